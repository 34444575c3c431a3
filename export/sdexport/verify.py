"""The golden check of a built bundle, as the export side logs it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from sdrun.apps.check import check_bundle
from sdrun.bundle.bundle import Bundle

logger = logging.getLogger(__name__)


def verify(root: Path, log: Callable[[str], None] = logger.info) -> int:
    """Run the golden check; log one line per output; return the number of failures."""
    failures = 0
    for c in check_bundle(Bundle.load(root)):
        failures += not c.ok
        log(f"  check {c.model}/{c.graph}/{c.case}/{c.output}: rel_l2 {c.rel_l2:.2e} "
            f"max_abs {c.max_abs:.2e} (tol {c.tolerance:.0e}) {'ok' if c.ok else 'FAIL'}"
            f"{'  ' + c.note if c.note else ''}")
    return failures
