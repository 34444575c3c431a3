"""sdrun.stages.images: image sizes read from the header, and the limits checked with them
before decoding (a 62 KB PNG can declare 8000x8000 pixels)."""
from __future__ import annotations

import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from sdrun.stages.images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_image_size,
    decode_image,
    image_format,
    image_size_from_header,
    load_image,
)

RNG = np.random.default_rng(1)
SIZES = [(1, 1), (1, 37), (37, 1), (23, 31), (31, 23), (257, 129)]  # (width, height)


def _encode(ext, arr, params=()):
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(arr), list(params))
    assert ok
    return buf.tobytes()


def _decoded_wh(data):
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img.shape[1], img.shape[0]


def _same_size_everywhere(data, wh, kind):
    """The header, OpenCV and decode_image agree on (width, height)."""
    assert image_format(data) == kind
    assert image_size_from_header(data) == wh
    assert _decoded_wh(data) == wh
    assert decode_image(data, "x").shape == (wh[1], wh[0], 3)


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_zeros(width, height):
    """A valid, complete 1-bit grey PNG of zeros: 8000x8000 is under 10 KB."""
    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def _png_header_only(width, height):
    """IHDR, a token IDAT and IEND: complete chunks, so only the size can refuse it."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))


def _tiff(pages, order="<", size_type=3, big=False):
    """A hand-made uncompressed 8-bit grey TIFF (cv2 writes little-endian classic only):
    pages = [(width, height, pixel bytes)], each an IFD, chained in order."""
    o = order
    out = bytearray((b"II" if o == "<" else b"MM")
                    + (struct.pack(o + "HHHQ", 43, 8, 0, 0) if big else struct.pack(o + "HI", 42, 0)))
    first_at, links = (8, []) if big else (4, [])
    ifds = []
    for w, h, pix in pages:
        strip = len(out)
        out += pix + b"\x00" * (len(pix) % 2)
        entries = [(256, size_type, w), (257, size_type, h), (258, 3, 8), (259, 3, 1), (262, 3, 1),
                   (273, 4, strip), (277, 3, 1), (278, 4, h), (279, 4, len(pix))]
        ifds.append(len(out))
        out += struct.pack(o + ("Q" if big else "H"), len(entries))
        for tag, kind, value in entries:
            fmt = {3: "H", 4: "I"}[kind]
            field = struct.pack(o + fmt, value).ljust(8 if big else 4, b"\x00")
            out += struct.pack(o + ("HHQ" if big else "HHI"), tag, kind, 1) + field
        links.append(len(out))
        out += bytes(8 if big else 4)
    struct.pack_into(o + ("Q" if big else "I"), out, first_at, ifds[0])
    for at, nxt in zip(links, ifds[1:] + [0]):
        struct.pack_into(o + ("Q" if big else "I"), out, at, nxt)
    return bytes(out)


def _jpeg_segment(marker, payload):
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


# ---- the header size is the decoded size --------------------------------------------------

@pytest.mark.parametrize("wh", SIZES)
@pytest.mark.parametrize("ext, kind, params", [
    (".png", "PNG", ()), (".jpg", "JPEG", ()), (".bmp", "BMP", ()), (".tif", "TIFF", ()),
    (".webp", "WebP", (cv2.IMWRITE_WEBP_QUALITY, 80)),  # lossy: VP8
    (".webp", "WebP", (cv2.IMWRITE_WEBP_QUALITY, 101)),  # lossless: VP8L
    (".gif", "GIF", ()),
    (".jpg", "JPEG", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    (".jpg", "JPEG", (cv2.IMWRITE_JPEG_RST_INTERVAL, 1)),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_header_size_is_the_decoded_size(ext, kind, params, wh, channels):
    w, h = wh
    arr = RNG.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    if ext == ".gif" and channels == 1:  # OpenCV's GIF writer wants colour
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    data = _encode(ext, arr, params)
    _same_size_everywhere(data, wh, kind)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_sixteen_bit_and_alpha(ext):
    _same_size_everywhere(_encode(ext, RNG.integers(0, 65536, (5, 9, 4), dtype=np.uint16)), (9, 5),
                          image_format(_encode(ext, np.zeros((1, 1), np.uint8))))


def test_webp_lossless_chunk_and_big_sizes():
    data = _encode(".webp", np.zeros((11, 1000, 3), np.uint8), (cv2.IMWRITE_WEBP_QUALITY, 101))
    assert data[12:16] == b"VP8L"
    _same_size_everywhere(data, (1000, 11), "WebP")
    lossy = _encode(".webp", np.zeros((3000, 31, 3), np.uint8), (cv2.IMWRITE_WEBP_QUALITY, 50))
    assert lossy[12:16] == b"VP8 "
    _same_size_everywhere(lossy, (31, 3000), "WebP")


@pytest.mark.parametrize("ext, kind", [(".webp", "WebP"), (".gif", "GIF"), (".png", "PNG")])
def test_animations_are_sized_by_their_canvas(ext, kind):
    anim = cv2.Animation()
    anim.frames = [RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(3)]
    anim.durations = [100] * 3
    ok, buf = cv2.imencodeanimation(ext, anim)
    assert ok
    data = np.asarray(buf).tobytes()
    if kind == "WebP":
        assert data[12:16] == b"VP8X"
    _same_size_everywhere(data, (11, 9), kind)


def test_gif_is_decoded_at_its_logical_screen_size():
    data = bytearray(_encode(".gif", np.zeros((7, 5, 3), np.uint8)))
    data[6:10] = struct.pack("<HH", 50, 60)  # a screen larger than the only frame
    _same_size_everywhere(bytes(data), (50, 60), "GIF")


def test_jpeg_with_exif_app_segments_thumbnail_and_fill_bytes():
    arr = RNG.integers(0, 256, (21, 34, 3), dtype=np.uint8)
    plain = _encode(".jpg", arr)
    thumb = _encode(".jpg", np.zeros((4, 3, 3), np.uint8))  # its own SOF says 3x4
    exif_ifd = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + bytes(4)
    segments = (_jpeg_segment(0xE1, b"Exif\x00\x00" + exif_ifd + thumb)  # orientation 6 = rotate
                + _jpeg_segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + bytes(range(256)) * 40)
                + _jpeg_segment(0xED, b"Photoshop 3.0\x00" + b"\xff\xd9\xff\xc0\x00\x11" * 50)
                + _jpeg_segment(0xFE, b"a comment \xff\xc0"))
    sof = plain.index(b"\xff\xc0")
    data = plain[:2] + segments + plain[2:sof] + b"\xff\xff\xff" + plain[sof:]  # fill bytes
    assert image_size_from_header(thumb) == (3, 4)
    # IMREAD_UNCHANGED ignores the EXIF orientation: the stored size is the decoded size
    _same_size_everywhere(data, (34, 21), "JPEG")
    assert np.array_equal(decode_image(data, "x"), decode_image(plain, "x"))


def test_bmp_top_down_and_core_header():
    arr = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data = bytearray(_encode(".bmp", arr))
    assert struct.unpack_from("<Iii", data, 14) == (40, 7, 5)
    struct.pack_into("<i", data, 22, -5)  # top-down rows
    _same_size_everywhere(bytes(data), (7, 5), "BMP")
    assert np.array_equal(cv2.imdecode(np.frombuffer(bytes(data), np.uint8), -1), arr[::-1])
    # OS/2 1.x BITMAPCOREHEADER: 16-bit unsigned width and height
    w, h = 3, 2
    rows = b"".join(bytes(arr[y, :w].tobytes()).ljust(12, b"\x00") for y in range(h - 1, -1, -1))
    core = b"BM" + struct.pack("<IHHI", 26 + len(rows), 0, 0, 26) + struct.pack("<IHHHH", 12, w, h, 1, 24) + rows
    assert image_size_from_header(core) == (w, h)
    decoded = cv2.imdecode(np.frombuffer(core, np.uint8), -1)
    if decoded is not None:  # OpenCV's BMP reader takes the core header too
        assert decoded.shape[:2] == (h, w)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("size_type", [3, 4])  # SHORT, LONG
def test_tiff_both_byte_orders_short_and_long(order, size_type):
    pix = RNG.integers(0, 256, (3, 5), dtype=np.uint8)
    data = _tiff([(5, 3, pix.tobytes())], order, size_type)
    _same_size_everywhere(data, (5, 3), "TIFF")
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), -1), pix)


def test_multi_page_tiff_is_sized_by_its_first_page():
    data = _tiff([(5, 3, bytes(15)), (400, 300, bytes(120000))], ">")
    _same_size_everywhere(data, (5, 3), "TIFF")
    ok, buf = cv2.imencodemulti(".tiff", [np.ones((5, 7), np.uint8), np.ones((90, 30), np.uint8)])
    assert ok
    _same_size_everywhere(np.asarray(buf).tobytes(), (7, 5), "TIFF")


@pytest.mark.parametrize("order", ["<", ">"])
def test_bigtiff_header(order):
    data = _tiff([(6, 4, bytes(range(24)))], order, size_type=4, big=True)
    _same_size_everywhere(data, (6, 4), "TIFF")


def test_only_the_header_is_read():
    """The size comes from the first bytes alone (TIFF: the first IFD, wherever it is)."""
    arr = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    for ext, params, head in [(".png", (), 24), (".bmp", (), 26), (".gif", (), 10),
                              (".webp", (cv2.IMWRITE_WEBP_QUALITY, 80), 30),
                              (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101), 30)]:
        data = _encode(ext, arr, params)
        assert image_size_from_header(data[:head]) == (60, 40), ext
        assert image_size_from_header(data[:head] + bytes(10_000_000)) == (60, 40), ext
        assert image_size_from_header(data[:head - 1]) is None, ext


def test_header_parsing_is_cheap_on_big_and_hostile_inputs():
    """Generous bounds (seconds would mean the walk reads pixels or loops per byte)."""
    big_app = _jpeg_segment(0xE1, b"\xff" * 65533)
    plain = _encode(".jpg", np.zeros((8, 8, 3), np.uint8))
    cases = {
        "many big APP segments": plain[:2] + big_app * 300 + plain[2:],  # 20 MB before the SOF
        "20 MB of fill bytes": b"\xff\xd8" + b"\xff" * 20_000_000 + plain[2:],
        "a million tiny segments": b"\xff\xd8" + b"\xff\xfe\x00\x02" * 1_000_000 + plain[2:],
        "PNG with 20 MB of data": _png_header_only(9, 9) + bytes(20_000_000),
        "TIFF IFD of 65535 entries": b"II*\x00\x08\x00\x00\x00\xff\xff" + bytes(12 * 65535),
    }
    for name, data in cases.items():
        start = time.perf_counter()
        size = image_size_from_header(data)
        assert time.perf_counter() - start < 0.5, name
        assert size in (None, (8, 8), (9, 9)), (name, size)
    assert image_size_from_header(cases["many big APP segments"]) == (8, 8)
    assert image_size_from_header(cases["20 MB of fill bytes"]) == (8, 8)
    assert image_size_from_header(cases["a million tiny segments"]) is None  # too many: damaged


def test_jpeg_truncation_check_stays_cheap_on_hostile_files():
    """decode_image's walk of a whole JPEG (for truncation) skips fill bytes and scans in C."""
    plain = _encode(".jpg", np.zeros((8, 8, 3), np.uint8))
    sos = plain.index(b"\xff\xda")
    cases = {
        "8 MB of fill bytes": (b"\xff\xd8" + b"\xff" * 8_000_000 + plain[2:], None),
        "a million tiny segments after the SOF": (plain[:sos] + b"\xff\xfe\x00\x02" * 1_000_000 + plain[sos:],
                                                  None),
        "4 million restart markers in the scan": (plain[:-2] + b"\xff\xd0" * 4_000_000 + b"\xff\xd9", None),
        "a scan of stuffed bytes, cut": (plain[:-2] + b"\xff\x00" * 4_000_000, "truncated JPEG"),
    }
    for name, (data, error) in cases.items():
        start = time.perf_counter()
        if error:
            with pytest.raises(ImageError, match=error):
                decode_image(data, "a")
        else:
            assert decode_image(data, "a").shape == (8, 8, 3), name
        assert time.perf_counter() - start < 1.0, name


# ---- the limits ---------------------------------------------------------------------------

def test_default_limits():
    assert DEFAULT_MAX_PIXELS == 60_000_000
    assert DEFAULT_MAX_ASPECT == 100
    check_image_size((8192, 6144), "x")  # a 50 MP phone camera's full-resolution photo
    with pytest.raises(ImageError):
        check_image_size((8000, 8000), "x")


def test_8000x8000_png_is_refused_before_decoding(tmp_path):
    data = _png_zeros(8000, 8000)  # what a caller can upload: a complete, valid PNG
    assert len(data) < 20_000 and image_size_from_header(data) == (8000, 8000)
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        decode_image(data, "image_a")
    assert time.perf_counter() - start < 1.0  # decoding it takes seconds and 1.5 GB
    msg = str(info.value)
    for words in ("image_a", "8000x8000 = 64.0 megapixels", "60.0 megapixels", "--max-pixels"):
        assert words in msg, msg
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="huge.png.*8000x8000"):
        load_image(path)
    with pytest.raises(ImageError, match="12000x12000 = 144.0 megapixels"):
        decode_image(_png_header_only(12000, 12000), "b")


def test_max_pixels_none_and_higher_let_a_large_image_through(tmp_path):
    data = _png_zeros(2000, 1500)
    with pytest.raises(ImageError, match=r"2000x1500 = 3\.0 megapixels.*1\.0 megapixels"):
        decode_image(data, "a", max_pixels=1_000_000)
    assert decode_image(data, "a", max_pixels=None).shape == (1500, 2000, 3)
    assert decode_image(data, "a", max_pixels=3_000_000).shape == (1500, 2000, 3)  # at the limit
    with pytest.raises(ImageError, match="3000000 pixels, over the limit of 2999999 pixels"):
        decode_image(data, "a", max_pixels=2_999_999)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert load_image(path, max_pixels=None).shape == (1500, 2000, 3)
    with pytest.raises(ImageError, match="a.png"):
        load_image(path, max_pixels=100)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif", ".webp", ".gif"])
def test_every_format_is_limited(ext):
    data = _encode(ext, np.zeros((40, 30, 3), np.uint8))
    with pytest.raises(ImageError, match=r"30x40 = 1200 pixels, over the limit of 1000 pixels"):
        decode_image(data, "a", max_pixels=1000)
    assert decode_image(data, "a", max_pixels=1200).shape == (40, 30, 3)


def test_absurd_aspect_ratio_is_refused():
    thin = _png_zeros(40000, 1)  # a few hundred bytes; preprocessing would stretch it to 224x8960000
    with pytest.raises(ImageError, match=r"40000x1, an aspect ratio of 4e\+04:1, over the limit of 100:1"):
        decode_image(thin, "a")
    assert decode_image(thin, "a", max_aspect=None).shape == (1, 40000, 3)
    assert decode_image(_png_zeros(1, 100), "a").shape == (100, 1, 3)  # 100:1 is allowed
    with pytest.raises(ImageError, match="aspect"):
        decode_image(_png_zeros(1, 101), "a")
    with pytest.raises(ImageError, match="aspect"):
        decode_image(_png_zeros(300, 2), "a", max_aspect=10)


def test_no_pixels_is_refused():
    with pytest.raises(ImageError, match=r"no pixels \(its header says 0x5\)"):
        decode_image(_png_header_only(0, 5), "a", max_pixels=None, max_aspect=None)
    jpeg = bytearray(_encode(".jpg", np.zeros((8, 8, 3), np.uint8)))
    sof = jpeg.index(b"\xff\xc0")
    struct.pack_into(">H", jpeg, sof + 5, 0)  # height 0: "defined later by a DNL marker"
    with pytest.raises(ImageError, match="no pixels"):
        decode_image(bytes(jpeg), "a")
    gif = bytearray(_encode(".gif", np.zeros((8, 8, 3), np.uint8)))
    gif[6:8] = b"\x00\x00"
    with pytest.raises(ImageError, match="no pixels"):
        decode_image(bytes(gif), "a")


def test_opencv_limits_get_a_message_not_an_assertion(monkeypatch):
    with pytest.raises(ImageError, match=r"40000x40000 = 1600\.0 megapixels, over OpenCV's limits"):
        decode_image(_png_header_only(40000, 40000), "a", max_pixels=None)
    with pytest.raises(ImageError, match="OpenCV's limits"):
        decode_image(_png_header_only(1_100_000, 20_000), "a", max_pixels=None)
    monkeypatch.setenv("CV_IO_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageError, match="CV_IO_MAX_IMAGE_PIXELS"):
        check_image_size((40, 30), "a", max_pixels=None)


# ---- other formats and garbage ------------------------------------------------------------

@pytest.mark.parametrize("ext", [".ppm", ".pfm", ".sr", ".hdr", ".pam"])
@pytest.mark.parametrize("max_pixels", [DEFAULT_MAX_PIXELS, None])
def test_formats_whose_size_is_not_read_are_refused(ext, max_pixels):
    data = _encode(ext, np.zeros((4, 5, 3), np.uint8 if ext != ".pfm" else np.float32))
    assert _decoded_wh(data) == (5, 4)  # OpenCV could decode it
    assert image_format(data) is None and image_size_from_header(data) is None
    with pytest.raises(ImageError, match="a.ppm: not an image sdrun reads .*not a PNG, JPEG, BMP, "
                                         "TIFF, WebP or GIF image"):
        decode_image(data, "a.ppm", max_pixels=max_pixels)


def test_damaged_headers_are_named():
    png = _encode(".png", np.zeros((4, 5, 3), np.uint8))
    no_ihdr = png[:12] + b"IHDX" + png[16:]  # chunks complete, IHDR missing
    with pytest.raises(ImageError, match="a damaged or truncated PNG .* does not give the image size"):
        decode_image(no_ihdr, "a")
    with pytest.raises(ImageError, match="damaged or truncated BMP"):
        decode_image(b"BMW cars are fast", "a")
    with pytest.raises(ImageError, match="damaged or truncated TIFF"):
        decode_image(b"II*\x00\x08\x00\x00\x00\x00\x00", "a")
    with pytest.raises(ImageError, match="truncated JPEG"):
        decode_image(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "a")


def _samples():
    arr = RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    yield _encode(".png", arr)
    yield _encode(".jpg", arr)
    yield _encode(".jpg", arr, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))
    yield _encode(".bmp", arr)
    yield _encode(".tif", arr)
    yield _tiff([(5, 3, bytes(15))], ">")
    yield _tiff([(5, 3, bytes(15))], "<", 4, big=True)
    yield _encode(".webp", arr, (cv2.IMWRITE_WEBP_QUALITY, 80))
    yield _encode(".webp", arr, (cv2.IMWRITE_WEBP_QUALITY, 101))
    yield _encode(".gif", arr)


def _fine(size):
    return size is None or (isinstance(size, tuple) and len(size) == 2
                            and all(isinstance(v, int) and v >= 0 for v in size))


def test_garbage_never_raises_anything_but_image_error():
    rng = np.random.default_rng(7)
    for data in _samples():
        cuts = sorted(set(range(min(len(data), 64))) | set(rng.integers(0, len(data), 20).tolist()))
        for n in cuts:  # every truncation of the header, some of the rest
            assert _fine(image_size_from_header(data[:n]))
            if n:
                try:
                    decode_image(data[:n], "a", max_pixels=100_000)
                except ImageError:
                    pass
        for _ in range(60):  # random bytes in the first 64
            bad = bytearray(data)
            for at in rng.integers(0, min(len(bad), 64), 3):
                bad[at] = int(rng.integers(0, 256))
            assert _fine(image_size_from_header(bytes(bad)))
            try:
                decode_image(bytes(bad), "a", max_pixels=100_000)
            except ImageError:
                pass
    for junk in [b"", b"\x00", b"\xff\xd8", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP",
                 b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(30), b"II*\x00\xff\xff\xff\xff", b"MM\x00+" + bytes(12),
                 b"GIF89a", b"BM" + bytes(30), rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()]:
        assert _fine(image_size_from_header(junk)), junk
    assert image_size_from_header(None) is None  # not even bytes
    assert image_size_from_header("\x89PNG") is None
    assert image_size_from_header(memoryview(_encode(".png", np.zeros((2, 3), np.uint8)))) == (3, 2)
