"""``train(config)``: run every stage of a (possibly chained) config; the library behind ``detr-panoptic train``.

Per stage: datasets -> model (initialised from ``model.init``, class head adapted to the dataset) ->
freeze policies -> criterion, AdamW, schedule -> resume from ``<output_dir>/checkpoints/last.pth`` when
present (``train.resume``) -> DDP when launched by ``torchrun`` -> ``Trainer`` with hooks. The run
folder gets ``config.yaml`` (resolved), ``metrics.jsonl``, ``tb/`` and ``checkpoints/{last,best}.pth``.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from detr_panoptic.config import Config, DataConfig, ModelConfig, save_config
from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.engine import distributed
from detr_panoptic.engine.distributed import DistributedContext
from detr_panoptic.engine.freezing import FreezeReport, apply_freeze
from detr_panoptic.engine.hooks import (
    CheckpointHook,
    EvalHook,
    Hook,
    LoggingHook,
    LRSchedulerHook,
    ProgressHook,
    restore_rng_state,
)
from detr_panoptic.engine.metrics_log import WandbWriter, truncate_metrics
from detr_panoptic.engine.optim import build_optimizer, build_scheduler
from detr_panoptic.engine.trainer import EpochBatches, RunState, Trainer, TrainingDiverged
from detr_panoptic.engine.transfer import adapt_to_classes
from detr_panoptic.models.criterion import build_criterion
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResult:
    """Where a finished stage left its outputs."""

    name: str
    output_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path
    steps: int
    best_pq: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- data ------------------------------------------------------------------------------------------
def build_datasets(data: DataConfig) -> tuple[Dataset, Dataset, CategoryMap]:
    """(train, val, category map) for ``data``; val is cut to ``max_val_images`` when set."""
    from detr_panoptic.data.coco_panoptic import CocoPanopticDataset, cityscapes_panoptic_dataset
    from detr_panoptic.data.transforms import make_transforms

    kwargs: dict[str, Any] = {"min_size": data.min_size, "max_size": data.max_size, "cache_dir": data.cache_dir}
    train_transforms = make_transforms(min_size=data.min_size, max_size=data.max_size, augment=data.augment)
    if data.dataset == "cityscapes":
        if not data.root:
            raise FileNotFoundError("data.root is empty: set it to the Cityscapes root that holds leftImg8bit/ "
                                    "and gtFine/ (e.g. --set data.root=data/cityscapes)")
        train_set = cityscapes_panoptic_dataset(data.root, data.train_split, data.use_train_id,
                                                transforms=train_transforms, **kwargs)
        val_set = cityscapes_panoptic_dataset(data.root, data.val_split, data.use_train_id,
                                              category_map=train_set.category_map, **kwargs)
    else:
        missing = [k for k in ("train_json", "train_panoptic_dir", "train_image_dir", "val_json",
                               "val_panoptic_dir", "val_image_dir") if not getattr(data, k)]
        if missing:
            raise FileNotFoundError(f"data.dataset is coco but {', '.join('data.' + m for m in missing)} "
                                    f"{'is' if len(missing) == 1 else 'are'} not set")
        train_set = CocoPanopticDataset(data.train_json, data.train_panoptic_dir, data.train_image_dir,
                                        transforms=train_transforms, **kwargs)
        val_set = CocoPanopticDataset(data.val_json, data.val_panoptic_dir, data.val_image_dir,
                                      category_map=train_set.category_map, **kwargs)
    category_map = train_set.category_map
    if data.max_val_images is not None and data.max_val_images < len(val_set):
        val_set = Subset(val_set, range(max(0, data.max_val_images)))
    return train_set, val_set, category_map


# -- model -----------------------------------------------------------------------------------------
ARCHITECTURE_FIELDS = ("backbone", "dilation", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                       "dim_feedforward", "num_queries")


def build_model(model_config: ModelConfig, category_map: CategoryMap) -> PanopticDETR:
    """A ``PanopticDETR`` for ``category_map``'s classes: random, or from ``model_config.init`` with the
    class head adapted (re-initialised, optionally warm-started) when the classes differ. A checkpoint
    defines the architecture; ``dropout`` and ``aux_loss`` come from the config."""
    from detr_panoptic.checkpoints import load_pretrained

    training = {"dropout": model_config.dropout, "aux_loss": model_config.aux_loss}
    if model_config.init is None:
        arch = {k: getattr(model_config, k) for k in ARCHITECTURE_FIELDS}
        model = PanopticDETR(category_map.num_classes, **arch, **training)
        model.category_map = category_map
        return model
    model = load_pretrained(model_config.init, **training)
    differs = {k: (getattr(model_config, k), model.config[k]) for k in ARCHITECTURE_FIELDS
               if model.config.get(k) != getattr(model_config, k)}
    if differs:
        log.info("model.init %s defines the architecture; config values not used: %s", model_config.init,
                 ", ".join(f"{k}={a!r} (checkpoint: {b!r})" for k, (a, b) in differs.items()))
    adapt_to_classes(model, category_map, warm_start=model_config.class_warm_start,
                     table_path=model_config.class_warm_start_table)
    return model


def _model_from_resume(checkpoint: dict[str, Any], category_map: CategoryMap) -> PanopticDETR:
    saved = checkpoint.get("detr_panoptic", {}).get("model_config", {})
    model = PanopticDETR(**{k: v for k, v in saved.items() if k != "category_map"})
    model.load_state_dict(checkpoint["model"])
    model.category_map = category_map
    if model.num_classes != category_map.num_classes:
        raise ValueError(f"cannot resume: last.pth has {model.num_classes} classes, the dataset "
                         f"{category_map.num_classes} (use another train.output_dir or train.resume=false)")
    return model


# -- validation --------------------------------------------------------------------------------------
def make_pq_evaluator(dataset: Dataset, category_map: CategoryMap, *, threshold: float, batch_size: int,
                      rank: int, world_size: int, device: torch.device, workers: int = 0
                      ) -> Callable[[nn.Module], dict[str, Any]]:
    """``evaluate(model) -> metrics`` (percentages, ``per_class`` by category id) with the in-memory PQ
    accumulator; each process takes every ``world_size``-th image and the statistics are summed.

    PQ is computed at the network input resolution (ground truth from the target masks), which is fast;
    ``detr-panoptic evaluate`` gives the official full-resolution figure.
    """
    from detr_panoptic.data.coco_panoptic import collate
    from detr_panoptic.evaluation.pq import PQAccumulator, results_to_percentages

    indices = list(range(rank, len(dataset), world_size))  # type: ignore[arg-type]

    def evaluate(model: nn.Module) -> dict[str, Any]:
        accumulator = PQAccumulator(category_map)
        loader = torch.utils.data.DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                                             num_workers=workers, collate_fn=collate)
        for images, targets in loader:
            sizes = [tuple(int(v) for v in t["size"]) for t in targets]
            results = model.predict([img.to(device) for img in images], threshold=threshold,  # type: ignore[operator]
                                    target_sizes=sizes)
            for target, result in zip(targets, results):
                gt_map, gt_segments = target_id_map(target)
                accumulator.add(gt_map, gt_segments, result.id_map.cpu(), result.segments_info,
                                image_id=target.get("image_id"))
        if distributed.is_initialized():
            total = accumulator.to_tensor(device=device if device.type == "cuda" else None)
            torch.distributed.all_reduce(total)
            accumulator.load_tensor(total.cpu())
        return results_to_percentages(accumulator.compute())

    return evaluate


def target_id_map(target: dict[str, Any]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Ground-truth id map [H, W] (0 = void) and segments from a dataset target's masks."""
    masks = target["masks"]
    id_map = torch.zeros(masks.shape[-2:], dtype=torch.int64)
    segments = []
    for k in range(masks.shape[0]):
        segment_id = int(target["segment_ids"][k])
        id_map[masks[k].cpu()] = segment_id
        segments.append({"id": segment_id, "category_id": int(target["category_ids"][k]),
                         "iscrowd": int(target["iscrowd"][k])})
    return id_map, segments


# -- one stage -----------------------------------------------------------------------------------------
def total_steps_for(*, epochs: int, max_steps: int | None, steps_per_epoch: int) -> int:
    total = epochs * steps_per_epoch
    return min(total, max_steps) if max_steps is not None else total


def _freeze(model: nn.Module, config: Config) -> FreezeReport:
    freeze = config.freeze
    backbone = freeze.backbone or config.train.lr_backbone == 0
    if backbone and not freeze.backbone:
        log.info("train.lr_backbone is 0: the backbone is frozen")
    return apply_freeze(model, backbone=backbone, transformer=freeze.transformer, attention=freeze.attention,
                        first_layers=freeze.first_layers, backbone_stem=freeze.backbone_stem)


def train_stage(config: Config, ctx: DistributedContext | None = None, *,
                evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
                datasets: tuple[Dataset, Dataset, CategoryMap] | None = None) -> StageResult:
    """Train one resolved config (no ``stages``). ``datasets`` and ``evaluate`` replace the ones built
    from ``config.data`` (tests, notebooks)."""
    if config.stages:
        raise ValueError("train_stage takes one resolved stage; use train() for a chained config")
    ctx = ctx or distributed.init_distributed(config.train.device)
    tc = config.train
    out = Path(tc.output_dir)
    ckpt_dir = out / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pth", ckpt_dir / "best.pth"
    if tc.accumulate_steps < 1 or tc.batch_size < 1:
        raise ValueError(f"train.batch_size ({tc.batch_size}) and train.accumulate_steps ({tc.accumulate_steps}) "
                         f"must be >= 1")
    seed_everything(tc.seed + ctx.rank)

    train_set, val_set, category_map = datasets if datasets is not None else build_datasets(config.data)
    resume = torch.load(last_path, map_location="cpu", weights_only=True) \
        if tc.resume and last_path.is_file() else None
    model = _model_from_resume(resume, category_map) if resume is not None \
        else build_model(config.model, category_map)
    model.to(ctx.device)
    if not config.freeze.batch_norm:
        if config.freeze.backbone or tc.lr_backbone == 0:
            raise UserInputError(f"{config.name}: freeze.batch_norm: false trains the backbone's batch norms, "
                                 f"so it needs freeze.backbone: false and train.lr_backbone > 0")
        from detr_panoptic.models.backbone import thaw_batch_norms

        body = model.detr.backbone[0].body
        # A frozen stem keeps its norms frozen too: only the training stages' norms move.
        stages = [body.layer2, body.layer3, body.layer4] if config.freeze.backbone_stem else [body]
        log.info("%s: %d backbone batch norms train (batch statistics)", config.name,
                 sum(thaw_batch_norms(stage) for stage in stages))
    report = _freeze(model, config)
    if ctx.is_main:
        log.info("%s: trainable parameters per part\n%s", config.name, report.format())

    batches = EpochBatches(train_set, batch_size=tc.batch_size, seed=tc.seed, rank=ctx.rank,
                           world_size=ctx.world_size, accumulate_steps=tc.accumulate_steps,
                           workers=config.data.workers, pin_memory=ctx.device.type == "cuda")
    state = RunState(rank=ctx.rank, world_size=ctx.world_size, steps_per_epoch=batches.steps_per_epoch,
                     total_steps=total_steps_for(epochs=tc.epochs, max_steps=tc.max_steps,
                                                 steps_per_epoch=batches.steps_per_epoch))
    criterion = build_criterion(
        category_map.num_classes, aux_loss=model.aux_loss, num_decoder_layers=model.config["dec_layers"],
        eos_coef=tc.eos_coef, ce_loss_coef=tc.ce_loss_coef, bbox_loss_coef=tc.bbox_loss_coef,
        giou_loss_coef=tc.giou_loss_coef, mask_loss_coef=tc.mask_loss_coef, dice_loss_coef=tc.dice_loss_coef,
        set_cost_class=tc.set_cost_class, set_cost_bbox=tc.set_cost_bbox, set_cost_giou=tc.set_cost_giou,
    ).to(ctx.device)
    optimizer = build_optimizer(model, lr=tc.lr, lr_backbone=tc.lr_backbone, weight_decay=tc.weight_decay)
    scheduler = build_scheduler(optimizer, scheduler=tc.scheduler, steps_per_epoch=batches.steps_per_epoch,
                                total_steps=state.total_steps, lr_drop_epochs=tc.lr_drop_epochs,
                                lr_drop_factor=tc.lr_drop_factor, warmup_steps=tc.warmup_steps)
    result = StageResult(name=config.name, output_dir=out, last_checkpoint=last_path, best_checkpoint=best_path,
                         steps=state.total_steps, best_pq=state.best_pq)
    if resume is not None:
        try:
            optimizer.load_state_dict(resume["optimizer"])
        except ValueError as exc:
            raise UserInputError(f"cannot resume from {last_path}: the trainable parameters differ from the run that "
                                 f"wrote it (freeze or learning-rate settings changed?): {exc}; set "
                                 f"train.resume=false or use another train.output_dir") from None
        scheduler.load_state_dict(resume["lr_scheduler"])
        state.restore(resume["run_state"])
        if ctx.is_main:
            log.info("%s: resuming from %s at step %d (epoch %d)", config.name, last_path, state.step, state.epoch)
        if state.step >= state.total_steps:
            if ctx.is_main:
                log.info("%s: already complete (%d steps in %s); nothing to do (train.resume=false or another "
                         "train.output_dir starts over)", config.name, state.step, last_path)
            return dataclasses.replace(result, best_pq=state.best_pq)
    elif tc.resume and ctx.is_main and best_path.exists():
        log.info("%s: no last.pth but an old best.pth in %s: it will be replaced", config.name, ckpt_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        if resume is None and best_path.exists():
            best_path.unlink()
        dropped = truncate_metrics(out / "metrics.jsonl", after_step=state.step) if resume is not None else 0
        if resume is None and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        if dropped:
            log.info("dropped %d metric records written after the resumed checkpoint", dropped)
    distributed.barrier()

    train_model: nn.Module = model
    if ctx.is_distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True)  # an image without targets leaves the mask head out of the graph
    wandb = None
    if config.logging.wandb and ctx.is_main:
        wandb = WandbWriter(project=config.logging.wandb_project, mode=config.logging.wandb_mode, run_dir=out,
                            name=config.name, config=config.to_dict(),
                            log_checkpoints=config.logging.wandb_log_checkpoints)
    if evaluate is None:
        evaluate = make_pq_evaluator(val_set, category_map, threshold=tc.eval_threshold, batch_size=tc.batch_size,
                                     rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    from detr_panoptic.checkpoints import model_config_from_model

    hooks: list[Hook] = [
        LRSchedulerHook(),
        EvalHook(evaluate, every_epochs=tc.eval_every_epochs),
        CheckpointHook(ckpt_dir, every_steps=tc.checkpoint_every_steps, model_config=model_config_from_model(model),
                       category_map=category_map.to_json(),
                       on_saved=wandb.log_checkpoint if wandb is not None else None,
                       input_size={"min_size": config.data.min_size, "max_size": config.data.max_size}),
        LoggingHook(out, every_steps=config.logging.log_every_steps, jsonl=config.logging.jsonl,
                    tensorboard=config.logging.tensorboard, wandb=wandb, main=ctx.is_main),
        ProgressHook(enabled=config.logging.progress),
    ]
    trainer = Trainer(model=train_model, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                      batches=batches, state=state, device=ctx.device, hooks=hooks, clip_max_norm=tc.clip_max_norm,
                      amp=tc.amp, matched_masks_only=tc.matched_masks_only, name=config.name)
    if resume is not None:
        if trainer.scaler is not None and "grad_scaler" in resume:
            trainer.scaler.load_state_dict(resume["grad_scaler"])
        rng = resume["rng"]["per_rank"]
        restore_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
    try:
        trainer.train()
    except TrainingDiverged as exc:
        if last_path.is_file():
            saved = torch.load(last_path, map_location="cpu", weights_only=True)
            where = f"the last good checkpoint is {last_path} (step {saved['step']})"
        else:
            where = "no checkpoint was written before it (set train.checkpoint_every_steps to keep some)"
        raise TrainingDiverged(f"{exc}; {where}", step=exc.step) from None
    return dataclasses.replace(result, best_pq=state.best_pq)


def train(config: Config, *, evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
          datasets: tuple[Dataset, Dataset, CategoryMap] | None = None) -> list[StageResult]:
    """Train every stage of ``config`` in order (a config without stages is one stage)."""
    stages = config.resolve_stages()
    owns_group = not distributed.is_initialized()
    ctx = distributed.init_distributed(stages[0].train.device)
    results = []
    try:
        for stage in stages:
            if ctx.is_main and len(stages) > 1:
                log.info("stage %s -> %s", stage.name, stage.train.output_dir)
            results.append(train_stage(stage, ctx, evaluate=evaluate, datasets=datasets))
    finally:
        if owns_group:
            distributed.cleanup_distributed()
    return results
