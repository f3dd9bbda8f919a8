"""Decode colour PNGs from memory into packed 32-bit pixels, fast.

A pixel comes out as one little-endian uint32 ``R + 256 G + 256^2 B + 256^3 X``: the low 24 bits are
the colour (a COCO panoptic segment id), the high byte ``X`` is padding or alpha and carries no
meaning. Palette and greyscale PNGs give the colour they display (grey ``v`` is ``(v, v, v)``);
16-bit PNGs keep the high byte of each sample, as Pillow reads them.

Three decoders, picked per file, all giving the same colours (tests/utils/test_png.py compares them
on each kind of file):

- ``unfilter``, for 8-bit, non-interlaced grey, RGB and RGBA PNGs (every panoptic PNG we have met):
  the chunks are read and CRC-checked here, the pixels inflated by zlib-ng (the ``zlib-ng`` wheel)
  and unfiltered by a small C extension of ours (``utils/_png_unfilter.c``). A 2048x1024 panoptic
  PNG takes ~4 ms, against ~9 ms in libvips and ~22 ms in Pillow; stock zlib alone needs ~14 ms to
  inflate it, zlib-ng ~1 ms.
- ``libvips`` (``pyvips``; the ``pyvips-binary`` wheels bundle it), for the other 8-bit PNGs
  (palette, interlaced), and for all of them when the extension was not compiled or zlib-ng is missing.
- ``pillow`` for everything else (16-bit PNGs, non-PNG files), and when pyvips cannot be imported.

``decode_grey16_png`` reads 16-bit greyscale PNGs (Cityscapes' instance ids) the same fast way, and
``encode_id_png`` writes id maps as PNGs, ~7x faster than Pillow.
"""
from __future__ import annotations

import ctypes
import io
import logging
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image

from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

try:
    import pyvips as _pyvips
except (ImportError, OSError) as exc:  # OSError: pyvips is installed but finds no libvips library
    _pyvips = None
    _VIPS_UNAVAILABLE = f"pyvips could not be imported ({type(exc).__name__}: {exc})"
else:
    _VIPS_UNAVAILABLE = ""
    # libvips reports every threadpool run (one per decoded image) at INFO level: noise in our logs.
    if logging.getLogger("pyvips").level == logging.NOTSET:
        logging.getLogger("pyvips").setLevel(logging.WARNING)
    if not _pyvips.at_least_libvips(8, 12):  # fail_on, which makes corrupt files an error, is 8.12+
        _VIPS_UNAVAILABLE = f"libvips {_pyvips.version(0)}.{_pyvips.version(1)} is older than 8.12"
        _pyvips = None

# libvips starts a thread pool for its first decode. A process forked after that has the pool's
# state but not its threads, and its first libvips call would wait for them forever: such a child
# decodes with Pillow (same pixels, slower). Processes forked before keep libvips; the pools' fork
# server imports pyvips but never decodes.
_vips_started = False


def _forget_vips_in_forked_child() -> None:
    global _pyvips, _VIPS_UNAVAILABLE
    if _vips_started and _pyvips is not None:
        _pyvips = None
        _VIPS_UNAVAILABLE = "this process was forked after libvips had started its threads"


if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_forget_vips_in_forked_child)

try:
    from zlib_ng import zlib_ng as _zlib_ng
except ImportError as exc:
    _zlib_ng = None
    _UNFILTER_UNAVAILABLE = f"zlib-ng could not be imported ({exc})"
else:
    _UNFILTER_UNAVAILABLE = ""
try:
    from detr_panoptic.utils._png_unfilter import unfilter as _unfilter
    from detr_panoptic.utils._png_unfilter import unfilter_grey16 as _unfilter_grey16
except ImportError as exc:
    _unfilter = _unfilter_grey16 = None
    _UNFILTER_UNAVAILABLE = (f"the C extension detr_panoptic.utils._png_unfilter was not built ({exc}); "
                             "reinstall with a C compiler")

if sys.byteorder != "little":  # the extension writes native uint32, the packed form is little-endian
    _unfilter = _unfilter_grey16 = None
    _UNFILTER_UNAVAILABLE = "the unfilter decoder works on little-endian machines only"

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = (0, 2, 3, 4, 6)  # grey, RGB, palette, grey + alpha, RGBA
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # the colour types the unfilter decoder takes: channels per pixel
_KNOWN_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
_INSTALL_HINT = "pip install 'pyvips[binary]' for faster decoding"
DECODERS = ("unfilter", "libvips", "pillow")
MAX_SEGMENT_ID = 256**3 - 1  # the largest id an RGB pixel can hold
_warned = False


def png_decoder() -> str:
    """The libraries that decode 8-bit PNGs in this process, with their versions (for reports)."""
    vips = (f"libvips {_pyvips.version(0)}.{_pyvips.version(1)}.{_pyvips.version(2)}" if _pyvips is not None
            else f"Pillow {Image.__version__} ({_VIPS_UNAVAILABLE}; {_INSTALL_HINT})")
    if _unfilter is None or _zlib_ng is None:
        return f"{vips} ({_UNFILTER_UNAVAILABLE})"
    return f"zlib-ng {_zlib_ng.ZLIBNG_VERSION} + our unfilter; {vips} for palette and interlaced PNGs"


def decode_rgb_png(data: bytes, source: str = "PNG", *, decoder: str | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """``[H, W]`` uint32 packed pixels (see the module docstring) of the PNG file bytes ``data``.

    ``source`` names the file in errors. ``decoder``: None picks the fastest one available for the
    file (see the module docstring); ``"unfilter"``, ``"libvips"`` or ``"pillow"`` forces one
    (``ImportError`` when it is missing; ``"unfilter"`` on a PNG it does not take is a ``ValueError``).
    ``out``: a writable C-contiguous uint32 array; the unfilter and libvips decoders decode into it
    (and return it) when it has the image's shape. Reusing one between images of a size spares
    allocating and page-faulting 8 MB per 2048x1024 image, which cost a fresh process ~5 ms per
    decode. The array may be read-only.
    Raises ``UserInputError`` for data that does not decode and for images that have no RGB colour
    (16-bit greyscale, a non-PNG in an unsupported mode).
    """
    if decoder not in (None, *DECODERS):
        raise ValueError(f"unknown PNG decoder {decoder!r}; expected one of {', '.join(DECODERS)}")
    if decoder in (None, "unfilter"):
        if _unfilter is None or _zlib_ng is None:
            if decoder == "unfilter":
                raise ImportError(f"the unfilter decoder is not available: {_UNFILTER_UNAVAILABLE}")
        else:
            pixels = _decode_unfilter(data, source, out)
            if pixels is not None:
                return pixels
            if decoder == "unfilter":
                raise ValueError(f"{source}: the unfilter decoder takes 8-bit, non-interlaced grey, RGB "
                                 "and RGBA PNGs only")
    if decoder == "libvips" and _pyvips is None:
        raise ImportError(f"libvips is not available: {_VIPS_UNAVAILABLE}; {_INSTALL_HINT}")
    if decoder == "libvips" or (decoder is None and _pyvips is not None and _is_8bit_png(data)):
        return _decode_vips(data, source, out)
    _note_fallback()
    return _decode_pillow(data, source)


def read_id_png(path: str | os.PathLike, *, packed: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """Read a COCO panoptic PNG as ``[H, W]`` uint32 segment ids (``R + 256 G + 256^2 B``).

    The file is read once and decoded from memory (``decode_rgb_png``). Palette and greyscale PNGs
    give the ids of the colours they display. ``packed=True`` skips one pass: the ids are then only
    the low 24 bits of each value (the high byte is padding or alpha), which is all that comparisons
    between neighbours need; the array may be read-only, or ``out`` (a buffer to reuse, see
    ``decode_rgb_png``). Raises ``FileNotFoundError`` naming the path when it does not exist and
    ``UserInputError`` when it does not decode.
    """
    with open(path, "rb") as file:
        data = file.read()
    ids = decode_rgb_png(data, str(path), out=out if packed else None)
    return ids if packed else ids & np.uint32(MAX_SEGMENT_ID)


def encode_id_png(id_map: np.ndarray, level: int = 1) -> bytes:
    """The bytes of an 8-bit RGB PNG of the ``[H, W]`` segment ids ``id_map`` (0..256^3-1; the pixel
    is ``(id % 256, id // 256 % 256, id // 256^2)``), encoded directly.

    Every row uses PNG's "Sub" filter (each byte minus the byte 3 to its left, mod 256): id maps are
    piecewise constant, so the filtered rows are mostly zeros, which zlib-ng compresses with its
    run-length strategy in ~2 ms for 2048x1024 (stock zlib: ~13 ms; Pillow's whole encoder: tens of
    ms). Raises ``ValueError`` for ids out of range or a map that is not 2-D.
    """
    ids = np.asarray(id_map)
    if ids.ndim != 2 or ids.size == 0 or ids.dtype.kind not in "ui":
        raise ValueError(f"expected a non-empty [H, W] integer id map, got {ids.dtype} of shape {ids.shape}")
    if ids.min() < 0 or ids.max() > MAX_SEGMENT_ID:
        raise ValueError(f"segment ids must be in 0..{MAX_SEGMENT_ID} to fit an RGB PNG, got {ids.min()}..{ids.max()}")
    height, width = ids.shape
    rows = np.zeros((height, 1 + 3 * width), np.uint8)
    rows[:, 0] = 1  # filter type: Sub
    if ids.dtype.itemsize > 1 and not (ids.dtype.byteorder == "<" or (ids.dtype.byteorder == "=" and
                                                                       sys.byteorder == "little")):
        ids = ids.astype(ids.dtype.newbyteorder("<"))
    # The ids' own bytes, lowest first: R, G, B are the first three (missing ones stay 0). No copies.
    id_bytes = np.ascontiguousarray(ids).view(np.uint8).reshape(height, width, ids.dtype.itemsize)
    for channel in range(min(3, ids.dtype.itemsize)):
        byte = id_bytes[:, :, channel]
        # Sub-filtered channel (wraps mod 256 as PNG specifies), written with a stride of 3 (RGB).
        filtered = rows[:, 1 + channel::3]
        filtered[:, 0] = byte[:, 0]
        np.subtract(byte[:, 1:], byte[:, :-1], out=filtered[:, 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    deflate = (_zlib_ng or zlib).compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return b"".join([_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", deflate.compress(rows.data) + deflate.flush()), _png_chunk(b"IEND", b"")])


def _fits(out: np.ndarray | None, shape: tuple[int, int]) -> bool:
    """Whether a decoder can write the packed pixels of an image of ``shape`` into ``out``."""
    return (out is not None and out.shape == shape and out.dtype == np.dtype("<u4") and out.flags.writeable
            and out.flags.c_contiguous)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _is_8bit_png(data: bytes) -> bool:
    """Whether ``data`` starts like a PNG with a bit depth of 8 or less (interlaced or not)."""
    header = _png_header(data)
    return header is not None and header[2] <= 8 and header[3] in _COLOUR_TYPES


def _decode_unfilter(data: bytes, source: str, out: np.ndarray | None) -> np.ndarray | None:
    """The unfilter decoder; None when the file is not a PNG it takes (another decoder will).

    Reads the chunks (each CRC-checked), inflates the IDAT stream with zlib-ng and undoes the row
    filters in C. A damaged file raises ``UserInputError``, as the other decoders do.
    """
    header = _plain_png_header(data)
    if header is None:
        return None
    width, height, bit_depth, colour_type = header
    channels = _CHANNELS.get(colour_type)
    if bit_depth != 8 or channels is None:
        return None
    inflated = _inflated_pixels(data, source, width, height, channels)
    if inflated is None:
        return None
    if not _fits(out, (height, width)):
        out = np.empty((height, width), "<u4")
    try:
        _unfilter(inflated, width, height, channels, out)
    except ValueError as exc:
        raise _undecodable(source, str(exc)) from None
    return out


def decode_grey16_png(data: bytes, source: str = "PNG") -> np.ndarray | None:
    """``[H, W]`` uint16 samples of a 16-bit greyscale, non-interlaced PNG (Cityscapes' instance ids),
    by zlib-ng and our C unfilter: ~3x faster than Pillow on a 2048x1024 ``*_instanceIds.png``.

    None when the unfilter decoder is not available or ``data`` is not such a PNG (read it with
    Pillow then, which also gives the error for other kinds). A damaged file raises ``UserInputError``.
    """
    if _unfilter_grey16 is None or _zlib_ng is None:
        return None
    header = _plain_png_header(data)
    if header is None or header[2:] != (16, 0):
        return None
    width, height = header[:2]
    inflated = _inflated_pixels(data, source, width, height, 2)
    if inflated is None:
        return None
    samples = np.empty((height, width), np.uint16)
    try:
        _unfilter_grey16(inflated, width, height, samples)
    except ValueError as exc:
        raise _undecodable(source, str(exc)) from None
    return samples


def _png_header(data: bytes) -> tuple[int, int, int, int, int, int, int] | None:
    """The IHDR fields ``(width, height, bit depth, colour type, compression, filter, interlace)`` of
    a PNG (IHDR comes first); None when ``data`` does not start like one."""
    if len(data) < 33 or not data.startswith(_SIGNATURE) or data[8:16] != b"\0\0\0\rIHDR":
        return None
    return struct.unpack_from(">IIBBBBB", data, 16)


def _plain_png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """``(width, height, bit depth, colour type)`` of a standard, non-interlaced PNG; None otherwise."""
    header = _png_header(data)
    if header is None or header[4:] != (0, 0, 0):
        return None
    return header[:4]


def _inflated_pixels(data: bytes, source: str, width: int, height: int, bytes_per_pixel: int) -> bytes | None:
    """The inflated IDAT stream of ``data``, checked to be ``height`` rows of a filter byte and
    ``width * bytes_per_pixel`` bytes. Every chunk's CRC is checked. None when the file has a critical
    chunk this reader does not know (another decoder takes it); ``UserInputError`` when it is damaged."""
    view = memoryview(data)
    idat = []
    position, size = 8, len(data)
    while True:
        if position + 12 > size:
            raise _undecodable(source, "the file ends before its IEND chunk")
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 8 + length
        name = kind.decode("ascii", "backslashreplace")
        if end + 4 > size:
            raise _undecodable(source, f"the {name} chunk at byte {position} runs past the end of the file")
        if zlib.crc32(view[position + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            raise _undecodable(source, f"the {name} chunk at byte {position} has a wrong CRC")
        if kind == b"IDAT":
            idat.append(view[position + 8:end])
        elif kind == b"IEND":
            break
        elif not kind[0] & 0x20 and kind not in _KNOWN_CRITICAL:  # a critical chunk we do not know
            return None
        position = end + 4
    expected = height * (1 + width * bytes_per_pixel)
    # At most one byte more than the header promises: a small file cannot inflate into gigabytes.
    inflater = _zlib_ng.decompressobj()
    try:
        inflated = inflater.decompress(b"".join(idat), expected + 1)
    except _zlib_ng.error as exc:
        raise _undecodable(source, f"the pixel data does not inflate ({exc})") from None
    if len(inflated) == expected and not inflater.eof:
        raise _undecodable(source, "the pixel data does not inflate (the compressed stream is truncated)")
    if len(inflated) != expected:
        amount = f"more than {expected}" if len(inflated) > expected else str(len(inflated))
        raise _undecodable(source, f"the pixel data has {amount} bytes, expected {expected} for "
                                   f"{width}x{height} pixels")
    return inflated


def _undecodable(source: str, reason: str) -> UserInputError:
    return UserInputError(f"{source}: cannot decode the PNG (corrupt or truncated file?): {reason}")


def _decode_vips(data: bytes, source: str, out: np.ndarray | None = None) -> np.ndarray:
    global _vips_started
    _vips_started = True
    try:
        # fail_on="error": a bad CRC or a truncated stream raises instead of giving a partial image.
        image = _pyvips.Image.pngload_buffer(data, access="sequential", fail_on="error")
        if image.format != "uchar":
            return _decode_pillow(data, source)
        if image.bands <= 2:  # grey (+ alpha): the colour is (v, v, v)
            grey = image[0]
            image = grey.bandjoin([grey, grey])
        if image.bands == 3:
            image = image.bandjoin_const([255])
        shape = (image.height, image.width)
        if _fits(out, shape):
            image.write(_pyvips.Image.new_from_memory(out, image.width, image.height, 4, "uchar"))
            return out
        pixels = image.write_to_memory()
    except _pyvips.Error as exc:
        raise _undecodable(source, " ".join(str(exc).split())) from None
    return np.frombuffer(pixels, dtype="<u4").reshape(shape)


def _decode_pillow(data: bytes, source: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("P", "PA", "L", "LA", "1"):
                image = image.convert("RGB")
            if image.mode == "RGB":
                # Pillow keeps RGB pixels as RGBX: read as little-endian uint32 they are the packed form.
                pixels = _rgbx_view(image)
                if pixels is None:
                    pixels = np.frombuffer(image.tobytes("raw", "RGBX"), dtype="<u4")
                return pixels.reshape(image.height, image.width)
            if image.mode == "RGBA":
                return np.frombuffer(image.tobytes("raw", "RGBA"), dtype="<u4").reshape(image.height, image.width)
            mode = image.mode
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow: not an image, truncated data, bad CRC ...
        raise _undecodable(source, str(exc)) from None
    raise UserInputError(f"{source}: expected an RGB panoptic PNG, got mode {mode}")


def _note_fallback() -> None:
    global _warned
    if _pyvips is None and not _warned:
        _warned = True
        log.info("decoding PNGs with Pillow: %s; %s", _VIPS_UNAVAILABLE, _INSTALL_HINT)


class _ArrowSchema(ctypes.Structure):
    pass


class _ArrowArray(ctypes.Structure):
    pass


# The Arrow C data interface structs (a stable ABI, https://arrow.apache.org/docs/format/CDataInterface.html).
_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]
_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _rgbx_view(image: Image.Image) -> np.ndarray | None:
    """A zero-copy ``[H, W]`` uint32 view of a loaded RGB image's pixel memory (RGBX, little-endian),
    through Pillow's Arrow export; None when that export is not available (older Pillow, an image
    stored in several blocks), and the caller copies with ``tobytes`` instead.

    The Arrow capsules ride along on the buffer object, so the memory stays alive as long as the view.
    """
    try:
        schema_capsule, array_capsule = image.__arrow_c_array__()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
    array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
    if (schema.format != b"+w:4" or schema.n_children != 1 or schema.children[0].contents.format != b"C"
            or array.n_children != 1 or array.offset != 0 or array.length != image.width * image.height):
        return None
    child = array.children[0].contents
    if child.offset != 0 or child.n_buffers != 2 or not child.buffers[1]:
        return None
    buffer = (ctypes.c_uint8 * (4 * image.width * image.height)).from_address(child.buffers[1])
    buffer._arrow = (schema_capsule, array_capsule)  # releases the export when the view goes away
    return np.ctypeslib.as_array(buffer).view("<u4").reshape(image.height, image.width)


# -- building blocks for other PNG readers and writers (utils/png_grey.py) ---------------------------------------
def png_header(data: bytes) -> tuple[int, int, int, int, int, int, int] | None:
    """``(width, height, bit depth, colour type, compression, filter, interlace)`` of PNG bytes; None otherwise."""
    return _png_header(data)


def inflate_rows(data: bytes, source: str, width: int, height: int, bytes_per_pixel: int) -> bytes | None:
    """The inflated, still filtered rows of a non-interlaced PNG (``height`` x (1 + ``width`` x
    ``bytes_per_pixel``) bytes), CRCs checked; None when zlib-ng is missing or a critical chunk is unknown."""
    if _zlib_ng is None:
        return None
    return _inflated_pixels(data, source, width, height, bytes_per_pixel)


def unfilter_rows(rows: bytes | memoryview, width: int, height: int, channels: int, out: np.ndarray) -> bool:
    """Undo the row filters of inflated rows into ``out`` (uint32 ``[height, width]`` packed pixels) with
    our C extension; False (``out`` untouched) when it is not available."""
    if _unfilter is None:
        return False
    _unfilter(rows, width, height, channels, out)
    return True


def decode_packed_fast(data: bytes, source: str) -> np.ndarray | None:
    """``decode_rgb_png`` by the unfilter decoder only; None when it does not take the file."""
    if _unfilter is None or _zlib_ng is None:
        return None
    return _decode_unfilter(data, source, None)


def png_from_filtered_rows(rows: np.ndarray, width: int, height: int, bit_depth: int, colour_type: int,
                           level: int = 1) -> bytes:
    """PNG bytes from already filtered rows (uint8 ``[height, 1 + row bytes]``), deflated with zlib-ng's
    (else zlib's) run-length strategy."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    deflate = (_zlib_ng or zlib).compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return b"".join([_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", deflate.compress(rows.data) + deflate.flush()), _png_chunk(b"IEND", b"")])
