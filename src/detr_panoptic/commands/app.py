"""``detr-panoptic app``: an interactive web page to look at a model (needs ``pip install 'detr-panoptic[app]'``)."""
from __future__ import annotations

import argparse

from detr_panoptic.commands.common import add_checkpoint, add_device


def register(subparsers: argparse._SubParsersAction) -> None:
    app = subparsers.add_parser(
        "app", help="an interactive web page to look at a model: overlay, segments, each query's attention",
        description="Serve a web page (Gradio; pip install 'detr-panoptic[app]') that segments an uploaded, "
        "example or webcam image, re-runs post-processing as you move its controls (no new forward pass), and "
        "shows each segment's query attention. Without --checkpoint it opens runs/demo's final model when "
        "there is one, else the packaged demo start point.")
    add_checkpoint(app, required=False, repeat=True)
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    app.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    app.add_argument("--queue-size", type=int, default=None,
                     help="requests that may wait while one runs; more are refused (default: 16)")
    app.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                     help="precision of the network (autocast; post-processing stays fp32; default: fp32)")
    add_device(app)
    app.set_defaults(func=run_app)


def run_app(args: argparse.Namespace) -> int:
    from detr_panoptic.app import require_gradio
    from detr_panoptic.utils.errors import UserInputError

    require_gradio()  # the install hint before any model is loaded
    if not 0 <= args.port <= 65535:
        raise UserInputError(f"--port must be in 0..65535, got {args.port}")
    if args.queue_size is not None and args.queue_size < 1:
        raise UserInputError(f"--queue-size must be at least 1, got {args.queue_size}")
    from detr_panoptic.app.serve import serve

    serve(args.checkpoint, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          queue_size=args.queue_size)
    return 0
