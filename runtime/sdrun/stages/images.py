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

Files are read whole and decoded with `cv2.imdecode(..., cv2.IMREAD_UNCHANGED)`. The
formats accepted are PNG, JPEG, BMP, TIFF, WebP and GIF, told by their first bytes (not by
the file name); anything else is refused, even a format OpenCV could decode (PPM, Sun
raster, JPEG 2000, AVIF, ...), because only for these is the image size read before
decoding. PNG and JPEG files are also checked for truncation, which a decoder may otherwise
half-paint silently: a PNG must have its chunks complete up to IEND, a JPEG its segments
and scans complete up to the end-of-image marker (FF D9). Bytes after the end are allowed.

Size limits, checked from the header BEFORE decoding (`image_size_from_header`), since a
tiny file can declare a huge image (a 62 KB PNG of 8000x8000 costs seconds and 1.5 GB to
decode):
- `max_pixels` (default `DEFAULT_MAX_PIXELS`, 60 megapixels: the full-resolution output
  of 48 and 50 megapixel phone cameras, 8192x6144 = 50.3 MP, passes; 8000x8000 does not);
  the command line's `--max-pixels`. None: no limit.
- `max_aspect` (default `DEFAULT_MAX_ASPECT`, 100:1): the longer side over the shorter.
  Preprocessing resizes the shorter side to a model's size, so a 1x40000 image (a few
  hundred bytes) would be stretched to 224x8960000 (seconds, gigabytes). None: no limit.
- A width or height of 0 is refused, and so is an image over OpenCV's own limits
  (`CV_IO_MAX_IMAGE_PIXELS`, 2**30 pixels, and 2**20 per side unless those environment
  variables say otherwise), with a message rather than an OpenCV assertion.
Multi-image files are sized as OpenCV decodes them: a TIFF by its first page, an animated
GIF, WebP or PNG by its canvas (the logical screen, VP8X canvas, IHDR).
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import cv2
import numpy as np

from ..errors import SpotdiffError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"

DEFAULT_MAX_PIXELS = 60_000_000  # per image; --max-pixels
DEFAULT_MAX_ASPECT = 100.0  # longer side / shorter side
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WebP", "GIF")  # what image_format can answer


class ImageError(SpotdiffError):
    """An image file that cannot be used: missing, empty, truncated, not an image, ..."""


# ---- files -----------------------------------------------------------------------------

def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_aspect: float | None = DEFAULT_MAX_ASPECT) -> np.ndarray:
    """The image at `path` as uint8 RGB (H, W, 3). Raises ImageError naming the file, also
    for an image over `max_pixels` or `max_aspect` (see `decode_image`)."""
    path = Path(path)
    return decode_image(_read_bytes(path), str(path), max_pixels=max_pixels, max_aspect=max_aspect)


def decode_image(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_aspect: float | None = DEFAULT_MAX_ASPECT) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, BMP, TIFF, WebP or GIF) as uint8 RGB (H, W, 3).
    Raises ImageError starting with `name` (a file, or a form field of a request).

    The size is read from the header first, and an image of more than `max_pixels` pixels
    (None: no limit), with a longer side more than `max_aspect` times its shorter one (None:
    no limit), with no pixels, or over OpenCV's limits is refused without decoding it. Data
    in any other format is refused too: its size cannot be known before decoding."""
    if not data:
        raise ImageError(f"{name}: is empty (0 bytes), not an image")
    kind = image_format(data)
    if kind is None:
        raise ImageError(f"{name}: not an image sdrun reads ({_describe(data)}, {len(data)} "
                         "bytes): not a PNG, JPEG, BMP, TIFF, WebP or GIF image")
    _check_complete(name, data)
    size = image_size_from_header(data)
    if size is None:
        raise ImageError(f"{name}: a damaged or truncated {kind} ({len(data)} bytes): its "
                         "header does not give the image size")
    check_image_size(size, name, max_pixels=max_pixels, max_aspect=max_aspect)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise ImageError(f"{name}: cannot be decoded ({reason})") from None
    if img is None:
        raise ImageError(f"{name}: not an image OpenCV can read ({_describe(data)}, "
                         f"{len(data)} bytes), or a damaged one")
    if img.ndim >= 2 and (img.shape[1], img.shape[0]) != size:  # never seen; limits still hold
        check_image_size((img.shape[1], img.shape[0]), name, max_pixels=max_pixels,
                         max_aspect=max_aspect)
    try:
        return _to_rgb(img, bgr=True)
    except ValueError as e:
        raise ImageError(f"{name}: {e}") from None


def check_image_size(size: tuple[int, int], name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     max_aspect: float | None = DEFAULT_MAX_ASPECT) -> None:
    """Raises ImageError (starting with `name`) when an image of `size` (width, height)
    must not be decoded: no pixels, over `max_pixels`, more elongated than `max_aspect`:1,
    or over OpenCV's own limits."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: the image has no pixels (its header says {w}x{h})")
    pixels = w * h
    if max_pixels is not None and pixels > max_pixels:
        amount, limit = _amount(pixels), _amount(max_pixels)
        if amount == limit:  # "3.0 megapixels, over the limit of 3.0 megapixels"
            amount, limit = f"{pixels} pixels", f"{max_pixels} pixels"
        raise ImageError(f"{name}: the image is {w}x{h} = {amount}, over the limit of "
                         f"{limit} (--max-pixels {max_pixels}); refused before "
                         "decoding. Shrink the image, or raise the limit with --max-pixels "
                         "(max_pixels= from Python)")
    if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
        raise ImageError(f"{name}: the image is {w}x{h}, an aspect ratio of "
                         f"{max(w, h) / min(w, h):.4g}:1, over the limit of {max_aspect:g}:1 "
                         "(stretching its shorter side to a model's size would cost far more "
                         "than its pixels)")
    cv_pixels, cv_width, cv_height = _opencv_limits()
    if pixels > cv_pixels or w > cv_width or h > cv_height:
        raise ImageError(f"{name}: the image is {w}x{h} = {_amount(pixels)}, over OpenCV's "
                         f"limits ({_amount(cv_pixels)}, {cv_width} wide, {cv_height} high; the "
                         "environment variables CV_IO_MAX_IMAGE_PIXELS, CV_IO_MAX_IMAGE_WIDTH "
                         "and CV_IO_MAX_IMAGE_HEIGHT set them)")


def _amount(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels" if pixels >= 100_000 else f"{pixels} pixels"


def _opencv_limits() -> tuple[int, int, int]:
    """OpenCV's imgcodecs limits (read from the environment as OpenCV does, defaults
    2**30 pixels and 2**20 per side)."""
    def env(var: str, default: int) -> int:
        try:
            return int(os.environ.get(var, "")) or default
        except ValueError:
            return default
    return (env("CV_IO_MAX_IMAGE_PIXELS", 1 << 30), env("CV_IO_MAX_IMAGE_WIDTH", 1 << 20),
            env("CV_IO_MAX_IMAGE_HEIGHT", 1 << 20))


# ---- headers ---------------------------------------------------------------------------

def image_format(data: bytes) -> str | None:
    """"PNG", "JPEG", "BMP", "TIFF", "WebP" or "GIF" from the first bytes (the signature
    only; the rest may still be damaged), or None for anything else. Never raises."""
    try:
        head = bytes(data[:16])
    except (TypeError, ValueError):  # not bytes-like
        return None
    if head.startswith(PNG_SIGNATURE):
        return "PNG"
    if head.startswith(JPEG_SIGNATURE):
        return "JPEG"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic, BigTIFF
        return "TIFF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an encoded image, read from its header only (no decoding; cost
    independent of the image size), or None when it cannot be read: not one of the
    formats of `image_format`, or a header that is truncated or damaged. Never raises
    (garbage of any kind gives None); a header declaring a width or height of 0 gives it
    as is.

    PNG: IHDR (an APNG's canvas). JPEG: the first SOFn (or DHP) frame header, walking the
    segments (APPn, DQT, ...) by their lengths and skipping 0xFF fill bytes. BMP: the
    BITMAPINFOHEADER family or the old BITMAPCOREHEADER; a negative height (top-down) is
    given as positive. TIFF, either byte order, also BigTIFF: ImageWidth (256) and
    ImageLength (257) of the first IFD, SHORT or LONG (the first page, which OpenCV
    decodes). WebP: VP8 (lossy), VP8L (lossless) or VP8X (extended, animated: the canvas).
    GIF: the logical screen (what OpenCV decodes; a frame outside it is a decode error)."""
    try:
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        fmt = image_format(data)
        parse = _HEADER_PARSERS.get(fmt) if fmt else None
        return parse(data) if parse else None
    except (struct.error, IndexError, ValueError, TypeError, OverflowError):  # a safety net
        return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[8:16] != b"\x00\x00\x00\x0dIHDR":  # IHDR must come first
        return None
    w, h = struct.unpack_from(">II", data, 16)
    return w, h


_JPEG_FILL = re.compile(rb"\xff+")
# SOF0..SOF15 without DHT (C4), JPG (C8), DAC (CC); DHP (DE) and JPEG-LS SOF55 (F7) share
# the layout: length, precision, height, width
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7}
_JPEG_MAX_SEGMENTS = 10_000  # before the frame header; real files have a few dozen


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos, n = 2, len(data)
    for _ in range(_JPEG_MAX_SEGMENTS):
        fill = _JPEG_FILL.match(data, pos)
        if fill is None:
            return None  # not a marker where one must be
        pos = fill.end()
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker in _JPEG_FRAMES:
            if pos + 7 > n:
                return None
            h, w = struct.unpack_from(">HH", data, pos + 3)
            return w, h
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            continue
        if marker in (0x00, 0xD9, 0xDA):  # stuffing, EOI, a scan before any frame header
            return None
        if pos + 2 > n:
            return None
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return None
        pos += length
    return None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 18:
        return None
    dib = struct.unpack_from("<I", data, 14)[0]
    if dib == 12:  # BITMAPCOREHEADER (OS/2 1.x): unsigned 16-bit
        if len(data) < 22:
            return None
        w, h = struct.unpack_from("<HH", data, 18)
        return w, h
    if dib < 16 or len(data) < 26:
        return None
    w, h = struct.unpack_from("<ii", data, 18)  # BITMAPINFOHEADER, V4, V5, OS/2 2.x
    if w < 0:
        return None
    return w, abs(h)  # negative: rows stored top-down


_TIFF_TYPES = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8 (BigTIFF)


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 8:
        return None
    e = "<" if data[:2] == b"II" else ">"
    big = struct.unpack_from(e + "H", data, 2)[0] == 43
    if big:  # BigTIFF: offset size 8, 0, first IFD offset (8 bytes); entries of 20 bytes
        if len(data) < 16:
            return None
        offset = struct.unpack_from(e + "Q", data, 8)[0]
        count_fmt, entry_fmt, entry_size, value_at = "Q", "HHQ", 20, 12
    else:
        offset = struct.unpack_from(e + "I", data, 4)[0]
        count_fmt, entry_fmt, entry_size, value_at = "H", "HHI", 12, 8
    count_size = struct.calcsize(count_fmt)
    if offset < 8 or offset + count_size > len(data):
        return None
    entries = struct.unpack_from(e + count_fmt, data, offset)[0]
    start = offset + count_size
    entries = min(entries, (len(data) - start) // entry_size)  # a truncated IFD: what is there
    found = {}
    for i in range(min(entries, 65535)):
        at = start + i * entry_size
        tag, kind, n = struct.unpack_from(e + entry_fmt, data, at)
        if tag in (256, 257) and n == 1 and kind in _TIFF_TYPES:
            found[tag] = struct.unpack_from(e + _TIFF_TYPES[kind], data, at + value_at)[0]
            if len(found) == 2:
                return found[256], found[257]
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 30:  # RIFF header (12) + chunk header (8) + the shortest size field
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":  # frame tag (3), start code 9D 01 2A, 14-bit width and height
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":  # signature 0x2F, then 14 bits width - 1, 14 bits height - 1
        if data[20] != 0x2F:
            return None
        bits = struct.unpack_from("<I", data, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # flags (1), reserved (3), 24-bit canvas width - 1, height - 1
        return (int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1)
    return None


def _gif_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 10:
        return None
    w, h = struct.unpack_from("<HH", data, 6)
    return w, h


_HEADER_PARSERS = {"PNG": _png_size, "JPEG": _jpeg_size, "BMP": _bmp_size, "TIFF": _tiff_size,
                   "WebP": _webp_size, "GIF": _gif_size}


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
    does not understand is left to the decoder, and so is a file of more than
    _JPEG_MAX_SEGMENTS markers (real files have a few dozen; the walk must stay cheap on
    hostile ones: fill bytes and entropy-coded data are skipped by regular expressions)."""
    n = len(data)
    truncated = f"truncated JPEG ({n} bytes): the file ends before its end-of-image marker"
    pos = 2  # after SOI
    for _ in range(_JPEG_MAX_SEGMENTS):
        if pos >= n:
            return truncated
        fill = _JPEG_FILL.match(data, pos)
        if fill is None:
            return None  # not where a marker should be: let the decoder judge
        pos = fill.end()
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
            end = _JPEG_SCAN_END.search(data, pos)
            if end is None or end.start() + 1 >= n:
                return truncated
            pos = end.start()
    return None


# in entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker;
# anything else (or nothing) ends the scan
_JPEG_SCAN_END = re.compile(rb"\xff(?![\x00\xd0-\xd7])")


# ---- arrays ----------------------------------------------------------------------------

def as_rgb(image: np.ndarray) -> np.ndarray:
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

