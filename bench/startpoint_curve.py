"""Source-domain validation curves of start-point pre-training runs, side by side (issue 22).

Reads each run's ``<run>/pretrain/metrics.jsonl`` (``detr-panoptic demo --pretrain-only --out <run>``): the
val records (every 1,000 steps) and the summed ``step_time`` of the train records before each, so runs of
different cost per step compare at equal training time too. Writes a JSON table and a figure (things PQ,
PQ, things found and mask IoU of the found things, against steps and against training hours).

    python bench/startpoint_curve.py runs/startpoint_long runs/startpoint_dc5 \
        --out bench/results/startpoint_runs.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from detr_panoptic.demo.report import CURVE_KEYS as KEYS
from detr_panoptic.demo.report import val_curve
from detr_panoptic.utils.precision import cpu_model


def run_curve(run: Path) -> dict[str, Any]:
    """Val records of ``run``'s pre-training with the training hours (summed step times) up to each."""
    path = run / "pretrain" / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (a `detr-panoptic demo --pretrain-only --out {run}` run?)")
    try:
        curve = val_curve(path)["source_val_curve"]
    except ValueError as exc:  # json.JSONDecodeError
        raise SystemExit(f"{path}: not a metrics.jsonl ({exc})") from None
    last_step = max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()),
                    default=0)
    rows = [{"step": p["step"], "train_hours": round(p["train_seconds"] / 3600, 3),
             **{k: v for k, v in p.items() if k in KEYS}} for p in curve]
    return {"run": str(run), "last_step": last_step, "val": rows}


def figure(curves: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pq_things", "things PQ"), ("pq", "PQ"), ("things_recall", "things found (box IoU 0.5), %"),
              ("things_mask_iou", "mask IoU of found things, %")]
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    for row, (x_key, x_label) in enumerate((("step", "pre-training step"), ("train_hours", "training hours"))):
        for ax, (key, label) in zip(axes[row], panels):
            for curve in curves:
                points = [(r[x_key], r[key]) for r in curve["val"] if key in r]
                if points:
                    ax.plot(*zip(*points), marker="o", ms=3, label=Path(curve["run"]).name)
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("start point pre-training: source-domain val (20 images) every 1,000 steps")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/startpoint_runs.json"))
    args = parser.parse_args(argv)
    curves = [run_curve(run) for run in args.runs]
    figures: dict[str, Any] = {}
    for curve in curves:  # RESULTS.md's table (bench/run_all.py): per run its last step and its curves
        name = Path(curve["run"]).name
        figures[f"{name}_last_step"] = curve["last_step"]
        for key in ("pq", "pq_things"):
            figures[f"{name}_{key}_per_1000_steps"] = " / ".join(str(r.get(key)) for r in curve["val"])
        if curve["val"]:
            figures[f"{name}_train_hours"] = curve["val"][-1]["train_hours"]
    result = {"name": args.out.stem, "figures": figures,
              "command": "python bench/startpoint_curve.py " + " ".join(str(r) for r in args.runs),
              "date": time.strftime("%Y-%m-%d"),
              "notes": f"{__doc__.splitlines()[0]} Source val (20 images) every 1,000 steps; train_hours: the "
                       f"summed step times up to the last validation. CPU: {cpu_model()}.",
              "runs": curves}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    figure(curves, args.out.with_suffix(".png"))
    for curve in curves:
        print(curve["run"], "last step", curve["last_step"])
        for row in curve["val"]:
            print("  ", "  ".join(f"{k} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
