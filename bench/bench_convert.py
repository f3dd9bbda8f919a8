"""Cityscapes -> COCO panoptic conversion: detr-panoptic (2 workers) vs cityscapesScripts, same run.

Generates synthetic 2048x1024 Cityscapes scenes, converts them with cityscapesScripts'
``convert2panoptic`` (single process, as shipped) and with ``detr_panoptic.convert_cityscapes``
(``--workers 2``), checks that the JSON bytes and PNG pixels are identical, and reports the median
time per image over the repetitions. Usage: ``python bench/bench_convert.py [--images 10] [--repeats 3]``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from detr_panoptic.data.cityscapes import convert_cityscapes
from detr_panoptic.data.synthetic import make_synthetic_cityscapes

RESULTS = Path(__file__).resolve().parent / "results"


def same_output(ours: Path, reference: Path) -> bool:
    ref_files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    if ref_files != sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file()):
        return False
    for rel in ref_files:
        if rel.suffix == ".json":
            if (ours / rel).read_bytes() != (reference / rel).read_bytes():
                return False
        elif not np.array_equal(np.asarray(Image.open(ours / rel)), np.asarray(Image.open(reference / rel))):
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        root = Path(tmp) / "cityscapes"
        make_synthetic_cityscapes(root, train=0, val=args.images, size=(1024, 2048), seed=0, workers=2)
        reference_times, our_times, identical = [], [], True
        reference_cpu, our_cpu_one_worker = [], []
        for repeat in range(args.repeats):
            ref_out, our_out = Path(tmp) / f"ref{repeat}", Path(tmp) / f"ours{repeat}"
            ref_out.mkdir()
            start, start_cpu = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                convert2panoptic(str(root / "gtFine"), str(ref_out), False, ["val"])
            reference_times.append(time.perf_counter() - start)
            reference_cpu.append(time.process_time() - start_cpu)
            start = time.perf_counter()
            convert_cityscapes(root, our_out, splits=["val"], workers=args.workers, progress=False)
            our_times.append(time.perf_counter() - start)
            identical &= same_output(our_out, ref_out)
            shutil.rmtree(our_out)
            # CPU time of one in-process worker: the per-image cost, little affected by other jobs.
            start_cpu = time.process_time()
            convert_cityscapes(root, our_out, splits=["val"], workers=1, progress=False)
            our_cpu_one_worker.append(time.process_time() - start_cpu)
            identical &= same_output(our_out, ref_out)
            shutil.rmtree(ref_out)
            shutil.rmtree(our_out)
    reference = statistics.median(reference_times) / args.images
    ours = statistics.median(our_times) / args.images
    figures = {
        "images": args.images,
        "image_size": "2048x1024",
        "repeats": args.repeats,
        "workers": args.workers,
        "cityscapesscripts_s_per_image": round(reference, 4),
        "ours_s_per_image": round(ours, 4),
        "speedup": round(reference / ours, 2),
        "cityscapesscripts_cpu_s_per_image": round(statistics.median(reference_cpu) / args.images, 4),
        "ours_1_worker_cpu_s_per_image": round(statistics.median(our_cpu_one_worker) / args.images, 4),
        "cpu_ratio_1_worker": round(statistics.median(reference_cpu) / statistics.median(our_cpu_one_worker), 2),
        "identical_output": identical,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"name": "bench_convert", "figures": figures, "command": "python bench/bench_convert.py",
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "notes": "median over repeats of the whole split's wall time / images; cityscapesScripts "
                       "single process as shipped vs ours with --workers 2; goal: speedup >= 4 with identical "
                       "JSON bytes and PNG pixels; other jobs sharing the 2 cores (load_average_1min) skew wall times, "
                       "so the CPU time per image of each converter in one process is reported as well"}
    (RESULTS / "bench_convert.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
