"""``train(config)``: run every stage of a (possibly chained) config; the library behind ``detr-panoptic train``.

Per stage: datasets -> model (initialised from ``model.init``, class head adapted to the dataset) ->
freeze policies -> criterion, AdamW, schedule -> resume from ``<output_dir>/checkpoints/last.pth`` when
present (``train.resume``) -> DDP when launched by ``torchrun`` -> ``Trainer`` with hooks. The run
folder gets ``config.yaml`` (resolved), ``metrics.jsonl``, ``tb/`` and ``checkpoints/{last,best}.pth``.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from detr_panoptic.config import Config, DataConfig, ModelConfig, TrainConfig, save_config
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
from detr_panoptic.engine.trainer import EpochBatches, RunState, Trainer, TrainingDiverged, autocast_dtype
from detr_panoptic.engine.transfer import adapt_to_classes
from detr_panoptic.engine.validation import make_validator
from detr_panoptic.models.config import DETRConfig
from detr_panoptic.models.criterion import build_criterion
from detr_panoptic.models.denoising import DenoisingQueries
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.one_to_many import OneToManyQueries
from detr_panoptic.models.query_branches import branch_loss_weights
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
def build_model(model_config: ModelConfig, category_map: CategoryMap) -> PanopticDETR:
    """A ``PanopticDETR`` for ``category_map``'s classes: random, or from ``model_config.init`` with the
    class head adapted (re-initialised, optionally warm-started) when the classes differ. A checkpoint
    defines the architecture; ``dropout`` and ``aux_loss`` come from the config."""
    from detr_panoptic.checkpoints import load_checkpoint

    wanted = model_config.detr_config(category_map.num_classes)
    if model_config.init is None:
        return PanopticDETR.from_config(wanted)
    pretrained = load_checkpoint(model_config.init, dropout=wanted.dropout, aux_loss=wanted.aux_loss)
    model = pretrained.model
    differs = {k: (wanted[k], model.config[k]) for k in DETRConfig.ARCHITECTURE if model.config[k] != wanted[k]}
    if differs:
        log.info("model.init %s defines the architecture; config values not used: %s", model_config.init,
                 ", ".join(f"{k}={a!r} (checkpoint: {b!r})" for k, (a, b) in differs.items()))
    adapt_to_classes(model, category_map, source_map=pretrained.category_map,
                     warm_start=model_config.class_warm_start, table_path=model_config.class_warm_start_table)
    return model


def _model_from_resume(checkpoint: dict[str, Any], category_map: CategoryMap) -> PanopticDETR:
    saved = checkpoint.get("detr_panoptic", {}).get("model_config", {})
    model = PanopticDETR.from_config(DETRConfig.from_dict(saved, source="last.pth"))
    model.load_state_dict(checkpoint["model"])
    if model.num_classes != category_map.num_classes:
        raise ValueError(f"cannot resume: last.pth has {model.num_classes} classes, the dataset "
                         f"{category_map.num_classes} (use another train.output_dir or train.resume=false)")
    return model


# -- one stage, step by step -------------------------------------------------------------------------------
def total_steps_for(*, epochs: int, max_steps: int | None, steps_per_epoch: int) -> int:
    total = epochs * steps_per_epoch
    return min(total, max_steps) if max_steps is not None else total


def _check_stage(config: Config) -> None:
    if config.stages:
        raise ValueError("train_stage takes one resolved stage; use train() for a chained config")
    tc = config.train
    if tc.accumulate_steps < 1 or tc.batch_size < 1:
        raise ValueError(f"train.batch_size ({tc.batch_size}) and train.accumulate_steps ({tc.accumulate_steps}) "
                         f"must be >= 1")
    if not config.freeze.batch_norm and (config.freeze.backbone or tc.lr_backbone == 0):
        raise UserInputError(f"{config.name}: freeze.batch_norm: false trains the backbone's batch norms, "
                             f"so it needs freeze.backbone: false and train.lr_backbone > 0")


def prepare_model(config: Config, category_map: CategoryMap, resume: dict[str, Any] | None,
                  device: torch.device, *, verbose: bool) -> PanopticDETR:
    """The stage's model on ``device``: from the resumed checkpoint or ``model.init``, batch norms thawed
    when ``freeze.batch_norm`` is false, freeze policies applied (trainable parameters per part logged),
    ``train.query_groups`` extra query groups for training."""
    model = _model_from_resume(resume, category_map) if resume is not None \
        else build_model(config.model, category_map)
    model.to(device)
    if not config.freeze.batch_norm:
        # A frozen stem keeps its norms frozen too: only the training stages' norms move.
        thawed = model.thaw_backbone_batch_norms(stem=not config.freeze.backbone_stem)
        log.info("%s: %d backbone batch norms train (batch statistics)", config.name, thawed)
    freeze = config.freeze
    backbone = freeze.backbone or config.train.lr_backbone == 0
    if backbone and not freeze.backbone:
        log.info("train.lr_backbone is 0: the backbone is frozen")
    report: FreezeReport = apply_freeze(model, backbone=backbone, transformer=freeze.transformer,
                                        attention=freeze.attention, first_layers=freeze.first_layers,
                                        backbone_stem=freeze.backbone_stem)
    if config.train.query_groups > 1:  # after freezing: the extra queries freeze with the official ones
        model.enable_query_groups(config.train.query_groups)
        if verbose:
            log.info("%s: %d query groups in training (Group-DETR); checkpoints and inference keep the official "
                     "%d queries", config.name, config.train.query_groups, model.config.num_queries)
    add_query_branches(model, config.train, verbose=verbose, name=config.name)
    if resume is not None:
        restore_training_state(model, resume, Path(config.train.output_dir) / "checkpoints" / "last.pth")
    if verbose:
        log.info("%s: trainable parameters per part\n%s", config.name, report.format())
    return model


def add_query_branches(model: PanopticDETR, tc: TrainConfig, *, verbose: bool, name: str) -> None:
    """``train.denoising_*`` and ``train.one_to_many_*``: the training-only query branches, whose parameters
    train whatever is frozen (docs/convergence.md)."""
    hidden, num_queries = model.config.hidden_dim, model.config.num_queries
    if tc.denoising_groups > 0:
        model.add_query_branch(DenoisingQueries(model.num_classes, hidden, groups=tc.denoising_groups,
                                                box_noise=tc.denoising_box_noise, label_noise=tc.denoising_label_noise))
    if tc.one_to_many_repeats > 0:
        queries = tc.one_to_many_queries or tc.one_to_many_repeats * num_queries
        model.add_query_branch(OneToManyQueries(queries, hidden, tc.one_to_many_repeats))
    if verbose and len(model.query_branches):
        log.info("%s: training-only query branches %s (checkpoints and inference keep the official %d queries)",
                 name, ", ".join(model.query_branches), num_queries)


def branch_weights(tc: TrainConfig, weight_dict: Mapping[str, float]) -> dict[str, float]:
    """The loss weights of the query branches that ``tc`` enables (``query_branches.branch_loss_weights``)."""
    weights: dict[str, float] = {}
    if tc.denoising_groups > 0:
        weights.update(branch_loss_weights(weight_dict, DenoisingQueries.name, tc.denoising_weight))
    if tc.one_to_many_repeats > 0:
        weights.update(branch_loss_weights(weight_dict, OneToManyQueries.name, tc.one_to_many_weight))
    return weights


def restore_training_state(model: PanopticDETR, resume: dict[str, Any], last_path: Path) -> None:
    """The training-only modules (extra query groups...) as ``last.pth`` saved them."""
    saved = resume.get("training_state")
    if saved is None:
        if model.training_state_dict():
            log.warning("%s has no training state (written by an older version): the training-only modules "
                        "(extra query groups) restart from their initialisation", last_path)
        return
    try:
        model.load_training_state_dict(saved)
    except ValueError as exc:
        raise UserInputError(f"cannot resume from {last_path}: {exc}; set train.resume=false or use another "
                             f"train.output_dir") from None


@dataclass
class StageParts:
    """What one stage trains with (``build_parts``)."""

    batches: EpochBatches
    state: RunState
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def build_parts(config: Config, model: PanopticDETR, train_set: Dataset, category_map: CategoryMap,
                ctx: DistributedContext) -> StageParts:
    """Batches, run state, criterion, AdamW and the LR schedule of a stage."""
    tc = config.train
    batches = EpochBatches(train_set, batch_size=tc.batch_size, seed=tc.seed, rank=ctx.rank,
                           world_size=ctx.world_size, accumulate_steps=tc.accumulate_steps,
                           workers=config.data.workers, pin_memory=ctx.device.type == "cuda")
    state = RunState(rank=ctx.rank, world_size=ctx.world_size, steps_per_epoch=batches.steps_per_epoch,
                     total_steps=total_steps_for(epochs=tc.epochs, max_steps=tc.max_steps,
                                                 steps_per_epoch=batches.steps_per_epoch))
    criterion = build_criterion(
        category_map.num_classes, aux_loss=model.aux_loss, num_decoder_layers=model.config.dec_layers,
        eos_coef=tc.eos_coef, ce_loss_coef=tc.ce_loss_coef, bbox_loss_coef=tc.bbox_loss_coef,
        giou_loss_coef=tc.giou_loss_coef, mask_loss_coef=tc.mask_loss_coef, dice_loss_coef=tc.dice_loss_coef,
        set_cost_class=tc.set_cost_class, set_cost_bbox=tc.set_cost_bbox, set_cost_giou=tc.set_cost_giou,
        # a NaN prediction must surface as a non-finite loss, which every process sees (all-reduced)
        raise_on_nonfinite=False,
    ).to(ctx.device)
    criterion.weight_dict.update(branch_weights(tc, criterion.weight_dict))
    optimizer = build_optimizer(model, lr=tc.lr, lr_backbone=tc.lr_backbone, weight_decay=tc.weight_decay)
    scheduler = build_scheduler(optimizer, scheduler=tc.scheduler, steps_per_epoch=batches.steps_per_epoch,
                                total_steps=state.total_steps, lr_drop_epochs=tc.lr_drop_epochs,
                                lr_drop_factor=tc.lr_drop_factor, warmup_steps=tc.warmup_steps,
                                decay_steps=tc.decay_steps)
    return StageParts(batches, state, criterion, optimizer, scheduler)


def restore_parts(parts: StageParts, resume: dict[str, Any], last_path: Path) -> None:
    """Optimizer, schedule and run state from ``last.pth``."""
    try:
        parts.optimizer.load_state_dict(resume["optimizer"])
    except ValueError as exc:
        raise UserInputError(f"cannot resume from {last_path}: the trainable parameters differ from the run that "
                             f"wrote it (freeze or learning-rate settings changed?): {exc}; set "
                             f"train.resume=false or use another train.output_dir") from None
    parts.scheduler.load_state_dict(resume["lr_scheduler"])
    parts.state.restore(resume["run_state"])


def load_resume_point(last_path: Path, *, enabled: bool, ctx: DistributedContext) -> dict[str, Any] | None:
    """``last.pth`` when the run resumes, else None. Rank 0 decides (``train.resume`` and whether it sees
    ``last_path``) and tells the others, which must then read the same step: processes that decided on
    their own could start at different steps and hang. Collective when distributed."""
    resume = torch.load(last_path, map_location="cpu", weights_only=True) \
        if ctx.is_main and enabled and last_path.is_file() else None
    step = distributed.broadcast_object(int(resume["step"]) if resume is not None else None)
    problem = None
    if step is not None and not ctx.is_main:
        if not last_path.is_file():
            problem = (f"rank {ctx.rank} cannot see {last_path}, from which rank 0 resumes (step {step}): "
                       f"multi-node training needs train.output_dir on a filesystem shared by all nodes")
        else:
            resume = torch.load(last_path, map_location="cpu", weights_only=True)
            if int(resume["step"]) != step:
                problem = (f"rank {ctx.rank} reads step {resume['step']} from {last_path}, rank 0 step {step}: "
                           f"the processes do not share one run folder")
    distributed.raise_if_any(problem, UserInputError)
    return resume


def prepare_run_folder(config: Config, *, resumed_step: int | None) -> None:
    """``config.yaml`` written; a fresh run drops an old ``best.pth`` and ``metrics.jsonl``, a resumed run
    drops the metric records written after its checkpoint. Rank 0 only."""
    out = Path(config.train.output_dir)
    best_path = out / "checkpoints" / "best.pth"
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    if resumed_step is None:
        best_path.unlink(missing_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        return
    dropped = truncate_metrics(out / "metrics.jsonl", after_step=resumed_step)
    if dropped:
        log.info("dropped %d metric records written after the resumed checkpoint", dropped)


def build_hooks(config: Config, model: PanopticDETR, category_map: CategoryMap, ctx: DistributedContext,
                validate: Callable[[nn.Module], dict[str, Any]], wandb: WandbWriter | None) -> list[Hook]:
    """LR schedule, validation, checkpoints, logging and the progress bar, in the order they must run."""

    tc = config.train
    out = Path(tc.output_dir)
    return [
        LRSchedulerHook(),
        EvalHook(validate, every_epochs=tc.eval_every_epochs),
        CheckpointHook(out / "checkpoints", every_steps=tc.checkpoint_every_steps,
                       model_config=model.config, category_map=category_map.to_json(),
                       on_saved=wandb.log_checkpoint if wandb is not None else None,
                       input_size={"min_size": config.data.min_size, "max_size": config.data.max_size}),
        LoggingHook(out, every_steps=config.logging.log_every_steps, jsonl=config.logging.jsonl,
                    tensorboard=config.logging.tensorboard, wandb=wandb, main=ctx.is_main),
        ProgressHook(enabled=config.logging.progress),
    ]


def set_tf32(enabled: bool, device: torch.device) -> None:
    """``train.tf32``: TF32 in CUDA matmuls and cuDNN convolutions (process-wide), else PyTorch's defaults."""
    if device.type != "cuda" or not enabled:
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log.info("train.tf32: TF32 matmuls and convolutions on %s", device)


def wrap_distributed(model: PanopticDETR, ctx: DistributedContext, *, find_unused_parameters: bool,
                     broadcast_buffers: bool) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed, else itself.

    ``find_unused_parameters`` (``train.ddp_find_unused_parameters``, default true): a process whose images
    have no targets matches no query, computes no mask, and the mask head gets no gradient
    (tests/engine/test_distributed.py shows it, and trains with such images).
    Buffers are synchronised at each forward only when batch norms train (``freeze.batch_norm: false``);
    frozen norms' buffers never change. The convolutions of the
    channels-last parts get channels-last weights, as their gradients are: DDP's gradient buckets take the
    parameters' strides, and a mismatch costs a copy of every such gradient per step (and a warning)."""
    if not ctx.is_distributed:
        return model
    for part in (model.detr.backbone[0], model.mask_head):
        if getattr(part, "channels_last", False):
            for module in part.modules():
                if isinstance(module, nn.Conv2d) and module.weight.requires_grad:
                    module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    ddp = nn.parallel.DistributedDataParallel
    # newer torch names it forward_sync_buffers (and warns that broadcast_buffers is deprecated)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else "broadcast_buffers"
    return ddp(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters, **{sync: broadcast_buffers})


def train_stage(config: Config, ctx: DistributedContext | None = None, *,
                evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
                datasets: tuple[Dataset, Dataset, CategoryMap] | None = None) -> StageResult:
    """Train one resolved config (no ``stages``): data, resume point, model (built, thawed, frozen), parts
    (criterion, optimizer, schedule), run folder, hooks, then the loop. ``datasets`` and ``evaluate``
    replace the ones built from ``config.data`` (tests, notebooks)."""
    _check_stage(config)
    ctx = ctx or distributed.init_distributed(config.train.device)
    tc = config.train
    out = Path(tc.output_dir)
    last_path, best_path = out / "checkpoints" / "last.pth", out / "checkpoints" / "best.pth"
    seed_everything(tc.seed + ctx.rank)

    autocast_dtype(tc.amp, ctx.device)  # fp16 on the CPU: refused now, before data and model are built
    train_set, val_set, category_map = datasets if datasets is not None else build_datasets(config.data)
    distributed.check_shared_folder(out)
    resume = load_resume_point(last_path, enabled=tc.resume, ctx=ctx)
    model = prepare_model(config, category_map, resume, ctx.device, verbose=ctx.is_main)
    parts = build_parts(config, model, train_set, category_map, ctx)
    result = StageResult(name=config.name, output_dir=out, last_checkpoint=last_path, best_checkpoint=best_path,
                         steps=parts.state.total_steps, best_pq=parts.state.best_pq)
    if resume is not None:
        restore_parts(parts, resume, last_path)
        if ctx.is_main:
            log.info("%s: resuming from %s at step %d (epoch %d)", config.name, last_path, parts.state.step,
                     parts.state.epoch)
        if parts.state.step >= parts.state.total_steps:
            if ctx.is_main:
                log.info("%s: already complete (%d steps in %s); nothing to do (train.resume=false or another "
                         "train.output_dir starts over)", config.name, parts.state.step, last_path)
            return dataclasses.replace(result, best_pq=parts.state.best_pq)
    elif tc.resume and ctx.is_main and best_path.exists():
        log.info("%s: no last.pth but an old best.pth in %s: it will be replaced", config.name, best_path.parent)
    if ctx.is_main:
        prepare_run_folder(config, resumed_step=parts.state.step if resume is not None else None)
    distributed.barrier()

    set_tf32(tc.tf32, ctx.device)
    train_model = wrap_distributed(model, ctx, find_unused_parameters=tc.ddp_find_unused_parameters,
                                   broadcast_buffers=not config.freeze.batch_norm)
    wandb = None
    if config.logging.wandb and ctx.is_main:
        wandb = WandbWriter(project=config.logging.wandb_project, mode=config.logging.wandb_mode, run_dir=out,
                            name=config.name, config=config.to_dict(),
                            log_checkpoints=config.logging.wandb_log_checkpoints)
    if evaluate is None:
        evaluate = make_validator(val_set, category_map, min_size=config.data.min_size,
                                  max_size=config.data.max_size, threshold=tc.eval_threshold,
                                  batch_size=tc.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                  device=ctx.device, num_workers=config.data.workers, metrics=tc.val_metrics)
    hooks = build_hooks(config, model, category_map, ctx, evaluate, wandb)
    trainer = Trainer(model=train_model, criterion=parts.criterion, optimizer=parts.optimizer,
                      scheduler=parts.scheduler, batches=parts.batches, state=parts.state, device=ctx.device,
                      hooks=hooks, clip_max_norm=tc.clip_max_norm, amp=tc.amp,
                      matched_masks_only=tc.matched_masks_only, name=config.name)
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
    return dataclasses.replace(result, best_pq=parts.state.best_pq)


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
            # rank 0 may still be writing the stage's best.pth (after_train), which the next stage loads
            distributed.barrier()
    finally:
        if owns_group:
            distributed.cleanup_distributed()
    return results
