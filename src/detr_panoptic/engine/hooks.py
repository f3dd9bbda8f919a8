"""What hangs off the training loop: LR schedule, checkpoints, validation, logging, progress bar.

A hook overrides any of ``before_train``, ``after_step``, ``after_epoch``, ``after_train``, ``on_log`` and
``close``. ``Trainer.log(record)`` hands a record (``kind`` train or val) to every hook's ``on_log``:
the logging hook writes it, the checkpoint hook watches validation PQ for ``best.pth``. Hooks run on
every process (some steps are collective); only rank 0 writes files.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detr_panoptic.checkpoints import save_checkpoint
from detr_panoptic.engine import distributed
from detr_panoptic.engine.metrics_log import JsonlWriter, TensorBoardWriter, WandbWriter
from detr_panoptic.engine.trainer import Hook, Trainer
from detr_panoptic.models.config import DETRConfig

log = logging.getLogger(__name__)


# -- RNG state (as tensors/lists, so checkpoints load with weights_only=True) -------------------------
def capture_rng_state() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's training-only state (``PanopticDETR.training_state_dict``), on the CPU; {} for other models."""
    getter = getattr(model, "training_state_dict", None)
    return {k: v.cpu() for k, v in getter().items()} if getter is not None else {}


class LRSchedulerHook(Hook):
    """Steps the LR scheduler once per optimizer step."""

    def after_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        trainer.scheduler.step()


class CheckpointHook(Hook):
    """``last.pth`` every ``every_steps`` steps, at each epoch end and at the end; ``best.pth`` whenever
    validation PQ improves. Writes are atomic, so a kill never leaves a broken checkpoint behind."""

    def __init__(self, folder: str | Path, *, every_steps: int | None, model_config: DETRConfig,
                 category_map: Mapping[str, Any], on_saved: Callable[[Path, str, int], None] | None = None,
                 input_size: Mapping[str, int] | None = None) -> None:
        self.folder = Path(folder)
        self.input_size = input_size
        self.every_steps = every_steps
        self.model_config = model_config
        self.category_map = dict(category_map)
        self.on_saved = on_saved
        self._last_saved: tuple | None = None

    @property
    def last_path(self) -> Path:
        return self.folder / "last.pth"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pth"

    def checkpoint(self, trainer: Trainer, *, full: bool) -> dict[str, Any] | None:
        """The training state that goes beside the weights (``checkpoints.save_checkpoint``'s ``extra``):
        step, epoch, best PQ and, when ``full``, optimizer, scheduler, RNG states of every rank and the
        data position. Collective when ``full`` and distributed; None on ranks other than 0."""
        rng_all = distributed.all_gather_objects(capture_rng_state()) if full else []
        if not trainer.state.is_main:
            return None
        state = trainer.state
        extra: dict[str, Any] = {"step": state.step, "epoch": state.epoch, "best_pq": state.best_pq}
        if full:
            extra.update({
                "optimizer": trainer.optimizer.state_dict(),
                "lr_scheduler": trainer.scheduler.state_dict(),
                "rng": {"per_rank": rng_all},
                "run_state": state.resumable(),
                # training-only modules (extra query groups...): not model weights, but needed for an exact resume
                "training_state": training_state(trainer.unwrapped_model),
            })
            if trainer.scaler is not None:
                extra["grad_scaler"] = trainer.scaler.state_dict()
        return extra

    def _write(self, trainer: Trainer, extra: Mapping[str, Any] | None, path: Path, alias: str) -> None:
        if extra is None:
            return
        save_checkpoint(path, trainer.unwrapped_model, category_map=self.category_map,  # type: ignore[arg-type]
                        model_config=self.model_config, extra=extra, input_size=self.input_size)
        log.debug("saved %s (step %d)", path, extra["step"])
        if self.on_saved is not None:
            self.on_saved(path, alias, int(extra["step"]))

    def save_last(self, trainer: Trainer) -> None:
        # Skip only when nothing changed: at an epoch end that follows a step save, the epoch, position
        # and best PQ did change, and a stale best PQ in last.pth would let a resumed run overwrite a
        # better best.pth.
        key = tuple(trainer.state.resumable().values())
        if self._last_saved == key:
            return
        self._write(trainer, self.checkpoint(trainer, full=True), self.last_path, "last")
        self._last_saved = key
        distributed.barrier()

    def save_best(self, trainer: Trainer) -> None:
        self._write(trainer, self.checkpoint(trainer, full=False), self.best_path, "best")

    def after_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.every_steps and trainer.state.step % self.every_steps == 0:
            self.save_last(trainer)

    def after_epoch(self, trainer: Trainer, epoch: int) -> None:
        self.save_last(trainer)

    def on_log(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if record.get("kind") != "val":
            return
        pq = float(record["pq"])
        if math.isfinite(pq) and pq > trainer.state.best_pq:
            trainer.state.best_pq = pq
            self.save_best(trainer)
            if trainer.state.is_main:
                log.info("step %d: new best PQ %.2f -> %s", trainer.state.step, pq, self.best_path)

    def after_train(self, trainer: Trainer) -> None:
        self.save_last(trainer)
        if trainer.state.is_main and not self.best_path.exists():
            log.info("no validation result to pick a best checkpoint: best.pth holds the final weights")
            self.save_best(trainer)
        distributed.barrier()  # the stage ends when its files are written: a next stage may load best.pth


class EvalHook(Hook):
    """Validation every ``every_epochs`` epochs and at the end of training (unless that step was just
    evaluated; ``every_epochs`` 0: never): ``evaluate(model) -> {"pq", "sq", "rq", ...}`` (percentages),
    logged as a val record."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], Mapping[str, Any]], *, every_epochs: int) -> None:
        self.evaluate = evaluate
        self.every_epochs = every_epochs
        self._evaluated_step = -1

    def run(self, trainer: Trainer, epoch: int) -> None:
        start = time.perf_counter()
        model = trainer.unwrapped_model
        was_training = model.training
        model.eval()
        try:
            metrics = dict(self.evaluate(model))
        finally:
            model.train(was_training)
        self._evaluated_step = trainer.state.step
        record = {"kind": "val", "step": trainer.state.step, "epoch": epoch, **metrics,
                  "eval_time": time.perf_counter() - start}
        trainer.log(record)

    def after_epoch(self, trainer: Trainer, epoch: int) -> None:
        if self.every_epochs > 0 and (epoch + 1) % self.every_epochs == 0:
            self.run(trainer, epoch)

    def after_train(self, trainer: Trainer) -> None:
        if self.every_epochs <= 0:
            return
        if self._evaluated_step != trainer.state.step and trainer.state.step > trainer.state.start_step:
            self.run(trainer, trainer.state.epoch)


class LoggingHook(Hook):
    """Rank 0 (``main``): every train record to ``metrics.jsonl``, every ``every_steps``-th (and the last)
    to TensorBoard and W&B; every val record to all of them (whichever are enabled) and a one-line
    summary of each validation to the log. Other ranks create no files."""

    def __init__(self, run_dir: str | Path, *, every_steps: int, jsonl: bool = True, tensorboard: bool = True,
                 wandb: WandbWriter | None = None, main: bool = True) -> None:
        self.every_steps = max(1, every_steps)
        self.jsonl = JsonlWriter(Path(run_dir) / "metrics.jsonl") if jsonl and main else None
        self.sinks: list[Any] = []
        if tensorboard and main:
            self.sinks.append(TensorBoardWriter(Path(run_dir) / "tb"))
        if wandb is not None and main:
            self.sinks.append(wandb)

    def after_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(record)
        step = trainer.state.step
        if step % self.every_steps == 0 or step == trainer.state.total_steps:
            for sink in self.sinks:
                sink.write(record)

    def on_log(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if record.get("kind") == "train":
            return  # written by after_step
        for sink in ([self.jsonl] if self.jsonl is not None else []) + self.sinks:
            sink.write(record)
        if trainer.state.is_main and record.get("kind") == "val":
            log.info("step %d (epoch %d): PQ %.2f  SQ %.2f  RQ %.2f  (things %.2f, stuff %.2f)",
                     record["step"], record["epoch"], record.get("pq", float("nan")), record.get("sq", float("nan")),
                     record.get("rq", float("nan")), record.get("pq_things", float("nan")),
                     record.get("pq_stuff", float("nan")))

    def close(self) -> None:
        for sink in ([self.jsonl] if self.jsonl is not None else []) + self.sinks:
            sink.close()
        self.jsonl, self.sinks = None, []


class ProgressHook(Hook):
    """A tqdm bar over optimizer steps with ETA and the current loss (rank 0 only)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def before_train(self, trainer: Trainer) -> None:
        if not (self.enabled and trainer.state.is_main):
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=trainer.state.total_steps, initial=trainer.state.step, unit="step",
                         desc=trainer.name, dynamic_ncols=True, smoothing=0.1)

    def after_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", epoch=trainer.state.epoch, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
