"""Metric sinks of a run: ``metrics.jsonl``, TensorBoard event files and (optionally) Weights & Biases.

Every sink takes the same flat records: ``{"kind": "train" | "val", "step": int, "epoch": int, ...}``
with numbers (and, for validation, a nested ``per_class`` dict that only the JSONL file keeps).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_text

log = logging.getLogger(__name__)

WANDB_HINT = "pip install 'detr-panoptic[wandb]'"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information readable
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a killed run keeps every written record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run; close())

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(_json_safe(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_metrics(path: str | Path, *, after_step: int) -> int:
    """Drop records with ``step > after_step`` (written by a run that was killed and is now resumed
    from an earlier checkpoint); returns how many were dropped. Unreadable lines are dropped too."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(record.get("step", 0)) > after_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardWriter:
    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: Mapping[str, Any]) -> None:
        kind = record.get("kind", "train")
        for name, value in _scalars(record).items():
            self._writer.add_scalar(f"{kind}/{name}", value, global_step=int(record["step"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise UserInputError(f"logging.wandb is true but the wandb package is not installed: {WANDB_HINT} "
                             f"(or set logging.wandb=false)") from None
    return wandb


class WandbWriter:
    """Weights & Biases run (``mode`` offline works without network; sync later with ``wandb sync``)."""

    def __init__(self, *, project: str, mode: str, run_dir: str | Path, name: str, config: Mapping[str, Any],
                 log_checkpoints: bool = False) -> None:
        self._wandb = import_wandb()
        self.log_checkpoints = log_checkpoints
        self._run = self._wandb.init(project=project, mode=mode, dir=str(run_dir), name=name, config=dict(config),
                                     reinit=True)

    def write(self, record: Mapping[str, Any]) -> None:
        kind = record.get("kind", "train")
        data = {f"{kind}/{k}": v for k, v in _scalars(record).items()}
        data["epoch"] = record.get("epoch", 0)
        self._run.log(data, step=int(record["step"]))

    def log_checkpoint(self, path: str | Path, alias: str, step: int) -> None:
        if not self.log_checkpoints:
            return
        name = f"{self._run.id}-checkpoint"
        artifact = self._wandb.Artifact(name=name, type="model",
                                        metadata={"step": step, "which": alias})
        artifact.add_file(str(path), name=Path(path).name)
        self._run.log_artifact(artifact, aliases=[alias, f"step-{step}"])
        # the name to load it back with (``--checkpoint wandb:...``); offline runs get their entity at sync
        entity = getattr(self._run, "entity", None) or "ENTITY"
        project = getattr(self._run, "project", None) or "PROJECT"
        log.info("checkpoint %s logged to W&B: load it with --checkpoint wandb:%s/%s/%s:%s", path, entity, project,
                 name, alias)

    def close(self) -> None:
        self._run.finish()
