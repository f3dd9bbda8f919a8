"""The demo: the whole system on generated data, on a laptop CPU, with no download.

``run_demo(out)`` (``detr-panoptic demo``, ``make demo``) runs, each phase timed and resumable:

1. **data**: a synthetic Cityscapes tree (``data.synthetic``) converted to COCO panoptic by our converter
   (``data.cityscapes.convert_cityscapes``); and a *source domain* standing in for COCO: other scenes from
   the same generator, labelled with a different, coarser, COCO-style label set (``SOURCE_LABELS``: COCO
   panoptic ids and names such as ``person`` for persons and riders, ``building-other-merged`` for
   buildings and walls, ``stop sign`` as a *thing*; no pole class), written as a COCO panoptic dataset.
2. **start point**: ``init`` (a real checkpoint: file, URL or alias, ``checkpoints.load_pretrained``), else
   the config's ``demo.start_point`` (the demo's: ``resources/demo_start_point.safetensors``, a source-domain
   model pre-trained by this very pipeline with ``pretrain_only``), else (or with ``pretrain``) a
   pre-training on the source domain in this run (backbone included: there are no ImageNet weights
   offline), saved in the official checkpoint format (``{"model": state_dict}``, official keys, plus our
   metadata) as ``<out>/source_model.pth``.
3. **fine-tuning** with the training engine (``engine.training.train``) on a chained config: ``stage1``
   (transformer frozen: heads train) from the start point with the class head adapted to the Cityscapes
   classes, then ``stage2`` (attention frozen) from stage 1's best checkpoint; backbone frozen, as in the
   recipe.
4. **evaluation**: PQ on the synthetic val split (``inference.evaluate_dataset``: predictions written in
   COCO panoptic format, panopticapi-exact PQ) of the start point, stage 1 and stage 2; with
   ``demo.calibrate_images``, ``inference.calibrate`` on that many *train* images, the best setting stored
   in a copy of the final checkpoint and evaluated on val; overlays, attention maps, curves and the HTML
   report of the final (calibrated) model.

The recipe's settings live in the shipped config ``demo`` (``demo_quick`` for ``quick``; files under
``detr_panoptic/configs/``, found by ``config.find_config``): a normal
chained ``Config`` (stages ``pretrain``, ``stage1``, ``stage2``) plus a ``demo:`` section read here
(``DemoSettings``: image size and counts, what the scenes hold, how many pictures, time budgets per
phase). The demo departs from the reference recipe where a CPU forces it, and says so in the config:
small ResNet-18 model, low resolution, scenes without structures thinner than the mask head resolves,
batch 2 with a higher learning rate, 1,700 pre-training steps. The pre-training starts from random
weights, so the demo initialises them for it: the backbone's frozen batch norms are calibrated on the data
(``calibrate_frozen_batchnorm``) and then train as batch norms (``freeze.batch_norm: false``), and the mask
head's weights on the query attention maps are amplified (``amplify_mask_attention``); without the latter
every query predicts the same mask for far longer than the demo trains.

Outputs under ``out``::

    data/cityscapes/  data/source/     the generated data (Cityscapes layout; COCO panoptic)
    source_model.pth                   the source-domain model, official checkpoint format
    pretrain/ stage1/ stage2/          training run folders (config.yaml, metrics.jsonl, checkpoints/)
    eval/{start,stage1,stage2}/        predictions + metrics.json per evaluated model
    summary/                           what the report shows: overlays/, attention/, plots/, metrics
    metrics.json  report.html          the summary (final pq, sq, rq, pq_things, pq_stuff; per stage)

Re-running with the same settings reuses finished phases (data, trained stages); different settings in
the same folder are refused rather than mixed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detr_panoptic.config import Config, config_from_dict, find_config, read_yaml
from detr_panoptic.data.categories import Category, CategoryMap
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_json, atomic_write_text, file_digest

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "demo"        # shipped config names (config.find_config)
QUICK_CONFIG = "demo_quick"
STATE_FILE = "demo_state.json"
PHASES = ("start", "stage1", "stage2")

# The source domain's label set, COCO panoptic style: Cityscapes label name -> (COCO id, COCO name, isthing).
# Coarser than Cityscapes (rider -> person, wall -> building) and different in kind (traffic lights and
# signs are things in COCO, there is no pole class: poles are void).
SOURCE_LABELS: dict[str, tuple[int, str, bool] | None] = {
    "person": (1, "person", True),
    "rider": (1, "person", True),
    "bicycle": (2, "bicycle", True),
    "car": (3, "car", True),
    "truck": (8, "truck", True),
    "traffic light": (10, "traffic light", True),
    "traffic sign": (13, "stop sign", True),
    "road": (149, "road", False),
    "fence": (185, "fence-merged", False),
    "vegetation": (184, "tree-merged", False),
    "sky": (187, "sky-other-merged", False),
    "sidewalk": (191, "pavement-merged", False),
    "terrain": (193, "grass-merged", False),
    "building": (197, "building-other-merged", False),
    "wall": (197, "building-other-merged", False),
    "pole": None,
}


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
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(f"{source}: unknown key demo.{unknown[0]} (known: {', '.join(sorted(known))})")
        if "size" in values:
            size = values["size"]
            if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v >= 32
                                                                               for v in size)):
                raise UserInputError(f"{source}: demo.size must be [height, width] (>= 32), got {size!r}")
            values["size"] = (int(size[0]), int(size[1]))
        for key in ("train_images", "val_images", "source_train_images", "source_val_images",
                    "figure_images", "attention_images", "calibrate_images"):
            if key in values and (not isinstance(values[key], int) or values[key] < 0):
                raise UserInputError(f"{source}: demo.{key} must be an integer >= 0, got {values[key]!r}")
        if "mask_attention_gain" in values:
            gain = values["mask_attention_gain"]
            if isinstance(gain, bool) or not isinstance(gain, (int, float)) or gain <= 0:
                raise UserInputError(f"{source}: demo.mask_attention_gain must be a number > 0, got {gain!r}")
            values["mask_attention_gain"] = float(gain)
        if "budgets" in values:
            values["budgets"] = {**cls().budgets, **dict(values["budgets"])}
        if values.get("start_point") is not None and not isinstance(values["start_point"], str):
            raise UserInputError(f"{source}: demo.start_point must be a file name or path, got "
                                 f"{values['start_point']!r}")
        if "scene" in values:
            from detr_panoptic.data.synthetic import SceneOptions

            scene = values["scene"]
            known_scene = {f.name for f in dataclasses.fields(SceneOptions)}
            if not isinstance(scene, Mapping) or set(scene) - known_scene:
                raise UserInputError(f"{source}: demo.scene must be a mapping with keys among "
                                     f"{', '.join(sorted(known_scene))}, got {scene!r}")
            try:
                SceneOptions(**scene)
            except (TypeError, UserInputError) as exc:
                raise UserInputError(f"{source}: demo.scene: {exc}") from None
            values["scene"] = dict(scene)
        return cls(**values)

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


# -- data -------------------------------------------------------------------------------------------------
def prepare_target_data(root: Path, settings: DemoSettings, *, seed: int, workers: int) -> Path:
    """The synthetic Cityscapes tree under ``root`` with ``gtFine/cityscapes_panoptic_{train,val}.json``."""
    from detr_panoptic.data.cityscapes import convert_cityscapes
    from detr_panoptic.data.synthetic import make_synthetic_cityscapes

    done = [root / "gtFine" / f"cityscapes_panoptic_{split}.json" for split in ("train", "val")]
    if all(p.is_file() for p in done):
        return root
    make_synthetic_cityscapes(root, train=settings.train_images, val=settings.val_images, size=settings.size,
                              seed=seed, workers=workers, options=settings.scene_options())
    convert_cityscapes(root, splits=["train", "val"], workers=workers, progress=False)
    return root


def source_categories() -> list[dict[str, Any]]:
    """COCO category records of the source label set (colours from the COCO panoptic table)."""
    from detr_panoptic.data.categories import coco_panoptic_categories

    coco = {c.id: c for c in coco_panoptic_categories()}
    seen: dict[int, dict[str, Any]] = {}
    for entry in SOURCE_LABELS.values():
        if entry is not None and entry[0] not in seen:
            cid, name, isthing = entry
            color = list(coco[cid].color) if cid in coco else [128, 128, 128]
            seen[cid] = Category(cid, name, isthing, tuple(color)).to_json()
    return [seen[k] for k in sorted(seen)]


def _source_segments(ids: np.ndarray, label_names: Mapping[int, str], has_instances: Mapping[int, bool]
                     ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Cityscapes instance ids [H, W] -> (COCO panoptic id map, segments) in the source label set.

    Stuff of one source category becomes one segment; things keep one segment per instance; crowd
    regions (``v < 1000`` of a class with instances) are ``iscrowd`` segments; unmapped labels are void.
    """
    id_map = np.zeros(ids.shape, np.int64)
    segments: list[dict[str, Any]] = []
    stuff_segment: dict[int, int] = {}
    for value in np.unique(ids).tolist():
        label = value // 1000 if value >= 1000 else value
        entry = SOURCE_LABELS.get(label_names.get(label, ""))
        if entry is None:
            continue
        cid, _, isthing = entry
        pixels = ids == value
        if not isthing:
            if cid not in stuff_segment:
                stuff_segment[cid] = len(segments) + 1
                segments.append({"id": stuff_segment[cid], "category_id": cid, "iscrowd": 0})
            id_map[pixels] = stuff_segment[cid]
            continue
        crowd = int(value < 1000 and has_instances.get(label, False))
        segments.append({"id": len(segments) + 1, "category_id": cid, "iscrowd": crowd})
        id_map[pixels] = len(segments)
    return id_map, segments


def prepare_source_data(root: Path, settings: DemoSettings, *, seed: int) -> dict[str, Path]:
    """The source domain as COCO panoptic under ``root``: ``panoptic_{split}.json``, ``panoptic_{split}/``
    and ``images/{split}/``. Returns ``{split: json path}``."""
    from cityscapesscripts.helpers.labels import labels
    from PIL import Image

    from detr_panoptic.data.synthetic import synthetic_sample
    from detr_panoptic.evaluation import PanopticPredictionWriter

    label_names = {label.id: label.name for label in labels}
    has_instances = {label.id: bool(label.hasInstances) for label in labels}
    categories = source_categories()
    written = {}
    for split, count, offset in (("train", settings.source_train_images, 0),
                                 ("val", settings.source_val_images, 1_000_000)):
        json_path = root / f"panoptic_{split}.json"
        written[split] = json_path
        if json_path.is_file():
            continue
        writer = PanopticPredictionWriter(json_path, root / f"panoptic_{split}", categories)
        images = []
        for index in range(count):
            # Other scenes than the target's: the generator's seed space is (seed, split, index).
            rgb, ids, _ = synthetic_sample([int(seed), 7_777_777, offset + index], *settings.size,
                                           options=settings.scene_options())
            id_map, segments = _source_segments(ids, label_names, has_instances)
            name = f"source_{split}_{index:06d}"
            image_path = root / "images" / split / f"{name}.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(image_path, compress_level=1)
            writer.add(index, id_map, segments, file_name=f"{name}.png")
            images.append({"id": index, "file_name": f"{name}.png", "height": int(rgb.shape[0]),
                           "width": int(rgb.shape[1])})
        atomic_write_json(json_path, {"images": images, "annotations": writer.annotations,
                                      "categories": writer.categories})
    return written


# -- in-memory datasets ---------------------------------------------------------------------------------------
class MemoryDataset(torch.utils.data.Dataset):
    """Every item of ``dataset`` decoded once and kept (the demo has no augmentation, so items never
    change); the training engine then reads tensors instead of PNGs each epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
        self.category_map = getattr(dataset, "category_map", None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


# -- configs ---------------------------------------------------------------------------------------------------
def _set(node: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def demo_configs(raw: Mapping[str, Any], *, out: Path, target_root: Path, source: Mapping[str, Path],
                 init: str | None, device: str, seed: int, progress: bool = True) -> tuple[Config, Config]:
    """(pre-training config, the stage1 -> stage2 fine-tuning config) with the demo's paths filled in."""
    data = copy.deepcopy(dict(raw))
    _set(data, "train.output_dir", str(out))
    _set(data, "train.device", device)
    _set(data, "train.seed", int(data.get("train", {}).get("seed", 42)) + seed)
    _set(data, "data.root", str(target_root))
    if not progress:
        _set(data, "logging.progress", False)
    stages = {s["name"]: s for s in data.pop("stages")}
    pretrain = copy.deepcopy(stages["pretrain"])
    source_root = source["train"].parent
    for split in ("train", "val"):
        _set(pretrain, f"data.{split}_json", str(source[split]))
        _set(pretrain, f"data.{split}_panoptic_dir", str(source[split].with_suffix("")))
        _set(pretrain, f"data.{split}_image_dir", str(source_root / "images" / split))
    _set(pretrain, "data.dataset", "coco")
    pretrain_config = config_from_dict({**data, "stages": [pretrain]}, source="demo pretrain").resolve_stages()[0]
    stage1 = copy.deepcopy(stages["stage1"])
    _set(stage1, "model.init", init if init is not None else str(out / "source_model.pth"))
    finetune = config_from_dict({**data, "stages": [stage1, copy.deepcopy(stages["stage2"])]},
                                source="demo fine-tuning")
    return pretrain_config, finetune


def _fingerprint(settings: DemoSettings, raw: Mapping[str, Any], *, init: str | None, seed: int) -> str:
    outputs = {k: v for k, v in settings.to_dict().items() if k != "budgets"}  # budgets change no output
    text = json.dumps({"settings": outputs, "config": raw, "init": init, "seed": seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_state(out: Path, fingerprint: str) -> None:
    path = out / STATE_FILE
    if path.is_file():
        saved = json.loads(path.read_text()).get("fingerprint")
        if saved != fingerprint:
            raise UserInputError(f"{out} holds a demo run with other settings (config, --init or --seed); "
                                 f"use another --out or delete {out}")
    elif out.is_dir() and any(out.iterdir()):
        raise UserInputError(f"{out} exists and is not a demo run folder; use another --out")
    atomic_write_json(path, {"fingerprint": fingerprint})


# -- phases -----------------------------------------------------------------------------------------------------
@dataclass
class PhaseTimer:
    budgets: Mapping[str, float]
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        log.info("demo: %s ...", name)
        try:
            return fn()
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 2)
            budget = self.budgets.get(name)
            if budget is not None and elapsed > budget:
                log.warning("demo: phase %s took %.0f s, over its %.0f s budget", name, elapsed, budget)
            else:
                log.info("demo: %s done in %.1f s", name, elapsed)


def export_source_model(checkpoint: Path, path: Path) -> Path:
    """The pre-trained model as the official format (``{"model": state_dict}`` with official keys) plus our
    metadata (model config, source category map), without the training state."""
    from detr_panoptic.checkpoints import save_checkpoint
    from detr_panoptic.models.config import DETRConfig
    from detr_panoptic.models.detr import PanopticDETR

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = saved["detr_panoptic"]
    model = PanopticDETR.from_config(DETRConfig.from_dict(meta["model_config"], source=str(path)))
    model.load_state_dict(saved["model"])
    return save_checkpoint(path, model, category_map=meta["category_map"], model_config=meta["model_config"],
                           input_size=meta.get("input_size"))


def export_start_point(checkpoint: Path, path: Path, *, about: Mapping[str, Any] | None = None) -> Path:
    """The source model (``export_source_model``'s file) as fp16 ``.safetensors`` + JSON sidecar: the
    format of the start point packaged with the demo (half the bytes; loading casts back to fp32).
    ``about`` (how it was made, its source val PQ) goes into the sidecar under ``demo``."""
    from detr_panoptic.checkpoints import export_safetensors, load_checkpoint, sidecar_path

    loaded = load_checkpoint(checkpoint)
    model = loaded.model.half()
    size = None if loaded.input_size is None else dict(zip(("min_size", "max_size"), loaded.input_size))
    weights = export_safetensors(model, path, category_map=loaded.category_map, model_config=model.config,
                                 input_size=size)
    if about:
        meta = json.loads(sidecar_path(weights).read_text())
        atomic_write_json(sidecar_path(weights), {**meta, "demo": dict(about)})
    return weights


def _flat_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("pq", "sq", "rq", "n", "pq_things", "sq_things", "rq_things", "n_things", "pq_stuff", "sq_stuff",
            "rq_stuff", "n_stuff", "things_recall", "things_kept_per_gt", "things_duplicates_per_gt",
            "things_kept_ratio", "things_mask_iou", "miou", "iiou", "ap", "ap50")
    return {k: (round(float(metrics[k]), 3) if isinstance(metrics[k], float) else metrics[k])
            for k in keys if k in metrics}


def _combined_metrics(run_dirs: Sequence[Path], out: Path) -> None:
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


def run_demo(out: str | os.PathLike = "runs/demo", *, quick: bool = False, init: str | None = None,
             device: str = "auto", seed: int = 0, config_path: str | os.PathLike | None = None,
             workers: int | None = None, progress: bool = True, pretrain: bool = False,
             pretrain_only: bool = False) -> dict[str, Any]:
    """Run the demo into ``out`` (see the module docstring); returns the summary written to
    ``<out>/metrics.json`` (final ``pq, sq, rq, pq_things, pq_stuff``, ``stages``, ``seconds``).

    The start point is ``init`` if given, else the config's packaged ``demo.start_point`` (unless
    ``pretrain``), else a pre-training on the source domain in this run.
    ``pretrain_only``: generate the source domain, pre-train on it and stop, with the source model also
    written as ``<out>/source_model.safetensors`` in fp16 (how the packaged start point is rebuilt);
    the summary then holds ``source_domain`` and ``seconds`` only."""
    from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset
    from detr_panoptic.engine.training import build_model, train
    from detr_panoptic.inference import PanopticPredictor, PredictorSettings, evaluate_dataset
    from detr_panoptic.utils.devices import resolve_device

    wall_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out)
    config_path = find_config(config_path) if config_path is not None else demo_config_path(quick)
    settings, raw = load_demo_config(config_path)
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    resolve_device(device)  # fail early on a bad device
    if init is not None and (pretrain or pretrain_only):
        raise UserInputError("demo: --init gives the start point; it cannot be combined with --pretrain or "
                             "--pretrain-only")
    packaged_start = None
    if init is None and not (pretrain or pretrain_only) and settings.start_point:
        packaged_start = start_point_path(settings.start_point)
        init = str(packaged_start)
    fingerprint = _fingerprint(settings, raw, init=init if packaged_start is None else file_digest(packaged_start),
                               seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    _check_state(out, fingerprint)
    timer = PhaseTimer(settings.budgets)
    target_root = out / "data" / "cityscapes"
    source_root = out / "data" / "source"

    def data_phase() -> dict[str, Path]:
        prepare_target_data(target_root, settings, seed=seed, workers=workers)
        return prepare_source_data(source_root, settings, seed=seed) if init is None else \
            {s: source_root / f"panoptic_{s}.json" for s in ("train", "val")}

    source = timer.run("data", data_phase)
    pretrain_config, finetune_config = demo_configs(raw, out=out, target_root=target_root, source=source,
                                                    init=init, device=device, seed=seed, progress=progress)
    stage_configs = finetune_config.resolve_stages()

    source_pq = None
    if init is None:
        def pretrain_phase() -> Path:
            from detr_panoptic.data.coco_panoptic import CocoPanopticDataset
            d = pretrain_config.data
            train_set = CocoPanopticDataset(d.train_json, d.train_panoptic_dir, d.train_image_dir,
                                            min_size=d.min_size, max_size=d.max_size)
            val_set = CocoPanopticDataset(d.val_json, d.val_panoptic_dir, d.val_image_dir,
                                          category_map=train_set.category_map, min_size=d.min_size,
                                          max_size=d.max_size)
            memory_train = MemoryDataset(train_set)
            config = pretrain_config
            if config.model.init is None:  # random weights: calibrate the backbone's frozen norms first
                init_path = out / "pretrain_init.pth"
                if not init_path.is_file():
                    init_path = random_calibrated_init(init_path, config, train_set.category_map,
                                                       [memory_train[i][0] for i in range(min(16, len(memory_train)))],
                                                       mask_attention_gain=settings.mask_attention_gain)
                config = dataclasses.replace(config, model=dataclasses.replace(config.model, init=str(init_path)))
            result = train(config, datasets=(memory_train, val_set, train_set.category_map))[0]
            target = out / "source_model.pth"
            if not target.is_file() or target.stat().st_mtime < result.last_checkpoint.stat().st_mtime:
                export_source_model(result.last_checkpoint, target)
            return target

        timer.run("pretrain", pretrain_phase)
        source_pq = _last_val(out / "pretrain" / "metrics.jsonl")
    if pretrain_only:
        pretrain_train = pretrain_config.train
        about = {"source_domain": source_pq, "seed": seed, "config": config_path.name,
                 "steps": pretrain_train.max_steps, "built": time.strftime("%Y-%m-%d"),
                 "command": f"OMP_NUM_THREADS={torch.get_num_threads()} detr-panoptic demo --pretrain-only "
                            f"--config {config_path.stem} --seed {seed}",
                 "threads": torch.get_num_threads(),  # CPU training is bit-reproducible for a thread count
                 "seconds": round(timer.seconds.get("pretrain", 0.0), 1)}
        weights = export_start_point(out / "source_model.pth", out / "source_model.safetensors", about=about)
        summary = {"source_domain": source_pq, "source_model": str(weights),
                   "seconds": dict(timer.seconds, total=round(time.perf_counter() - wall_start, 1)),
                   "config": str(config_path), "seed": seed, "settings": settings.to_dict()}
        atomic_write_json(out / "metrics.json", summary)
        return summary

    data_config = stage_configs[0].data
    train_set = cityscapes_panoptic_dataset(target_root, "train", min_size=data_config.min_size,
                                            max_size=data_config.max_size)
    val_set = cityscapes_panoptic_dataset(target_root, "val", category_map=train_set.category_map,
                                          min_size=data_config.min_size, max_size=data_config.max_size)
    category_map = train_set.category_map
    threshold = stage_configs[0].train.eval_threshold
    eval_kwargs: dict[str, Any] = {"batch_size": 4, "workers": 1, "progress": False, "chart": False}
    evaluations: dict[str, dict[str, Any]] = {}

    def start_phase() -> None:
        torch.manual_seed(stage_configs[0].train.seed)
        model = build_model(stage_configs[0].model, category_map)  # what stage 1 starts from
        settings = PredictorSettings(category_map, min_size=data_config.min_size, max_size=data_config.max_size,
                                     threshold=threshold)
        evaluations["start"] = evaluate_dataset(PanopticPredictor(model, settings, device=device), val_set,
                                                out / "eval" / "start", **eval_kwargs)["metrics"]

    timer.run("start", start_phase)
    memory_train = MemoryDataset(train_set)
    timer.run("finetune", lambda: train(finetune_config, datasets=(memory_train, val_set,
                                                                   category_map)))

    def evaluate_phase() -> None:
        for stage in stage_configs:
            name = stage.name.split("/")[-1]
            best = Path(stage.train.output_dir) / "checkpoints" / "best.pth"
            predictor = PanopticPredictor.from_pretrained(best, device=device, threshold=threshold)
            evaluations[name] = evaluate_dataset(predictor, val_set, out / "eval" / name,
                                                 extra_metrics={"checkpoint": str(best)}, **eval_kwargs)["metrics"]

    timer.run("evaluate", evaluate_phase)
    final_checkpoint = Path(stage_configs[-1].train.output_dir) / "checkpoints" / "best.pth"
    summary_dir = out / "summary"

    def calibrate_phase() -> dict[str, Any] | None:
        from detr_panoptic.checkpoints import write_postprocess
        from detr_panoptic.inference.calibrate import calibrate, write_table

        count = min(settings.calibrate_images, len(train_set))
        table = calibrate(PanopticPredictor.from_pretrained(final_checkpoint, device=device),
                          torch.utils.data.Subset(train_set, list(range(count))), batch_size=4, num_workers=0)
        written = write_table(table, summary_dir)  # the report draws summary/calibration.{json,png}
        calibrated = write_postprocess(final_checkpoint, table.best.setting.as_dict(),
                                       out=out / "calibration" / "calibrated.pth")
        predictor = PanopticPredictor.from_pretrained(calibrated, device=device)  # the stored setting applies
        evaluations["calibrated"] = evaluate_dataset(predictor, val_set, out / "eval" / "calibrated",
                                                     extra_metrics={"checkpoint": str(calibrated)},
                                                     **eval_kwargs)["metrics"]
        return {**_flat_metrics(evaluations["calibrated"]), "setting": table.best.setting.as_dict(),
                "train_images": count, "checkpoint": str(calibrated), "chart": str(written.get("chart", ""))}

    calibrated = timer.run("calibrate", calibrate_phase) if settings.calibrate_images else None

    summary = _summary(evaluations, source_pq=source_pq, settings=settings, config_path=config_path,
                       init=init, seed=seed, final_checkpoint=final_checkpoint, quick=quick)
    if packaged_start is not None:
        summary["init"] = (f"start point {packaged_start.name} (demo.start_point; `detr-panoptic demo --pretrain-only` "
                           f"rebuilds it)")
        summary["source_domain"] = _packaged_source_metrics(packaged_start)
    summary["threshold"] = threshold  # class-score threshold of the per-stage evaluations
    if calibrated is not None:
        summary["calibrated"] = calibrated
    # The pictures show the final model with the calibrated post-processing when there is one.
    figure_checkpoint = Path(calibrated["checkpoint"]) if calibrated is not None else final_checkpoint
    timer.run("figures", lambda: _figures(figure_checkpoint, val_set, summary_dir, settings, stage_configs,
                                          device=device, threshold=None if calibrated is not None else threshold))
    summary["seconds"] = dict(timer.seconds, total=round(time.perf_counter() - wall_start, 1))
    summary["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "load_average": _load_average()}
    atomic_write_json(summary_dir / "metrics.json", {k: v for k, v in summary.items() if k != "stages"} |
                      {"per_class": evaluations["stage2"].get("per_class", {})})
    _write_report(summary_dir, out / "report.html", summary)
    summary["seconds"]["total"] = round(time.perf_counter() - wall_start, 1)
    # CPU seconds of this process (all its threads; not the data-conversion workers): on a machine shared
    # with other jobs, wall time grows but this does not.
    summary["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    atomic_write_json(out / "metrics.json", summary)
    return summary


def _packaged_source_metrics(path: Path) -> dict[str, Any] | None:
    """The source val PQ recorded in a packaged start point's sidecar (``source_domain``), if any."""
    from detr_panoptic.checkpoints import sidecar_path

    try:
        meta = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    source = meta.get("demo", {}).get("source_domain")
    return source if isinstance(source, dict) else None


def _last_val(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    vals = [r for r in records if r.get("kind") == "val"]
    return _flat_metrics(vals[-1]) if vals else None


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _summary(evaluations: Mapping[str, Mapping[str, Any]], *, source_pq: Mapping[str, Any] | None,
             settings: DemoSettings, config_path: Path, init: str | None, seed: int, final_checkpoint: Path,
             quick: bool) -> dict[str, Any]:
    final = _flat_metrics(evaluations["stage2"])
    stages = {name: _flat_metrics(evaluations[name]) for name in PHASES}
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


def _figures(checkpoint: Path, val_set: Any, summary_dir: Path, settings: DemoSettings,
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
    _combined_metrics([Path(s.train.output_dir) for s in stage_configs], summary_dir / "metrics.jsonl")
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
                    "things_duplicates_per_gt", "things_kept_ratio", "things_mask_iou"):
            figures[f"{name}_{key}"] = summary["stages"][name].get(key)
    if summary.get("calibrated"):
        calibrated = summary["calibrated"]
        for key in ("pq", "pq_things", "pq_stuff", "things_recall"):
            figures[f"calibrated_{key}"] = calibrated.get(key)
        figures["calibrated_setting"] = "{threshold:.2f}/{merge_stuff}/{min_area}".format(**calibrated["setting"])
        figures["calibrated_on_train_images"] = calibrated.get("train_images")
    if summary.get("source_domain"):
        figures["source_domain_pq"] = summary["source_domain"].get("pq")
    figures["goal_pq_50"] = summary["pq"] >= 50.0
    figures["goal_things_30"] = (summary.get("pq_things") or 0.0) >= 30.0
    figures["goal_600_seconds"] = summary["seconds"]["total"] <= 600
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
    rows = [("", "PQ", "SQ", "RQ", "PQ things", "PQ stuff", "mIoU", "AP", "things found %", "kept per thing")]
    labels = {"start": "start point", "stage1": "stage 1 (transformer frozen)",
              "stage2": "stage 2 (attention frozen)"}
    keys = ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "ap", "things_recall", "things_kept_per_gt")
    for name in PHASES:
        m = summary["stages"][name]
        rows.append((labels[name], *(f"{_number(m.get(k)):.1f}" for k in keys)))
    if summary.get("calibrated"):
        m = summary["calibrated"]
        rows.append((_calibrated_label(m), *(f"{_number(m.get(k)):.1f}" for k in keys)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _calibrated_label(calibrated: Mapping[str, Any]) -> str:
    setting = calibrated["setting"]
    return (f"stage 2, calibrated ({setting['threshold']:.2f}/{setting['merge_stuff']}, "
            f"on {calibrated.get('train_images')} train images)")


def _write_report(summary_dir: Path, report_path: Path, summary: Mapping[str, Any]) -> None:
    """``visualize.report.build_report`` of the summary folder, the per-stage PQ table first."""
    from detr_panoptic.visualize import report

    labels = {"start": "start point (before fine-tuning)", "stage1": "stage 1: transformer frozen",
              "stage2": "stage 2: attention frozen"}
    keys = ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "ap", "things_recall", "things_kept_per_gt",
            "things_kept_ratio")
    def cells(metrics: Mapping[str, Any]) -> list[Any]:
        return [metrics.get(k, "") if metrics.get(k, "") is not None else "-" for k in keys]

    rows = [[labels[name], *cells(summary["stages"][name])] for name in PHASES]
    if summary.get("calibrated"):
        rows.append([_calibrated_label(summary["calibrated"]), *cells(summary["calibrated"])])
    body = report.html_table(["", "PQ", "SQ", "RQ", "PQ things", "PQ stuff", "mIoU (Cityscapes classes)",
                              "AP (Cityscapes instances)", "things found (%, box IoU >= 0.5)",
                              "kept queries per thing found", "kept / ground-truth things"], rows)
    source = summary.get("source_domain")
    if source:
        body += (f"<p>The source-domain model (the COCO stand-in, its own label set) reaches PQ "
                 f"{source.get('pq', 0):.1f} on the source val images.</p>")
    seconds = summary.get("seconds", {})
    body += "<p>Seconds per phase: " + ", ".join(f"{k} {v}" for k, v in seconds.items()) + ".</p>"
    report.build_report(summary_dir, report_path, title="detr-panoptic demo: synthetic Cityscapes",
                        lead_sections=[("PQ, mIoU and AP on the synthetic val split, per stage", body, "stages")])


def random_calibrated_init(path: Path, config: Config, category_map: CategoryMap,
                           images: Sequence[torch.Tensor], *, mask_attention_gain: float = 1.0) -> Path:
    """A randomly initialised model for ``config`` with calibrated frozen norms (and the mask head's
    attention weights amplified by ``mask_attention_gain``), saved to ``path``."""
    from detr_panoptic.checkpoints import save_checkpoint
    from detr_panoptic.engine.training import build_model

    torch.manual_seed(config.train.seed)
    model = build_model(config.model, category_map)
    count = calibrate_frozen_batchnorm(model, images)
    log.info("demo: random backbone, %d frozen batch norms calibrated on %d images", count, len(images))
    if mask_attention_gain != 1.0:
        amplify_mask_attention(model, mask_attention_gain)
    return save_checkpoint(path, model, category_map=category_map, model_config=model.config)


# -- initialisation of a random backbone ------------------------------------------------------------------------
@torch.no_grad()
def amplify_mask_attention(model: torch.nn.Module, gain: float) -> None:
    """Multiply the mask head's first-layer weights on the per-query attention maps by ``gain``.

    The mask head sees, per query, the image's projected features (shared by every query) and the query's
    attention maps, whose values are softmax outputs over heads x pixels (about 1 / (heads * h * w) each).
    With PyTorch's initialisation the attention term is thousands of times smaller than the shared one,
    so every query starts with the same mask, and from scratch the weights take far longer to grow than
    a CPU demo runs (a pre-trained detector, as in the reference, hides this). Amplifying them lets the
    query-specific signal through from the first step.
    """
    heads = model.bbox_attention.num_heads  # type: ignore[attr-defined]
    model.mask_head.lay1.weight[:, -heads:] *= gain  # type: ignore[attr-defined]



@torch.no_grad()
def calibrate_frozen_batchnorm(model: torch.nn.Module, images: Sequence[torch.Tensor]) -> int:
    """Data-dependent initialisation of a *random* backbone's frozen batch norms; returns how many.

    A ResNet built for fine-tuning has ``FrozenBatchNorm2d`` layers; with random weights they are the
    identity, so nothing normalises the activations and training from scratch is slow and unstable. One
    forward pass over ``images`` (normalised [3, H, W], same size) sets each frozen BN's running mean and
    variance to the statistics of its input *as it arrives*, earlier layers already calibrated, so every
    block starts with unit-variance activations (as a trained BN network does). The statistics are then
    frozen like any pre-trained backbone's.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    def calibrate(module: FrozenBatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(calibrate) for m in layers]
    was_training = model.training
    try:
        model.eval()
        # The torchvision modules one by one (the backbone's own forward folds the norms into the convs).
        body = model.detr.backbone[0].body  # type: ignore[attr-defined, index]
        body(torch.stack(list(images)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return len(layers)
