"""Inference speed: ``PanopticDETR.predict`` (masks for kept queries only) in float32 and under bf16
autocast, each with the conv parts channels-last (the default) and NCHW, vs the all-queries path
(forward computing all 100 masks + ``panoptic_postprocess``) vs transformers' ``DetrForSegmentation``
(same weights) + its ``post_process_panoptic_segmentation`` (the reference anchor).

One 1024x2048 image resized to 800x1600, DETR-R50 panoptic (250 classes, 100 queries) with random weights
whose class head is fitted so that ~20 queries pass the 0.85 threshold (a mix of things and stuff). The
predict variants run in one subprocess, alternating after one warm-up each (so a shared machine's load
hits them alike); all-queries and transformers each in its own, one after the other (clean peak memory);
``--reps`` times each, the median of wall and process CPU time is reported. FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` and
compared with this machine's measured 2048^3 matrix-multiply peak (fp32, and bf16 for reference). The
bf16 result is compared with the fp32 one: same segments, and the share of pixels whose segment comes
from the same query. The CPU model and its bf16 support are printed with the figures.

Usage: ``python bench/bench_inference.py [--reps 3] [--hf-reps 2] [--kept 20] [--no-hf] [--no-nchw]``
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
    """Fit the class head (ridge regression on the decoder output) so that ``kept`` queries predict COCO
    classes with probability ~0.99 and the others predict "no object", in float32 and under bf16 autocast.

    The decoder outputs of a random model are nearly collinear, so an exact least-squares fit has huge
    weights and the bf16 rounding of its input flips classes (a bf16 run then keeps other queries, or
    none, and times something else). The fit is made on the decoder outputs of both precisions at once,
    with the largest ridge term of a few that keeps exactly the chosen queries above the threshold in both.
    A random model's decoder outputs barely differ between queries (their spread across queries is 0.2% of
    their scale, below bf16's rounding), so the query embeddings are first scaled by 100 (spread 12%)."""
    with torch.no_grad():
        model.detr.query_embed.weight.mul_(100.0)
    category_map = model.category_map
    things = [i for i, c in enumerate(category_map.class_ids) if c != -1 and category_map.is_thing()[i]]
    stuff = [i for i, c in enumerate(category_map.class_ids) if c != -1 and not category_map.is_thing()[i]]
    outputs = []
    with torch.inference_mode():
        batch, mask = model._batch([image], None)
        outputs.append(model._trunk(batch, mask)["hs"][-1][0].double())  # [Q, D]
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs.append(model._trunk(batch, mask)["hs"][-1][0].double())
    queries, dim = outputs[0].shape
    chosen = torch.linspace(0, queries - 1, kept).round().long().tolist()
    target = torch.zeros(queries, 251, dtype=torch.float64)
    target[:, 250] = 10.0
    for n, q in enumerate(chosen):
        label = things[(7 * n) % len(things)] if n % 2 == 0 else stuff[(5 * n) % len(stuff)]
        target[q, 250] = 0.0
        target[q, label] = 10.0
    features = torch.cat([torch.cat([hs, torch.ones(queries, 1, dtype=torch.float64)], 1) for hs in outputs])
    targets = target.repeat(len(outputs), 1)
    gram = features.T @ features
    scale = float(gram.diagonal().mean())
    wanted = torch.zeros(queries, dtype=torch.bool)
    wanted[chosen] = True
    wanted = wanted.repeat(len(outputs))
    def kept_by_model() -> torch.Tensor:  # what predict keeps, in each precision (the class head included)
        keep = []
        with torch.inference_mode():
            for autocast in ([False, True] if len(outputs) == 2 else [False]):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits = model._trunk(batch, mask)["logits"][-1][0].float()
                scores, labels = logits.softmax(-1).max(-1)
                keep.append((labels != 250) & (scores > THRESHOLD))
        return torch.cat(keep)

    for ridge in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0.0):
        eye = torch.eye(dim + 1, dtype=torch.float64)
        solution = torch.linalg.solve(gram + ridge * scale * eye, features.T @ targets) if ridge else \
            torch.linalg.lstsq(features, targets, driver="gelsd").solution
        with torch.no_grad():
            model.detr.class_embed.weight.copy_(solution[:dim].T.float())
            model.detr.class_embed.bias.copy_(solution[dim].float())
        if torch.equal(kept_by_model(), wanted):
            break
    else:
        print("warning: the steered class head does not keep the same queries in fp32 and bf16", flush=True)


def summarise(results) -> dict:
    return {"segments": [[(s["category_id"], s["area"], s["query"]) for s in r.segments_info] for r in results],
            "id_map_sha": [hashlib.sha256(r.id_map.cpu().numpy().tobytes()).hexdigest()[:16] for r in results]}


def query_map(result) -> torch.Tensor:
    """[H, W] int16: the query whose segment covers each pixel (-1: void), comparable across precisions."""
    lookup = torch.full((int(result.id_map.max()) + 1,), -1, dtype=torch.int16)
    for segment in result.segments_info:
        lookup[segment["id"]] = segment["query"]
    return lookup[result.id_map.cpu()]


# predict variants: name -> (autocast dtype, channels-last conv parts)
PREDICT_PATHS = {"predict": (None, True), "predict_nchw": (None, False),
                 "predict_bf16": (torch.bfloat16, True), "predict_bf16_nchw": (torch.bfloat16, False)}


def worker(path_name: str, weights: str, reps: int, queue, variants: tuple[str, ...] = ()) -> None:
    """Run one path ``reps`` times in this (fresh) process; report times, FLOPs, peak RSS, a result digest.

    ``predict_variants``: the ``PREDICT_PATHS`` named in ``variants``, in one process, one warm-up each, then
    ``reps`` rounds alternating between them (so load on a shared machine hits them alike); one report each.
    """
    torch.manual_seed(0)
    from torch.utils.flop_counter import FlopCounterMode

    from detr_panoptic.inference import PanopticPredictor, PredictorSettings
    from detr_panoptic.models.postprocess import panoptic_postprocess

    model = build_model()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.requires_grad_(False)  # inference only (and FlopCounterMode's module hooks need it under inference_mode)
    image = make_image()
    category_map = model.category_map
    is_thing, to_category = category_map.is_thing(), category_map.class_to_category_tensor()

    def predictor(name: str):
        dtype, channels_last = PREDICT_PATHS[name]
        # the predictor's network + post-processing on the already preprocessed image
        runner = PanopticPredictor(model, PredictorSettings(category_map, threshold=THRESHOLD), device="cpu",
                                   dtype=dtype)

        def run():
            model.set_channels_last(backbone=channels_last, mask_head=channels_last)
            return runner.predict_tensors([image], [ORIGINAL_SIZE])
        return run

    if path_name == "predict_variants":
        runs = {name: predictor(name) for name in variants}
        times = {name: [] for name in variants}
        cpu_times = {name: [] for name in variants}
        results = {}
        for rep in range(reps + 1):
            for name in (variants if rep % 2 else variants[::-1]):
                start, start_cpu = time.perf_counter(), time.process_time()
                results[name] = runs[name]()
                if rep:
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - start_cpu)
        reports = []
        for name in variants:
            flops = None
            if name == "predict":
                with FlopCounterMode(display=False) as counter:
                    runs[name]()
                flops = counter.get_total_flops()
            reports.append({"path": name, "times": times[name], "cpu_times": cpu_times[name], "flops": flops,
                            "query_map": query_map(results[name][0]).numpy(), "digest": summarise(results[name]),
                            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        queue.put(reports)
        return
    if path_name == "all_queries":
        def run():
            with torch.inference_mode():
                outputs = model([image])
                return panoptic_postprocess(outputs, [PROCESSED_SIZE], [ORIGINAL_SIZE], is_thing=is_thing,
                                            threshold=THRESHOLD, class_to_category=to_category)
    elif path_name == "transformers":
        run = transformers_runner(model, image, category_map)
    else:
        raise ValueError(path_name)

    times, cpu_times, result = [], [], None
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    flops = None
    if path_name == "all_queries":
        with FlopCounterMode(display=False) as counter:
            run()
        flops = counter.get_total_flops()
    digest = summarise(result) if path_name != "transformers" else {"segments": [len(result[0]["segments_info"])]}
    # query maps travel as numpy arrays: a torch tensor would be a shared-memory handle dying with this process
    queue.put([{"path": path_name, "times": times, "cpu_times": cpu_times, "flops": flops, "query_map": None,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "digest": digest}])


def transformers_runner(model, image, category_map):
    import transformers

    from detr_panoptic.models.weight_names import official_to_hugging_face

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


def run_path(name: str, weights: str, reps: int, variants: tuple[str, ...] = ()) -> dict[str, dict]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=worker, args=(name, weights, reps, queue, variants))
    process.start()
    while True:
        try:
            return {report["path"]: report for report in queue.get(timeout=5)}
        except queue_module.Empty:  # still running, or died
            if not process.is_alive():
                raise RuntimeError(f"the {name} worker failed (exit code {process.exitcode})") from None


def matmul_peak(size: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
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
    parser.add_argument("--no-nchw", action="store_true", help="skip the NCHW (not channels-last) variants")
    args = parser.parse_args()
    from detr_panoptic.utils.precision import hardware_summary

    hardware = hardware_summary()
    print(json.dumps(hardware), flush=True)

    transformers_failure = None
    peak_before = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model()
        steer_class_head(model, make_image(), args.kept)
        weights = str(Path(tmp) / "weights.pth")
        torch.save(model.state_dict(), weights)
        del model
        runs = {}
        variants = ("predict", "predict_bf16") if args.no_nchw else tuple(PREDICT_PATHS)
        runs.update(run_path("predict_variants", weights, args.reps, variants))
        runs.update(run_path("all_queries", weights, args.reps))
        for name, r in runs.items():
            print(f"{name}: runs {', '.join(f'{t:.2f}' for t in r['times'])} s", flush=True)
        if not args.no_hf:
            try:
                runs.update(run_path("transformers", weights, args.hf_reps))
            except ImportError as exc:
                print(f"transformers not available ({exc}); skipped")
            except RuntimeError as exc:  # e.g. killed for lack of memory on a shared machine
                print(f"transformers path failed: {exc}")
                transformers_failure = str(exc)
    peak_after = matmul_peak()
    peak = max(peak_before, peak_after)
    bf16_peak = matmul_peak(dtype=torch.bfloat16)

    med = {name: statistics.median(r["times"]) for name, r in runs.items()}
    med_cpu = {name: statistics.median(r["cpu_times"]) for name, r in runs.items()}
    predict, full = runs["predict"], runs["all_queries"]
    kept = sum(len(s) for s in predict["digest"]["segments"])
    bf16 = runs["predict_bf16"]
    fp32_queries, bf16_queries = torch.from_numpy(predict.pop("query_map")), torch.from_numpy(bf16.pop("query_map"))
    figures = {
        "cpu": hardware["cpu"],
        "cpu_bf16_native": hardware["cpu_bf16_native"],
        "mkldnn_bf16_supported": hardware["mkldnn_bf16_supported"],
        "threads": hardware["cpu_threads"],
        "predict_s": med["predict"],
        "predict_bf16_s": med["predict_bf16"],
        "speedup_bf16_vs_fp32": med["predict"] / med["predict_bf16"],
        "predict_cpu_s": med_cpu["predict"],
        "predict_bf16_cpu_s": med_cpu["predict_bf16"],
        "speedup_bf16_vs_fp32_cpu_time": med_cpu["predict"] / med_cpu["predict_bf16"],
        "all_queries_s": med["all_queries"],
        "speedup_predict_vs_all_queries": med["all_queries"] / med["predict"],
        "predict_gflop": predict["flops"] / 1e9,
        "all_queries_gflop": full["flops"] / 1e9,
        "flop_ratio_all_queries_vs_predict": full["flops"] / predict["flops"],
        "all_queries_cpu_s": med_cpu["all_queries"],
        "predict_gflops_per_s": predict["flops"] / 1e9 / med["predict"],
        "all_queries_gflops_per_s": full["flops"] / 1e9 / med["all_queries"],
        "matmul_peak_gflops_per_s": peak,
        "matmul_peak_bf16_gflops_per_s": bf16_peak,
        "predict_bf16_fraction_of_bf16_peak": predict["flops"] / 1e9 / med["predict_bf16"] / bf16_peak,
        "predict_fraction_of_peak": predict["flops"] / 1e9 / med["predict"] / peak,
        "predict_peak_rss_mb": predict["max_rss_mb"],
        "all_queries_peak_rss_mb": full["max_rss_mb"],
        "segments": kept,
        "predict_equals_all_queries": predict["digest"] == full["digest"],
        "bf16_same_segments": [(c, q) for c, _, q in bf16["digest"]["segments"][0]]
        == [(c, q) for c, _, q in predict["digest"]["segments"][0]],
        "bf16_pixels_same_segment": float((fp32_queries == bf16_queries).float().mean()),
        "reps": args.reps,
    }
    for name in ("predict_nchw", "predict_bf16_nchw"):
        if name in runs:
            figures[f"{name}_s"] = med[name]
            figures[f"{name}_cpu_s"] = med_cpu[name]
            figures[f"speedup_channels_last_{'bf16' if 'bf16' in name else 'fp32'}"] = \
                med[name] / med[name.removesuffix("_nchw")]
            runs[name].pop("query_map")
    if "transformers" in runs:
        figures.update({"transformers_s": med["transformers"],
                        "speedup_predict_vs_transformers": med["transformers"] / med["predict"],
                        "speedup_predict_bf16_vs_transformers": med["transformers"] / med["predict_bf16"],
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
                  f"queries pass {THRESHOLD}; the predict variants in one process, alternating after one warm-up each (their peak RSS is that process's), the others each in its own process; median of the runs (wall and process CPU time); 'predict' = "
                  "fp32, conv parts channels-last (the default); '_bf16' = network under bf16 autocast "
                  "(post-processing fp32); '_nchw' = conv parts NCHW; "
                  "'all_queries' = forward (all 100 masks) + panoptic_postprocess; 'transformers' = "
                  "DetrForSegmentation (same weights) + post_process_panoptic_segmentation; peak = best "
                  "2048^3 torch.mm before/after. The query embeddings are scaled by 100 and the class head is fitted "
                  "on the fp32 and bf16 decoder outputs, so that bf16 keeps the same queries (timed: the same work); "
                  "the random mask logits differ between queries by less than bf16 rounding, so "
                  "bf16_pixels_same_segment says nothing about a trained model (bench/bf16_accuracy.py measures "
                  "that). The machine may be shared: absolute times are noisy."),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_inference.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
