"""The demo's results: the summary (``metrics.json``), the figures of the final model, the PQ table, the
HTML report and the benchmark record."""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detr_panoptic.config import Config
from detr_panoptic.demo.settings import DemoSettings
from detr_panoptic.utils.io import atomic_write_text

log = logging.getLogger(__name__)


PHASES = ("start", "stage1", "stage2")


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("pq", "sq", "rq", "n", "pq_things", "sq_things", "rq_things", "n_things", "pq_stuff", "sq_stuff",
            "rq_stuff", "n_stuff", "things_recall", "things_kept_per_gt", "things_duplicates_per_gt",
            "things_kept_ratio", "things_mask_iou", "things_segment_recall", "things_segment_duplicates_per_gt", "miou",
            "iiou", "ap", "ap50")
    return {k: (round(float(metrics[k]), 3) if isinstance(metrics[k], float) else metrics[k])
            for k in keys if k in metrics}


def combined_metrics(run_dirs: Sequence[Path], out: Path) -> None:
    """The stages' ``metrics.jsonl`` records in one file, steps continuing across stages (for the curves)."""
    lines, offset = [], 0
    for run_dir in run_dirs:
        last = 0
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            last = max(last, int(record.get("step", 0)))
            record["step"] = int(record.get("step", 0)) + offset
            record["stage"] = run_dir.name
            lines.append(json.dumps(record))
        offset += last
    atomic_write_text(out, "\n".join(lines) + ("\n" if lines else ""))


def packaged_source_metrics(path: Path) -> dict[str, Any] | None:
    """The source val PQ recorded in a packaged start point's sidecar (``source_domain``), if any."""
    from detr_panoptic.checkpoints import sidecar_path

    try:
        meta = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    source = meta.get("demo", {}).get("source_domain")
    return source if isinstance(source, dict) else None


def last_val_metrics(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    vals = [r for r in records if r.get("kind") == "val"]
    return flat_metrics(vals[-1]) if vals else None


CURVE_KEYS = ("pq", "pq_things", "pq_stuff", "things_recall", "things_duplicates_per_gt", "things_kept_ratio",
              "things_mask_iou")


def val_curve(path: Path) -> dict[str, Any]:
    """A run's ``metrics.jsonl`` as its val curve (``CURVE_KEYS`` per val record, rounded, with the training
    seconds up to it) and its training seconds (the sum of the train records' ``step_time``, each step once:
    a resumed run repeats the steps after its checkpoint, and the parts before a resume count too)."""
    curve: dict[int, dict[str, Any]] = {}
    step_times: dict[int, float] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == "train":
            step_times[record["step"]] = float(record.get("step_time", 0.0))
        elif record.get("kind") == "val":
            curve[record["step"]] = {"step": record["step"],
                                     **{k: round(float(record[k]), 2) for k in CURVE_KEYS if k in record}}
    for step, point in curve.items():
        point["train_seconds"] = round(sum(t for s, t in step_times.items() if s <= step), 1)
    return {"source_val_curve": [curve[step] for step in sorted(curve)],
            "train_seconds": round(sum(step_times.values()), 1)}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def summarise(evaluations: Mapping[str, Mapping[str, Any]], *, source_pq: Mapping[str, Any] | None,
             settings: DemoSettings, config_path: Path, init: str | None, seed: int, final_checkpoint: Path,
             quick: bool) -> dict[str, Any]:
    final = flat_metrics(evaluations["stage2"])  # DemoRun.report puts the calibrated model's here when there is one
    stages = {name: flat_metrics(evaluations[name]) for name in PHASES}
    return {
        **final,
        "stages": stages,
        "source_domain": source_pq,
        "checkpoint": str(final_checkpoint),
        "config": str(config_path),
        "quick": quick,
        "init": init or "source-domain pre-training (synthetic COCO-style labels)",
        "seed": seed,
        "settings": settings.to_dict(),
        "goal": {"pq_at_least": 50.0, "seconds_at_most": 600,
                 "ordered": bool(stages["stage2"]["pq"] >= stages["stage1"]["pq"] > stages["start"]["pq"])},
    }


def write_figures(checkpoint: Path, val_set: Any, summary_dir: Path, settings: DemoSettings,
             stage_configs: Sequence[Config], *, device: str, threshold: float | None) -> None:
    """Overlays and attention maps of the final model on a few val images; curves of the fine-tuning."""
    from detr_panoptic.inference import PanopticPredictor, predict_to_folder
    from detr_panoptic.visualize.attention import write_attention_figures
    from detr_panoptic.visualize.curves import plot_run

    predictor = PanopticPredictor.from_pretrained(checkpoint, device=device, threshold=threshold)
    paths = [val_set.image_path(val_set.image_record(i)) for i in range(len(val_set))]
    if settings.figure_images:
        predict_to_folder(predictor, paths[:settings.figure_images], summary_dir, progress=False)
    for path in paths[:settings.attention_images]:
        write_attention_figures(predictor.attention(path),
                                summary_dir / "attention" / path.stem.removesuffix("_leftImg8bit"),
                                predictor.settings.category_map)
    combined_metrics([Path(s.train.output_dir) for s in stage_configs], summary_dir / "metrics.jsonl")
    shutil.copyfile(Path(stage_configs[-1].train.output_dir) / "config.yaml", summary_dir / "config.yaml")
    try:
        plot_run(summary_dir)
    except ImportError as exc:  # a chart module of the visualize package may be missing in a partial install
        log.warning("demo: curves not drawn (%s)", exc)


def bench_record(summary: Mapping[str, Any], *, command: str) -> dict[str, Any]:
    """The demo's timing and PQ figures in the benchmark result format (``bench/results/<name>.json``)."""
    import datetime as dt

    figures: dict[str, Any] = {"total_seconds": summary["seconds"]["total"], "cpu_seconds": summary.get("cpu_seconds")}
    figures.update({f"{k}_seconds": v for k, v in summary["seconds"].items() if k != "total"})
    for name in PHASES:
        for key in ("pq", "sq", "rq", "pq_things", "pq_stuff", "things_recall", "things_kept_per_gt",
                    "things_duplicates_per_gt", "things_kept_ratio", "things_mask_iou",
                    "things_segment_duplicates_per_gt"):
            figures[f"{name}_{key}"] = summary["stages"][name].get(key)
    if summary.get("calibrated"):
        calibrated = summary["calibrated"]
        for key in ("pq", "pq_things", "pq_stuff", "things_recall", "things_segment_recall",
                    "things_segment_duplicates_per_gt"):
            figures[f"calibrated_{key}"] = calibrated.get(key)
        figures["calibrated_setting"] = "{threshold:.2f}/{merge_stuff}/{min_area}/{min_visible:.2f}".format(
            **{"min_visible": 0.0, **calibrated["setting"]})
        figures["calibrated_on_train_images"] = calibrated.get("train_images")
    if summary.get("source_domain"):
        figures["source_domain_pq"] = summary["source_domain"].get("pq")
    figures["goal_pq_50"] = summary["pq"] >= 50.0
    figures["goal_things_30"] = (summary.get("pq_things") or 0.0) >= 30.0
    figures["goal_600_seconds"] = summary["seconds"]["total"] <= 600
    final = summary.get("calibrated") or summary["stages"]["stage2"]  # the model the report shows
    duplicates = final.get("things_segment_duplicates_per_gt")
    figures["goal_duplicates_0_1"] = duplicates is not None and duplicates <= 0.1
    figures["goal_ordered"] = summary["goal"]["ordered"]
    machine = summary.get("machine", {})
    settings = summary.get("settings", {})
    return {
        "name": "demo",
        "figures": figures,
        "command": command,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "notes": (f"one run of the default demo from scratch (empty output folder); PQ (%) on the "
                  f"{settings.get('val_images')} synthetic val images ({settings.get('size')}), panopticapi-exact, "
                  f"of the start point (source model, class head adapted), stage 1 and stage 2 (best checkpoints). "
                  f"Seconds are wall time per phase; load average at the end {machine.get('load_average')} on "
                  f"{machine.get('cpus')} cores (other jobs shared the machine when it is above the core count)."),
    }


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def pq_table(summary: Mapping[str, Any]) -> str:
    """The start point / stage 1 / stage 2 PQ table as text."""
    rows = [("", "PQ", "SQ", "RQ", "PQ things", "PQ stuff", "mIoU", "AP", "things found %", "kept per thing",
             "duplicate segments per thing")]
    labels = {"start": "start point", "stage1": "stage 1 (transformer frozen)",
              "stage2": "stage 2 (attention frozen)"}
    keys = ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "ap", "things_recall", "things_kept_per_gt",
            "things_segment_duplicates_per_gt")

    def cells(m: Mapping[str, Any]) -> list[str]:
        return [f"{_number(m.get(k)):.{2 if k.endswith('_per_gt') else 1}f}" for k in keys]

    for name in PHASES:
        rows.append((labels[name], *cells(summary["stages"][name])))
    if summary.get("calibrated"):
        rows.append((_calibrated_label(summary["calibrated"]), *cells(summary["calibrated"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _calibrated_label(calibrated: Mapping[str, Any]) -> str:
    setting = calibrated["setting"]
    visible = f"/visible {setting['min_visible']:.2f}" if setting.get("min_visible") else ""
    return (f"stage 2, calibrated ({setting['threshold']:.2f}/{setting['merge_stuff']}{visible}, "
            f"on {calibrated.get('train_images')} train images)")


def write_report(summary_dir: Path, report_path: Path, summary: Mapping[str, Any]) -> None:
    """``visualize.report.build_report`` of the summary folder, the per-stage PQ table first."""
    from detr_panoptic.visualize import report

    labels = {"start": "start point (before fine-tuning)", "stage1": "stage 1: transformer frozen",
              "stage2": "stage 2: attention frozen"}
    keys = ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "ap", "things_recall", "things_kept_per_gt",
            "things_kept_ratio", "things_segment_duplicates_per_gt")

    def cells(metrics: Mapping[str, Any]) -> list[Any]:
        return [metrics.get(k, "") if metrics.get(k, "") is not None else "-" for k in keys]

    rows = [[labels[name], *cells(summary["stages"][name])] for name in PHASES]
    if summary.get("calibrated"):
        rows.append([_calibrated_label(summary["calibrated"]), *cells(summary["calibrated"])])
    body = report.html_table(["", "PQ", "SQ", "RQ", "PQ things", "PQ stuff", "mIoU (Cityscapes classes)",
                              "AP (Cityscapes instances)", "things found (%, box IoU >= 0.5)",
                              "kept queries per thing found", "kept / ground-truth things",
                              "duplicate thing segments per ground-truth thing"], rows)
    source = summary.get("source_domain")
    if source:
        body += (f"<p>The source-domain model (the COCO stand-in, its own label set) reaches PQ "
                 f"{source.get('pq', 0):.1f} on the source val images.</p>")
    seconds = summary.get("seconds", {})
    body += "<p>Seconds per phase: " + ", ".join(f"{k} {v}" for k, v in seconds.items()) + ".</p>"
    report.build_report(summary_dir, report_path, title="detr-panoptic demo: synthetic Cityscapes",
                        lead_sections=[("PQ, mIoU and AP on the synthetic val split, per stage", body, "stages")])
