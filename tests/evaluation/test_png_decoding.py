"""PNG decoding into packed pixels: libvips and Pillow give the same colours for every kind of PNG."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from detr_panoptic.evaluation import png_decoding
from detr_panoptic.evaluation.png_decoding import decode_rgb_png, png_decoder
from detr_panoptic.utils.errors import UserInputError

needs_vips = pytest.mark.skipif(png_decoding._pyvips is None, reason="pyvips is not available")


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
    from detr_panoptic.data.cityscapes import panoptic_png_bytes

    kinds = {
        "rgb": pillow_png(Image.fromarray(rgb)),
        "rgb, no compression": pillow_png(Image.fromarray(rgb), compress_level=0),
        # Our converter's own encoder: Sub filter on every row, run-length zlib.
        "rgb, converter": panoptic_png_bytes((rgb[..., 0] + 256 * rgb[..., 1].astype(np.uint16)).astype(np.uint16)),
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
def test_both_decoders_give_the_displayed_colours(kind):
    data = png_kinds()[kind]
    expected = shown_colour_ids(data)
    by_pillow = decode_rgb_png(data, use_vips=False)
    assert by_pillow.dtype == np.uint32 and by_pillow.shape == expected.shape
    np.testing.assert_array_equal(by_pillow & 0xFFFFFF, expected)
    default = decode_rgb_png(data)
    np.testing.assert_array_equal(default & 0xFFFFFF, expected)
    if png_decoding._pyvips is not None:
        np.testing.assert_array_equal(decode_rgb_png(data, use_vips=True) & 0xFFFFFF, expected)


def test_16_bit_pngs_keep_the_high_byte_as_pillow_reads_them():
    rgb = colours()
    ids = decode_rgb_png(_rgb16_png(rgb)) & 0xFFFFFF
    np.testing.assert_array_equal(ids, rgb[..., 0] + 256 * rgb[..., 1].astype(np.uint32)
                                  + 65536 * rgb[..., 2].astype(np.uint32))


@needs_vips
def test_8_bit_pngs_go_to_libvips_and_others_to_pillow(monkeypatch):
    calls = []
    monkeypatch.setattr(png_decoding, "_decode_pillow", lambda data, source: calls.append(source))
    kinds = png_kinds()
    decode_rgb_png(kinds["rgb"], "rgb.png")
    decode_rgb_png(kinds["palette, 4 bit"], "palette.png")
    assert calls == []
    decode_rgb_png(kinds["rgb, 16 bit"], "rgb16.png")
    decode_rgb_png(b"not a png", "text.png")
    assert calls == ["rgb16.png", "text.png"]
    assert png_decoder().startswith("libvips ")


@pytest.mark.parametrize("use_vips", [False, pytest.param(True, marks=needs_vips)])
def test_undecodable_data_is_a_user_error_naming_the_file(use_vips):
    data = png_kinds()["rgb, several IDAT chunks"]
    for broken in (data[:len(data) // 2], b"not a png at all"):
        with pytest.raises(UserInputError, match=r"^x/a\.png: cannot decode the PNG \(corrupt or truncated"):
            decode_rgb_png(broken, "x/a.png", use_vips=use_vips)


@needs_vips
def test_libvips_rejects_a_corrupt_crc_that_pillow_would_decode():
    data = bytearray(png_kinds()["rgb, several IDAT chunks"])
    data[len(data) // 2] ^= 0x5A  # inside the compressed pixels: the chunk's CRC no longer matches
    with pytest.raises(UserInputError, match="cannot decode the PNG"):
        decode_rgb_png(bytes(data), "a.png")


def test_modes_without_colour_are_rejected():
    data = pillow_png(Image.fromarray(np.array([[0, 1000]], np.uint16)))  # 16-bit greyscale: mode I;16
    with pytest.raises(UserInputError, match=r"a\.png: expected an RGB panoptic PNG, got mode I;16"):
        decode_rgb_png(data, "a.png")


def test_without_pyvips_pillow_decodes_and_says_how_to_get_libvips(monkeypatch):
    monkeypatch.setattr(png_decoding, "_pyvips", None)
    monkeypatch.setattr(png_decoding, "_VIPS_UNAVAILABLE", "pyvips could not be imported (test)")
    data = png_kinds()["rgb"]
    np.testing.assert_array_equal(decode_rgb_png(data) & 0xFFFFFF, shown_colour_ids(data))
    assert png_decoder().startswith(f"Pillow {Image.__version__} (pyvips could not be imported (test)")
    assert "pip install 'pyvips[binary]'" in png_decoder()
    with pytest.raises(ImportError, match=r"pyvips\[binary\]"):
        decode_rgb_png(data, use_vips=True)


def test_a_failing_pyvips_import_falls_back_to_pillow():
    # pyvips raises OSError, not ImportError, when it finds no libvips; a None entry in sys.modules
    # makes the import fail the same way in a fresh interpreter.
    code = ("import sys; sys.modules['pyvips'] = None\n"
            "from detr_panoptic.evaluation import png_decoding as p\n"
            "assert p._pyvips is None and 'pyvips could not be imported' in p.png_decoder(), p.png_decoder()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_vips
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_process_forked_after_libvips_decoded_uses_pillow_instead_of_hanging(tmp_path):
    # libvips' thread pool does not survive fork(): a forked child's first libvips call would wait
    # forever. Run in a fresh interpreter, not by forking pytest.
    path = tmp_path / "a.png"
    path.write_bytes(png_kinds()["rgb"])
    code = f"""
import multiprocessing
from detr_panoptic.evaluation import png_decoding as p
data = open({str(path)!r}, "rb").read()

def child(_):
    return p.decode_rgb_png(data).tolist(), p.png_decoder()

if __name__ == "__main__":
    expected = p.decode_rgb_png(data).tolist()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pixels, decoder = pool.apply_async(child, (0,)).get(timeout=60)
    assert pixels == expected
    assert decoder.startswith("Pillow") and "forked after libvips" in decoder, decoder
"""
    script = tmp_path / "fork_after_vips.py"
    script.write_text(code)
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)


@needs_vips
def test_libvips_decodes_into_a_given_array_of_the_right_shape():
    kinds = png_kinds()
    data = kinds["rgb"]
    expected = shown_colour_ids(data)
    out = np.zeros(expected.shape, np.uint32)
    decoded = decode_rgb_png(data, out=out)
    assert decoded is out
    np.testing.assert_array_equal(out & 0xFFFFFF, expected)
    decoded = decode_rgb_png(kinds["grey"], out=out)  # reused for the next image
    assert decoded is out
    np.testing.assert_array_equal(out & 0xFFFFFF, shown_colour_ids(kinds["grey"]))
    for unusable in (np.zeros((3, 3), np.uint32), np.zeros(expected.shape, np.int64),
                     np.zeros(expected.shape[::-1], np.uint32).T):
        decoded = decode_rgb_png(data, out=unusable)
        assert decoded is not unusable
        np.testing.assert_array_equal(decoded & 0xFFFFFF, expected)
    read_only = np.zeros(expected.shape, np.uint32)
    read_only.flags.writeable = False
    assert decode_rgb_png(data, out=read_only) is not read_only
    assert decode_rgb_png(data, use_vips=False, out=out) is not out  # Pillow allocates its own
