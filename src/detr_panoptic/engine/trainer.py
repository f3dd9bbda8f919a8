"""The training loop: short on purpose; checkpoints, validation, logging and LR steps are hooks.

One optimizer step = ``accumulate_steps`` micro-batches (DDP gradient sync only on the last). Each
micro-batch: pad the images, run the model with the Hungarian matcher as ``mask_queries`` (so masks are
computed for matched queries only, inside the one forward), criterion -> unweighted losses ->
weighted total. Data order is a deterministic function of (seed, epoch) and a position within the
epoch, so a resumed run reads exactly the batches the uninterrupted run would have read.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from detr_panoptic.data.coco_panoptic import collate
from detr_panoptic.engine import distributed
from detr_panoptic.models.criterion import SetCriterion
from detr_panoptic.models.matcher import QuerySelector
from detr_panoptic.utils.batching import pad_images
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.precision import autocast, resolve_dtype

log = logging.getLogger(__name__)


class Hook:
    """What hangs off the loop (``engine.hooks`` has the standard ones); override any of these."""

    def before_train(self, trainer: Trainer) -> None: ...

    def after_step(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def after_epoch(self, trainer: Trainer, epoch: int) -> None: ...

    def after_train(self, trainer: Trainer) -> None: ...

    def on_log(self, trainer: Trainer, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TrainingDiverged(RuntimeError):
    """A non-finite loss: training stopped at ``step`` (1-based, the step that failed)."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class RunState:
    """Mutable progress of a run (the config stays frozen): where we are and who we are."""

    rank: int = 0
    world_size: int = 1
    step: int = 0            # optimizer steps done
    epoch: int = 0           # epoch in progress (0-based)
    position: int = 0        # micro-batches of the current epoch already consumed (this process)
    steps_per_epoch: int = 0
    total_steps: int = 0
    best_pq: float = -1.0    # best validation PQ so far (percent); -1 before any validation
    start_step: int = 0      # step at which this process started (after a resume)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def resumable(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "best_pq": self.best_pq}

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.step = int(saved["step"])
        self.epoch = int(saved["epoch"])
        self.position = int(saved["position"])
        self.best_pq = float(saved["best_pq"])
        self.start_step = self.step


class SeededItems(Dataset):
    """``dataset[i]`` with the torch RNG seeded from (seed, epoch, i) and the caller's RNG left untouched:
    random augmentations then depend only on the item and the epoch -- not on the worker that loads
    it, nor on where a resumed run restarted."""

    def __init__(self, dataset: Dataset, *, seed: int, epoch: int) -> None:
        self.dataset = dataset
        self.base = (seed * 100_003 + epoch) * 1_000_003

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        # Only the CPU generator, which the transforms draw from and fork_rng restores: torch.manual_seed
        # would also reseed every CUDA generator (dropout's stream on the GPU) on every item, unrestored.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.base + index) % 2**63)
            return self.dataset[index]


class EpochBatches:
    """This process's batches of an epoch, deterministic in (seed, epoch), resumable at any position.

    The global order is a seeded permutation; each process takes its ``DistributedSampler``-style
    shard (see ``distributed.shard_indices``), cut into batches of ``batch_size``; the incomplete last
    batch is dropped, and ``micro_batches_per_epoch`` is a multiple of ``accumulate_steps``.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 accumulate_steps: int = 1, workers: int = 0, collate_fn: Callable = collate,
                 shuffle: bool = True, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accumulate_steps = accumulate_steps
        self.workers = workers
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.pin_memory = pin_memory
        per_rank = -(-len(dataset) // world_size)  # type: ignore[arg-type]
        batches = per_rank // batch_size
        self.steps_per_epoch = batches // accumulate_steps
        if self.steps_per_epoch == 0:
            raise UserInputError(
                f"the training set has {len(dataset)} images: too few for one step of batch_size {batch_size} "  # type: ignore[arg-type]
                f"x accumulate_steps {accumulate_steps} x {world_size} processes")

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulate_steps

    def batch_indices(self, epoch: int) -> list[list[int]]:
        indices = distributed.shard_indices(len(self.dataset), seed=self.seed, epoch=epoch, rank=self.rank,  # type: ignore[arg-type]
                                            world_size=self.world_size, shuffle=self.shuffle)
        b = self.batch_size
        return [indices[i * b:(i + 1) * b] for i in range(self.micro_batches_per_epoch)]

    def iterate(self, epoch: int, start: int = 0) -> Iterator[Any]:
        batches = self.batch_indices(epoch)[start:]
        if not batches:
            return iter(())
        # The loader's own generator (not the global RNG) seeds its workers, so creating it mid-epoch
        # after a resume draws nothing from the global RNG stream that dropout uses.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        loader = DataLoader(SeededItems(self.dataset, seed=self.seed, epoch=epoch), batch_sampler=batches, collate_fn=self.collate_fn,
                            num_workers=self.workers, generator=generator, pin_memory=self.pin_memory)
        return iter(loader)


def _to_device(target: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


class Trainer:
    """Runs optimizer steps until ``state.total_steps``, calling hooks (see ``hooks.Hook``)."""

    def __init__(self, *, model: nn.Module, criterion: SetCriterion, optimizer: torch.optim.Optimizer,
                 scheduler: Any, batches: EpochBatches, state: RunState, device: torch.device,
                 hooks: Sequence[Hook] = (), clip_max_norm: float = 0.0, amp: str = "none",
                 matched_masks_only: bool = True, name: str = "train", max_nonfinite_steps: int = 5) -> None:
        self.model = model
        self.criterion = criterion
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.batches = batches
        self.state = state
        self.device = device
        self.hooks = list(hooks)
        self.clip_max_norm = clip_max_norm
        self.matched_masks_only = matched_masks_only
        self.name = name
        self.autocast_dtype = autocast_dtype(amp, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.autocast_dtype == torch.float16 else None
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model

    def log(self, record: Mapping[str, Any]) -> None:
        for hook in self.hooks:
            hook.on_log(self, record)

    def _call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    # -- one micro-batch --------------------------------------------------------------------------------
    def forward_losses(self, images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, Any]]
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Unweighted losses and the weighted total for one micro-batch."""
        batch, mask = pad_images([img.to(self.device, non_blocking=True) for img in images])
        targets = [_to_device(t, self.device) for t in targets]
        selector = QuerySelector(self.criterion.matcher, targets) if self.matched_masks_only else None
        # the training-only query branches (denoising...) are built from the targets
        branch_targets = {"targets": targets} if len(getattr(self.unwrapped_model, "query_branches", ())) else {}
        with autocast(self.device, self.autocast_dtype):  # the network only; losses run in float32
            outputs = self.model(batch, mask, mask_queries=selector, **branch_targets)
        matched = {"indices": selector.indices, "aux_indices": selector.aux_indices} if selector is not None else {}
        losses = self.criterion(outputs, targets, **matched)
        return losses, self.criterion.weighted_total(losses)

    # -- one optimizer step -------------------------------------------------------------------------------
    def step(self, micro_batches: Sequence[tuple[Sequence[torch.Tensor], Sequence[Mapping[str, Any]]]]
             ) -> dict[str, float]:
        """Forward/backward every micro-batch, clip, optimizer step; returns the mean losses over
        micro-batches and processes (``loss`` = weighted total).

        The losses reach the host once per step, after the backward passes (logging needs them; a check
        per micro-batch would stall the GPU each time). A non-finite loss then skips the optimizer step:
        under fp16 (an overflow) the run goes on and stops only after ``max_nonfinite_steps`` such steps in
        a row; otherwise it stops at once (``TrainingDiverged``)."""
        self.optimizer.zero_grad(set_to_none=True)
        is_ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        totals: torch.Tensor | None = None
        names: list[str] = []
        for i, (images, targets) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self.model.no_sync() if is_ddp and not last else contextlib.nullcontext():  # type: ignore[operator]
                losses, total = self.forward_losses(images, targets)
                names = ["loss", *sorted(losses)]
                values = torch.stack([total.detach().float(), *(losses[k].detach().float() for k in names[1:])])
                scaled = total / len(micro_batches)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            totals = values if totals is None else totals + values
        assert totals is not None
        # every process sees the same (all-reduced) values, so all skip or stop together
        mean = dict(zip(names, (distributed.all_reduce_mean(totals) / len(micro_batches)).tolist()))
        if not all(math.isfinite(v) for v in mean.values()):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip_nonfinite(mean)
        self.nonfinite_in_a_row = 0
        if self.clip_max_norm > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return mean

    def _skip_nonfinite(self, values: dict[str, float]) -> dict[str, float]:
        parts = ", ".join(f"{n}={v:.4g}" for n, v in values.items())
        self.nonfinite_in_a_row += 1
        if self.scaler is None or self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            in_a_row = f" ({self.nonfinite_in_a_row} steps in a row under fp16)" if self.scaler is not None else ""
            raise self._diverged(f"non-finite loss{in_a_row} ({parts})")
        log.warning("%s: step %d skipped: non-finite loss under fp16 (%s); %d in a row, the run stops at %d",
                    self.name, self.state.step + 1, parts, self.nonfinite_in_a_row, self.max_nonfinite_steps)
        self.scaler.update(self.scaler.get_scale() / 2)  # as after a gradient overflow: a smaller scale
        return {**values, "skipped": 1.0}

    def _diverged(self, what: str) -> TrainingDiverged:
        step = self.state.step + 1
        return TrainingDiverged(f"{self.name}: training stopped at step {step} (epoch {self.state.epoch}): {what}",
                                step=step)

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> RunState:
        state = self.state
        epoch_len = self.batches.micro_batches_per_epoch
        accumulate = self.batches.accumulate_steps
        self.model.train()
        self._call("before_train")
        try:
            while state.step < state.total_steps:
                if state.position < epoch_len:
                    self._run_epoch_part(epoch_len, accumulate)
                if state.position >= epoch_len:
                    finished = state.epoch
                    state.epoch += 1
                    state.position = 0
                    self._call("after_epoch", finished)
            self._call("after_train")
        finally:
            for hook in self.hooks:
                hook.close()
        return state

    def _run_epoch_part(self, epoch_len: int, accumulate: int) -> None:
        state = self.state
        iterator = self.batches.iterate(state.epoch, state.position)
        while state.step < state.total_steps and state.position < epoch_len:
            start = time.perf_counter()
            micro = []
            for _ in range(accumulate):
                micro.append(next(iterator))
            data_time = time.perf_counter() - start
            lrs = {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}
            values = self.step(micro)
            state.step += 1
            state.position += accumulate
            record: dict[str, Any] = {"kind": "train", "step": state.step, "epoch": state.epoch,
                                      "lr": lrs.get("other", next(iter(lrs.values())))}
            if "backbone" in lrs:
                record["lr_backbone"] = lrs["backbone"]
            record.update(values)
            record["step_time"] = time.perf_counter() - start
            record["data_time"] = data_time
            self._call("after_step", record)
        del iterator


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (``utils.precision.resolve_dtype``): none -> None
    (float32); bf16 on the CPU and on CUDA; fp16 on CUDA only (with a ``GradScaler``), a
    ``UserInputError`` naming ``train.amp`` on the CPU. bf16 on hardware that only emulates it warns."""
    if amp not in ("none", "bf16", "fp16"):
        raise UserInputError(f"train.amp must be none, bf16 or fp16, got {amp!r}")
    dtype = resolve_dtype(amp, device, key="train.amp")
    if dtype is not None:
        log.info("train.amp=%s: the network runs under %s autocast on %s; losses and weights stay float32",
                 amp, amp, device)
    return dtype
