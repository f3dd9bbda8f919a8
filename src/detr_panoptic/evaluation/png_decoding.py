"""Decode colour PNGs from memory into packed 32-bit pixels, fast.

A pixel comes out as one little-endian uint32 ``R + 256 G + 256^2 B + 256^3 X``: the low 24 bits are
the colour (a COCO panoptic segment id), the high byte ``X`` is padding or alpha and carries no
meaning. Palette and greyscale PNGs give the colour they display (grey ``v`` is ``(v, v, v)``);
16-bit PNGs keep the high byte of each sample, as Pillow reads them.

8-bit PNGs (every colour type, interlaced or not) are decoded by libvips (``pyvips``; the
``pyvips-binary`` wheels bundle it): a 2048x1024 panoptic PNG takes ~10 ms there against ~22 ms in
Pillow, which spends most of it outside inflate (a stored, uncompressed PNG still takes ~12 ms).
Everything else, and every PNG when pyvips cannot be imported, goes through Pillow. Both give the
same pixels (tests/evaluation/test_png_decoding.py compares them on each kind of file).
"""
from __future__ import annotations

import ctypes
import io
import logging
import os
import struct

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

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = (0, 2, 3, 4, 6)  # grey, RGB, palette, grey + alpha, RGBA
_INSTALL_HINT = "pip install 'pyvips[binary]' for faster decoding"
_warned = False


def png_decoder() -> str:
    """The library that decodes 8-bit PNGs in this process, with its version (for reports)."""
    if _pyvips is not None:
        return f"libvips {_pyvips.version(0)}.{_pyvips.version(1)}.{_pyvips.version(2)}"
    return f"Pillow {Image.__version__} ({_VIPS_UNAVAILABLE}; {_INSTALL_HINT})"


def decode_rgb_png(data: bytes, source: str = "PNG", *, use_vips: bool | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """``[H, W]`` uint32 packed pixels (see the module docstring) of the PNG file bytes ``data``.

    ``source`` names the file in errors. ``use_vips``: None picks libvips for 8-bit PNGs when it is
    available; False forces Pillow; True forces libvips (``ImportError`` when it is missing).
    ``out``: a writable C-contiguous uint32 array; libvips decodes into it (and returns it) when it
    has the image's shape. Reusing one between images of a size spares allocating and page-faulting
    8 MB per 2048x1024 image, which cost a fresh process ~5 ms per decode. The array may be read-only.
    Raises ``UserInputError`` for data that does not decode and for images that have no RGB colour
    (16-bit greyscale, a non-PNG in an unsupported mode).
    """
    if use_vips is None:
        use_vips = _pyvips is not None and _is_8bit_png(data)
    elif use_vips and _pyvips is None:
        raise ImportError(f"libvips is not available: {_VIPS_UNAVAILABLE}; {_INSTALL_HINT}")
    if use_vips:
        return _decode_vips(data, source, out)
    _note_fallback()
    return _decode_pillow(data, source)


def _is_8bit_png(data: bytes) -> bool:
    """Whether ``data`` starts like a PNG with a bit depth of 8 or less (the IHDR chunk comes first)."""
    if len(data) < 33 or not data.startswith(_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = struct.unpack_from(">BB", data, 24)
    return bit_depth <= 8 and colour_type in _COLOUR_TYPES


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
        if (out is not None and out.shape == shape and out.dtype == np.dtype("<u4") and out.flags.writeable
                and out.flags.c_contiguous):
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
