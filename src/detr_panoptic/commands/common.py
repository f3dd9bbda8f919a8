"""Flags shared by subcommands, so they are spelled and documented the same everywhere."""
from __future__ import annotations

import argparse


def add_out(parser: argparse.ArgumentParser, *, required: bool = False, default: str | None = None,
            help: str = "output folder") -> None:
    parser.add_argument("--out", "-o", required=required, default=default, help=help)


def add_checkpoint(parser: argparse.ArgumentParser, *, required: bool = True, repeat: bool = False) -> None:
    """``--checkpoint``/``-c``; ``repeat``: may be given several times (a list, empty when not given)."""
    several = {"action": "append", "default": [], "metavar": "CKPT"} if repeat else {}
    parser.add_argument(
        "--checkpoint", "-c", required=required, **several,
        help=("repeatable; " if repeat else "") + "weights: a .pth/.safetensors file, a Hugging Face DetrForSegmentation folder or Hub id "
        "(facebook/detr-resnet-50-panoptic[@REVISION], the hub extra), a W&B artifact "
        "(wandb:ENTITY/PROJECT/NAME:ALIAS, the wandb extra), an https:// URL, or the alias coco-r50-panoptic; "
        "a local path wins over an id of the same spelling",
    )


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")


def add_workers(parser: argparse.ArgumentParser, *, default: int | None = None, threads: bool = False) -> None:
    what = "PQ threads" if threads else "worker processes"
    auto = "chosen from the amount of work, at most one per core" if threads else "all cores"
    parser.add_argument("--workers", "-j", type=int, default=default,
                        help=f"{what} (default: {auto})" if default is None else f"{what} (default: {default})")


CONFIG_HELP = "a YAML config file, or a shipped config's name such as cityscapes/recipe_two_stages " \
    "(detr-panoptic config --list)"


def add_config(parser: argparse.ArgumentParser, *, required: bool = True, positional: bool | None = None) -> None:
    """The config argument: positional when required (``positional=True`` makes an optional one
    positional too), else ``--config``; plus the repeatable ``--set KEY=VALUE``."""
    if required:
        parser.add_argument("config", help=CONFIG_HELP)
    elif positional:
        parser.add_argument("config", nargs="?", default=None, help=CONFIG_HELP)
    else:
        parser.add_argument("--config", help=CONFIG_HELP)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=5e-5 (repeatable)")
