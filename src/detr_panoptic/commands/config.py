"""``detr-panoptic config``: show a config file fully resolved (defaults, overrides and stages)."""
from __future__ import annotations

import argparse

import yaml

from detr_panoptic.commands.common import add_config
from detr_panoptic.config import load_config, save_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="print a config resolved with defaults and --set overrides")
    add_config(parser)
    parser.add_argument("--out", "-o", help="also write the resolved config to this YAML file")
    parser.add_argument("--stages", action="store_true", help="print each resolved stage of a chained config")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.stages:
        for stage in config.resolve_stages():
            print(f"# {stage.name}")
            print(yaml.safe_dump(stage.to_dict(), sort_keys=False))
    else:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    if args.out:
        save_config(config, args.out)
    return 0
