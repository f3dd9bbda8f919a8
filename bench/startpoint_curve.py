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

from detr_panoptic.utils.precision import cpu_model

KEYS = ("pq", "pq_things", "pq_stuff", "things_recall", "things_duplicates_per_gt", "things_kept_ratio",
        "things_mask_iou")


def run_curve(run: Path) -> dict[str, Any]:
    """Val records of ``run``'s pre-training with the training seconds (sum of step times) before each."""
    path = run / "pretrain" / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (a `detr-panoptic demo --pretrain-only --out {run}` run?)")
    seconds_at: dict[int, float] = {}
    total, rows, last_step = 0.0, [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"{path}:{number}: not a JSON line") from None
        if record.get("kind") == "train":
            if record["step"] not in seconds_at:  # a resumed run repeats the steps after its checkpoint
                total += float(record.get("step_time", 0.0))
                seconds_at[record["step"]] = total
            last_step = max(last_step, record["step"])
        elif record.get("kind") == "val":
            row = {"step": record["step"], "train_hours": round(seconds_at.get(record["step"], total) / 3600, 3)}
            row.update({k: round(float(record[k]), 2) for k in KEYS if k in record})
            rows = [r for r in rows if r["step"] != row["step"]] + [row]
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
