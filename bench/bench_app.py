"""The app's latency: the first result for an uploaded image against ``predict`` on the same file, and a
threshold change (post-processing only, on the cached network output).

Model and image as in ``bench_inference.py``: DETR-R50 panoptic (250 classes, 100 queries) with random
weights whose class head is fitted so that 20 queries pass the threshold (things and stuff), one 1024x2048
'photo' (a PNG file) resized to 800x1600 for the network. Timed, median of ``--reps`` runs each:

* ``predict``: ``PanopticPredictor(path)`` (decode, preprocess, one forward with the kept queries' masks,
  post-processing at 1024x2048);
* the app's first result: ``session.open_image`` + ``session.analyse`` (one forward with the masks of every
  query above the page's lowest threshold) + ``Analysis.result`` at the same setting (equal to predict's:
  checked), and the page update around it (overlay, segment table, COCO panoptic PNG + JSON);
* a threshold change at 1024x2048 with 20 kept queries: ``Analysis.result`` alone (goal <= 100 ms), and
  the page update after it; wall and CPU time (the CPU time of this process barely grows when other jobs
  share the machine; the wall time does, and the load average is recorded).

Usage: ``python bench/bench_app.py [--reps 3] [--threads N]``. Writes bench/results/bench_app.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_inference import ORIGINAL_SIZE, THRESHOLD, build_model, steer_class_head

RESULTS = BENCH / "results"
KEPT = 20


def write_photo(path: Path) -> Path:
    """A 1024x2048 'photo' (smooth random colours plus noise) as a PNG file."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 16, 32, generator=generator)
    image = F.interpolate(coarse, size=ORIGINAL_SIZE, mode="bilinear", align_corners=False)
    image = image + 0.05 * torch.randn(1, 3, *ORIGINAL_SIZE, generator=generator)
    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return path


def median_seconds(fn, reps: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(reps):
        tick = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times), value


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``: on a machine shared with other jobs the wall
    time grows with the load, the CPU time much less."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def page_update(analysis, result, categories, folder: Path) -> None:
    """What the page draws around a result (``app.page``'s handler without Gradio)."""
    from detr_panoptic.app.session import legend_html, overlay, segment_rows, write_downloads

    overlay(analysis.picture, result, categories)
    segment_rows(result, categories)
    legend_html(result, categories)
    write_downloads(result, categories, folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from detr_panoptic.app.session import Setting, analyse, open_image
    from detr_panoptic.inference import PanopticPredictor, PredictorSettings

    model = build_model()
    settings = PredictorSettings(model.category_map, min_size=800, max_size=1600, threshold=THRESHOLD)
    predictor = PanopticPredictor(model, settings, device="cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-app-"))
    photo = write_photo(work / "photo.png")
    steer_class_head(model, predictor.preprocess(open_image(photo)[0]), KEPT)
    setting = Setting.of(predictor)

    predict_seconds, expected = median_seconds(lambda: predictor(photo)[0], args.reps)

    def first_result():
        analysis = analyse(predictor, open_image(photo)[0])
        return analysis, analysis.result(setting)[0]

    first_seconds, (analysis, result) = median_seconds(first_result, args.reps)
    same = [(s["category_id"], s["area"], s["query"]) for s in result.segments_info] == \
        [(s["category_id"], s["area"], s["query"]) for s in expected.segments_info] and \
        torch.equal(result.id_map, expected.id_map)
    categories = predictor.settings.category_map
    update_seconds, _ = median_seconds(lambda: page_update(analysis, result, categories, work / "first"), args.reps)
    kept = len(result.kept)
    changes = [Setting(t, setting.merge_stuff, setting.min_area) for t in (0.9, 0.5, 0.95, 0.85)]
    change_times, change_cpu, page_times, page_cpu = [], [], [], []
    for _ in range(args.reps):
        for change in changes:
            wall, cpu = timed(lambda c=change: analysis.result(c))
            change_times.append(wall)
            change_cpu.append(cpu)
            changed = analysis.result(change)[0]
            wall, cpu = timed(lambda r=changed: page_update(analysis, r, categories, work / "change"))
            page_times.append(wall)
            page_cpu.append(cpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: its CPU time is the wall time of an idle core
    one_thread = [timed(lambda c=change: analysis.result(c))[1] for _ in range(args.reps) for change in changes]
    torch.set_num_threads(threads)
    figures = {
        "predict_s": round(predict_seconds, 3),
        "app_first_result_s": round(first_seconds, 3),
        "app_first_result_over_predict": round(first_seconds / predict_seconds, 3),
        "app_first_page_update_s": round(first_seconds + update_seconds, 3),
        "app_result_equals_predict": same,
        "kept_queries": kept,
        "segments": len(result.segments_info),
        "threshold_change_ms": round(1000 * statistics.median(change_times), 1),
        "threshold_change_cpu_ms": round(1000 * statistics.median(change_cpu), 1),
        "threshold_change_one_thread_cpu_ms": round(1000 * statistics.median(one_thread), 1),
        "page_update_ms": round(1000 * statistics.median(page_times), 1),
        "page_update_cpu_ms": round(1000 * statistics.median(page_cpu), 1),
        "image": f"{ORIGINAL_SIZE[0]}x{ORIGINAL_SIZE[1]} PNG, network input 800x1600",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    record = {"name": "app latency (detr-panoptic app)", "figures": figures,
              "command": f"python bench/bench_app.py --reps {args.reps}"
              + (f" --threads {args.threads}" if args.threads else ""),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "notes": f"DETR-R50, random weights steered to keep {KEPT} queries (bench_inference.py); CPU, fp32; "
                       f"median of {args.reps}; threshold changes: {[c.threshold for c in changes]} on the cached "
                       "output; the page update is overlay + table + legend + COCO panoptic PNG/JSON"}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_app.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)
    print(json.dumps(figures, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
