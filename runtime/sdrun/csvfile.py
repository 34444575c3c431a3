"""Reading the CSVs people bring: UTF-8 with or without a byte-order mark, UTF-16 with
one (Excel's "Unicode text"), comma-, semicolon- or tab-separated, headers with stray
spaces. Anything else is a `CsvError` that names the file and the line."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

from .errors import SpotdiffError

DELIMITERS = (",", ";", "\t")

# The three label columns, defined here once for every layer: a result's fields, their
# CSV columns, and the header of a submission (and of a label CSV).
COLUMNS = ("added", "removed", "changed")
LABEL_COLUMNS = tuple(f"{c}_objs" for c in COLUMNS)  # added_objs, removed_objs, changed_objs
SUBMISSION_COLUMNS = ("img_id", *LABEL_COLUMNS)


class CsvError(SpotdiffError):
    """A CSV that cannot be read; the message names the file (and the line)."""


def _decode(path: Path, data: bytes, role: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise CsvError(f"{path}{role}: starts like UTF-16 text but is not ({e.reason})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CsvError(f"{path}{role}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                       "save it as UTF-8 CSV") from None


def read_csv(path: str | Path, role: str = "") -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """(column names, stripped; rows as (line number, {column: cell})): blank rows
    skipped, missing cells absent, surplus cells as a list under the key None. `role`
    (e.g. "truth") is named in errors beside the path."""
    path = Path(path)
    where = f" ({role})" if role else ""
    if path.is_dir():
        raise CsvError(f"{path}{where}: is a folder, not a CSV file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CsvError(f"{path}{where}: no such file") from None
    except OSError as e:
        raise CsvError(f"{path}{where}: cannot be read ({e.strerror or e})") from None
    text = _decode(path, data, where)
    header = text.split("\n", 1)[0]
    delimiter = next((d for d in DELIMITERS if d in header), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        names = [c.strip() for c in next(reader, [])]
    except csv.Error as e:
        raise CsvError(f"{path}{where}: line 1: {e}") from None

    def rows():
        try:
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                row: dict = dict(zip(names, cells))  # (str keys, and None for the surplus)
                if len(cells) > len(names):
                    row[None] = cells[len(names):]  # as csv.DictReader's restkey
                yield reader.line_num, row
        except csv.Error as e:
            raise CsvError(f"{path}{where}: line {reader.line_num}: {e}") from None

    return names, rows()
