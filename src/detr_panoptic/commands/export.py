"""``detr-panoptic export``: a checkpoint as ONNX graphs, a Hugging Face folder or safetensors."""
from __future__ import annotations

import argparse
import logging

from detr_panoptic.commands.common import add_checkpoint, add_out

log = logging.getLogger(__name__)

FORMATS_HELP = ("onnx: trunk.onnx + masks.onnx + metadata.json (run with detr_panoptic.OnnxPredictor; needs "
                "the onnx extra); hf: a transformers DetrForSegmentation folder (config.json, model.safetensors, "
                "preprocessor_config.json); safetensors: model.safetensors + model.json (our metadata)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint for deployment: ONNX, a Hugging Face folder, or safetensors",
        description="Write a checkpoint in a deployment format. The checkpoint's categories, training input "
        "size and calibrated post-processing settings travel with every format. " + FORMATS_HELP + ".")
    add_checkpoint(parser)
    # no argparse choices: an unknown format is one error line like every other bad input
    parser.add_argument("--format", "-f", required=True, metavar="{onnx,hf,safetensors}", help=FORMATS_HELP)
    add_out(parser, required=True, help="output folder (created if needed; files of the same names are replaced)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from detr_panoptic.export import export_checkpoint

    for path in export_checkpoint(args.checkpoint, args.format, args.out):
        print(path)
    return 0
