"""Convergence benchmark (issue 22): the demo's start point fine-tuned on the demo data for a fixed budget
with each training-only convergence aid, validated along the way.

Options (``--options``, any of): ``baseline`` (none), ``groups`` (``train.query_groups: 3``, Group-DETR),
``denoising`` (``train.denoising_groups: 5``, DN-DETR), ``one_to_many`` (``train.one_to_many_repeats: 4``,
H-DETR), ``combined`` (all three). Every option starts from the same weights (the packaged start point,
``demo.start_point``, or ``--init``) with the same data order and fine-tunes one stage on the demo's target
data (1,000 generated Cityscapes scenes at 128x256): everything but the backbone trains (the decoder must,
for any of these aids to act), lr 2e-4 after a 20-step warm-up, then constant (a schedule that does not
depend on how many steps fit the budget), batch 2, the demo's model and loss settings otherwise.

The clock is the process's CPU time with one thread (``--threads 1``), validations excluded: on a machine
shared with other jobs, CPU seconds measure the work an option costs where wall seconds would measure the
neighbours. Each option trains for ``--budget`` CPU seconds and is validated on the demo's 30 val images
every ``--eval-every`` CPU seconds (PQ, things PQ, things found at box IoU 0.5, duplicates per found
thing). The CPU seconds per step of each option give its extra cost per step.

Usage: python bench/convergence.py [--budget 180] [--eval-every 45] [--options baseline groups ...]
                                   [--init PATH] [--out runs/convergence] [--label NAME] [--report-only]
Each option's result is kept under --out (``option_<name>.json``), so options can run in separate processes
(side by side) into the same --out; every call then writes bench/results/convergence[_<label>].json and .png
(things PQ / PQ / recall / duplicates against CPU minutes, one line per option measured) and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from detr_panoptic.config import apply_overrides, config_from_dict
from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset
from detr_panoptic.demo.pipeline import (
    MemoryDataset,
    demo_config_path,
    load_demo_config,
    prepare_target_data,
    start_point_path,
)
from detr_panoptic.engine import distributed
from detr_panoptic.engine.hooks import LRSchedulerHook
from detr_panoptic.engine.trainer import Hook, Trainer
from detr_panoptic.engine.training import build_parts, make_validator, prepare_model, seed_everything
from detr_panoptic.utils.io import atomic_write_json

OPTIONS = {
    "baseline": [],
    "groups": ["train.query_groups=3"],
    "denoising": ["train.denoising_groups=5"],
    "one_to_many": ["train.one_to_many_repeats=4"],
    "combined": ["train.query_groups=3", "train.denoising_groups=5", "train.one_to_many_repeats=4"],
}
KEYS = {"pq": "pq", "pq_things": "pq_things", "pq_stuff": "pq_stuff", "things_recall": "recall",
        "things_duplicates_per_gt": "duplicates"}


class BudgetReached(Exception):
    pass


class BudgetHook(Hook):
    """Validates every ``eval_every`` CPU seconds of training and stops at ``budget`` (validations excluded
    from the clock)."""

    def __init__(self, validate: Any, *, budget: float, eval_every: float, rows: list[dict[str, Any]]) -> None:
        self.validate, self.budget, self.eval_every, self.rows = validate, budget, eval_every, rows
        self.cpu_start = time.process_time()
        self.wall_start = time.perf_counter()
        self.excluded = 0.0
        self.next_eval = eval_every

    def clock(self) -> float:
        return time.process_time() - self.cpu_start - self.excluded

    def after_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        spent = self.clock()
        if spent < self.next_eval and spent < self.budget:
            return
        before = time.process_time()
        model = trainer.unwrapped_model
        model.eval()
        try:
            metrics = self.validate(model)
        finally:
            model.train()
        self.excluded += time.process_time() - before
        row = {"step": trainer.state.step, "cpu_seconds": round(spent, 1),
               "wall_seconds": round(time.perf_counter() - self.wall_start, 1), **summary(metrics)}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.next_eval += self.eval_every
        if spent >= self.budget:
            raise BudgetReached


def summary(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: round(float(metrics[key]), 3) for key, name in KEYS.items() if metrics.get(key) is not None}


def base_config(raw: dict[str, Any], *, root: Path, init: str, out: Path) -> dict[str, Any]:
    data = json.loads(json.dumps({k: v for k, v in raw.items() if k != "stages"}))
    data["name"] = "convergence"
    data["model"]["init"] = init
    data["data"].update({"dataset": "cityscapes", "root": str(root)})
    data["freeze"] = {"backbone": True}
    data["train"].update({"output_dir": str(out), "lr": 2.0e-4, "scheduler": "constant", "warmup_steps": 20,
                          "epochs": 100_000, "max_steps": 1_000_000, "eval_every_epochs": 0, "resume": False,
                          "device": "cpu"})
    data["logging"] = {"progress": False, "tensorboard": False, "jsonl": False}
    return data


def run_option(name: str, data: dict[str, Any], datasets: tuple[Any, Any, Any], validate: Any, *,
               budget: float, eval_every: float) -> dict[str, Any]:
    config = config_from_dict(apply_overrides(data, OPTIONS[name]), source=f"convergence {name}")
    train_set, _, category_map = datasets
    ctx = distributed.init_distributed("cpu")
    seed_everything(config.train.seed)
    model = prepare_model(config, category_map, None, ctx.device, verbose=False)
    parts = build_parts(config, model, train_set, category_map, ctx)
    rows: list[dict[str, Any]] = []
    hook = BudgetHook(validate, budget=budget, eval_every=eval_every, rows=rows)
    trainer = Trainer(model=model, criterion=parts.criterion, optimizer=parts.optimizer, scheduler=parts.scheduler,
                      batches=parts.batches, state=parts.state, device=ctx.device, hooks=[LRSchedulerHook(), hook],
                      clip_max_norm=config.train.clip_max_norm, name=name)
    try:
        trainer.train()
    except BudgetReached:
        pass
    last = rows[-1]
    return {"overrides": OPTIONS[name], "rows": rows, "steps": last["step"],
            "cpu_seconds_per_step": round((last["cpu_seconds"]) / max(last["step"], 1), 4)}


def figure(results: dict[str, Any], start: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("pq_things", "things PQ"), ("pq", "PQ"), ("recall", "things found (%, box IoU 0.5)"),
              ("duplicates", "duplicates per found thing")]
    for ax, (key, title) in zip(axes.flat, panels):
        for name, result in results.items():
            rows = [{"cpu_seconds": 0.0, **start}] + result["rows"]
            ax.plot([r["cpu_seconds"] / 60 for r in rows], [r.get(key, float("nan")) for r in rows], marker="o",
                    label=name)
        ax.set_title(title)
        ax.set_xlabel("CPU minutes (1 thread, validations excluded)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle("Fine-tuning the demo's start point on the demo data")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results: dict[str, Any], start: dict[str, float]) -> str:
    base = results.get("baseline", {}).get("cpu_seconds_per_step")
    lines = [("| option | steps | CPU s/step | extra cost/step | PQ | things PQ | stuff PQ | things found % | "
             "duplicates/found |"), "|---|---|---|---|---|---|---|---|---|",
             (f"| start point | 0 | | | {start.get('pq', 0):.1f} | {start.get('pq_things', 0):.1f} | "
             f"{start.get('pq_stuff', 0):.1f} | {start.get('recall', 0):.1f} | {start.get('duplicates', 0):.2f} |")]
    for name, result in results.items():
        last = result["rows"][-1]
        extra = f"{100 * (result['cpu_seconds_per_step'] / base - 1):+.0f}%" if base else ""
        lines.append(f"| {name} | {result['steps']} | {result['cpu_seconds_per_step']:.3f} | {extra} | "
                     f"{last.get('pq', 0):.1f} | {last.get('pq_things', 0):.1f} | {last.get('pq_stuff', 0):.1f} | "
                     f"{last.get('recall', 0):.1f} | {last.get('duplicates', float('nan')):.2f} |")
    return "\n".join(lines)


def measure(args: argparse.Namespace, out: Path) -> None:
    """Train the requested options (each result kept as ``<out>/option_<name>.json``)."""
    settings, raw = load_demo_config(demo_config_path())
    root = out / "data"
    prepare_target_data(root, settings, seed=0, workers=1)
    init = args.init or str(start_point_path(settings.start_point))
    data = base_config(raw, root=root, init=init, out=out / "run")
    probe = config_from_dict(data, source="convergence")
    size = {"min_size": probe.data.min_size, "max_size": probe.data.max_size}
    train_set = cityscapes_panoptic_dataset(root, "train", **size)
    val_set = cityscapes_panoptic_dataset(root, "val", category_map=train_set.category_map, **size)
    datasets = (MemoryDataset(train_set), val_set, train_set.category_map)
    validate = make_validator(val_set, train_set.category_map, **size, threshold=probe.train.eval_threshold,
                              batch_size=2, rank=0, world_size=1, device=torch.device("cpu"), diagnostic_images=0)
    if not (out / "start.json").is_file():
        start_model = prepare_model(probe, train_set.category_map, None, torch.device("cpu"), verbose=False).eval()
        atomic_write_json(out / "start.json", {"init": init, **summary(validate(start_model))})
    for name in args.options:
        result = run_option(name, data, datasets, validate, budget=args.budget, eval_every=args.eval_every)
        atomic_write_json(out / f"option_{name}.json", {**result, "budget": args.budget, "init": init,
                                                        "eval_every": args.eval_every})


def report(args: argparse.Namespace, out: Path, command: str) -> None:
    """bench/results/convergence[_<label>].json and .png from the options measured under ``out``."""
    start = json.loads((out / "start.json").read_text())
    init = start.pop("init")
    results = {name: json.loads((out / f"option_{name}.json").read_text()) for name in OPTIONS
               if (out / f"option_{name}.json").is_file()}
    text = table(results, start)
    print(text)
    stem = "convergence" + (f"_{args.label}" if args.label else "")
    results_dir = Path(__file__).resolve().parent / "results"
    figure(results, start, results_dir / f"{stem}.png")
    figures: dict[str, Any] = {"start_pq": start.get("pq"), "start_pq_things": start.get("pq_things")}
    for name, result in results.items():
        last = result["rows"][-1]
        figures[f"{name}_cpu_s_per_step"] = result["cpu_seconds_per_step"]
        figures.update({f"{name}_final_{k}": last.get(k) for k in ("pq", "pq_things", "recall", "duplicates")})
    budgets = sorted({r["budget"] for r in results.values()})
    record = {"name": stem, "figures": figures, "table": text, "start": start, "options": results,
              "command": command, "init": init, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "notes": f"{'/'.join(f'{b:.0f}' for b in budgets)} CPU s of fine-tuning per option from the same "
                       "start point on the demo's 1,000 target images, validated on its 30 val images; clock = "
                       "process CPU time with one thread, validations excluded (the machine is shared)"}
    atomic_write_json(results_dir / f"{stem}.json", record)
    print(f"wrote {results_dir / stem}.json and .png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=180.0, help="CPU seconds of training per option")
    parser.add_argument("--eval-every", type=float, default=45.0, help="CPU seconds between validations")
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--init", default=None, help="start point (default: the packaged demo start point)")
    parser.add_argument("--out", default="runs/convergence")
    parser.add_argument("--label", default="")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true",
                        help="only write the result from the options already measured under --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.report_only:
        measure(args, out)
    report(args, out, "python bench/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
