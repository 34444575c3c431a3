"""`python -m sdrun.cli`: the same as the `sdrun` command."""
from .main import main

main()
