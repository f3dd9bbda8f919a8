"""``detr-panoptic predict | attention | plot | report``: inference on image files and pictures."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from detr_panoptic.commands.common import add_checkpoint, add_device, add_out

log = logging.getLogger("detr_panoptic")


def add_predictor_options(parser: argparse.ArgumentParser) -> None:
    """The predictor's settings as flags; each defaults to what the checkpoint records, then DETR's default."""
    parser.add_argument("--threshold", type=float,
                        help="keep queries whose best class (not 'no object') scores above this (default: the "
                        "checkpoint's calibrated threshold when it has one, else 0.85)")
    parser.add_argument("--size", type=int, help="resize the shorter side to this (default: the size the "
                        "checkpoint was trained with, when it records one, else 800)")
    parser.add_argument("--max-size", type=int,
                        help="but keep the longer side at most this (default: the checkpoint's, else 1333)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="precision of the network (autocast; post-processing stays fp32; default: fp32)")


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser(
        "predict", help="panoptic predictions for image files: COCO panoptic PNGs, overlays, predictions.json",
        description="Predict every input image (files, folders, globs such as 'photos/**/*.jpg') and write "
        "OUT/predictions/<name>.png (COCO panoptic ids, R + 256 G + 256^2 B, original size), "
        "OUT/overlays/<name>.png and OUT/predictions.json.")
    add_checkpoint(predict)
    add_predictor_options(predict)
    predict.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default: 1)")
    predict.add_argument("--loader-workers", type=int, default=None,
                         help="processes decoding images ahead of the model (default: 1 for several images, else 0)")
    add_device(predict)
    predict.add_argument("--skip-bad", action="store_true",
                         help="skip missing or unreadable inputs with a warning instead of stopping")
    predict.add_argument("--no-overlays", dest="overlays", action="store_false", help="write only PNGs and JSON")
    predict.add_argument("--format", choices=("coco", "cityscapes"), default="coco",
                         help="cityscapes: also write Cityscapes' semantic and instance formats into OUT/cityscapes/ "
                         "(a test-server submission; docs/metrics.md); needs a model with Cityscapes categories")
    add_out(predict, required=True)
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    predict.set_defaults(func=run_predict)

    attention = subparsers.add_parser(
        "attention", help="where each kept query looks: decoder and encoder attention maps of one image")
    add_checkpoint(attention)
    attention.add_argument("image", help="an image file")
    add_predictor_options(attention)
    attention.add_argument("--per-head", action="store_true", help="one cross-attention map per head")
    attention.add_argument("--points", type=int, default=4,
                           help="encoder self-attention reference points (default: 4; 0: none)")
    add_device(attention)
    add_out(attention, required=True)
    attention.set_defaults(func=run_attention)

    plot = subparsers.add_parser("plot", help="loss curves, PQ over time and per-class bars of a run")
    plot.add_argument("run_dir", help="a run folder (with metrics.jsonl)")
    add_out(plot, help="output folder (default: RUN_DIR/plots)")
    plot.set_defaults(func=run_plot)

    report = subparsers.add_parser("report", help="one self-contained HTML page for a run or evaluation folder")
    report.add_argument("folder", help="a run folder (metrics.jsonl) or an evaluation/prediction folder")
    add_out(report, help="HTML file to write (default: FOLDER/report.html)")
    report.add_argument("--max-images", type=int, default=12, help="example pictures to embed (default: 12)")
    report.set_defaults(func=run_report)


def predictor_from_args(args: argparse.Namespace):
    from detr_panoptic.inference import PanopticPredictor

    return PanopticPredictor.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                             threshold=args.threshold, size=args.size, max_size=args.max_size)


def run_predict(args: argparse.Namespace) -> int:
    from detr_panoptic.inference import predict_to_folder

    summary = predict_to_folder(predictor_from_args(args), args.inputs, args.out, batch_size=args.batch_size,
                                skip_bad=args.skip_bad, overlays=args.overlays, num_workers=args.loader_workers,
                                cityscapes=args.format == "cityscapes")
    print(f"predicted {len(summary.processed)} image(s) into {summary.out_dir} ({summary.predictions_json.name})"
          + (f"; {summary.resumed} kept from an interrupted run" if summary.resumed else "")
          + (f"; skipped {len(summary.skipped)}" if summary.skipped else ""))
    return 0


def run_attention(args: argparse.Namespace) -> int:
    from detr_panoptic.inference import load_image
    from detr_panoptic.visualize.attention import write_attention_figures
    from detr_panoptic.visualize.overlay import draw_panoptic, save_image

    image = load_image(args.image)
    predictor = predictor_from_args(args)
    category_map = predictor.settings.category_map
    maps = predictor.attention(image)
    out = Path(args.out)
    written = write_attention_figures(maps, out, category_map, per_head=args.per_head, points=args.points)
    if maps.result is not None:
        save_image(draw_panoptic(image, maps.result, category_map), out / "overlay.png")
        written.append(out / "overlay.png")
    print(f"{len(maps.queries)} kept quer{'y' if len(maps.queries) == 1 else 'ies'}; wrote "
          + ", ".join(p.name for p in written) + f" into {out}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from detr_panoptic.visualize.curves import plot_run

    written = plot_run(args.run_dir, args.out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from detr_panoptic.visualize.report import build_report

    path = build_report(args.folder, args.out, max_images=args.max_images)
    print(f"wrote {path}")
    return 0
