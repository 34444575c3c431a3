"""spotdiff's version (also `sdrun.__version__`; recorded in run records and manifests)."""
__version__ = "0.1.0"
