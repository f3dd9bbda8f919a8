"""8-bit greyscale PNGs: label maps (Cityscapes ``*_labelIds.png``, semantic results) and binary
instance masks (Cityscapes instance results), read and written fast.

* ``read_grey8_png``: ``[H, W]`` uint8 of an 8-bit PNG as Pillow's ``convert("L")`` gives it for
  greyscale files (the sample itself); other kinds (RGB, palette, 1-bit, 16-bit) go through Pillow's
  ``convert("L")``, so the values are always those Pillow gives.
* ``read_mask_pixels``: the flat indices of the non-zero pixels of a mask PNG (what cityscapesScripts'
  instance evaluator takes as the instance: ``convert("L") != 0``). A full-image mask is mostly empty
  rows; for 8-bit greyscale files whose rows use PNG's None, Sub or Up filters (what Pillow and
  ``encode_grey8_png`` write for masks) only the rows that hold pixels are reconstructed, from the
  inflated stream: ~1 ms for a 2048x1024 mask, against ~10 ms to decode it whole with Pillow.
* ``encode_grey8_png``: an 8-bit greyscale PNG (Sub filter, zlib-ng run-length strategy).
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from detr_panoptic.utils import png as _png
from detr_panoptic.utils.errors import UserInputError

_NONE, _SUB, _UP = 0, 1, 2
_PACKED_ZERO = np.uint32(0xFF000000)


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise UserInputError(f"{what} {path} is a folder, expected a PNG file") from None


def _pillow_grey(data: bytes, source: str) -> np.ndarray:
    """``convert("L")`` of any image Pillow reads, as uint8 ``[H, W]``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                raise UserInputError(f"{source}: expected an 8-bit PNG, got a 16-bit one (mode {image.mode})")
            return np.asarray(image.convert("L"))
    except UnidentifiedImageError:
        what = "an empty file" if not data else f"not an image (it starts with {data[:8]!r})"
        raise UserInputError(f"{source}: cannot decode: {what}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, UserInputError):
            raise
        raise UserInputError(f"{source}: cannot decode the PNG (corrupt or truncated file?): {exc}") from None


def _grey8_rows(data: bytes, source: str) -> np.ndarray | None:
    """The inflated ``[H, 1 + W]`` rows (filter byte first) of an 8-bit greyscale non-interlaced PNG
    that this module can reconstruct; None for other files (and when zlib-ng is missing)."""
    header = _png.png_header(data)
    if header is None or header[2:4] != (8, 0) or header[6] != 0:
        return None
    width, height = header[:2]
    inflated = _png.inflate_rows(data, source, width, height, 1)
    if inflated is None:
        return None
    return np.frombuffer(inflated, np.uint8).reshape(height, width + 1)


def read_grey8_png(path: str | os.PathLike, *, what: str = "PNG") -> np.ndarray:
    """``[H, W]`` uint8 of the PNG at ``path`` (greyscale sample, else Pillow's ``convert("L")``).

    ``FileNotFoundError`` names the path; an undecodable file is a ``UserInputError``."""
    values = read_grey8_packed(path, what=what)
    return values if values.dtype == np.uint8 else (values & np.uint32(0xFF)).astype(np.uint8)


def read_grey8_packed(path: str | os.PathLike, *, what: str = "PNG") -> np.ndarray:
    """``read_grey8_png``'s values in the low byte of each element, without a copy: ``[H, W]`` uint32
    packed pixels (``utils.png``) for 8-bit greyscale files, else uint8. Equal neighbours stay equal,
    so run-length counting can work on it and mask the run values with ``& 0xFF``."""
    data = _read(path, what)
    source = f"{what} {path}"
    header = _png.png_header(data)
    if header is not None and header[2:4] == (8, 0):  # 8-bit grey: the packed pixels' low byte
        pixels = _png.decode_packed_fast(data, source)
        if pixels is not None:
            return pixels
    return _pillow_grey(data, source)


def read_mask_pixels(path: str | os.PathLike, *, what: str = "mask PNG") -> tuple[tuple[int, int], np.ndarray]:
    """``((H, W), flat indices)`` of the pixels of the mask PNG at ``path`` that are non-zero in
    Pillow's ``convert("L")`` (int64, ascending)."""
    data = _read(path, what)
    source = f"{what} {path}"
    rows = _grey8_rows(data, source)
    if rows is not None:
        indices = _sparse_nonzero(rows)
        if indices is not None:
            return (rows.shape[0], rows.shape[1] - 1), indices
    grey = _pillow_grey(data, source)
    return grey.shape, np.flatnonzero(grey)


def _sparse_nonzero(rows: np.ndarray) -> np.ndarray | None:
    """Flat indices of the non-zero pixels of filtered rows ``[H, 1 + W]``; None when the rows cannot
    be reconstructed here (the caller decodes the whole file then).

    A row whose filtered bytes are all zero below an all-zero row is zero whatever its filter. So the
    image is zero above the first row with a non-zero filtered byte, and below the last one from the
    first following row filtered None or Sub (zero bytes there give a zero row). Only the rows between
    are unfiltered (by our C extension, else here for the None, Sub and Up filters)."""
    height, width = rows.shape[0], rows.shape[1] - 1
    active = np.flatnonzero(rows[:, 1:].any(axis=1))
    if not active.size:
        return np.zeros(0, np.int64)
    types = rows[:, 0]
    if int(types.max()) > 4:
        row = int(np.flatnonzero(types > 4)[0])
        raise UserInputError(f"unknown PNG filter type {int(types[row])} in row {row}")
    first, last = int(active[0]), int(active[-1])
    zero_after = np.flatnonzero(types[last + 1:] <= _SUB)
    end = last + 1 + int(zero_after[0]) if zero_after.size else height
    span = rows[first:end]
    pixels = np.empty((end - first, width), "<u4")
    if _png.unfilter_rows(span.data, width, end - first, 1, pixels):
        # Grey v is packed as (v, v, v, 255): zero is 0xFF000000 (one comparison of whole words).
        return np.flatnonzero(pixels != _PACKED_ZERO) + first * width
    return _sparse_nonzero_numpy(span, first, width)


def _sparse_nonzero_numpy(span: np.ndarray, first: int, width: int) -> np.ndarray | None:
    """``_sparse_nonzero`` without the C extension: rows filtered None, Sub or Up only."""
    pieces = []
    previous = np.zeros(width, np.uint8)
    for offset, row in enumerate(span):
        kind, filtered = int(row[0]), row[1:]
        if kind == _NONE:
            current = filtered
        elif kind == _SUB:
            current = np.cumsum(filtered, dtype=np.uint8)
        elif kind == _UP:
            current = filtered + previous
        else:
            return None
        pieces.append(np.flatnonzero(current) + (first + offset) * width)
        previous = current
    return np.concatenate(pieces)


def encode_grey8_png(array: np.ndarray, level: int = 1) -> bytes:
    """The bytes of an 8-bit greyscale PNG of the uint8 ``[H, W]`` ``array`` (every row Sub-filtered,
    zlib-ng run-length strategy: label maps and masks are piecewise constant)."""
    values = np.asarray(array)
    if values.ndim != 2 or values.size == 0 or values.dtype != np.uint8:
        raise ValueError(f"expected a non-empty [H, W] uint8 array, got {values.dtype} of shape {values.shape}")
    height, width = values.shape
    rows = np.empty((height, 1 + width), np.uint8)
    rows[:, 0] = _SUB
    rows[:, 1] = values[:, 0]
    np.subtract(values[:, 1:], values[:, :-1], out=rows[:, 2:])
    return _png.png_from_filtered_rows(rows, width, height, 8, 0, level)
