"""Reading images into uint8 RGB arrays, with OpenCV and numpy only (no Pillow, no torch).

`load_image(path)` reads a file; `as_rgb(array)` checks and converts an array handed
over by an API user. Both return a C-contiguous uint8 array of shape (H, W, 3) in
RGB order.

Conventions (the same for both):
- 16-bit samples become 8-bit by rounding v / 257 (65535 -> 255, 128 -> 0, 129 -> 1).
- Grey (HxW or HxWx1) is repeated into 3 channels.
- An alpha channel (grey+alpha, RGBA, a palette with transparency) is DROPPED, not
  composited onto a background: a transparent pixel shows the colour it stores, as
  `PIL.Image.open(p).convert("RGB")` does.
- Palette PNGs are expanded to their colours.
- Pixels are taken as stored: an EXIF orientation tag is NOT applied (a phone photo
  saved sideways stays sideways), again as `PIL.Image.open(p)` without `exif_transpose`.

Files are read whole and decoded with `cv2.imdecode(..., cv2.IMREAD_UNCHANGED)`, so any
format OpenCV reads works (PNG, JPEG, BMP, TIFF, WebP, ...). PNG and JPEG files are
also checked for truncation, which a decoder may otherwise half-paint silently: a PNG
must have its chunks complete up to IEND, a JPEG its segments and scans complete up to
the end-of-image marker (FF D9). Bytes after the end are allowed.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

from ..errors import SpotdiffError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


class ImageError(SpotdiffError):
    """An image file that cannot be used: missing, empty, truncated, not an image, ..."""


# ---- files -----------------------------------------------------------------------------

def load_image(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as uint8 RGB (H, W, 3). Raises ImageError naming the file."""
    path = Path(path)
    return decode_image(_read_bytes(path), str(path))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) as uint8 RGB (H, W, 3). Raises ImageError
    starting with `name` (a file, or a form field of a request)."""
    if not data:
        raise ImageError(f"{name}: is empty (0 bytes), not an image")
    _check_complete(name, data)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # e.g. an image over OpenCV's pixel limit
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise ImageError(f"{name}: cannot be decoded ({reason})") from None
    if img is None:
        raise ImageError(f"{name}: not an image OpenCV can read ({_describe(data)}, "
                         f"{len(data)} bytes), or a damaged one")
    try:
        return _to_rgb(img, bgr=True)
    except ValueError as e:
        raise ImageError(f"{name}: {e}") from None


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    try:
        data = np.fromfile(str(path), dtype=np.uint8).tobytes()
    except PermissionError:
        raise ImageError(f"{path}: cannot be read (permission denied)") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise ImageError(f"{path}: is empty (0 bytes), not an image")
    return data


def _describe(data: bytes) -> str:
    head = data[:16]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"it starts with text {head.decode('ascii', 'replace')!r}"
    return f"it starts with bytes {head[:8].hex(' ')}"


def _check_complete(path, data: bytes) -> None:
    if data.startswith(PNG_SIGNATURE):
        problem = _png_problem(data)
    elif data.startswith(JPEG_SIGNATURE):
        problem = _jpeg_problem(data)
    else:
        return
    if problem:
        raise ImageError(f"{path}: {problem}")


def _png_problem(data: bytes) -> str | None:
    """Walk the chunk list: every chunk must be whole, and IEND must be reached."""
    pos, n = len(PNG_SIGNATURE), len(data)
    while True:
        if pos + 8 > n:
            return f"truncated PNG ({n} bytes): the file ends before its IEND chunk"
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length  # length, type, data, CRC
        if end > n:
            name = kind.decode("latin-1", "replace")
            return (f"truncated PNG ({n} bytes): its {name!r} chunk needs {end - n} more "
                    "bytes and the IEND chunk is missing")
        if kind == b"IEND":
            return None
        pos = end


def _jpeg_problem(data: bytes) -> str | None:
    """Walk the markers from SOI to EOI, skipping each segment by its length and each
    scan's entropy-coded data (where 0xFF is always followed by 0x00 or a restart marker).
    Bytes after EOI are allowed (phones append thumbnails, videos, ...). A layout this walk
    does not understand is left to the decoder."""
    n = len(data)
    truncated = f"truncated JPEG ({n} bytes): the file ends before its end-of-image marker"
    pos = 2  # after SOI
    while True:
        if pos >= n:
            return truncated
        if data[pos] != 0xFF:
            return None  # not where a marker should be: let the decoder judge
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return truncated
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            continue
        if pos + 2 > n:
            return truncated
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return None
        pos += length
        if pos > n:
            return truncated
        if marker == 0xDA:  # start of scan: skip the entropy-coded data
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return truncated
                nxt = data[pos + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                    pos += 2
                    continue
                break


# ---- arrays ----------------------------------------------------------------------------

def as_rgb(image) -> np.ndarray:
    """An array from an API user as uint8 RGB (H, W, 3).

    Accepts uint8, uint16 (scaled by 1/257 with rounding), other integer types holding
    0..255, and floating point in 0..1 (times 255, rounded); shapes (H, W), (H, W, 1),
    (H, W, 3) and (H, W, 4) (alpha dropped). Channels are taken to be RGB(A) already.
    Raises ValueError otherwise.
    A uint8 (H, W, 3) C-contiguous array is returned as is (not copied)."""
    if not isinstance(image, np.ndarray):
        if hasattr(image, "__array__") or isinstance(image, (list, tuple)):
            image = np.asarray(image)
        else:
            raise ValueError(f"expected an image as a numpy array, got {type(image).__name__}")
    return _to_rgb(image, bgr=False)


def _to_rgb(img: np.ndarray, bgr: bool) -> np.ndarray:
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or "
                         f"(H, W, 4), got shape {tuple(img.shape)}")
    h, w, c = img.shape
    if h < 1 or w < 1:
        raise ValueError(f"the image has no pixels (size {w}x{h})")
    if c not in (1, 3, 4):
        hint = " (grey + alpha as 2 channels is not accepted: drop the alpha)" if c == 2 else ""
        raise ValueError(f"unsupported number of channels {c} (shape {tuple(img.shape)}); "
                         f"expected 1 (grey), 3 (RGB) or 4 (RGBA){hint}")
    img = _to_uint8(img)
    if c == 1:
        img = np.repeat(img, 3, axis=2)
    elif bgr:
        img = img[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped
    elif c == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        x = img.astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError("the float image has NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        tol = 0.5 / 255  # half a grey level of rounding noise is accepted (and clipped)
        if lo < -tol or hi > 1 + tol:
            raise ValueError(f"a float image must hold values in 0..1, this one has "
                             f"{lo:.4g}..{hi:.4g}; for 0..255 data pass .astype(np.uint8)")
        return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(img.dtype, np.integer):  # e.g. int64 from a nested list: 0..255 only
        lo, hi = int(img.min()), int(img.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"an integer image of type {img.dtype} must hold values in 0..255, "
                             f"this one has {lo}..{hi} (16-bit data: pass it as uint16)")
        return img.astype(np.uint8)
    raise ValueError(f"unsupported pixel type {img.dtype}: expected uint8, uint16, other "
                     "integers in 0..255 or float in 0..1")

