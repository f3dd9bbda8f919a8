"""PQ evaluation speed: detr_panoptic.pq_compute vs hotcoco (Rust) vs cityscapesscripts' evaluatePanoptic
(panopticapi's algorithm) on generated 2048x1024 Cityscapes-like scenes, each with 2 workers.

Ground truth: stuff regions with ragged boundaries (sky, building, vegetation, sidewalk, road), 30-50
thing instances (cars, persons, ...) with ids ``class * 1000 + k``, crowd regions, void on the ego
vehicle and along some boundaries. Predictions: the ground truth seen through a 1/4-resolution mask
(blocky, shifted boundaries), some instances missed, merged or mislabelled, a few false positives,
ids 1..N. Both PNG sets are written with Pillow, as cityscapesscripts' converter does.

Every evaluator runs in a fresh Python process per repetition (``python -c``): "cold" is the wall time
from starting that process to the end of its first evaluation (interpreter start, imports, first call:
what a user's script pays), "warm" the median of further calls in the same process. The processes
import from a bytecode cache (``PYTHONPYCACHEPREFIX``, filled by one untimed run of each evaluator), as
an installed package does, also where ``PYTHONDONTWRITEBYTECODE`` is set. Workers: ours
``pq_compute(workers=2)`` (threads), hotcoco with ``RAYON_NUM_THREADS=2``, cityscapesscripts a Pool of
``multiprocessing.cpu_count()`` processes as shipped (2 on the machine this is meant for). hotcoco
takes integer image ids only, so it reads copies of the two JSONs with the ids renumbered 1..N (same
PNGs). All three must give the same PQ, SQ, RQ per class and averages to 1e-9. Repetitions rotate
the evaluators' order; the 1-minute load average is recorded, as the machine may be shared.

``--profile`` also times ours stage by stage in one thread (file reading, PNG decoding, counting).

Usage: python bench/bench_pq.py [--images 16] [--reps 7] [--warm-calls 5] [--workers 2] [--keep DIR] [--profile]
Prints the figures and writes bench/results/bench_pq.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from detr_panoptic.evaluation import id_map_to_rgb
from detr_panoptic.utils.png import png_decoder

HEIGHT, WIDTH = 1024, 2048
# Cityscapes label ids: stuff 7 road, 8 sidewalk, 11 building, 21 vegetation, 23 sky;
# things 24 person, 25 rider, 26 car, 27 truck, 33 bicycle.
STUFF = {"road": 7, "sidewalk": 8, "building": 11, "vegetation": 21, "sky": 23}
THINGS = {"person": 24, "rider": 25, "car": 26, "truck": 27, "bicycle": 33}
CATEGORIES = ([{"id": i, "name": n, "isthing": 0} for n, i in STUFF.items()]
              + [{"id": i, "name": n, "isthing": 1} for n, i in THINGS.items()])


def ragged(rng: np.random.Generator, base: float, amplitude: float, width: int = WIDTH) -> np.ndarray:
    """A boundary height per column: a smooth random walk around ``base``."""
    steps = rng.normal(0, 1, width).cumsum()
    steps -= np.linspace(steps[0], steps[-1], width)
    return (base + amplitude * steps / (np.abs(steps).max() + 1e-9)).astype(int)


def ground_truth(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    rows = np.arange(HEIGHT)[:, None]
    gt = np.full((HEIGHT, WIDTH), STUFF["road"], np.int64)
    horizon = ragged(rng, 0.25 * HEIGHT, 120)
    treeline = ragged(rng, 0.45 * HEIGHT, 80)
    kerb = ragged(rng, 0.62 * HEIGHT, 30)
    gt[rows < kerb] = STUFF["sidewalk"]
    gt[rows < treeline] = STUFF["vegetation"]
    for x0 in np.sort(rng.choice(WIDTH, 6, replace=False)):  # buildings between trees
        x1 = min(WIDTH, x0 + int(rng.integers(100, 400)))
        top = ragged(rng, 0.15 * HEIGHT, 40, x1 - x0)
        block = gt[:, x0:x1]
        block[(rows < treeline[x0:x1] + 20) & (rows >= top)] = STUFF["building"]
    gt[rows < horizon] = STUFF["sky"]
    segments = [{"id": i, "category_id": i, "iscrowd": 0} for i in STUFF.values()]
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    names = list(THINGS)
    for k in range(int(rng.integers(30, 51))):
        name = names[int(rng.choice(len(names), p=[0.35, 0.05, 0.45, 0.05, 0.10]))]
        cy = int(rng.integers(int(0.4 * HEIGHT), int(0.85 * HEIGHT)))
        scale = 0.3 + 1.7 * (cy - 0.4 * HEIGHT) / (0.45 * HEIGHT)
        h = int(scale * (120 if name in ("person", "rider") else 80) * rng.uniform(0.7, 1.3))
        w = int(scale * (45 if name in ("person", "rider") else 180) * rng.uniform(0.7, 1.3))
        cx = int(rng.integers(0, WIDTH))
        y0, y1, x0, x1 = max(0, cy - h // 2), min(HEIGHT, cy + h // 2), max(0, cx - w // 2), min(WIDTH, cx + w // 2)
        if y1 - y0 < 4 or x1 - x0 < 4:
            continue
        # An ellipse with a noisy outline.
        ey, ex = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
        angle = np.arctan2(ey - cy, ex - cx)
        wobble = 1 + 0.08 * np.sin(angle * int(rng.integers(3, 9)) + rng.uniform(0, 6))
        inside = ((ey - cy) / (h / 2)) ** 2 + ((ex - cx) / (w / 2)) ** 2 < wobble**2
        crowd = rng.random() < 0.06
        sid = THINGS[name] if crowd else THINGS[name] * 1000 + k
        gt[y0:y1, x0:x1][inside] = sid
        if not any(s["id"] == sid for s in segments):
            segments.append({"id": sid, "category_id": THINGS[name], "iscrowd": int(crowd)})
        if rng.random() < 0.3:  # an unlabelled gap along part of the outline
            edge = inside & ~np.roll(inside, 3, axis=1)
            gt[y0:y1, x0:x1][edge] = 0
    gt[rows >= ragged(rng, 0.9 * HEIGHT, 15)] = 0  # ego vehicle
    ids, counts = np.unique(gt, return_counts=True)
    area = dict(zip(ids.tolist(), counts.tolist()))
    segments = [dict(s, area=area[s["id"]]) for s in segments if s["id"] in area]
    return gt, segments


def prediction(rng: np.random.Generator, gt: np.ndarray, segments: list[dict]) -> tuple[np.ndarray, list[dict]]:
    category = {s["id"]: s["category_id"] for s in segments}
    coarse = gt[::4, ::4]
    dy, dx = rng.integers(-2, 3, size=2)
    pred_source = np.roll(np.repeat(np.repeat(coarse, 4, 0), 4, 1), (int(dy), int(dx)), axis=(0, 1))
    pred_source = np.where(pred_source == 0, STUFF["road"], pred_source)  # the model labels every pixel
    ids = np.unique(pred_source)
    new_ids = rng.permutation(len(ids)) + 1
    relabel = {int(i): int(n) for i, n in zip(ids, new_ids)}
    pred_segments = []
    for sid, new in relabel.items():
        cat = category.get(sid, STUFF["road"])
        if cat in THINGS.values() and rng.random() < 0.1:
            cat = int(rng.choice(list(THINGS.values())))
        pred_segments.append({"id": new, "category_id": cat})
    lookup = np.zeros(int(ids.max()) + 1, np.int64)
    for sid, new in relabel.items():
        lookup[sid] = new
    pred = lookup[pred_source]
    next_id = len(ids) + 1
    for _ in range(int(rng.integers(2, 6))):  # false positives
        y, x = int(rng.integers(0, HEIGHT - 60)), int(rng.integers(0, WIDTH - 60))
        pred[y:y + int(rng.integers(20, 60)), x:x + int(rng.integers(20, 60))] = next_id
        pred_segments.append({"id": next_id, "category_id": int(rng.choice(list(THINGS.values())))})
        next_id += 1
    present = set(np.unique(pred).tolist())
    return pred, [s for s in pred_segments if s["id"] in present]


def make_dataset(root: Path, num_images: int, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    paths = {"gt_json": root / "gt.json", "gt_folder": root / "gt", "pred_json": root / "pred.json",
             "pred_folder": root / "pred"}
    paths["gt_folder"].mkdir(parents=True, exist_ok=True)
    paths["pred_folder"].mkdir(parents=True, exist_ok=True)
    gt_annotations, pred_annotations, segment_counts = [], [], []
    for i in range(num_images):
        image_id = f"bench_{i:06d}_000019"
        file_name = f"{image_id}_gtFine_panoptic.png"
        gt, gt_segments = ground_truth(rng)
        pred, pred_segments = prediction(rng, gt, gt_segments)
        Image.fromarray(id_map_to_rgb(gt)).save(paths["gt_folder"] / file_name)
        Image.fromarray(id_map_to_rgb(pred)).save(paths["pred_folder"] / file_name)
        gt_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": gt_segments})
        pred_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": pred_segments})
        segment_counts.append(len(gt_segments))
    paths["gt_json"].write_text(json.dumps({"annotations": gt_annotations, "categories": CATEGORIES}))
    paths["pred_json"].write_text(json.dumps({"annotations": pred_annotations}))
    print(f"generated {num_images} images, {min(segment_counts)}-{max(segment_counts)} gt segments each")
    return paths


def integer_id_copies(paths: dict[str, Path]) -> dict[str, Path]:
    """The two JSONs with image ids renumbered 1..N (hotcoco rejects string ids); same PNG folders."""
    copies = dict(paths)
    numbers: dict[str, int] = {}
    for key in ("gt_json", "pred_json"):
        document = json.loads(paths[key].read_text())
        for annotation in document["annotations"]:
            annotation["image_id"] = numbers.setdefault(annotation["image_id"], len(numbers) + 1)
        for image in document.get("images", []):
            image["id"] = numbers.setdefault(image["id"], len(numbers) + 1)
        copies[key] = paths[key].with_name(paths[key].stem + "_int_ids.json")
        copies[key].write_text(json.dumps(document))
    return copies


# What each fresh process runs: {setup} imports the evaluator, {call} evaluates once (an expression).
CHILD = """
import json, os, sys, time
start = time.perf_counter()
{setup}
imported = time.perf_counter()
calls, ends = [], []
for _ in range({calls}):
    begin = time.perf_counter()
    result = {call}
    calls.append(time.perf_counter() - begin)
    ends.append(time.time())
    if len(calls) == 1:
        cpu = sum(os.times()[:2])  # this process's user + system CPU since it started, all threads
json.dump({{"import_s": imported - start, "calls_s": calls, "first_end": ends[0], "cold_cpu_s": cpu,
           "result": result}},
          open({out!r}, "w"))
"""

EVALUATORS = {
    "ours": ("from detr_panoptic import pq_compute",
             "pq_compute({gt_json!r}, {pred_json!r}, {gt_folder!r}, {pred_folder!r}, workers={workers})"),
    "hotcoco": ("from hotcoco.panoptic import pq_compute",
                "pq_compute({gt_json_int!r}, {pred_json_int!r}, {gt_folder!r}, {pred_folder!r})"),
    "cityscapesscripts": ("from cityscapesscripts.evaluation.evalPanopticSemanticLabeling import evaluatePanoptic",
                          ("evaluatePanoptic({gt_json!r}, {gt_folder!r}, {pred_json!r}, {pred_folder!r}, "
                           "{results!r})")),
}


def run_fresh(name: str, paths: dict[str, Path], int_paths: dict[str, Path], workers: int, calls: int,
              tmp: Path) -> dict:
    """One fresh process of evaluator ``name``: import, then ``calls`` evaluations. Returns the child's
    figures plus ``cold_s`` (process start to the end of the first evaluation) and ``process_s``."""
    setup, call = EVALUATORS[name]
    out = tmp / f"{name}.json"
    call = call.format(gt_json=str(paths["gt_json"]), pred_json=str(paths["pred_json"]),
                       gt_folder=str(paths["gt_folder"]), pred_folder=str(paths["pred_folder"]),
                       gt_json_int=str(int_paths["gt_json"]), pred_json_int=str(int_paths["pred_json"]),
                       workers=workers, results=str(tmp / "cityscapesscripts_results.json"))
    code = CHILD.format(setup=setup, call=call, calls=calls, out=str(out))
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), PYTHONPYCACHEPREFIX=str(tmp / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # imports read compiled bytecode, as from an installed package
    launched = time.time()
    begin = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", code], check=False, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, timeout=600)
    process_s = time.perf_counter() - begin
    if completed.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {completed.returncode}):\n{completed.stderr}")
    figures = json.loads(out.read_text())
    figures["cold_s"] = figures["first_end"] - launched
    figures["process_s"] = process_s
    return figures


def largest_difference(ours: dict, theirs: dict) -> float:
    """Largest difference of PQ, SQ, RQ (averages and per class; fractions); counts must be equal."""
    worst = 0.0
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == theirs[name]["n"], (name, ours[name]["n"], theirs[name]["n"])
        worst = max([worst] + [abs(ours[name][m] - theirs[name][m]) for m in ("pq", "sq", "rq")])
    theirs_per_class = {str(k): v for k, v in theirs["per_class"].items()}
    ours_per_class = {str(k): v for k, v in ours["per_class"].items()}
    assert set(theirs_per_class) <= set(ours_per_class), (sorted(theirs_per_class), sorted(ours_per_class))
    for cid, values in theirs_per_class.items():
        worst = max([worst] + [abs(ours_per_class[cid][m] - values[m]) for m in ("pq", "sq", "rq")])
    return worst


def profile_stages(paths: dict[str, Path], reps: int = 5) -> dict:
    """Ours in one thread, stage by stage, median over reps (seconds for all images)."""
    from detr_panoptic.evaluation import pq
    from detr_panoptic.evaluation.panoptic_format import load_panoptic_json
    from detr_panoptic.utils.png import decode_rgb_png

    gt = load_panoptic_json(paths["gt_json"])
    pred = load_panoptic_json(paths["pred_json"])
    categories = pq.CategoryTable(gt["categories"])
    pairs = pq.match_annotations(gt, pred)
    files = [(str(paths["gt_folder"] / g["file_name"]), str(paths["pred_folder"] / p["file_name"])) for g, p in pairs]
    stages: dict[str, list[float]] = {"read_files": [], "decode": [], "count": [], "whole_one_thread": []}
    for _ in range(reps):
        begin = time.perf_counter()
        data = [(Path(a).read_bytes(), Path(b).read_bytes()) for a, b in files]
        stages["read_files"].append(time.perf_counter() - begin)
        buffers = [None, None]
        maps = []
        decoding = 0.0
        for pair in data:
            begin = time.perf_counter()
            for i in range(2):
                buffers[i] = decode_rgb_png(pair[i], out=buffers[i])
            decoding += time.perf_counter() - begin
            maps.append((buffers[0].copy(), buffers[1].copy()))
        stages["decode"].append(decoding)
        begin = time.perf_counter()
        for (gt_map, pred_map), (g, p) in zip(maps, pairs):
            pq.image_pq_stats(gt_map, [dict(s) for s in g["segments_info"]], pred_map,
                              [dict(s) for s in p["segments_info"]], categories, low_24_bits=True)
        stages["count"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        pq._pairs_stats(pairs, str(paths["gt_folder"]), str(paths["pred_folder"]), categories)
        stages["whole_one_thread"].append(time.perf_counter() - begin)
    return {f"profile_{name}_s": round(statistics.median(values), 4) for name, values in stages.items()}


def cpu_model() -> str:
    from detr_panoptic.utils.precision import cpu_model as model_name

    return model_name()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--reps", type=int, default=7, help="fresh processes per evaluator")
    parser.add_argument("--warm-calls", type=int, default=5, help="evaluations after the first in each process")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", help="generate into (and reuse) this folder instead of a temporary one")
    parser.add_argument("--only", nargs="+", choices=list(EVALUATORS), default=list(EVALUATORS))
    parser.add_argument("--profile", action="store_true", help="also time our stages in one thread")
    args = parser.parse_args()
    import multiprocessing

    import torch

    if multiprocessing.cpu_count() != args.workers:
        print(f"note: cityscapesscripts uses multiprocessing.cpu_count() = {multiprocessing.cpu_count()} "
              f"processes; the others use --workers {args.workers}")
    decoder = png_decoder()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); mkldnn bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"our PNG decoder: {decoder}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = Path(args.keep) if args.keep else tmp / "data"
        paths = {"gt_json": root / "gt.json", "gt_folder": root / "gt", "pred_json": root / "pred.json",
                 "pred_folder": root / "pred"}
        if not (args.keep and paths["pred_json"].is_file()):
            paths = make_dataset(root, args.images)
        int_paths = integer_id_copies(paths)
        num_images = len(json.loads(paths["gt_json"].read_text())["annotations"])
        runs: dict[str, list[dict]] = {name: [] for name in args.only}
        loads = []
        for name in args.only:  # untimed: compiles every imported module into the bytecode cache
            run_fresh(name, paths, int_paths, args.workers, 1, tmp)
        for rep in range(args.reps):
            loads.append(os.getloadavg()[0])
            order = args.only[rep % len(args.only):] + args.only[:rep % len(args.only)]
            line = []
            for name in order:
                figures = run_fresh(name, paths, int_paths, args.workers, 1 + args.warm_calls, tmp)
                runs[name].append(figures)
                warm = statistics.median(figures["calls_s"][1:]) if args.warm_calls else float("nan")
                line.append(f"{name} cold {figures['cold_s']:.3f} s (import {figures['import_s']:.3f}, "
                            f"first call {figures['calls_s'][0]:.3f}), warm {warm:.3f} s")
            print(f"rep {rep} (load {loads[-1]:.2f}): " + "; ".join(line))
        results = {name: values[-1]["result"] for name, values in runs.items()}
        differences = {name: largest_difference(results["ours"], result) for name, result in results.items()
                       if name != "ours"} if "ours" in results else {}
        for name, difference in differences.items():
            assert difference <= 1e-9, (name, difference)
        profile = profile_stages(paths) if args.profile else {}

    def median(name: str, key: str) -> float:
        if key == "warm_s":
            return statistics.median(statistics.median(r["calls_s"][1:]) for r in runs[name])
        if key == "first_call_s":
            return statistics.median(r["calls_s"][0] for r in runs[name])
        return statistics.median(r[key] for r in runs[name])

    figures: dict = {"images": num_images, "image_size": f"{WIDTH}x{HEIGHT}", "workers": args.workers,
                     "reps": args.reps, "warm_calls": args.warm_calls}
    for name in args.only:
        for key in ("cold_s", "import_s", "first_call_s", "warm_s", "cold_cpu_s"):
            figures[f"{name}_{key}"] = round(median(name, key), 4)
    if "ours" in runs and "hotcoco" in runs:
        # Per rep, the two processes ran one after the other: the ratio within a rep sees similar load.
        paired = [h["cold_s"] / o["cold_s"] for h, o in zip(runs["hotcoco"], runs["ours"])]
        figures["hotcoco_over_ours_cold_paired_median"] = round(statistics.median(paired), 2)
        figures["ours_faster_cold_reps"] = f"{sum(r > 1 for r in paired)} of {len(paired)}"
        figures["hotcoco_over_ours_cold"] = round(figures["hotcoco_cold_s"] / figures["ours_cold_s"], 2)
        figures["hotcoco_over_ours_warm"] = round(figures["hotcoco_warm_s"] / figures["ours_warm_s"], 2)
    if "ours" in runs and "cityscapesscripts" in runs:
        figures["cityscapesscripts_over_ours_cold"] = round(figures["cityscapesscripts_cold_s"] / figures["ours_cold_s"], 2)
        figures["cityscapesscripts_over_ours_warm"] = round(figures["cityscapesscripts_warm_s"] / figures["ours_warm_s"], 2)
    figures.update(profile)
    figures.update({f"max_abs_difference_{name}": difference for name, difference in differences.items()})
    figures.update({
        "ours_decoder": decoder,
        "cpu": f"{cpu_model()} ({os.cpu_count()} cores)",
        "load_average_1min_median": round(statistics.median(loads), 2),
        "load_average_1min_min": round(min(loads), 2),
        "load_average_1min_max": round(max(loads), 2),
    })
    if "ours" in results:
        figures["pq"] = round(100 * results["ours"]["All"]["pq"], 3)
    for key, value in figures.items():
        print(f"{key}: {value}")
    result = {
        "name": "bench_pq",
        "figures": figures,
        "command": "python bench/bench_pq.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "notes": "each evaluator in a fresh process per rep (python -c): cold_s = process start to the end of "
                 "its first evaluation (interpreter, imports, first call), import_s and first_call_s its parts, "
                 "cold_cpu_s the CPU time (user + system, all threads, not child processes: not cityscapesscripts' Pool "
                 "workers) the process had used by then; imports from a "
                 "bytecode cache (PYTHONPYCACHEPREFIX, filled by one untimed run each), as an installed package; "
                 "warm_s the median of further calls in that process; medians over reps; *_paired_median: the median "
                 "over reps of the ratio within a rep (the processes ran one after the other). ours = pq_compute"
                 "(workers=2, threads), hotcoco pq_compute with RAYON_NUM_THREADS=2 (on copies of the JSONs "
                 "with integer image ids), cityscapesscripts evaluatePanoptic as shipped (Pool of cpu_count() "
                 "processes); results equal to max_abs_difference_* (<= 1e-9 asserted). profile_* (with "
                 "--profile): ours stage by stage in one thread. The machine has 2 cores and may be shared: "
                 "load_average_1min_* is os.getloadavg()[0] at the start of each rep.",
    }
    out = Path(__file__).resolve().parent / "results" / "bench_pq.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
