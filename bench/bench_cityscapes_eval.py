"""Cityscapes' semantic + instance benchmark scoring: ``detr-panoptic cityscapes-eval`` vs
cityscapesScripts' ``evalPixelLevelSemanticLabeling`` + ``evalInstanceLevelSemanticLabeling`` on the
same files, side by side, each a whole fresh process (start-up included).

Data: ``--images`` synthetic Cityscapes scenes at 2048x1024 (``data.synthetic.make_synthetic_cityscapes``:
stuff, ~20 thing instances per image at density 2.5, crowd groups, ego vehicle, caravans), and imperfect results in the benchmark's
formats (``data.synthetic_results.write_cityscapes_results``: semantic labelIds PNGs, one full-size
0/255 mask PNG per predicted instance written with Pillow, as detectron2's Cityscapes writer does,
30 low-confidence candidates per image among them, and a COCO panoptic prediction).

Processes: ours is the command (``cityscapes-eval RESULTS --cityscapes ROOT --parts semantic instance``,
threads = the cores); the reference runs both evaluators in one process, patched only as far as
today's numpy needs (tests/evaluation/cityscapes_reference.py: ``np.in1d`` -> ``np.isin``, no JSON
writing), with ``evalInstanceLevelSemanticLabeling``'s ground-truth cache absent (a fresh evaluation).
Wall time and CPU time (user + system, all threads) of each process are recorded: on a shared
machine the CPU time is the steadier comparison. Both write their scores; they must agree (mIoU, iIoU, category IoU/iIoU, AP, AP50) to 1e-9. Reps
alternate the order; medians are reported, with the 1-minute load average (the machine may be shared).
Also ``--parts panoptic semantic instance`` (all three from one run) is timed once per rep.

Usage: python bench/bench_cityscapes_eval.py [--images 20] [--reps 3] [--keep DIR]
Prints the figures and writes bench/results/bench_cityscapes_eval.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Cityscapes val has about 20 thing instances per image; a detector keeps a tail of low-scored masks.
DENSITY = 2.5
EXTRA_CANDIDATES = 30

OURS = """
import json, sys
from detr_panoptic.cli import main
code = main(["cityscapes-eval", {results!r}, "--cityscapes", {root!r}, "--parts", *{parts!r}, "--out", {out!r}])
sys.exit(code)
"""

REFERENCE = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.evaluation.cityscapes_reference import reference_instance_level, reference_pixel_level
pixel = reference_pixel_level({semantic!r}, {root!r})
instance = reference_instance_level({instance!r}, {root!r}, cache={tmp!r})
json.dump({{"miou": pixel["averageScoreClasses"], "iiou": pixel["averageScoreInstClasses"],
           "category_miou": pixel["averageScoreCategories"], "category_iiou": pixel["averageScoreInstCategories"],
           "ap": float(instance["averages"]["allAp"]), "ap50": float(instance["averages"]["allAp50%"])}},
          open({out!r}, "w"))
"""


def timed(code: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and its threads) of a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, timeout=1200, check=False)
    seconds = time.perf_counter() - begin
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def make_data(folder: Path, images: int) -> dict[str, float]:
    from detr_panoptic.data.synthetic import SceneOptions, make_synthetic_cityscapes
    from detr_panoptic.data.synthetic_results import write_cityscapes_results

    root, results = folder / "cityscapes", folder / "results"
    if not (root / "gtFine" / "val").is_dir():
        make_synthetic_cityscapes(root, train=0, val=images, size=(1024, 2048), seed=0, workers=2,
                                  options=SceneOptions(density=DENSITY))
    if not (results / "predictions.json").is_file():
        write_cityscapes_results(root, "val", results, seed=0, pillow_masks=True, extra_candidates=EXTRA_CANDIDATES)
    return counts(root, results)


def counts(root: Path, results: Path) -> dict[str, float]:
    import numpy as np

    from detr_panoptic.evaluation.cityscapes import read_instance_ids

    instances, segments = [], []
    for path in sorted((root / "gtFine" / "val").glob("*/*_gtFine_instanceIds.png")):
        values = np.unique(read_instance_ids(path))
        instances.append(int((values >= 1000).sum()))
        segments.append(int(values.size))
    masks = [len(p.read_text().splitlines()) for p in (results / "cityscapes" / "instance").glob("*.txt")]
    return {"images": len(instances), "gt_instances_per_image": round(statistics.mean(instances), 1),
            "gt_segments_per_image": round(statistics.mean(segments), 1),
            "predicted_masks_per_image": round(statistics.mean(masks), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", help="generate into (and reuse) this folder instead of a temporary one")
    args = parser.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_cityscapes_eval_"))
    folder.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    figures: dict[str, object] = make_data(folder, args.images)
    print(f"data ready in {time.perf_counter() - begin:.0f} s: {figures}", flush=True)
    root, results = folder / "cityscapes", folder / "results"
    ours_out, reference_out = folder / "ours.json", folder / "reference.json"
    ours_code = OURS.format(results=str(results), root=str(root), parts=["semantic", "instance"], out=str(ours_out))
    all_code = OURS.format(results=str(results), root=str(root), parts=["panoptic", "semantic", "instance"],
                           out=str(folder / "all.json"))
    reference_code = REFERENCE.format(repo=str(REPO), semantic=str(results / "cityscapes" / "semantic"),
                                      instance=str(results / "cityscapes" / "instance"), root=str(root),
                                      tmp=str(folder), out=str(reference_out))
    times: dict[str, list[float]] = {"ours": [], "reference": [], "ours_all_three": []}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    loads = []
    for rep in range(args.reps):
        loads.append(os.getloadavg()[0])
        order = ["ours", "reference", "ours_all_three"] if rep % 2 == 0 else ["reference", "ours_all_three", "ours"]
        for name in order:
            code = {"ours": ours_code, "reference": reference_code, "ours_all_three": all_code}[name]
            wall, used = timed(code)
            times[name].append(wall)
            cpu[name].append(used)
            print(f"rep {rep}: {name} {wall:.2f} s (CPU {used:.2f} s)", flush=True)
    ours, reference = json.loads(ours_out.read_text()), json.loads(reference_out.read_text())
    worst = max(abs(ours[k] / 100 - reference[k]) for k in reference)
    assert worst < 1e-9, (ours, reference)
    median = {name: statistics.median(values) for name, values in times.items()}
    from detr_panoptic.utils.precision import cpu_model

    figures.update({
        "image_size": "2048x1024", "reps": args.reps,
        "ours_s": round(median["ours"], 3), "reference_s": round(median["reference"], 3),
        "reference_over_ours": round(median["reference"] / median["ours"], 2),
        "ours_all_three_s": round(median["ours_all_three"], 3),
        "ours_cpu_s": round(statistics.median(cpu["ours"]), 3),
        "reference_cpu_s": round(statistics.median(cpu["reference"]), 3),
        "reference_over_ours_cpu": round(statistics.median(cpu["reference"]) / statistics.median(cpu["ours"]), 2),
        "ours_all_three_cpu_s": round(statistics.median(cpu["ours_all_three"]), 3),
        "ours_runs_s": [round(t, 3) for t in times["ours"]], "reference_runs_s": [round(t, 3) for t in times["reference"]],
        "max_abs_difference": worst,
        "miou": round(ours["miou"], 3), "iiou": round(ours["iiou"], 3), "ap": round(ours["ap"], 3),
        "ap50": round(ours["ap50"], 3), "pq": round(json.loads((folder / "all.json").read_text())["pq"], 3),
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "load_average_1min_median": round(statistics.median(loads), 2),
    })
    for key, value in figures.items():
        print(f"{key}: {value}")
    record = {"name": "bench_cityscapes_eval", "figures": figures,
              "command": "python bench/bench_cityscapes_eval.py " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "notes": ("whole fresh processes, start-up included; ours = cityscapes-eval --parts semantic "
                        "instance (threads: all cores); reference = cityscapesScripts 2.3.0 pixel-level + "
                        "instance-level evaluators in one process, patched only for numpy 2.4 "
                        "(np.in1d -> np.isin, JSON writers off), no ground-truth cache; scores equal to "
                        "max_abs_difference (fractions); ours_all_three_s adds PQ from the same run. "
                        "The machine may be shared: load_average_1min_median.")}
    out = REPO / "bench" / "results" / "bench_cityscapes_eval.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
