"""PNG decoding into packed pixels: our unfilter decoder, libvips and Pillow give the same colours for every
kind of PNG."""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from detr_panoptic.utils import png as png_decoding
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.png import decode_rgb_png, png_decoder

needs_vips = pytest.mark.skipif(png_decoding._pyvips is None, reason="pyvips is not available")
needs_unfilter = pytest.mark.skipif(png_decoding._unfilter is None or png_decoding._zlib_ng is None,
                                    reason="the unfilter decoder is not available")
# The kinds of png_kinds() that the unfilter decoder takes (8-bit, not interlaced, no palette).
UNFILTER_KINDS = ("rgb", "rgb, no compression", "rgb, ours", "rgb, several IDAT chunks", "rgb + tRNS", "rgba",
                  "grey", "grey + alpha")


def colours() -> np.ndarray:
    """[24, 30, 3] uint8: blocks of random colours (piecewise constant, like a panoptic map)."""
    rng = np.random.default_rng(0)
    return np.repeat(np.repeat(rng.integers(0, 256, (6, 5, 3)), 4, 0), 6, 1).astype(np.uint8)


def pillow_png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def shown_colour_ids(data: bytes) -> np.ndarray:
    """The ids of the colours the PNG displays, as Pillow converts it to RGB."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB")).astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def png_kinds() -> dict[str, bytes]:
    rgb = colours()
    grey = rgb[..., 0]
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    noise = np.random.default_rng(2).integers(0, 256, (300, 300, 3), dtype=np.uint8)

    kinds = {
        "rgb": pillow_png(Image.fromarray(rgb)),
        "rgb, no compression": pillow_png(Image.fromarray(rgb), compress_level=0),
        # Our own encoder (encode_id_png): Sub filter on every row, run-length zlib.
        "rgb, ours": png_decoding.encode_id_png(rgb[..., 0] + 256 * rgb[..., 1].astype(np.uint32)
                                                + 65536 * rgb[..., 2].astype(np.uint32)),
        "rgb, several IDAT chunks": pillow_png(Image.fromarray(noise)),
        "rgb + tRNS": pillow_png(Image.fromarray(rgb), transparency=tuple(int(v) for v in rgb[0, 0])),
        "rgba": pillow_png(Image.fromarray(np.dstack([rgb, alpha]))),
        "palette": pillow_png(Image.fromarray(rgb).quantize(64)),
        "palette + transparency": pillow_png(Image.fromarray(rgb).quantize(64), transparency=3),
        "palette, 4 bit": pillow_png(Image.fromarray(rgb).quantize(16), bits=4),
        "grey": pillow_png(Image.fromarray(grey)),
        "grey + alpha": pillow_png(Image.fromarray(np.dstack([grey, alpha]), mode="LA")),
        "bilevel": pillow_png(Image.fromarray(grey > 100)),
        "rgb, 16 bit": _rgb16_png(rgb),
    }
    if png_decoding._pyvips is not None:  # Pillow cannot write interlaced PNGs
        vips_image = png_decoding._pyvips.Image.new_from_array(rgb).copy(interpretation="srgb")
        kinds["rgb, interlaced"] = vips_image.pngsave_buffer(interlace=True)
    return kinds


def _rgb16_png(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG, written by hand (Pillow does not write them)."""
    import struct
    import zlib

    samples = (rgb.astype(">u2") * 256 + 3).astype(">u2")  # high byte: the 8-bit value; low byte: 3
    rows = np.concatenate([np.zeros((rgb.shape[0], 1), np.uint8),
                           samples.view(np.uint8).reshape(rgb.shape[0], -1)], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes()))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", list(png_kinds()))
def test_every_decoder_gives_the_displayed_colours(kind):
    data = png_kinds()[kind]
    expected = shown_colour_ids(data)
    by_pillow = decode_rgb_png(data, decoder="pillow")
    assert by_pillow.dtype == np.uint32 and by_pillow.shape == expected.shape
    np.testing.assert_array_equal(by_pillow & 0xFFFFFF, expected)
    default = decode_rgb_png(data)
    np.testing.assert_array_equal(default & 0xFFFFFF, expected)
    if png_decoding._pyvips is not None:
        np.testing.assert_array_equal(decode_rgb_png(data, decoder="libvips") & 0xFFFFFF, expected)
    if png_decoding._unfilter is not None and png_decoding._zlib_ng is not None:
        if kind in UNFILTER_KINDS:
            np.testing.assert_array_equal(decode_rgb_png(data, decoder="unfilter") & 0xFFFFFF, expected)
        else:
            with pytest.raises(ValueError, match="the unfilter decoder takes 8-bit, non-interlaced"):
                decode_rgb_png(data, "x.png", decoder="unfilter")


def filtered_png(pixels: np.ndarray, filters: list[int], *, grey16: bool = False) -> bytes:
    """An 8-bit PNG of ``pixels`` ([H, W, C], C = 1..4) whose row ``y`` uses the filter ``filters[y]``,
    encoded here (PNG spec, section 9) so that every filter type is used on every kind of pixel."""
    import struct
    import zlib

    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels).astype(np.int32)
    encoded = []
    for y, kind in enumerate(filters):
        x = rows[y]
        b = rows[y - 1] if y > 0 else np.zeros_like(x)
        a = np.concatenate([np.zeros(channels, np.int32), x[:-channels]])
        c = np.concatenate([np.zeros(channels, np.int32), b[:-channels]])
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        predictor = {0: 0, 1: a, 2: b, 3: (a + b) // 2,
                     4: np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))}[kind]
        encoded.append(bytes([kind]) + ((x - predictor) % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    colour_type = 0 if grey16 else {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # grey16: 2 bytes, high first
    header = struct.pack(">IIBBBBB", width, height, 16 if grey16 else 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(encoded)))
            + chunk(b"IEND", b""))


def packed(pixels: np.ndarray) -> np.ndarray:
    """The packed form of [H, W, C] pixels: grey v is (v, v, v); no alpha is 255."""
    channels = pixels.shape[2]
    rgb = np.repeat(pixels[..., :1], 3, axis=2) if channels <= 2 else pixels[..., :3]
    alpha = pixels[..., -1] if channels in (2, 4) else np.full(pixels.shape[:2], 255, np.uint8)
    rgba = np.dstack([rgb, alpha]).astype(np.uint32)
    return rgba[..., 0] | rgba[..., 1] << 8 | rgba[..., 2] << 16 | rgba[..., 3] << 24


@needs_unfilter
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_the_unfilter_decoder_undoes_every_filter_type(channels):
    rng = np.random.default_rng(channels)
    # Noise exercises every branch of the Paeth predictor; blocks of one colour its shortcut (b == c).
    noise = rng.integers(0, 256, (40, 23, channels), dtype=np.uint8)
    blocks = np.repeat(np.repeat(rng.integers(0, 256, (5, 4, channels), dtype=np.uint8), 8, 0), 6, 1)[:, :23]
    filters = [int(f) for f in rng.permutation(np.arange(40) % 5)]
    for pixels in (noise, blocks):
        data = filtered_png(pixels, filters)
        decoded = decode_rgb_png(data, decoder="unfilter")
        np.testing.assert_array_equal(decoded, packed(pixels))
        np.testing.assert_array_equal(decoded & 0xFFFFFF, shown_colour_ids(data))  # as Pillow reads it


@needs_unfilter
def test_16_bit_greyscale_decodes_to_its_samples():
    rng = np.random.default_rng(16)
    noise = rng.integers(0, 65536, (40, 23), dtype=np.uint16)
    blocks = np.repeat(np.repeat(rng.integers(0, 65536, (5, 4), dtype=np.uint16), 8, 0), 6, 1)[:, :23]
    filters = [int(f) for f in rng.permutation(np.arange(40) % 5)]
    for samples in (noise, blocks):
        data = filtered_png(samples.astype(">u2").view(np.uint8).reshape(40, 23, 2), filters, grey16=True)
        decoded = png_decoding.decode_grey16_png(data)
        assert decoded.dtype == np.uint16
        np.testing.assert_array_equal(decoded, samples)
        with Image.open(io.BytesIO(data)) as image:  # as Pillow reads it
            np.testing.assert_array_equal(decoded, np.asarray(image))


def test_decode_grey16_png_leaves_other_files_to_pillow():
    kinds = png_kinds()
    for kind in ("grey", "rgb", "rgb, 16 bit"):
        assert png_decoding.decode_grey16_png(kinds[kind]) is None
    assert png_decoding.decode_grey16_png(b"not a png") is None


@needs_unfilter
def test_the_unfilter_decoder_names_what_is_wrong_with_a_damaged_file():
    import struct
    import zlib

    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    good = filtered_png(pixels, [0, 1, 2, 3, 4, 2])
    header = good[:33]  # signature + IHDR chunk
    idat_start = 33

    def with_pixel_data(rows: bytes) -> bytes:
        body = zlib.compress(rows)
        return (header + struct.pack(">I", len(body)) + b"IDAT" + body
                + struct.pack(">I", zlib.crc32(b"IDAT" + body)) + good[-12:])

    def with_truncated_stream(rows: bytes) -> bytes:  # all pixels there, the stream's end missing
        compressor = zlib.compressobj()
        body = compressor.compress(rows) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return (header + struct.pack(">I", len(body)) + b"IDAT" + body
                + struct.pack(">I", zlib.crc32(b"IDAT" + body)) + good[-12:])

    inflated = zlib.decompress(good[idat_start + 8:-16])
    bad_filter = bytearray(inflated)
    bad_filter[3 * 16] = 7  # row 3's filter-type byte
    cases = {
        "row 3 has the unknown filter type 7": with_pixel_data(bytes(bad_filter)),
        "the pixel data has 95 bytes, expected 96 for 5x6 pixels": with_pixel_data(inflated[:-1]),
        "the pixel data has more than 96 bytes, expected 96": with_pixel_data(inflated + bytes(1000)),
        "the compressed stream is truncated": with_truncated_stream(inflated),
        "the IDAT chunk at byte 33 has a wrong CRC": good[:-17] + bytes([good[-17] ^ 1]) + good[-16:],
        "the file ends before its IEND chunk": good[:-12],
        "the IDAT chunk at byte 33 runs past the end of the file": good[:50],
        "the pixel data does not inflate": good[:idat_start + 8] + b"\0" * (len(good) - idat_start - 24)
                                           + good[-16:],
    }
    for message, data in cases.items():
        if "does not inflate" in message:  # the zeros need a CRC of their own to get as far as inflating
            body = data[idat_start + 8:-16]
            data = data[:-16] + struct.pack(">I", zlib.crc32(b"IDAT" + body)) + good[-12:]
        with pytest.raises(UserInputError, match=r"^x/a\.png: cannot decode the PNG .*" + re.escape(message)):
            decode_rgb_png(data, "x/a.png", decoder="unfilter")


def test_16_bit_pngs_keep_the_high_byte_as_pillow_reads_them():
    rgb = colours()
    ids = decode_rgb_png(_rgb16_png(rgb)) & 0xFFFFFF
    np.testing.assert_array_equal(ids, rgb[..., 0] + 256 * rgb[..., 1].astype(np.uint32)
                                  + 65536 * rgb[..., 2].astype(np.uint32))


@needs_vips
@needs_unfilter
def test_each_png_goes_to_the_fastest_decoder_that_takes_it(monkeypatch):
    calls = []
    for name in ("_decode_unfilter", "_decode_vips", "_decode_pillow"):
        decode = getattr(png_decoding, name)
        monkeypatch.setattr(png_decoding, name,
                            lambda data, source, *rest, name=name, decode=decode: calls.append((name, source))
                            or decode(data, source, *rest))
    kinds = png_kinds()
    for kind in ("rgb", "palette, 4 bit", "rgb, interlaced", "rgb, 16 bit"):
        decode_rgb_png(kinds[kind], kind)
    with pytest.raises(UserInputError):
        decode_rgb_png(b"not a png", "text")
    assert calls == [("_decode_unfilter", "rgb"),
                     ("_decode_unfilter", "palette, 4 bit"), ("_decode_vips", "palette, 4 bit"),
                     ("_decode_unfilter", "rgb, interlaced"), ("_decode_vips", "rgb, interlaced"),
                     ("_decode_unfilter", "rgb, 16 bit"), ("_decode_pillow", "rgb, 16 bit"),
                     ("_decode_unfilter", "text"), ("_decode_pillow", "text")]
    assert png_decoder().startswith("zlib-ng ") and "libvips " in png_decoder()


def test_an_unknown_decoder_name_is_refused():
    with pytest.raises(ValueError, match="unknown PNG decoder 'spng'; expected one of unfilter, libvips, pillow"):
        decode_rgb_png(png_kinds()["rgb"], decoder="spng")


@pytest.mark.parametrize("decoder", ["pillow", pytest.param("libvips", marks=needs_vips),
                                     pytest.param("unfilter", marks=needs_unfilter)])
def test_undecodable_data_is_a_user_error_naming_the_file(decoder):
    data = png_kinds()["rgb, several IDAT chunks"]
    for broken in (data[:len(data) // 2], b"not a png at all"):
        if decoder == "unfilter" and not broken.startswith(b"\x89PNG"):
            continue  # not a PNG: not the unfilter decoder's (the default passes it on, see above)
        with pytest.raises(UserInputError, match=r"^x/a\.png: cannot decode the PNG \(corrupt or truncated"):
            decode_rgb_png(broken, "x/a.png", decoder=decoder)


@pytest.mark.parametrize("decoder", [pytest.param("libvips", marks=needs_vips),
                                     pytest.param("unfilter", marks=needs_unfilter)])
def test_a_corrupt_crc_that_pillow_would_decode_is_an_error(decoder):
    data = bytearray(png_kinds()["rgb, several IDAT chunks"])
    data[len(data) // 2] ^= 0x5A  # inside the compressed pixels: the chunk's CRC no longer matches
    with pytest.raises(UserInputError, match="cannot decode the PNG"):
        decode_rgb_png(bytes(data), "a.png", decoder=decoder)


def test_modes_without_colour_are_rejected():
    data = pillow_png(Image.fromarray(np.array([[0, 1000]], np.uint16)))  # 16-bit greyscale: mode I;16
    with pytest.raises(UserInputError, match=r"a\.png: expected an RGB panoptic PNG, got mode I;16"):
        decode_rgb_png(data, "a.png")


def test_without_pyvips_pillow_decodes_and_says_how_to_get_libvips(monkeypatch):
    monkeypatch.setattr(png_decoding, "_pyvips", None)
    monkeypatch.setattr(png_decoding, "_VIPS_UNAVAILABLE", "pyvips could not be imported (test)")
    data = png_kinds()["palette"]
    np.testing.assert_array_equal(decode_rgb_png(data) & 0xFFFFFF, shown_colour_ids(data))
    assert f"Pillow {Image.__version__} (pyvips could not be imported (test)" in png_decoder()
    assert "pip install 'pyvips[binary]'" in png_decoder()
    with pytest.raises(ImportError, match=r"pyvips\[binary\]"):
        decode_rgb_png(data, decoder="libvips")


@needs_vips
def test_without_the_extension_libvips_decodes_and_the_report_says_why(monkeypatch):
    monkeypatch.setattr(png_decoding, "_unfilter", None)
    monkeypatch.setattr(png_decoding, "_UNFILTER_UNAVAILABLE", "the C extension was not built (test)")
    calls = []
    decode = png_decoding._decode_vips
    monkeypatch.setattr(png_decoding, "_decode_vips", lambda *args: calls.append(1) or decode(*args))
    data = png_kinds()["rgb"]
    np.testing.assert_array_equal(decode_rgb_png(data) & 0xFFFFFF, shown_colour_ids(data))
    assert calls == [1]
    assert png_decoder().startswith("libvips ") and "(the C extension was not built (test))" in png_decoder()
    with pytest.raises(ImportError, match="the unfilter decoder is not available: the C extension was not built"):
        decode_rgb_png(data, decoder="unfilter")


def test_a_failing_pyvips_import_falls_back_to_pillow():
    # pyvips raises OSError, not ImportError, when it finds no libvips; a None entry in sys.modules
    # makes the import fail the same way in a fresh interpreter.
    code = ("import sys; sys.modules['pyvips'] = None\n"
            "from detr_panoptic.utils import png as p\n"
            "assert p._pyvips is None and 'pyvips could not be imported' in p.png_decoder(), p.png_decoder()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_vips
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_process_forked_after_libvips_decoded_uses_pillow_instead_of_hanging(tmp_path):
    # libvips' thread pool does not survive fork(): a forked child's first libvips call would wait
    # forever. Run in a fresh interpreter, not by forking pytest.
    path = tmp_path / "a.png"
    path.write_bytes(png_kinds()["palette"])  # a PNG that only libvips and Pillow decode
    code = f"""
import multiprocessing
from detr_panoptic.utils import png as p
data = open({str(path)!r}, "rb").read()

def child(_):
    return p.decode_rgb_png(data).tolist(), p.png_decoder()

if __name__ == "__main__":
    expected = p.decode_rgb_png(data).tolist()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pixels, decoder = pool.apply_async(child, (0,)).get(timeout=60)
    assert pixels == expected
    assert "Pillow" in decoder and "forked after libvips" in decoder, decoder
"""
    script = tmp_path / "fork_after_vips.py"
    script.write_text(code)
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)


@pytest.mark.parametrize("decoder", [pytest.param("libvips", marks=needs_vips),
                                     pytest.param("unfilter", marks=needs_unfilter)])
def test_decoding_into_a_given_array_of_the_right_shape(decoder):
    kinds = png_kinds()
    data = kinds["rgb"]
    expected = shown_colour_ids(data)
    out = np.zeros(expected.shape, np.uint32)
    decoded = decode_rgb_png(data, decoder=decoder, out=out)
    assert decoded is out
    np.testing.assert_array_equal(out & 0xFFFFFF, expected)
    decoded = decode_rgb_png(kinds["grey"], decoder=decoder, out=out)  # reused for the next image
    assert decoded is out
    np.testing.assert_array_equal(out & 0xFFFFFF, shown_colour_ids(kinds["grey"]))
    for unusable in (np.zeros((3, 3), np.uint32), np.zeros(expected.shape, np.int64),
                     np.zeros(expected.shape[::-1], np.uint32).T):
        decoded = decode_rgb_png(data, decoder=decoder, out=unusable)
        assert decoded is not unusable
        np.testing.assert_array_equal(decoded & 0xFFFFFF, expected)
    read_only = np.zeros(expected.shape, np.uint32)
    read_only.flags.writeable = False
    assert decode_rgb_png(data, decoder=decoder, out=read_only) is not read_only
    assert decode_rgb_png(data, decoder="pillow", out=out) is not out  # Pillow allocates its own


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")), reason="no C compiler here")
def test_the_install_built_the_extension_where_a_compiler_exists():
    # The extension is optional at install time; without this test a failed build would only skip the
    # unfilter tests and quietly make PQ evaluation twice as slow.
    assert png_decoding._unfilter is not None, png_decoding._UNFILTER_UNAVAILABLE
    assert png_decoding._zlib_ng is not None, png_decoding._UNFILTER_UNAVAILABLE


def test_encode_id_png_round_trips_every_id_through_pillow():
    rng = np.random.default_rng(24)
    for ids in (rng.integers(0, 256**3, (37, 29)),  # noise: every byte of every pixel changes
                np.repeat(np.repeat(rng.integers(0, 256**3, (4, 3)), 9, 0), 10, 1).astype(np.uint32),
                np.array([[0]], np.uint8), np.array([[256**3 - 1, 65535]], np.int64),
                rng.integers(0, 65536, (30, 20)).astype(">u4").T,  # big-endian, not contiguous
                rng.integers(0, 65536, (3, 5)).astype(np.uint16)):
        data = png_decoding.encode_id_png(ids)
        np.testing.assert_array_equal(shown_colour_ids(data), ids)


def test_encode_id_png_refuses_what_no_rgb_pixel_holds():
    for ids, message in ((np.array([[256**3]]), r"segment ids must be in 0\.\.16777215 to fit an RGB PNG, got 16777216"),
                         (np.array([[-1, 0]]), r"got -1\.\.0"),
                         (np.zeros((0, 4), np.int64), "non-empty"), (np.zeros(4, np.int64), "non-empty"),
                         (np.zeros((2, 2), np.float32), "integer")):
        with pytest.raises(ValueError, match=message):
            png_decoding.encode_id_png(ids)
