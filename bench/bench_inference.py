"""Inference speed: ``PanopticDETR.predict`` (masks for kept queries only) vs the all-queries path
(forward computing all 100 masks + ``panoptic_postprocess``) vs transformers' ``DetrForSegmentation``
(same weights) + its ``post_process_panoptic_segmentation``.

One 1024x2048 image resized to 800x1600, DETR-R50 panoptic (250 classes, 100 queries) with random weights
whose class head is fitted so that ~20 queries pass the 0.85 threshold (a mix of things and stuff). Each
path runs in its own subprocess, one after the other (clean peak memory, no interference), ``--reps``
times; the median is reported. FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` and
compared with this machine's measured matrix-multiply peak.

Usage: ``python bench/bench_inference.py [--reps 3] [--hf-reps 2] [--kept 20] [--no-hf]``
Writes bench/results/bench_inference.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import queue as queue_module
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ORIGINAL_SIZE = (1024, 2048)
PROCESSED_SIZE = (800, 1600)
THRESHOLD = 0.85


def make_image() -> torch.Tensor:
    """A 1024x2048 'photo' (smooth random colours), resized to 800x1600 and ImageNet-normalised."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 16, 32, generator=generator)
    image = F.interpolate(coarse, size=ORIGINAL_SIZE, mode="bilinear", align_corners=False)
    image = image + 0.05 * torch.randn(1, 3, *ORIGINAL_SIZE, generator=generator)
    image = F.interpolate(image, size=PROCESSED_SIZE, mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (image.clamp(0, 1) - mean) / std


def build_model():
    from detr_panoptic.data.categories import coco_category_map
    from detr_panoptic.models.detr import PanopticDETR

    torch.manual_seed(0)
    model = PanopticDETR(250).eval()
    model.category_map = coco_category_map()
    return model


def steer_class_head(model, image: torch.Tensor, kept: int) -> None:
    """Fit the class head (least squares on the decoder output) so that ``kept`` queries predict COCO
    classes with probability ~0.99 and the others predict "no object"."""
    category_map = model.category_map
    things = [i for i, c in enumerate(category_map.class_ids) if c != -1 and category_map.is_thing()[i]]
    stuff = [i for i, c in enumerate(category_map.class_ids) if c != -1 and not category_map.is_thing()[i]]
    with torch.inference_mode():
        batch, mask = model._batch([image], None)
        hs = model._trunk(batch, mask)["hs"][-1][0]  # [Q, D]
    queries, dim = hs.shape
    chosen = torch.linspace(0, queries - 1, kept).round().long().tolist()
    target = torch.zeros(queries, 251, dtype=torch.float64)
    target[:, 250] = 10.0
    for n, q in enumerate(chosen):
        label = things[(7 * n) % len(things)] if n % 2 == 0 else stuff[(5 * n) % len(stuff)]
        target[q, 250] = 0.0
        target[q, label] = 10.0
    features = torch.cat([hs.double(), torch.ones(queries, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(features, target, driver="gelsd").solution
    with torch.no_grad():
        model.detr.class_embed.weight.copy_(solution[:dim].T.float())
        model.detr.class_embed.bias.copy_(solution[dim].float())


def summarise(results) -> dict:
    return {"segments": [[(s["category_id"], s["area"], s["query"]) for s in r.segments_info] for r in results],
            "id_map_sha": [hashlib.sha256(r.id_map.cpu().numpy().tobytes()).hexdigest()[:16] for r in results]}


def worker(path_name: str, weights: str, reps: int, queue) -> None:
    """Run one path ``reps`` times in this (fresh) process; report times, FLOPs, peak RSS, a result digest."""
    torch.manual_seed(0)
    from torch.utils.flop_counter import FlopCounterMode

    from detr_panoptic.models.postprocess import panoptic_postprocess

    model = build_model()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.requires_grad_(False)  # inference only (and FlopCounterMode's module hooks need it under inference_mode)
    image = make_image()
    category_map = model.category_map
    is_thing, to_category = category_map.is_thing(), category_map.class_to_category_tensor()

    if path_name == "predict":
        def run():
            return model.predict([image], threshold=THRESHOLD, target_sizes=[ORIGINAL_SIZE])
    elif path_name == "all_queries":
        def run():
            with torch.inference_mode():
                outputs = model([image])
                return panoptic_postprocess(outputs, [PROCESSED_SIZE], [ORIGINAL_SIZE], is_thing=is_thing,
                                            threshold=THRESHOLD, class_to_category=to_category)
    elif path_name == "transformers":
        run = transformers_runner(model, image, category_map)
    else:
        raise ValueError(path_name)

    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    flops = None
    if path_name != "transformers":
        with FlopCounterMode(display=False) as counter:
            run()
        flops = counter.get_total_flops()
    digest = summarise(result) if path_name != "transformers" else {"segments": [len(result[0]["segments_info"])]}
    queue.put({"path": path_name, "times": times, "flops": flops,
               "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "digest": digest})


def transformers_runner(model, image, category_map):
    import transformers

    from detr_panoptic.checkpoints import official_to_hugging_face

    backbone = transformers.ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                                         layer_type="bottleneck",
                                         out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.DetrConfig(backbone_config=backbone, use_timm_backbone=False,
                                     use_pretrained_backbone=False, num_labels=250)
    hf = transformers.DetrForSegmentation(config).eval()
    hf_keys = list(hf.state_dict())
    hf.load_state_dict(official_to_hugging_face(model.state_dict(), hf_keys), strict=True)
    processor = transformers.DetrImageProcessor()
    stuff = {i for i, cid in enumerate(category_map.class_ids) if cid != -1 and not category_map.is_thing()[i]}
    pixel_values = image[None]
    pixel_mask = torch.ones(1, *PROCESSED_SIZE, dtype=torch.long)

    def run():
        with torch.inference_mode():
            outputs = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
            return processor.post_process_panoptic_segmentation(outputs, threshold=THRESHOLD,
                                                                label_ids_to_fuse=stuff,
                                                                target_sizes=[ORIGINAL_SIZE])
    return run


def run_path(name: str, weights: str, reps: int) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=worker, args=(name, weights, reps, queue))
    process.start()
    while True:
        try:
            return queue.get(timeout=5)
        except queue_module.Empty:  # still running, or died
            if not process.is_alive():
                raise RuntimeError(f"the {name} worker failed (exit code {process.exitcode})") from None


def matmul_peak(size: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * size ** 3 / best / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hf-reps", type=int, default=2)
    parser.add_argument("--kept", type=int, default=20)
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()

    transformers_failure = None
    peak_before = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model()
        steer_class_head(model, make_image(), args.kept)
        weights = str(Path(tmp) / "weights.pth")
        torch.save(model.state_dict(), weights)
        del model
        runs = {}
        for name in ("predict", "all_queries"):
            runs[name] = run_path(name, weights, args.reps)
            print(f"{name}: runs {', '.join(f'{t:.2f}' for t in runs[name]['times'])} s", flush=True)
        if not args.no_hf:
            try:
                runs["transformers"] = run_path("transformers", weights, args.hf_reps)
            except ImportError as exc:
                print(f"transformers not available ({exc}); skipped")
            except RuntimeError as exc:  # e.g. killed for lack of memory on a shared machine
                print(f"transformers path failed: {exc}")
                transformers_failure = str(exc)
    peak_after = matmul_peak()
    peak = max(peak_before, peak_after)

    med = {name: statistics.median(r["times"]) for name, r in runs.items()}
    predict, full = runs["predict"], runs["all_queries"]
    kept = sum(len(s) for s in predict["digest"]["segments"])
    figures = {
        "predict_s": med["predict"],
        "all_queries_s": med["all_queries"],
        "speedup_predict_vs_all_queries": med["all_queries"] / med["predict"],
        "predict_gflop": predict["flops"] / 1e9,
        "all_queries_gflop": full["flops"] / 1e9,
        "flop_ratio_all_queries_vs_predict": full["flops"] / predict["flops"],
        "predict_gflops_per_s": predict["flops"] / 1e9 / med["predict"],
        "all_queries_gflops_per_s": full["flops"] / 1e9 / med["all_queries"],
        "matmul_peak_gflops_per_s": peak,
        "predict_fraction_of_peak": predict["flops"] / 1e9 / med["predict"] / peak,
        "predict_peak_rss_mb": predict["max_rss_mb"],
        "all_queries_peak_rss_mb": full["max_rss_mb"],
        "segments": kept,
        "predict_equals_all_queries": predict["digest"] == full["digest"],
        "reps": args.reps,
    }
    if "transformers" in runs:
        figures.update({"transformers_s": med["transformers"],
                        "speedup_predict_vs_transformers": med["transformers"] / med["predict"],
                        "transformers_peak_rss_mb": runs["transformers"]["max_rss_mb"],
                        "transformers_segments": runs["transformers"]["digest"]["segments"][0],
                        "transformers_reps": args.hf_reps})
    elif transformers_failure:
        figures["transformers"] = transformers_failure
    for name, r in runs.items():
        print(f"{name:>13}: median {med[name]:7.2f} s  (runs {', '.join(f'{t:.2f}' for t in r['times'])})"
              f"  peak RSS {r['max_rss_mb']:.0f} MB" + (f"  {r['flops'] / 1e9:.0f} GFLOP" if r["flops"] else ""))
    for key, value in figures.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    result = {
        "name": "bench_inference",
        "figures": figures,
        "command": "python bench/bench_inference.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": (f"1024x2048 -> 800x1600, DETR-R50 panoptic random weights, class head fitted so {args.kept} "
                  f"queries pass {THRESHOLD}; each path in its own process, median of the runs; "
                  "'all_queries' = forward (all 100 masks) + panoptic_postprocess; 'transformers' = "
                  "DetrForSegmentation (same weights) + post_process_panoptic_segmentation; peak = best "
                  "2048^3 torch.mm before/after. The machine is shared: absolute times are noisy."),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_inference.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
