"""Logging for the command lines: one handler on stderr for the `sdrun` and `sdexport`
loggers, its level set by -v/--verbose and -q/--quiet. Library code only logs
(`logging.getLogger(__name__)`); an embedding service configures logging its own way."""
from __future__ import annotations

import logging
import sys

PACKAGES = ("sdrun", "sdexport")
_HANDLER_NAME = "sdrun-cli"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbosity: int = 0) -> None:
    """INFO by default; DEBUG with verbosity > 0; WARNING with verbosity < 0 (--quiet).
    Idempotent: a second call only changes the level."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
            handler = _StderrHandler(sys.stderr)
            handler.set_name(_HANDLER_NAME)
            handler.setFormatter(logging.Formatter("%(message)s" if verbosity <= 0 else
                                                   "%(asctime)s %(name)s %(levelname)s: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
