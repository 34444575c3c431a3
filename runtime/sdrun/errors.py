"""Errors the runtime reports to users: each names the thing that is wrong."""


class SpotdiffError(Exception):
    """Base class: a message fit to print without a traceback."""


class BundleError(SpotdiffError):
    """A bundle that cannot be used: missing, altered, escaping or unknown files."""


class ProviderError(SpotdiffError):
    """An execution provider that was asked for but is not available."""
