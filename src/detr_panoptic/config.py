"""Typed, frozen configuration: one dataclass per concern, loaded from YAML with command-line overrides.

This is the only module that reads YAML. Everything else takes plain typed keyword arguments or one
of these dataclasses. A config file looks like::

    model: {backbone: resnet50, num_queries: 100, init: coco-r50-panoptic}
    data: {dataset: cityscapes, root: data/cityscapes}
    train: {lr: 1.0e-4, epochs: 10, output_dir: runs/stage1}
    freeze: {backbone: true, transformer: true}
    stages:                       # optional: a chain of stages, each a partial override of the above
      - name: stage1
        freeze: {transformer: true}
      - name: stage2
        freeze: {transformer: false, attention: true}
        model: {init: "@stage1/best"}

Unknown keys and wrong types raise ``UserInputError`` naming the key and the file.

The shipped configs (the demo's and the Cityscapes recipes) are package data under
``detr_panoptic/configs/``: ``list_configs()`` names them, and ``find_config`` (used by ``load_config``)
takes a shipped name such as ``cityscapes/recipe_two_stages`` as well as a path.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from detr_panoptic.shipped_configs import find_config, list_configs
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_text

if TYPE_CHECKING:
    from detr_panoptic.models.config import DETRConfig


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the DETR panoptic model (defaults: the official DETR-R50 panoptic)."""

    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    dilation: bool = False
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    aux_loss: bool = True
    # Where the weights come from: a file, a URL, a Hugging Face folder, an alias such as
    # "coco-r50-panoptic", "@<stage>/best" (a previous stage of the same config), or None (random).
    init: str | None = None
    # Warm-start the re-initialised class head row by row from matching source classes.
    class_warm_start: bool = False
    class_warm_start_table: str | None = None

    def detr_config(self, num_classes: int) -> DETRConfig:
        """The ``models.config.DETRConfig`` of this section for ``num_classes`` classes (the model it builds
        when ``init`` is None; with ``init``, the checkpoint's architecture wins and only ``dropout`` and
        ``aux_loss`` are taken from here)."""
        from detr_panoptic.models.config import DETRConfig

        return DETRConfig(num_classes, **{name: getattr(self, name) for name in DETRConfig.ARCHITECTURE},
                          dropout=self.dropout, aux_loss=self.aux_loss)


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset is and how images are prepared."""

    dataset: Literal["cityscapes", "coco"] = "cityscapes"
    # Cityscapes: the root that holds leftImg8bit/ and gtFine/ (gtFine/ holds the converted panoptic files).
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    use_train_id: bool = False
    # Generic COCO panoptic: explicit files and folders (used when dataset == "coco").
    train_json: str = ""
    train_panoptic_dir: str = ""
    train_image_dir: str = ""
    val_json: str = ""
    val_panoptic_dir: str = ""
    val_image_dir: str = ""
    # Image preparation: the reference fast path resizes the shorter side to min_size (longer <= max_size).
    min_size: int = 800
    max_size: int = 1333
    augment: bool = False
    cache_dir: str | None = None
    workers: int = 2
    max_val_images: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run control (defaults: the reference Cityscapes fine-tuning recipe)."""

    output_dir: str = "runs/train"
    lr: float = 1e-4
    lr_backbone: float = 0.0
    weight_decay: float = 1e-4
    batch_size: int = 1
    epochs: int = 10
    max_steps: int | None = None
    clip_max_norm: float = 0.1
    scheduler: Literal["step", "cosine", "constant", "wsd"] = "step"
    lr_drop_epochs: int = 200
    lr_drop_factor: float = 0.1
    warmup_steps: int = 0
    decay_steps: int = 0  # scheduler wsd: the final steps over which the rate falls (cosine) to 0
    accumulate_steps: int = 1
    seed: int = 42
    amp: Literal["none", "bf16", "fp16"] = "none"
    device: str = "auto"
    # TF32 matmuls and convolutions on Ampere and newer GPUs (docs/gpu.md): ~10-bit mantissa products, several
    # times the float32 throughput. false leaves PyTorch's defaults. No effect on the CPU.
    tf32: bool = False
    # DistributedDataParallel searches each step's graph for parameters without a gradient: a process whose
    # images have no targets computes no mask, so the mask head gets none. false saves that search when every
    # training image has at least one segment (else DDP stops with a collective mismatch).
    ddp_find_unused_parameters: bool = True
    eval_every_epochs: int = 1
    checkpoint_every_steps: int | None = None
    eval_threshold: float = 0.85
    # What training validation measures: PQ always; "miou" and "ap" add Cityscapes' pixel-level (mIoU, iIoU) and
    # instance-level (AP, AP50) scores (docs/metrics.md), at the cost of the queries' extra masks.
    val_metrics: tuple[Literal["pq", "miou", "ap"], ...] = ("pq",)
    eos_coef: float = 0.1
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_loss_coef: float = 1.0
    dice_loss_coef: float = 1.0
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    matched_masks_only: bool = True
    # Group-DETR training (faster convergence): K groups of model.num_queries queries during training only,
    # each matched one-to-one on its own, self-attention within each group, losses averaged over groups.
    # The first group is the model's own queries; inference and checkpoints are unchanged. 1: off.
    query_groups: int = 1
    # Denoising queries (DN-DETR, training only; models/denoising.py, docs/convergence.md): groups of noised
    # copies of the ground truth fed to the decoder and reconstructed, masked from the model's queries.
    # 0: off; DN-DETR uses 5 groups, box noise 0.4, label noise 0.2. The weight scales its losses.
    denoising_groups: int = 0
    denoising_box_noise: float = 0.4
    denoising_label_noise: float = 0.2
    denoising_weight: float = 1.0
    # One-to-many matching (H-DETR, training only; models/one_to_many.py): an extra group of queries matched
    # to the ground truth repeated K times, masked from the model's queries. 0: off (H-DETR: K = 6);
    # one_to_many_queries 0 means K x model.num_queries. The weight scales its losses.
    one_to_many_repeats: int = 0
    one_to_many_queries: int = 0
    one_to_many_weight: float = 1.0
    # Continue from <output_dir>/checkpoints/last.pth when it exists (model, optimizer, scheduler, step,
    # epoch, RNG states, data position); false starts over in the same folder.
    resume: bool = True


@dataclass(frozen=True)
class FreezeConfig:
    """Which parts of the model do not train; composable."""

    backbone: bool = True
    # When the backbone trains, its stem (conv1 and layer1) stays frozen, as in the reference DETR.
    backbone_stem: bool = True
    transformer: bool = False
    attention: bool = False
    first_layers: int = 0
    # The backbone's batch norms: frozen statistics (the reference, for a pre-trained backbone), or, with
    # false, batch norms that train with the backbone (for a backbone trained from scratch; needs
    # backbone: false). Checkpoints hold frozen-norm keys either way.
    batch_norm: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go."""

    jsonl: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "detr-panoptic"
    wandb_mode: Literal["online", "offline"] = "offline"
    wandb_log_checkpoints: bool = False
    progress: bool = True
    log_every_steps: int = 10


@dataclass(frozen=True)
class StageConfig:
    """One stage of a chained recipe: a name and a partial override of the base sections."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    name: str = "run"
    stages: tuple[StageConfig, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready); the inverse of ``config_from_dict``."""
        out: dict[str, Any] = {"name": self.name}
        for section in SECTIONS:
            out[section] = dataclasses.asdict(getattr(self, section))
        if self.stages:
            out["stages"] = [{"name": s.name, **copy.deepcopy(dict(s.overrides))} for s in self.stages]
        return out

    def resolve_stages(self) -> list[Config]:
        """One fully resolved config per stage (no ``stages``); ``[self]`` when there are no stages.

        Each stage's ``train.output_dir`` defaults to ``<base output_dir>/<stage name>`` and
        ``model.init: "@<stage>/best"`` (or ``/last``) refers to an earlier stage's checkpoint.
        """
        if not self.stages:
            return [self]
        base = self.to_dict()
        base.pop("stages")
        resolved: list[Config] = []
        out_dirs: dict[str, str] = {}
        for stage in self.stages:
            merged = _deep_merge(base, dict(stage.overrides), source=f"stage {stage.name!r}")
            if "output_dir" not in stage.overrides.get("train", {}):
                merged["train"]["output_dir"] = str(Path(base["train"]["output_dir"]) / stage.name)
            init = merged["model"].get("init")
            if isinstance(init, str) and init.startswith("@"):
                ref_stage, _, which = init[1:].partition("/")
                if ref_stage not in out_dirs:
                    raise UserInputError(
                        f"stage {stage.name!r}: model.init {init!r} refers to stage {ref_stage!r}, "
                        f"which is not an earlier stage (earlier: {sorted(out_dirs) or 'none'})"
                    )
                merged["model"]["init"] = str(Path(out_dirs[ref_stage]) / "checkpoints" / f"{which or 'best'}.pth")
            merged["name"] = f"{base['name']}/{stage.name}"
            cfg = config_from_dict(merged, source=f"stage {stage.name!r}")
            out_dirs[stage.name] = cfg.train.output_dir
            resolved.append(cfg)
        return resolved


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "freeze": FreezeConfig,
    "logging": LoggingConfig,
}


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key == "name":
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, source=source)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except UserInputError as exc:
                errors.append(exc)
        raise UserInputError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserInputError(f"{source}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise UserInputError(f"{source}: {key} must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise UserInputError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserInputError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config annotation {tp!r} for {key}")


def section_from_dict(cls: type, values: Any, prefix: str, source: str) -> Any:
    """The dataclass ``cls`` from the mapping ``values`` (the section ``prefix`` of ``source``), every key
    known and every value of its field's type (``UserInputError`` naming ``source`` and the dotted key)."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise UserInputError(f"{source}: {prefix} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(
            f"{source}: unknown key {prefix}.{unknown[0]} (known keys in {prefix}: {', '.join(sorted(known))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}", source) for k, v in values.items()}
    if cls is TrainConfig and kwargs.get("query_groups", 1) < 1:
        raise UserInputError(f"{source}: {prefix}.query_groups must be >= 1 (1: no extra query groups), "
                             f"got {kwargs['query_groups']}")
    if cls is TrainConfig:
        _check_branch_options(kwargs, prefix, source)
    return cls(**kwargs)


def _check_branch_options(values: Mapping[str, Any], prefix: str, source: str) -> None:
    """The denoising / one-to-many options (``TrainConfig``) in range."""
    for key in ("denoising_groups", "one_to_many_repeats", "one_to_many_queries"):
        if values.get(key, 0) < 0:
            raise UserInputError(f"{source}: {prefix}.{key} must be >= 0 (0: off), got {values[key]}")
    for key in ("denoising_box_noise", "denoising_weight", "one_to_many_weight"):
        if key in values and not values[key] >= 0:
            raise UserInputError(f"{source}: {prefix}.{key} must be >= 0, got {values[key]}")
    if not 0 <= values.get("denoising_label_noise", 0.0) <= 1:
        raise UserInputError(f"{source}: {prefix}.denoising_label_noise must be in [0, 1], got "
                             f"{values['denoising_label_noise']}")


def config_from_dict(data: Mapping[str, Any] | None, *, source: str = "<dict>") -> Config:
    """Build a ``Config`` from nested mappings, checking every key and type."""
    data = dict(data or {})
    allowed = set(SECTIONS) | {"name", "stages"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserInputError(f"{source}: unknown key {unknown[0]} (top-level keys: {', '.join(sorted(allowed))})")
    sections = {name: section_from_dict(cls, data.get(name), name, source) for name, cls in SECTIONS.items()}
    name = data.get("name", "run")
    if not isinstance(name, str):
        raise UserInputError(f"{source}: name must be a string, got {name!r}")
    stages = []
    raw_stages = data.get("stages") or []
    if not isinstance(raw_stages, list):
        raise UserInputError(f"{source}: stages must be a list of mappings, got {raw_stages!r}")
    seen: set[str] = set()
    for i, raw in enumerate(raw_stages):
        if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
            raise UserInputError(f"{source}: stages[{i}] must be a mapping with a string 'name'")
        stage_name = raw["name"]
        if stage_name in seen:
            raise UserInputError(f"{source}: stage name {stage_name!r} is used twice")
        seen.add(stage_name)
        overrides = {k: v for k, v in raw.items() if k != "name"}
        # Validate the override keys and types now, against the base, so errors point at the file.
        probe = _deep_merge({s: dataclasses.asdict(sections[s]) for s in SECTIONS}, overrides,
                            source=f"{source}: stages[{i}]")
        stage_source = f"{source}: stage {stage_name!r}"
        for key in overrides:
            if key not in SECTIONS:
                raise UserInputError(f"{stage_source}: unknown key stages[{i}].{key} (stage keys: name, "
                                     f"{', '.join(SECTIONS)})")
        for sec, cls in SECTIONS.items():
            section_from_dict(cls, probe[sec], f"stages[{i}].{sec}", stage_source)
        stages.append(StageConfig(name=stage_name, overrides=copy.deepcopy(overrides)))
    return Config(name=name, stages=tuple(stages), **sections)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserInputError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=5e-5")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise UserInputError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=5e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserInputError(f"--set {item!r}: cannot parse the value: {exc}") from None
    # YAML reads "5e-5" as a string (YAML 1.1 wants a dot); accept it as the number users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.lower() not in ("nan", "inf") \
                else value
        except ValueError:
            pass
    return parts, value


def set_value(data: dict[str, Any], dotted: str, value: Any, *, what: str | None = None) -> None:
    """Set ``section.key`` (any depth) of a raw config dict in place, creating missing sections; ``what``
    names the change in the error when a part of the path is not a section."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserInputError(f"{what or dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict, in order."""
    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = _parse_override(item)
        set_value(data, ".".join(parts), value, what=f"--set {item!r}")
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (a path or a shipped config name, see ``find_config``; the defaults when
    ``path`` is None) and apply ``--set`` overrides."""
    if path is not None:
        path = find_config(path)
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with --set overrides)"
    return config_from_dict(data, source=source)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); ``load_config`` reads it back to an equal config."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


__all__ = ["Config", "DataConfig", "FreezeConfig", "LoggingConfig", "ModelConfig", "TrainConfig", "apply_overrides",
           "config_from_dict", "find_config", "list_configs", "load_config", "read_yaml", "save_config", "set_value"]
