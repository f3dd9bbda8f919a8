"""``detr-panoptic config``: show a config fully resolved (defaults, overrides and stages), or list the
shipped configs (``--list``)."""
from __future__ import annotations

import argparse

import yaml

from detr_panoptic.commands.common import add_config
from detr_panoptic.config import list_configs, load_config, save_config
from detr_panoptic.utils.errors import UserInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config", help="print a config resolved with defaults and --set overrides; --list: the shipped configs",
        description="Print CONFIG (a YAML file or a shipped config's name) resolved with the defaults and "
        "--set overrides, or with --list the configs that ship with the package (name and what it is).")
    add_config(parser, required=False, positional=True)
    parser.add_argument("--list", action="store_true", help="list the shipped configs (name: description)")
    parser.add_argument("--out", "-o", help="also write the resolved config to this YAML file")
    parser.add_argument("--stages", action="store_true", help="print each resolved stage of a chained config")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        if args.config is not None or args.overrides or args.out or args.stages:
            raise UserInputError("--list takes no config, --set, --out or --stages")
        shipped = list_configs()
        width = max(map(len, shipped), default=0)
        for name, description in shipped.items():
            print(f"{name:<{width}}  {description}")
        return 0
    if args.config is None:
        raise UserInputError("give a config (a YAML file or a shipped name), or --list to see the shipped ones")
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
