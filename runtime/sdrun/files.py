"""Writing outputs without harming inputs, for every command that writes.

- `atomic_write`: a file appears whole or not at all (its folder made if missing); the one
  way every command writes a file that is read back or handed to the user.
- `atomic_path`: the same for writers that need a path (torch.save, onnxruntime's
  optimised-graph file): a temporary file beside the target, moved into place whole.
- `check_output_paths`: an output file that is an input, lies in a protected folder (a
  bundle) or is another output of the same command is refused before anything runs.
- `check_output_folder`: a folder a command creates or replaces whole (a bundle, a training
  run) is refused when it holds anything the command did not write, or an input.
- `pair_id_problem` / `id_file_stem`: an id read from a CSV (or a request) is a name, never
  a path: ids that could reach outside a folder are refused, and file names made from ids
  are plain names.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from .errors import SpotdiffError


class OutputPathError(SpotdiffError):
    """An output path that would overwrite an input or another output."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; best effort (some systems cannot open or fsync a
    folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # Linux: read without changing it (os.umask sets it for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_beside(path: Path, suffix: str) -> tuple[int, Path]:
    """A new temporary file beside `path` (its folder made if missing), with the permissions
    a plain `open(path, "w")` would give (mkstemp's own are owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError:  # a file system without permissions
        pass
    return fd, Path(tmp)


def _move_into_place(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to a temporary file of this process beside `path`, flush it to disk, then
    move it into place: a reader never sees half a file (not even after a crash), and two
    processes never share a temp file."""
    path = Path(path)
    fd, tmp = _temp_beside(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """`atomic_write` for writers that need a path: yields a new, empty temporary file beside
    `path` (named `.<name>.<random><suffix>`; give a suffix ending in the extension when the
    writer picks its format by it) for the block to write in full; when the block ends
    without an exception the file is flushed to disk and moved to `path`, else deleted.
    Data that is already in memory goes through `atomic_write`."""
    path = Path(path)
    fd, tmp = _temp_beside(path, suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _move_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def is_inside(path: Path, folder: Path) -> bool:
    p, d = _key(path), _key(folder)
    return p == d or d in p.parents


def check_output_folder(folder: str | Path, what: str,
                        owned: Callable[[Path], Iterable[str]] | None = None,
                        inputs: Iterable[tuple[str, str | Path | None]] = (),
                        hint: str = "") -> None:
    """Refuse (OutputPathError) a folder that a command creates or replaces whole, when
    writing it could lose something the user has: it is a file; an input is it or lies
    inside it; or it holds a file that `owned(folder)` (relative POSIX paths: what an
    earlier run of the command wrote there) does not list, or any link (the command writes
    files, never through links). `owned` None: the folder must be
    absent or empty. `hint` ends the message (e.g. which flag allows reuse)."""
    folder = Path(folder)
    for what_in, q in inputs:
        if q is not None and is_inside(Path(q), folder):
            raise OutputPathError(f"{what} {folder} would replace {what_in} {q}, which lies "
                                  "inside it; choose another output folder")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputPathError(f"{what} {folder} is a file, not a folder; choose another path")
    known = set(owned(folder)) if owned is not None else set()
    foreign = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_symlink() or (p.is_file() and p.relative_to(folder).as_posix() not in known))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputPathError(f"{what} {folder} holds files this command did not write ({shown}); "
                              f"writing there could replace them: choose an empty or new folder{hint}")


def replace_folder(new: Path, folder: Path, owned: Callable[[Path], Iterable[str]] | None = None,
                   inputs: Iterable[tuple[str, str | Path | None]] = (), what: str = "--out") -> None:
    """Move the finished folder `new` to `folder`, replacing what an earlier run wrote there:
    checked again (`check_output_folder`: files may have appeared since the start), the old
    folder moved aside, the new one renamed into place, then the old one deleted; so
    `folder` is never missing or half written."""
    import shutil

    folder = Path(folder)
    check_output_folder(folder, what, owned=owned, inputs=inputs)
    if not folder.exists():
        os.replace(new, folder)
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    os.replace(folder, old / folder.name)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


# A pair id becomes part of file names ({id}_1.png, {id}.png): it may hold no path
# separator, no NUL or other control character, and fit in a file name.
_ID_FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")
MAX_ID_LENGTH = 200


def pair_id_problem(pair_id: str) -> str | None:
    """Why `pair_id` cannot name files (None: it can). Ids are names, never paths."""
    if not pair_id:
        return "an empty id"
    if _ID_FORBIDDEN.search(pair_id):
        return (f"id {pair_id!r} holds a path separator or control character: ids are file "
                "names, not paths")
    if len(pair_id.encode()) > MAX_ID_LENGTH:
        return f"id {pair_id[:40]!r}... is longer than {MAX_ID_LENGTH} bytes"
    return None


def id_file_stem(pair_id: str) -> str:
    """A plain file name stem for an id: the id itself when it is made of letters, digits,
    '.', '_' and '-' (and does not start with '.'), else its safe characters plus a short
    hash of the id (two ids never share a stem)."""
    pair_id = str(pair_id)
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}", pair_id):
        return pair_id
    digest = hashlib.sha256(pair_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', pair_id)[:60]}-{digest}"
