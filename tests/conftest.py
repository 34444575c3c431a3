"""Shared fixtures and helpers: one tiny bundle per test session, a torch-free subprocess
runner, the CLIs in this process, and file snapshots."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# Remembered bundle digests go to a per-session folder, never the user's ~/.cache.
os.environ["SPOTDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="spotdiff-test-cache-")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REAL_PAIRS = SHARED / "data" / "octwave" / "pairs"
TRAIN_CSV = SHARED / "data" / "octwave" / "train.csv"

# Imported first in a child process: any attempt to import these fails.
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "timm", "open_clip", "sdexport"}:
                raise ImportError(f"blocked in this test: {name}")
    sys.meta_path.insert(0, _Block())
""")


def run_without_torch(argv: list[str], cwd: Path | None = None, timeout: float = 600,
                      env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `sdrun ARGV` in a fresh process where importing torch (and friends) fails."""
    code = BLOCK_TORCH + textwrap.dedent(f"""
        sys.argv = ["sdrun"] + {argv!r}
        from sdrun.cli import main
        main()
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The tiny-random bundle with all four models (built once per test session)."""
    pytest.importorskip("torch")
    from sdexport.build import build_bundle, resolve_sources
    from sdrun.bundle.vocab import default_vocabulary

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_bundle(out, resolve_sources("tiny-random", {}), default_vocabulary(),
                 gdino_size=(256, 256), log=lambda s: None)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sdrun(*args):
    """`sdrun ARGS` in this process (click's runner); exceptions propagate."""
    from click.testing import CliRunner

    from sdrun.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


TRAIN_TINY = ["--backbone", "tiny-random", "--batch-size", "8", "--quiet"]


def train_change(*args):
    """`sdexport train-change ARGS` in this process."""
    from click.testing import CliRunner

    from sdexport.cli import main as sdexport

    return CliRunner().invoke(sdexport, ["train-change", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="session")
def train_pairs(tmp_path_factory) -> Path:
    """32 synthetic labelled pairs for the training tests (made once per session)."""
    from sdrun.apps.synth import write_synthetic_pairs

    out = tmp_path_factory.mktemp("train-pairs")
    write_synthetic_pairs(out, 32, seed=11)
    return out


def snapshot(*roots) -> dict[str, str]:
    """sha256 of every file under `roots` (files or folders): equal before and after means
    nothing there was changed."""
    out = {}
    for root in map(Path, roots):
        for p in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
