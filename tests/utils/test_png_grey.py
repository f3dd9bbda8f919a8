"""utils/png_grey.py: the same pixels as Pillow's convert("L"), whatever filters the file uses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.png_grey import encode_grey8_png, read_grey8_png, read_mask_pixels


def masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [np.zeros((30, 50), np.uint8)]
    for k in range(8):
        mask = np.zeros((30, 50), np.uint8)
        for _ in range(k % 3 + 1):
            y, x = rng.integers(0, 25, 2)
            mask[y:y + rng.integers(1, 20), x:x + rng.integers(1, 40)] = rng.choice([1, 7, 255])
        if k % 2:
            mask[rng.random(mask.shape) < 0.05] = 255  # noise: Pillow then picks Average/Paeth rows too
        out.append(mask)
    return out


@pytest.mark.parametrize("writer", ["pillow", "ours", "rgb", "1bit"])
def test_mask_pixels_and_grey_values_equal_pillow(tmp_path: Path, writer: str) -> None:
    for k, mask in enumerate(masks()):
        path = tmp_path / f"{k}.png"
        if writer == "ours":
            path.write_bytes(encode_grey8_png(mask))
        elif writer == "rgb":
            Image.fromarray(np.stack([mask, mask // 2, mask], -1)).save(path)
        elif writer == "1bit":
            Image.fromarray(mask > 0).save(path)
        else:
            Image.fromarray(mask).save(path)
        expected = np.asarray(Image.open(path).convert("L"))
        shape, pixels = read_mask_pixels(path)
        assert shape == mask.shape
        np.testing.assert_array_equal(pixels, np.flatnonzero(expected))
        np.testing.assert_array_equal(read_grey8_png(path), expected)


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_mask_pixels(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserInputError, match="bad.png"):
        read_grey8_png(tmp_path / "bad.png")
