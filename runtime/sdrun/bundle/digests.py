"""sha256 of bundle files, remembered across processes.

A full bundle is a few GB; hashing it on every load costs seconds (2.2 GB: ~2 s here) and
dominates `sdrun`'s cold start. Once a file has been hashed, its digest is stored in a small
JSON file under the user's cache folder, keyed by the file's absolute path and its stat
signature: device, inode, size, mtime_ns and ctime_ns. Any write to the file, a `touch`,
a `cp` over it or a rename onto it changes that signature (ctime cannot be set back from
user space), so the file is hashed again. A cached digest is only ever used to *confirm*
the manifest's value; a mismatch is always reported from a fresh hash.

The cache lives in `$SPOTDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/spotdiff`, else
`~/.cache/spotdiff`. `SPOTDIFF_DIGEST_CACHE=0` turns it off (every load hashes). Failing
to read or write it is never an error: the files are then simply hashed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..files import atomic_write

CACHE_FILE = "verified-digests.json"
MAX_ENTRIES = 4096


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    if os.environ.get("SPOTDIFF_CACHE_DIR"):
        return Path(os.environ["SPOTDIFF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spotdiff"


def enabled() -> bool:
    return os.environ.get("SPOTDIFF_DIGEST_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def signature(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class DigestCache:
    """Digests of files whose stat signature has not changed since they were hashed."""

    def __init__(self, path: Path | None = None, enabled_: bool | None = None):
        self.enabled = enabled() if enabled_ is None else enabled_
        self.path = path or cache_dir() / CACHE_FILE
        self.entries: dict[str, dict] = {}
        self.dirty = False
        self.hashed = 0  # files hashed by this instance (for tests and timings)
        if self.enabled:
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict):
                    self.entries = {k: v for k, v in data.items() if isinstance(v, dict)}
            except (OSError, ValueError):
                pass

    def sha256(self, path: Path) -> str:
        """The file's sha256: the remembered one when its signature is unchanged."""
        key = str(Path(path).resolve())
        sig = signature(path) if self.enabled else None
        entry = self.entries.get(key)
        if sig is not None and entry and entry.get("sig") == sig and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = sha256_file(path)
        self.hashed += 1
        if self.enabled and sig == signature(path):  # unchanged while it was read
            self.entries[key] = {"sig": sig, "sha256": digest}
            self.dirty = True
        return digest

    def forget(self, path: Path) -> None:
        if self.entries.pop(str(Path(path).resolve()), None) is not None:
            self.dirty = True

    def save(self) -> None:
        if not (self.enabled and self.dirty):
            return
        entries = self.entries
        if len(entries) > MAX_ENTRIES:  # keep the newest: dicts keep insertion order
            entries = dict(list(entries.items())[-MAX_ENTRIES:])
        try:
            atomic_write(self.path, json.dumps(entries))
            self.dirty = False
        except OSError:
            pass
