"""Writing outputs without harming inputs: atomic writes, and refusing an output path
that is one of the user's inputs or another output of the same command."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from .errors import SpotdiffError


class OutputPathError(SpotdiffError):
    """An output path that would overwrite an input or another output."""


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to a temporary file of this process beside `path`, then move it into
    place: a reader never sees half a file, and two processes never share a temp file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output_paths(outputs: Mapping[str, Path | None], inputs: Iterable[tuple[str, Path]] = (),
                       protected_dirs: Iterable[tuple[str, Path]] = ()) -> None:
    """OutputPathError (naming both paths) when an output is an input file, lies inside a
    protected folder (the bundle), or is the same file as another output.

    `outputs`: what each output is (e.g. "--out") -> its path (None: not written);
    `inputs` and `protected_dirs`: (what it is, path) pairs. Paths are compared after
    resolving links, and existing files also by inode (hard links)."""
    outs = [(what, Path(p)) for what, p in outputs.items() if p is not None]
    by_key: dict[object, str] = {}
    for what, p in outs:
        for k in (_key(p), _inode(p)):
            if k is None:
                continue
            if k in by_key:
                raise OutputPathError(f"{what} {p} is the same file as {by_key[k]}; "
                                      "give them different paths")
            by_key[k] = f"{what} {p}"
    for what_in, q in inputs:
        q = Path(q)
        hit = by_key.get(_key(q)) or by_key.get(_inode(q))
        if hit is not None:
            raise OutputPathError(f"{hit} would overwrite {what_in} {q}; "
                                  "choose an output path that is not one of the inputs")
    for what_dir, d in protected_dirs:
        d_key = _key(Path(d))
        for what, p in outs:
            if d_key == _key(p) or d_key in _key(p).parents:
                raise OutputPathError(f"{what} {p} lies inside {what_dir} {d}; write outputs "
                                      "elsewhere (every file of a bundle is checked against its "
                                      "manifest)")
