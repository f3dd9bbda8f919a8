"""The demo's configuration: the shipped YAML (``demo``, ``demo_quick``) is a chained training ``Config``
plus a ``demo:`` section (``DemoSettings``); ``demo_configs`` fills in the run's paths; a run folder
remembers the settings it was made with (``run_fingerprint``, ``check_run_folder``)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detr_panoptic.config import (
    Config,
    config_from_dict,
    find_config,
    read_yaml,
    section_from_dict,
    set_value,
)
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_json

log = logging.getLogger(__name__)


DEFAULT_CONFIG = "demo"        # shipped config names (config.find_config)


QUICK_CONFIG = "demo_quick"


STATE_FILE = "demo_state.json"


@dataclass(frozen=True)
class DemoSettings:
    """The ``demo:`` section of the demo config (everything that is not a training ``Config``)."""

    size: tuple[int, int] = (128, 256)        # generated image height, width
    train_images: int = 200                   # synthetic Cityscapes train / val
    val_images: int = 30
    source_train_images: int = 300            # the source domain (the COCO stand-in)
    source_val_images: int = 20
    figure_images: int = 4                    # val images drawn as overlays
    attention_images: int = 1                 # val images with attention figures
    # What the generated scenes hold (``data.synthetic.SceneOptions``: density, near, street_furniture),
    # for the source domain and the target alike.
    scene: Mapping[str, Any] = field(default_factory=dict)
    # Random-init pre-training only: multiply the mask head's weights on the query attention maps by this
    # (see ``amplify_mask_attention``); 1 keeps PyTorch's initialisation.
    mask_attention_gain: float = 1.0
    # The start point when no --init is given: a file name among the package's resources
    # (``detr_panoptic/resources/``, see ``start_point_path``) or a path; None pre-trains on the source
    # domain in the demo run itself. ``run_demo(pretrain=True)`` (``--pretrain``) pre-trains regardless.
    start_point: str | None = None
    # After stage 2: ``calibrate`` (threshold x stuff merge mode) on the first this-many *train* images, the
    # chosen setting stored in a copy of the final checkpoint and that copy evaluated on val; 0: skipped.
    calibrate_images: int = 0
    # Seconds per phase on the 2-core reference machine; exceeding one is reported, not fatal.
    budgets: Mapping[str, float] = field(default_factory=lambda: {
        "data": 45, "pretrain": 240, "start": 15, "finetune": 180, "evaluate": 40, "figures": 40})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, *, source: str) -> DemoSettings:
        """The ``demo:`` section of ``source``: keys and types checked by ``config.section_from_dict``
        (the training config's path), then the ranges here."""
        settings = section_from_dict(cls, values, "demo", source)
        if len(settings.size) != 2 or min(settings.size) < 32:
            raise UserInputError(f"{source}: demo.size must be [height, width] (>= 32), got {list(settings.size)}")
        for key in ("train_images", "val_images", "source_train_images", "source_val_images",
                    "figure_images", "attention_images", "calibrate_images"):
            if getattr(settings, key) < 0:
                raise UserInputError(f"{source}: demo.{key} must be an integer >= 0, got {getattr(settings, key)}")
        if settings.mask_attention_gain <= 0:
            raise UserInputError(f"{source}: demo.mask_attention_gain must be a number > 0, got "
                                 f"{settings.mask_attention_gain}")
        from detr_panoptic.data.synthetic import SceneOptions

        known_scene = {f.name for f in dataclasses.fields(SceneOptions)}
        if set(settings.scene) - known_scene:
            raise UserInputError(f"{source}: demo.scene must be a mapping with keys among "
                                 f"{', '.join(sorted(known_scene))}, got {dict(settings.scene)!r}")
        try:
            SceneOptions(**settings.scene)
        except (TypeError, UserInputError) as exc:
            raise UserInputError(f"{source}: demo.scene: {exc}") from None
        if "budgets" in (values or {}):
            settings = dataclasses.replace(settings, budgets={**cls().budgets, **settings.budgets})
        return settings

    def scene_options(self) -> Any:
        """The ``data.synthetic.SceneOptions`` of ``scene``."""
        from detr_panoptic.data.synthetic import SceneOptions

        return SceneOptions(**self.scene)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["size"] = list(self.size)
        out["budgets"] = dict(self.budgets)
        out["scene"] = dict(self.scene)
        return out


def start_point_path(name: str) -> Path:
    """The start point ``name`` (``demo.start_point``): a file among the package's resources, else a path."""
    import importlib.resources

    packaged = importlib.resources.files("detr_panoptic.resources").joinpath(name)
    if packaged.is_file():
        return Path(str(packaged))
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserInputError(f"demo.start_point: {name!r} is neither a file packaged in detr_panoptic/resources "
                             f"nor an existing path (rebuild it with `detr-panoptic demo --pretrain-only`, or run "
                             f"`detr-panoptic demo --pretrain`)")
    return path


def demo_config_path(quick: bool = False) -> Path:
    return find_config(QUICK_CONFIG if quick else DEFAULT_CONFIG)


def load_demo_config(path: str | os.PathLike) -> tuple[DemoSettings, dict[str, Any]]:
    """(demo settings, the training config as a plain dict) from a demo YAML file."""
    data = read_yaml(path)
    settings = DemoSettings.from_dict(data.pop("demo", None), source=str(path))
    config_from_dict(data, source=str(path))  # check every key and type now, against the file
    names = [s.get("name") for s in data.get("stages") or []]
    if names[:3] != ["pretrain", "stage1", "stage2"]:
        raise UserInputError(f"{path}: the demo config needs the stages pretrain, stage1, stage2 in this "
                             f"order, got {names}")
    return settings, data


def demo_configs(raw: Mapping[str, Any], *, out: Path, target_root: Path, source: Mapping[str, Path],
                 init: str | None, device: str, seed: int, progress: bool = True) -> tuple[Config, Config]:
    """(pre-training config, the stage1 -> stage2 fine-tuning config) with the demo's paths filled in."""
    data = copy.deepcopy(dict(raw))
    set_value(data, "train.output_dir", str(out))
    set_value(data, "train.device", device)
    set_value(data, "train.seed", int(data.get("train", {}).get("seed", 42)) + seed)
    set_value(data, "data.root", str(target_root))
    if not progress:
        set_value(data, "logging.progress", False)
    stages = {s["name"]: s for s in data.pop("stages")}
    pretrain = copy.deepcopy(stages["pretrain"])
    source_root = source["train"].parent
    for split in ("train", "val"):
        set_value(pretrain, f"data.{split}_json", str(source[split]))
        set_value(pretrain, f"data.{split}_panoptic_dir", str(source[split].with_suffix("")))
        set_value(pretrain, f"data.{split}_image_dir", str(source_root / "images" / split))
    set_value(pretrain, "data.dataset", "coco")
    pretrain_config = config_from_dict({**data, "stages": [pretrain]}, source="demo pretrain").resolve_stages()[0]
    stage1 = copy.deepcopy(stages["stage1"])
    set_value(stage1, "model.init", init if init is not None else str(out / "source_model.pth"))
    finetune = config_from_dict({**data, "stages": [stage1, copy.deepcopy(stages["stage2"])]},
                                source="demo fine-tuning")
    return pretrain_config, finetune


def run_fingerprint(settings: DemoSettings, raw: Mapping[str, Any], *, init: str | None, seed: int) -> str:
    """What a demo run folder's outputs depend on. Not the budgets, nor the length of a pre-training on the
    wsd schedule: its stable part does not depend on ``max_steps``, so a run can be lengthened (or shortened
    while still stable) by running again with another ``max_steps`` (``DemoRun.pretrain`` refuses it once the
    decay has begun)."""
    outputs = {k: v for k, v in settings.to_dict().items() if k != "budgets"}  # budgets change no output
    config = copy.deepcopy(dict(raw))
    default_scheduler = (config.get("train") or {}).get("scheduler")
    for stage in config.get("stages", []):
        train = (stage.get("train") or {}) if isinstance(stage, dict) else {}
        if stage.get("name") == "pretrain" and train.get("scheduler", default_scheduler) == "wsd":
            train.pop("max_steps", None)
    text = json.dumps({"settings": outputs, "config": config, "init": init, "seed": seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_run_folder(out: Path, fingerprint: str) -> None:
    path = out / STATE_FILE
    if path.is_file():
        saved = json.loads(path.read_text()).get("fingerprint")
        if saved != fingerprint:
            raise UserInputError(f"{out} holds a demo run with other settings (config, --init or --seed); "
                                 f"use another --out or delete {out}")
    elif out.is_dir() and any(out.iterdir()):
        raise UserInputError(f"{out} exists and is not a demo run folder; use another --out")
    atomic_write_json(path, {"fingerprint": fingerprint})
