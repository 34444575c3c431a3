"""`sdrun score`, `sdrun eval`, `sdrun tune`."""
from __future__ import annotations


def register(group) -> None:
    """Add this module's commands to the `sdrun` group."""
