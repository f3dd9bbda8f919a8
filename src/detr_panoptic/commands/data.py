"""Data subcommands: ``convert-cityscapes``, ``synth-cityscapes``, ``check-dataset``."""
from __future__ import annotations

import argparse

from detr_panoptic.commands.common import add_workers


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert-cityscapes",
        help="convert Cityscapes gtFine to COCO panoptic (same output as cityscapesScripts, in parallel)",
        description="Convert gtFine/<split>/*/*_instanceIds.png to cityscapes_panoptic_<split>[_trainId].json "
        "and a PNG folder of the same name, identical to cityscapesScripts' createPanopticImgs. "
        "Restartable: a rerun after an interruption resumes.",
    )
    convert.add_argument("gtfine_dir", metavar="GTFINE_DIR", help="the gtFine folder, or the Cityscapes root holding it")
    convert.add_argument("--output", help="output folder (default: GTFINE_DIR, as cityscapesScripts does)")
    convert.add_argument("--splits", nargs="+", default=["val", "train", "test"], help="splits (default: val train test)")
    convert.add_argument("--use-train-id", action="store_true", help="train ids as category ids (suffix _trainId)")
    add_workers(convert)
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.set_defaults(func=run_convert)

    synth = subparsers.add_parser(
        "synth-cityscapes", help="write synthetic street scenes in the Cityscapes layout",
        description="Write leftImg8bit/ and gtFine/ (instanceIds, labelIds, color, polygons) for synthetic "
        "street scenes; deterministic per --seed.",
    )
    synth.add_argument("out", metavar="OUT", help="output root (gets leftImg8bit/ and gtFine/)")
    synth.add_argument("--train", type=int, default=8, help="training images (default: 8)")
    synth.add_argument("--val", type=int, default=4, help="validation images (default: 4)")
    synth.add_argument("--size", default="512x1024", help="HEIGHTxWIDTH (default: 512x1024)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument("--density", type=float, default=1.0,
                       help="scale the number of cars, persons, riders and bicycles (default: 1, 2-13 per image)")
    synth.add_argument("--near", type=float, default=0.12,
                       help="nearest-placement bound of things in 0..0.95; larger keeps them closer to the camera "
                            "and larger (default: 0.12)")
    synth.add_argument("--no-street-furniture", action="store_true",
                       help="leave out fences, poles, traffic signs and traffic lights")
    add_workers(synth, default=1)
    synth.set_defaults(func=run_synth)

    check = subparsers.add_parser(
        "check-dataset", help="check a COCO panoptic dataset (JSON vs PNGs vs images vs categories)",
        description="Report missing images, segment ids in the JSON absent from the PNG, PNG ids absent from "
        "the JSON and unknown category ids. Give --json/--panoptic-dir[/--image-dir] or --cityscapes/--split. "
        "Exit status: 0 when clean, 1 when problems were found, 2 on bad arguments.",
    )
    check.add_argument("--json", help="COCO panoptic JSON")
    check.add_argument("--panoptic-dir", help="folder of the panoptic PNGs")
    check.add_argument("--image-dir", help="folder of the images (optional: skip the image check without it)")
    check.add_argument("--cityscapes", metavar="ROOT", help="a Cityscapes root with converted panoptic files")
    check.add_argument("--split", default="val", help="Cityscapes split (default: val)")
    check.add_argument("--use-train-id", action="store_true", help="check the _trainId conversion")
    add_workers(check)
    check.set_defaults(func=run_check)


def run_convert(args: argparse.Namespace) -> int:
    from detr_panoptic.data.cityscapes import convert_cityscapes

    written = convert_cityscapes(args.gtfine_dir, output=args.output, splits=args.splits,
                                 use_train_id=args.use_train_id, workers=args.workers,
                                 progress=not args.no_progress)
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from detr_panoptic.data.synthetic import SceneOptions, make_synthetic_cityscapes, parse_size

    options = SceneOptions(density=args.density, near=args.near, street_furniture=not args.no_street_furniture)
    root = make_synthetic_cityscapes(args.out, train=args.train, val=args.val, size=parse_size(args.size),
                                     seed=args.seed, workers=args.workers or 1, progress=True, options=options)
    print(f"wrote {args.train} train + {args.val} val images under {root}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from detr_panoptic.data.check import check_cityscapes, check_dataset
    from detr_panoptic.utils.errors import UserInputError

    if args.cityscapes:
        problems = check_cityscapes(args.cityscapes, args.split, args.use_train_id, workers=args.workers,
                                    progress=True)
        what = f"{args.cityscapes} ({args.split})"
    elif args.json and args.panoptic_dir:
        problems = check_dataset(args.json, args.panoptic_dir, args.image_dir, workers=args.workers, progress=True)
        what = args.json
    else:
        raise UserInputError("give --json and --panoptic-dir (and optionally --image-dir), or --cityscapes ROOT")
    for problem in problems:
        print(problem)
    print(f"{what}: {len(problems)} problem(s)")
    return 1 if problems else 0
