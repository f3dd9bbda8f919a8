"""Data loading cost per sample: 2048x1024 Cityscapes-like images, ~30 segments, resized to 800x1600.

Builds synthetic 2048x1024 scenes with 25-35 kept segments, converts them to COCO panoptic, and
times ``CocoPanopticDataset.__getitem__`` (decode image + panoptic PNG, resize to min_size 800 /
max_size 1600, normalise, masks/boxes/areas) on one core (``torch.set_num_threads(1)``), plain and
with the prepared cache (``prepare_cache``). Median over repetitions of the mean time per sample.
Usage: ``python bench/bench_loading.py [--images 8] [--repeats 3]``. Goal: <= 0.15 s per sample.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detr_panoptic.data.cityscapes import convert_cityscapes
from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset, prepare_cache
from detr_panoptic.data.synthetic import SceneOptions, synthetic_sample, write_sample

RESULTS = Path(__file__).resolve().parent / "results"
BUSY = SceneOptions(density=2.5)  # ~30 segments per image, as the loading goal states
IGNORED = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)


def kept_segments(ids: np.ndarray) -> int:
    values = np.unique(ids)
    return int((~np.isin(np.where(values < 1000, values, values // 1000), IGNORED)).sum())


def make_tree(root: Path, images: int) -> list[int]:
    """Write ``images`` scenes with 25..35 kept segments (seeds picked on small previews)."""
    counts = []
    seed = 0
    while len(counts) < images:
        _, preview, _ = synthetic_sample(seed, 256, 512, options=BUSY)
        if 25 <= kept_segments(preview) <= 35:
            rgb, ids, scene = synthetic_sample(seed, 1024, 2048, options=BUSY)
            write_sample(root, "val", "frankfurt", seed, rgb, ids, scene)
            counts.append(kept_segments(ids))
        seed += 1
    return counts


def time_dataset(dataset, repeats: int) -> tuple[float, float, float]:
    """(median wall s/sample, median CPU s/sample of this process, mean segments per sample)."""
    wall, cpu, segments = [], [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for index in range(len(dataset)):
            _, target = dataset[index]
            segments.append(len(target["labels"]))
        wall.append((time.perf_counter() - start) / len(dataset))
        cpu.append((time.process_time() - start_cpu) / len(dataset))
    return statistics.median(wall), statistics.median(cpu), float(np.mean(segments))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loading_") as tmp:
        root = Path(tmp) / "cityscapes"
        make_tree(root, args.images)
        convert_cityscapes(root, splits=["val"], workers=2, progress=False)
        dataset = cityscapes_panoptic_dataset(root, "val", min_size=800, max_size=1600)
        image, _ = dataset[0]
        assert tuple(image.shape[-2:]) == (800, 1600), image.shape
        plain, plain_cpu, segments = time_dataset(dataset, args.repeats)
        start = time.perf_counter()
        prepare_cache(dataset, Path(tmp) / "cache", progress=False)
        prepare = (time.perf_counter() - start) / len(dataset)
        cached_dataset = cityscapes_panoptic_dataset(root, "val", min_size=800, max_size=1600,
                                                     cache_dir=Path(tmp) / "cache")
        cached, cached_cpu, _ = time_dataset(cached_dataset, args.repeats)
    figures = {
        "images": args.images,
        "repeats": args.repeats,
        "input_size": "2048x1024",
        "output_size": "1600x800",
        "mean_segments": round(segments, 1),
        "s_per_sample": round(plain, 4),
        "cpu_s_per_sample": round(plain_cpu, 4),
        "s_per_sample_cached": round(cached, 4),
        "cpu_s_per_sample_cached": round(cached_cpu, 4),
        "s_per_sample_prepare_cache": round(prepare, 4),
        "goal_s_per_sample": 0.15,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"name": "bench_loading", "figures": figures, "command": "python bench/bench_loading.py",
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "notes": "one thread; CocoPanopticDataset.__getitem__ with the default fast path (decode, resize "
                       "shorter side 800 / longer <= 1600, normalise, masks+boxes+areas); cached = prepare_cache "
                       ".npy files at the target size; median over repeats of the mean per sample; wall time suffers when "
                       "other jobs share the 2 cores (see load_average_1min), CPU time much less"}
    (RESULTS / "bench_loading.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
