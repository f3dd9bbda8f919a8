"""PQ evaluation speed: detr_panoptic.pq_compute vs cityscapesscripts' evaluatePanoptic (panopticapi's
algorithm) on generated 2048x1024 Cityscapes-like scenes, both with 2 worker processes.

Ground truth: stuff regions with ragged boundaries (sky, building, vegetation, sidewalk, road), 30-50
thing instances (cars, persons, ...) with ids ``class * 1000 + k``, crowd regions, void on the ego
vehicle and along some boundaries. Predictions: the ground truth seen through a 1/4-resolution mask
(blocky, shifted boundaries), some instances missed, merged or mislabelled, a few false positives,
ids 1..N. Both PNG sets are written with Pillow, as cityscapesscripts' converter does.

Besides the two evaluators, each repetition times the PNG decoding alone with each decoder (a Pool of
as many processes that only reads and decodes): Pillow, which cityscapesscripts uses, and ours
(zlib-ng + our compiled unfilter when built, else libvips). Repetitions alternate which evaluator runs first; the 1-minute load average is recorded
with each, as the machine may be shared.

Usage: python bench/bench_pq.py [--images 16] [--reps 15] [--workers 2] [--keep DIR]
Prints the figures and writes bench/results/bench_pq.json.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from detr_panoptic.evaluation import id_map_to_rgb, pq_compute
from detr_panoptic.utils.parallel import process_context
from detr_panoptic.utils.png import decode_rgb_png, png_decoder

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


def run_reference(paths: dict[str, Path], results_file: Path) -> dict:
    """cityscapesscripts' evaluatePanoptic: a Pool of multiprocessing.cpu_count() processes."""
    from cityscapesscripts.evaluation.evalPanopticSemanticLabeling import evaluatePanoptic

    with contextlib.redirect_stdout(io.StringIO()):
        return evaluatePanoptic(str(paths["gt_json"]), str(paths["gt_folder"]), str(paths["pred_json"]),
                                str(paths["pred_folder"]), str(results_file))


def _decode_pair_pillow(files: tuple[str, str]) -> int:
    total = 0
    for path in files:
        with Image.open(path) as image:
            image.load()
            total += image.width
    return total


def _decode_pair_ours(files: tuple[str, str]) -> int:
    total = 0
    for path in files:
        with open(path, "rb") as file:
            total += decode_rgb_png(file.read(), path).shape[1]
    return total


def decode_only(paths: dict[str, Path], workers: int, decoder: str) -> None:
    """The PNG decoding alone with Pillow (what cityscapesscripts does) or our decoder, in a Pool of
    the same number of processes. The Pool starts from our fork server: a process forked from this
    one after libvips has decoded would fall back to Pillow for the PNGs that need libvips
    (detr_panoptic.utils.png)."""
    annotations = json.loads(paths["gt_json"].read_text())["annotations"]
    pairs = [(str(paths["gt_folder"] / a["file_name"]), str(paths["pred_folder"] / a["file_name"]))
             for a in annotations]
    decode = _decode_pair_pillow if decoder == "pillow" else _decode_pair_ours
    with process_context().Pool(workers) as pool:
        pool.map(decode, pairs, chunksize=max(1, len(pairs) // (4 * workers)))


def same(ours: dict, theirs: dict) -> float:
    worst = 0.0
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == theirs[name]["n"]
        worst = max([worst] + [abs(ours[name][m] - theirs[name][m]) for m in ("pq", "sq", "rq")])
    for cid, values in theirs["per_class"].items():
        worst = max([worst] + [abs(ours["per_class"][cid][m] - values[m]) for m in ("pq", "sq", "rq")])
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", help="generate into (and reuse) this folder instead of a temporary one")
    args = parser.parse_args()
    import multiprocessing

    if multiprocessing.cpu_count() != args.workers:
        print(f"note: cityscapesscripts uses multiprocessing.cpu_count() = {multiprocessing.cpu_count()} "
              f"processes; ours uses --workers {args.workers}")
    decoder = png_decoder()
    print(f"our PNG decoder: {decoder}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        if args.keep and (root / "pred.json").is_file():
            paths = {"gt_json": root / "gt.json", "gt_folder": root / "gt", "pred_json": root / "pred.json",
                     "pred_folder": root / "pred"}
        else:
            paths = make_dataset(root, args.images)
        num_images = len(json.loads(paths["gt_json"].read_text())["annotations"])
        times: dict[str, list[float]] = {"reference": [], "ours": [], "pillow": [], "decoder": []}
        loads = []
        results = {}

        def timed(name: str, run) -> None:
            start = time.perf_counter()
            value = run()
            times[name].append(time.perf_counter() - start)
            results[name] = value

        for rep in range(args.reps):
            loads.append(os.getloadavg()[0])
            evaluators = [
                ("reference", lambda: run_reference(paths, Path(tmp) / "reference.json")),
                ("ours", lambda: pq_compute(paths["gt_json"], paths["pred_json"], paths["gt_folder"],
                                            paths["pred_folder"], workers=args.workers)),
            ]
            for name, run in evaluators if rep % 2 == 0 else evaluators[::-1]:  # noise hits both alike
                timed(name, run)
            timed("pillow", lambda: decode_only(paths, args.workers, "pillow"))
            timed("decoder", lambda: decode_only(paths, args.workers, "ours"))
            print(f"rep {rep}: cityscapesscripts {times['reference'][-1]:.3f} s, ours {times['ours'][-1]:.3f} s, "
                  f"decoding alone: Pillow {times['pillow'][-1]:.3f} s, ours {times['decoder'][-1]:.3f} s "
                  f"(load average {loads[-1]:.2f})")
        difference = same(results["ours"], results["reference"])
        assert difference <= 1e-12, difference
    median = {name: statistics.median(values) for name, values in times.items()}
    ours_s, reference_s = median["ours"], median["reference"]
    figures = {
        "images": num_images,
        "image_size": f"{WIDTH}x{HEIGHT}",
        "processes": args.workers,
        "reps": args.reps,
        "ours_s": round(ours_s, 4),
        "cityscapesscripts_s": round(reference_s, 4),
        "ours_ms_per_image": round(1000 * ours_s / num_images, 2),
        "cityscapesscripts_ms_per_image": round(1000 * reference_s / num_images, 2),
        "speedup": round(reference_s / ours_s, 2),
        "ours_decoder": decoder,
        "decode_floor_pillow_s": round(median["pillow"], 4),
        "decode_floor_ours_s": round(median["decoder"], 4),
        "ours_beyond_decode_floor_s": round(ours_s - median["decoder"], 4),
        "cityscapesscripts_beyond_decode_floor_s": round(reference_s - median["pillow"], 4),
        "load_average_1min_median": round(statistics.median(loads), 2),
        "load_average_1min_min": round(min(loads), 2),
        "load_average_1min_max": round(max(loads), 2),
        "max_abs_difference": difference,
        "pq": round(100 * results["ours"]["All"]["pq"], 3),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    result = {
        "name": "bench_pq",
        "figures": figures,
        "command": "python bench/bench_pq.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "notes": "median wall time over reps of pq_compute(workers=2) vs cityscapesscripts evaluatePanoptic "
                 "as shipped (Pool of cpu_count()=2), same files, results equal to 1e-12. cityscapesscripts "
                 "decodes the PNGs with Pillow, ours with ours_decoder; decode_floor_*_s is the time a Pool of "
                 "the same size takes to only read and decode all the PNGs with that decoder, and *_beyond_"
                 "decode_floor_s what each evaluator spends on top of its own floor (it can be negative for ours: "
                 "pq_compute works in this process beside workers-1 pool processes, which costs less than "
                 "starting a Pool of workers processes). The machine has 2 cores "
                 "and may be shared: load_average_1min_* is os.getloadavg()[0] at the start of each rep.",
    }
    out = Path(__file__).resolve().parent / "results" / "bench_pq.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
