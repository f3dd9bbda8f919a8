"""onnxruntime (CPU) vs PyTorch (CPU), end to end: ``OnnxPredictor`` vs ``PanopticPredictor`` on one image.

DETR-R50 panoptic (250 classes, 100 queries) with generated weights whose class head is fitted (least
squares on the decoder output) so that 20 queries pass the 0.85 threshold, a mix of things and stuff,
and whose mask head depends on the query (context and FPN adapters off: same compute, distinct masks);
the model is exported with ``export_onnx`` (the export time is reported too). The image is an 800x1333
'photo' (smooth random colours), so preprocessing resizes nothing; both predictors take the PIL image and
return ``PanopticResult``s (preprocessing, network, kept-query rule, post-processing). They run in one
process, alternating after one warm-up each (a shared machine's load hits them alike), ``--reps`` times;
the median wall time is reported, and the trunk alone (backbone + transformer + heads) of each. Both use
``--threads`` intra-op threads. The results are compared: same kept queries, same segments, share of
pixels with the same segment id.

Usage: ``python bench/bench_onnx.py [--reps 3] [--threads N] [--kept 20]``
Writes bench/results/bench_onnx.json.
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
RESULTS = BENCH / "results"
SIZE = (800, 1333)
THRESHOLD = 0.85


def cpu_model() -> str:
    from detr_panoptic.utils.precision import cpu_model as model_name

    return model_name()


def make_picture() -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 12, 20, generator=generator)
    image = F.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False)[0]
    image = (image + 0.05 * torch.randn(3, *SIZE, generator=generator)).clamp(0, 1)
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def build_model(category_map, picture: Image.Image, kept: int, settings):
    """R50 with random weights; the class head makes ``kept`` queries predict COCO classes (~0.99), the
    others "no object"."""
    from detr_panoptic.inference import preprocess
    from detr_panoptic.models.detr import PanopticDETR

    torch.manual_seed(0)
    model = PanopticDETR(250).eval()
    is_thing = category_map.is_thing().tolist()
    used = [i for i, c in enumerate(category_map.class_ids) if c != -1]
    things = [i for i in used if is_thing[i]]
    stuff = [i for i in used if not is_thing[i]]
    image = preprocess(picture, settings.min_size, settings.max_size)
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
    # A random mask head gives every query nearly the same mask (rounding would then decide most pixels of
    # the comparison): masks from each query's attention alone, as in tests/export (same compute).
    head = model.mask_head
    with torch.no_grad():
        head.lay1.weight[:, :head.context_dim].zero_()
        for name, parameter in head.named_parameters():
            if name.startswith("adapter") or name.endswith("bias"):
                parameter.zero_()
            elif name.startswith("gn") and name.endswith("weight"):
                parameter.fill_(1.0)
    features = torch.cat([hs, torch.ones(queries, 1)], 1).double()
    solution = torch.linalg.lstsq(features, target).solution
    with torch.no_grad():
        model.detr.class_embed.weight.copy_(solution[:dim].T.float())
        model.detr.class_embed.bias.copy_(solution[dim].float())
    return model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--kept", type=int, default=20)
    args = parser.parse_args()

    import onnxruntime

    from detr_panoptic.data.categories import coco_category_map
    from detr_panoptic.export import export_onnx
    from detr_panoptic.export.onnx_predictor import OnnxPredictor
    from detr_panoptic.inference import PanopticPredictor, PredictorSettings, preprocess
    from detr_panoptic.utils.batching import pad_images

    torch.set_num_threads(args.threads)
    category_map = coco_category_map(250)
    settings = PredictorSettings(category_map, SIZE[0], SIZE[1], threshold=THRESHOLD)
    picture = make_picture()
    model = build_model(category_map, picture, args.kept, settings)
    torch_predictor = PanopticPredictor(model, settings, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        export_s = timed(lambda: export_onnx(model, folder, category_map=category_map, input_size=SIZE,
                                             postprocess=settings.postprocess_metadata()))
        onnx_predictor = OnnxPredictor(folder, settings, device="cpu", threads=args.threads)
        image = preprocess(picture, *SIZE)
        batch, mask = pad_images([image])

        def torch_trunk():
            with torch.inference_mode():
                model._trunk(batch, mask)

        runs = {"pytorch": lambda: torch_predictor(picture), "onnxruntime": lambda: onnx_predictor(picture),
                "pytorch_trunk": torch_trunk, "onnxruntime_trunk": lambda: onnx_predictor.run_trunk(batch, mask)}
        for run in runs.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.reps):
            for name, run in runs.items():
                times[name].append(timed(run))
                print(f"{name}: {times[name][-1]:.2f} s", flush=True)
        expected, actual = torch_predictor(picture)[0], onnx_predictor(picture)[0]

    same_pixels = float((expected.id_map == actual.id_map).float().mean())
    segments = [(s["category_id"], s["query"]) for s in expected.segments_info]
    median = {name: statistics.median(values) for name, values in times.items()}
    figures = {
        "image": f"{SIZE[0]}x{SIZE[1]}", "kept_queries": len(expected.kept), "segments": len(segments),
        "pytorch_s": round(median["pytorch"], 3), "onnxruntime_s": round(median["onnxruntime"], 3),
        "speedup_onnxruntime_vs_pytorch": round(median["pytorch"] / median["onnxruntime"], 3),
        "pytorch_trunk_s": round(median["pytorch_trunk"], 3),
        "onnxruntime_trunk_s": round(median["onnxruntime_trunk"], 3),
        "export_s": round(export_s, 1), "same_kept_queries": bool(torch.equal(expected.kept.indices,
                                                                               actual.kept.indices)),
        "same_segments": segments == [(s["category_id"], s["query"]) for s in actual.segments_info],
        "same_pixel_share": round(same_pixels, 6), "threads": args.threads, "reps": args.reps,
        "onnxruntime_version": onnxruntime.__version__, "torch_version": torch.__version__,
        "cpu": cpu_model(), "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    result = {
        "name": "bench_onnx", "figures": figures,
        "command": "python bench/bench_onnx.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": ("OnnxPredictor (onnxruntime CPUExecutionProvider, trunk.onnx + masks.onnx, opset 18) vs "
                  "PanopticPredictor (PyTorch fp32, CPU) on one 800x1333 PIL image end to end, DETR-R50 random "
                  "weights, class head fitted so 20 queries pass 0.85; alternating in one process after a warm-up, "
                  "median of the reps; *_trunk = backbone + transformer + heads alone. The machine is shared "
                  "(load_average_1min): absolute times are noisy, the ratio less so."),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_onnx.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'bench_onnx.json'}")


if __name__ == "__main__":
    main()
