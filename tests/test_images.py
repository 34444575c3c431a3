"""sdrun.stages.images: loading files and checking arrays (OpenCV + numpy; no torch, no Pillow)."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from sdrun.errors import SpotdiffError
from sdrun.stages.images import ImageError, as_rgb, load_image

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (23, 31, 3), dtype=np.uint8)


def _write(path, rgb_or_grey, ext=".png", params=()):
    """Write with cv2 (which wants BGR)."""
    arr = rgb_or_grey
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(arr), list(params))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _png(width, height, color_type, bit_depth, rows, plte=None, trns=None):
    """A hand-made PNG (cv2 cannot write palette or grey+alpha PNGs)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth,
                                                          color_type, 0, 0, 0))
    if plte is not None:
        out += chunk(b"PLTE", plte)
    if trns is not None:
        out += chunk(b"tRNS", trns)
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ---- good files --------------------------------------------------------------------------

def test_rgb_png_round_trip(tmp_path):
    img = load_image(_write(tmp_path / "a.png", RGB))
    assert img.dtype == np.uint8 and img.shape == (23, 31, 3) and img.flags.c_contiguous
    assert np.array_equal(img, RGB)


def test_str_path_and_unicode_name(tmp_path):
    path = _write(tmp_path / "bild-ü.png", RGB)
    assert np.array_equal(load_image(str(path)), RGB)


def test_sixteen_bit_png_scaled_by_rounding(tmp_path):
    v = np.array([[0, 128, 129, 257, 385, 386, 65535, 65407]], np.uint16)
    rgb16 = np.stack([v, v[:, ::-1], np.full_like(v, 1000)], axis=-1)
    img = load_image(_write(tmp_path / "a.png", rgb16))
    expect = np.floor(rgb16 / 257 + 0.5).astype(np.uint8)
    assert img.dtype == np.uint8
    assert np.array_equal(img, expect)
    assert img[0, :, 0].tolist() == [0, 0, 1, 1, 1, 2, 255, 255]


def test_sixteen_bit_grey(tmp_path):
    grey = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    img = load_image(_write(tmp_path / "g16.png", grey))
    assert img.shape == (3, 4, 3)
    expect = np.floor(grey / 257 + 0.5).astype(np.uint8)
    for c in range(3):
        assert np.array_equal(img[:, :, c], expect)


def test_grey_png_becomes_three_channels(tmp_path):
    grey = RNG.integers(0, 256, (9, 7), dtype=np.uint8)
    img = load_image(_write(tmp_path / "g.png", grey))
    assert img.shape == (9, 7, 3)
    assert all(np.array_equal(img[:, :, c], grey) for c in range(3))


def test_rgba_alpha_is_dropped_not_composited(tmp_path):
    alpha = np.zeros((23, 31, 1), np.uint8)  # fully transparent: colours must survive
    img = load_image(_write(tmp_path / "a.png", np.concatenate([RGB, alpha], axis=2)))
    assert img.shape == (23, 31, 3)
    assert np.array_equal(img, RGB)


def test_grey_alpha_png(tmp_path):
    path = tmp_path / "ga.png"
    path.write_bytes(_png(2, 1, 4, 8, [[10, 200, 20, 0]]))  # (grey, alpha) pairs
    img = load_image(path)
    assert img.shape == (1, 2, 3)
    assert img[0].tolist() == [[10, 10, 10], [20, 20, 20]]


def test_palette_png_expanded(tmp_path):
    path = tmp_path / "p.png"
    path.write_bytes(_png(3, 1, 3, 8, [[0, 1, 2]], plte=bytes([255, 0, 0, 0, 0, 255, 9, 8, 7])))
    assert load_image(path)[0].tolist() == [[255, 0, 0], [0, 0, 255], [9, 8, 7]]


def test_palette_png_with_transparency(tmp_path):
    path = tmp_path / "pt.png"
    path.write_bytes(_png(2, 1, 3, 8, [[0, 1]], plte=bytes([255, 0, 0, 0, 0, 255]),
                          trns=bytes([0])))
    assert load_image(path)[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_jpeg(tmp_path):
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[..., 0] = np.linspace(0, 255, 48, dtype=np.uint8)[None]
    smooth[..., 1] = 128
    smooth[..., 2] = np.linspace(255, 0, 32, dtype=np.uint8)[:, None]
    path = _write(tmp_path / "a.jpg", smooth, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 98))
    img = load_image(path)
    assert img.shape == smooth.shape
    # lossy, but channels in the right order and close
    assert np.abs(img.astype(int) - smooth).mean() < 3
    assert img[0, -1, 0] > 200 and img[0, -1, 2] > 200 and img[-1, 0, 2] < 50


def test_jpeg_with_trailing_bytes_after_eoi(tmp_path):
    path = _write(tmp_path / "a.jpg", RGB, ".jpg")
    path.write_bytes(path.read_bytes() + b"some trailer\x00\x00")
    assert load_image(path).shape == RGB.shape


def test_jpeg_with_appended_data_holding_marker_bytes(tmp_path):
    # e.g. a "motion photo": a video appended after EOI, full of FF DA / FF D9 pairs
    path = _write(tmp_path / "a.jpg", RGB, ".jpg")
    path.write_bytes(path.read_bytes() + b"ftypmp42" + b"\x12\xff\xda\x00\x0c" * 50 + b"\xff\xda")
    assert load_image(path).shape == RGB.shape


@pytest.mark.parametrize("params", [(cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
                                    (cv2.IMWRITE_JPEG_RST_INTERVAL, 2)])
def test_progressive_and_restart_jpeg(tmp_path, params):
    path = _write(tmp_path / "a.jpg", RGB, ".jpg", params)
    assert load_image(path).shape == RGB.shape
    data = path.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[:len(data) * 3 // 4])
    _raises(cut, "truncated JPEG")


def test_bmp_and_other_cv2_formats(tmp_path):
    assert np.array_equal(load_image(_write(tmp_path / "a.bmp", RGB, ".bmp")), RGB)


# ---- bad files ---------------------------------------------------------------------------

def _raises(path, *words):
    with pytest.raises(ImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    assert isinstance(info.value, SpotdiffError)
    return msg


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.png", "no such file")


def test_folder(tmp_path):
    _raises(tmp_path, "folder")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _raises(path, "empty", "0 bytes")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, this is text\n")
    _raises(path, "not an image", "hello")


@pytest.mark.parametrize("keep", [0.99, 0.5, 40, 12])
def test_truncated_png(tmp_path, keep):
    data = _write(tmp_path / "full.png", RGB).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "cut.png"
    path.write_bytes(data[:n])
    _raises(path, "truncated PNG")


def test_png_without_iend_only(tmp_path):
    data = _write(tmp_path / "full.png", RGB).read_bytes()
    assert data.endswith(b"IEND\xaeB`\x82")
    path = tmp_path / "cut.png"
    path.write_bytes(data[:-12])
    _raises(path, "truncated PNG", "IEND")


@pytest.mark.parametrize("cut", [2, 100, 0.5])
def test_truncated_jpeg(tmp_path, cut):
    data = _write(tmp_path / "full.jpg", RGB, ".jpg").read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else len(data) - cut
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:n])
    _raises(path, "truncated JPEG")


def test_jpeg_header_only(tmp_path):
    path = tmp_path / "head.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    _raises(path, "truncated JPEG")


def test_zero_size_png(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(_png(0, 0, 2, 8, []))
    _raises(path)


def test_corrupt_png_data(tmp_path):
    data = bytearray(_write(tmp_path / "full.png", RGB).read_bytes())
    data[60:80] = b"\x00" * 20  # inside IDAT: chunk list intact, pixels undecodable
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    _raises(path)


def test_two_channel_image_is_refused(tmp_path):
    # cv2 turns grey+alpha PNGs into 4 channels; a 2-channel array can still come from
    # other formats (e.g. TIFF): as_rgb's check is what load_image relies on
    with pytest.raises(ValueError, match="channels 2"):
        as_rgb(np.zeros((4, 4, 2), np.uint8))


# ---- arrays ------------------------------------------------------------------------------

def test_as_rgb_passes_uint8_rgb_through():
    assert as_rgb(RGB) is RGB


def test_as_rgb_conversions():
    grey = RGB[:, :, 0]
    assert np.array_equal(as_rgb(grey), np.repeat(grey[:, :, None], 3, 2))
    assert np.array_equal(as_rgb(grey[:, :, None]), np.repeat(grey[:, :, None], 3, 2))
    rgba = np.concatenate([RGB, np.zeros_like(RGB[:, :, :1])], 2)
    assert np.array_equal(as_rgb(rgba), RGB)
    assert np.array_equal(as_rgb(RGB.astype(np.uint16) * 257), RGB)
    assert np.array_equal(as_rgb(RGB / 255.0), RGB)
    assert np.array_equal(as_rgb((RGB / 255.0).astype(np.float32)), RGB)
    assert as_rgb(RGB.tolist()).shape == RGB.shape
    assert as_rgb(np.full((2, 2), 1.0 + 1e-7))[0, 0, 0] == 255  # rounding noise is clipped
    strided = RGB[:, ::2]
    assert as_rgb(strided).flags.c_contiguous


@pytest.mark.parametrize("bad, words", [
    (np.zeros((4, 4, 5), np.uint8), "channels 5"),
    (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
    (np.zeros((4,), np.uint8), "shape"),
    (np.zeros((0, 4, 3), np.uint8), "no pixels"),
    (np.full((4, 4, 3), 256, np.int64), "0..255"),
    (np.full((4, 4, 3), -1, np.int32), "0..255"),
    (np.zeros((4, 4, 3), bool), "pixel type bool"),
    (np.full((4, 4, 3), 2.0), "0..1"),
    (np.full((4, 4, 3), -0.1), "0..1"),
    (np.full((4, 4, 3), np.nan), "NaN"),
    ("a string", "numpy array"),
])
def test_as_rgb_refuses(bad, words):
    with pytest.raises(ValueError, match=words):
        as_rgb(bad)
