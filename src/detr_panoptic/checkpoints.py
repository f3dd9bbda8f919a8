"""Loading, saving and adapting model weights.

Sources understood by ``load_pretrained``:

* the official DETR format: a ``torch.save``d ``{"model": state_dict}`` (optionally with the reference
  training script's ``optimizer``/``lr_scheduler``/``epoch``/``args``), or a bare state dict;
* our checkpoints (``{"model": ..., "detr_panoptic": {"format_version", "model_config", "category_map"}, ...}``);
* ``.safetensors`` (official or Hugging Face names) with an optional JSON sidecar (``<stem>.json``);
* a Hugging Face ``DetrForSegmentation`` folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``);
* an ``http(s)://`` URL, downloaded once into the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and
  checked against the SHA-256 prefix in its file name (``name-<hex>.pth``);
* an alias: ``coco-r50-panoptic``, ``coco-r50-dc5-panoptic``, ``coco-r101-panoptic``.
* ``wandb:ENTITY/PROJECT/NAME:ALIAS`` (a W&B artifact, e.g. one our training logged) and a Hugging Face
  Hub id ``ORG/NAME[@REVISION]``, fetched into a local cache by ``checkpoint_sources.fetch_remote``; a local
  path that exists wins over an id of the same spelling.

Pickled files are only ever read with ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed),
so no code in a checkpoint runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from detr_panoptic.checkpoint_sources import fetch_remote
from detr_panoptic.data.categories import CategoryMap, coco_category_map
from detr_panoptic.models.config import DETRConfig
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.postprocess import PostprocessSettings
from detr_panoptic.models.weight_names import (
    hugging_face_to_official,
    infer_model_config,
    is_hugging_face_state,
)
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
OFFICIAL_URLS = {
    "coco-r50-panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r50-panoptic-00ce5173.pth",
    "coco-r50-dc5-panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-panoptic-da08f1b1.pth",
    "coco-r101-panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r101-panoptic-40021d53.pth",
}
# What the weights cannot tell about an alias.
ALIAS_OVERRIDES: dict[str, dict[str, Any]] = {"coco-r50-dc5-panoptic": {"dilation": True}}
CLASS_HEAD_KEYS = ("detr.class_embed.weight", "detr.class_embed.bias")


# -- reading files ---------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    """``torch.load`` that never executes pickled code; a file needing more is refused with the reason."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"{path}: refusing to load: the file holds pickled objects other than tensors and plain "
            f"containers, and loading it could run code ({first_line})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise UserInputError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: expected a JSON file ({exc})") from None


def sidecar_path(weights_path: str | os.PathLike) -> Path:
    """``model.safetensors`` -> ``model.json`` (the metadata written by ``export_safetensors``)."""
    return Path(weights_path).with_suffix(".json")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserInputError(f"{path}: not a readable .safetensors file ({exc})") from None


def download_to_hub_cache(url: str) -> Path:
    """Download ``url`` once into ``torch.hub.get_dir()/checkpoints`` (as torch.hub does), checking the
    SHA-256 prefix in the file name (``name-<hex>.ext``) when there is one."""
    file_name = os.path.basename(urlparse(url).path)
    if not file_name:
        raise UserInputError(f"{url}: the URL does not name a file")
    target = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(file_name)
        hash_prefix = match.group(1) if match else None
        log.info("downloading %s to %s", url, target)
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=False)
        except RuntimeError as exc:  # hash mismatch
            raise UserInputError(f"{url}: {exc}") from None
        except OSError as exc:
            raise UserInputError(f"{url}: download failed ({exc})") from None
    return target


class _Loaded:
    """What a source holds: official-name state dict, our metadata, config hints, a description."""

    def __init__(self, state: dict[str, torch.Tensor], *, description: str,
                 metadata: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None) -> None:
        self.state = state
        self.description = description
        self.metadata = dict(metadata or {})
        self.config = dict(config or {})


def _read_source(source: str | os.PathLike) -> _Loaded:
    text = str(source)
    if text in OFFICIAL_URLS:
        loaded = _read_source(OFFICIAL_URLS[text])
        loaded.config.update(ALIAS_OVERRIDES.get(text, {}))
        return loaded
    if text.startswith(("http://", "https://")):
        return _read_file(download_to_hub_cache(text), description=text)
    remote = fetch_remote(text)
    if remote is not None:
        if remote.path.is_dir():
            return _read_hf_folder(remote.path, description=remote.description)
        return _read_file(remote.path, description=remote.description)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_hf_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (expected a .pth/.safetensors file, a Hugging Face "
                                f"folder or Hub id ORG/NAME, wandb:ENTITY/PROJECT/NAME:ALIAS, a URL or one of "
                                f"{sorted(OFFICIAL_URLS)})")
    return _read_file(path, description=str(path))


def _read_file(path: Path, *, description: str) -> _Loaded:
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
        sidecar = sidecar_path(path)
        meta = _read_json(sidecar) if sidecar.is_file() else {}
        return _Loaded(state, description=description, metadata=meta)
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise UserInputError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], Mapping):
        return _Loaded(dict(obj["model"]), description=description, metadata=obj.get("detr_panoptic"))
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _Loaded(dict(obj), description=description)
    raise UserInputError(f"{path}: expected {{'model': state_dict}} or a state dict; found keys {sorted(obj)[:10]}")


def _read_hf_folder(folder: Path, *, description: str | None = None) -> _Loaded:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: not a Hugging Face model folder (no config.json)")
    hf = _read_json(config_file)
    if hf.get("model_type") not in (None, "detr"):
        raise UserInputError(f"{config_file}: model_type {hf.get('model_type')!r} is not 'detr'")
    if (folder / "model.safetensors").is_file():
        state = _read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        state = _torch_load(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{folder}: expected model.safetensors or pytorch_model.bin beside config.json")
    config = {"hidden_dim": hf.get("d_model"), "nheads": hf.get("encoder_attention_heads"),
              "enc_layers": hf.get("encoder_layers"), "dec_layers": hf.get("decoder_layers"),
              "dim_feedforward": hf.get("encoder_ffn_dim"), "dropout": hf.get("dropout"),
              "num_queries": hf.get("num_queries"), "aux_loss": hf.get("auxiliary_loss"),
              "dilation": hf.get("dilation")}
    if hf.get("decoder_ffn_dim", config["dim_feedforward"]) != config["dim_feedforward"]:
        raise UserInputError(f"{config_file}: encoder_ffn_dim != decoder_ffn_dim is not supported")
    if hf.get("position_embedding_type", "sine") != "sine":
        raise UserInputError(f"{config_file}: only sine position embeddings are supported")
    # our own metadata, when the folder was written by ``export.export_hugging_face``
    metadata = hf.get("detr_panoptic") if isinstance(hf.get("detr_panoptic"), Mapping) else None
    return _Loaded(dict(state), description=description or str(folder), metadata=metadata,
                   config={k: v for k, v in config.items() if v is not None})


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if is_hugging_face_state(state):
        state = hugging_face_to_official(state)
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        out[key.removeprefix("module.")] = value
    return out


# -- the public entry points ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pretrained:
    """A model loaded by ``load_checkpoint`` and what its checkpoint says about using it.

    category_map: from our metadata, the COCO panoptic map for 250-class checkpoints without metadata,
    else None. input_size: ``(min_size, max_size)`` the model was trained with (our checkpoints), else
    None. postprocess: the post-processing settings stored by ``calibrate`` (``threshold``,
    ``merge_stuff``, ``min_area``), else None. The module carries weights only;
    ``inference.PredictorSettings.from_pretrained`` turns these into the predictor's settings.
    """

    model: PanopticDETR
    category_map: CategoryMap | None
    input_size: tuple[int, int] | None
    postprocess: dict[str, Any] | None
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(source: str | os.PathLike, **model_overrides: Any) -> Pretrained:
    """Build a ``PanopticDETR`` from ``source`` (see the module docstring), load its weights and read its metadata.

    The configuration is read from the weights (classes, queries, layers, widths, heads, backbone depth),
    then from metadata (our checkpoints, a Hugging Face config.json), then ``model_overrides``
    (``num_classes=``, ``aux_loss=``, ``dropout=``, ``dilation=`` ...). With a different ``num_classes``
    the class head keeps its fresh initialisation (logged) and the category map is dropped; any other
    shape mismatch raises ``UserInputError`` listing the keys.
    """
    DETRConfig.check_names(model_overrides)
    loaded = _read_source(source)
    state = _normalise_keys(loaded.state)
    config = DETRConfig().to_dict()
    try:
        config.update(infer_model_config(state))
    except UserInputError as exc:
        raise UserInputError(f"{loaded.description}: {exc}") from None
    known = set(DETRConfig.field_names())
    config.update({k: v for k, v in loaded.config.items() if k in known})
    config.update({k: v for k, v in loaded.metadata.get("model_config", {}).items() if k in known})
    checkpoint_classes = config["num_classes"]
    config.update(model_overrides)
    model = PanopticDETR.from_config(DETRConfig.from_dict(config, source=f"{loaded.description}: cannot build the "
                                                                          "model"))
    skip = CLASS_HEAD_KEYS if model.config.num_classes != checkpoint_classes else ()
    _load_state(model, state, skip=skip, description=loaded.description)
    if skip:
        log.info("%s: %d -> %d classes: not loaded (re-initialised): %s", loaded.description, checkpoint_classes,
                 config["num_classes"], ", ".join(skip))
    postprocess = loaded.metadata.get("postprocess")
    return Pretrained(model=model, category_map=_category_map(loaded, config["num_classes"], checkpoint_classes),
                      input_size=_input_size(loaded),
                      postprocess=dict(postprocess) if isinstance(postprocess, Mapping) else None,
                      description=loaded.description, metadata=dict(loaded.metadata))


def load_pretrained(source: str | os.PathLike, **model_overrides: Any) -> PanopticDETR:
    """The ``PanopticDETR`` of ``load_checkpoint(source, **model_overrides)``, weights only.

    For inference, ``inference.PanopticPredictor.from_pretrained(source)`` also restores the checkpoint's
    categories, input size and post-processing settings.
    """
    return load_checkpoint(source, **model_overrides).model


def _input_size(loaded: _Loaded) -> tuple[int, int] | None:
    """``(min_size, max_size)`` from our metadata, when it is there and sane (else None, logged)."""
    saved = loaded.metadata.get("input_size")
    if saved is None:
        return None
    try:
        sizes = int(saved["min_size"]), int(saved["max_size"])
    except (KeyError, TypeError, ValueError):
        sizes = None
    if sizes is None or not 0 < sizes[0] <= sizes[1]:
        log.warning("%s: ignoring a malformed input_size in the metadata: %r", loaded.description, saved)
        return None
    return sizes


def _load_state(model: PanopticDETR, state: Mapping[str, torch.Tensor], *, skip: tuple[str, ...],
                description: str) -> None:
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k not in skip}
    missing = sorted(set(expected) - set(state) - set(skip))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                        for k, v in state.items() if k in expected and v.shape != expected[k].shape)
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched)}")
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    if problems:
        raise UserInputError(f"{description}: the weights do not fit the model ({model.config}): "
                             + " | ".join(problems))
    model.load_state_dict(state, strict=not skip)


def _category_map(loaded: _Loaded, num_classes: int, checkpoint_classes: int) -> CategoryMap | None:
    if num_classes != checkpoint_classes:
        return None
    saved = loaded.metadata.get("category_map")
    if saved:
        category_map = CategoryMap.from_json(saved, source=loaded.description)
        if category_map.num_classes == num_classes:
            return category_map
        log.warning("%s: category map has %d classes, the model %d: ignored", loaded.description,
                    category_map.num_classes, num_classes)
        return None
    if num_classes == 250:
        return coco_category_map(250)
    return None


# -- saving ------------------------------------------------------------------------------------------------
def _config_record(model: PanopticDETR, model_config: DETRConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    if model_config is None:
        return model.config.to_dict()
    if isinstance(model_config, DETRConfig):
        return model_config.to_dict()
    return DETRConfig.from_dict(model_config).to_dict()


def _metadata(model: PanopticDETR, category_map: CategoryMap | Mapping[str, Any] | None,
              model_config: DETRConfig | Mapping[str, Any] | None,
              input_size: Mapping[str, int] | None = None,
              postprocess: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if isinstance(category_map, CategoryMap):
        category_map = category_map.to_json()
    meta = {"format_version": FORMAT_VERSION,
            "model_config": _config_record(model, model_config),
            "category_map": dict(category_map) if category_map is not None else None}
    if input_size is not None:
        meta["input_size"] = {"min_size": int(input_size["min_size"]), "max_size": int(input_size["max_size"])}
    if postprocess is not None:
        meta["postprocess"] = dict(postprocess)
    return meta


def save_checkpoint(path: str | os.PathLike, model: PanopticDETR, *,
                    category_map: CategoryMap | Mapping[str, Any] | None,
                    model_config: DETRConfig | Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None, input_size: Mapping[str, int] | None = None,
                    postprocess: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"model": state_dict, "detr_panoptic": {...}, **extra}`` atomically.

    ``model_config``: the ``DETRConfig`` to record (default: ``model.config``; a mapping is read with
    ``DETRConfig.from_dict``).

    ``input_size`` (``{"min_size", "max_size"}``): the resize the model was trained and validated with;
    the predictor (``predict``/``evaluate``/``attention``) uses it when no size is given. ``postprocess``
    (``{"threshold", "merge_stuff", "min_area"}``, written by ``calibrate``): the predictor's defaults.

    The reference code loads it (``checkpoint["model"]`` has the official keys); ``extra`` holds the
    training state (``optimizer``, ``lr_scheduler``, ``step``, ``epoch``, ``rng``, ``best_pq``) and must
    be tensors/numbers/strings/lists/dicts so that ``torch.load(weights_only=True)`` reads it.
    """
    # Trainable batch norms (``models.backbone.thaw_batch_norms``) add ``num_batches_tracked``, which the
    # official layout (frozen norms) has not; their other keys are the frozen norms' own.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".num_batches_tracked")}
    payload: dict[str, Any] = {"model": state,
                               "detr_panoptic": _metadata(model, category_map, model_config, input_size,
                                                          postprocess)}
    for key, value in (extra or {}).items():
        if key in payload:
            raise ValueError(f"extra must not overwrite {key!r}")
        payload[key] = value
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def export_safetensors(model: PanopticDETR, path: str | os.PathLike, *,
                       category_map: CategoryMap | Mapping[str, Any] | None = None,
                       model_config: DETRConfig | Mapping[str, Any] | None = None,
                       input_size: Mapping[str, int] | None = None,
                       postprocess: Mapping[str, Any] | None = None) -> Path:
    """Write the weights (official keys) as ``.safetensors`` plus ``<stem>.json`` with the model config,
    category map, input size and post-processing settings (``load_checkpoint`` reads them back).
    Returns the weights path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserInputError(f"{path}: the file name must end in .safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = _metadata(model, category_map, model_config, input_size, postprocess)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "detr_panoptic_format_version": str(FORMAT_VERSION)})
    atomic_write_json(sidecar_path(path), meta)
    return path


def write_postprocess(source: str | os.PathLike, postprocess: Mapping[str, Any], *,
                      out: str | os.PathLike | None = None, in_place: bool = False) -> Path:
    """Store ``postprocess`` (``PostprocessSettings`` keys: what ``calibrate`` chose) as the checkpoint's
    ``detr_panoptic.postprocess`` record, which ``PredictorSettings.from_checkpoint`` reads.

    ``in_place``: rewrite ``source`` atomically (our ``.pth`` checkpoints: everything else in the file is
    kept; ``.safetensors``: its JSON sidecar). Otherwise write a copy to ``out``: our ``.pth`` with
    everything else kept, any other source (official file, ``.safetensors``, Hugging Face folder, URL,
    alias) as our checkpoint format (weights, categories, model config, input size). Returns the path written.
    """
    record = PostprocessSettings.from_dict(postprocess).as_dict()
    path = Path(str(source)).expanduser()
    if in_place and not path.is_file():
        raise UserInputError(f"{source}: --in-place needs a checkpoint file (.pth or .safetensors); "
                             "write a calibrated copy with --out instead")
    if not in_place and out is None:
        raise UserInputError("write_postprocess: give out= or in_place=True")
    target = path if in_place else Path(out)  # type: ignore[arg-type]
    if path.is_file() and path.suffix != ".safetensors":
        obj = _torch_load(path)
        if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) \
                and isinstance(obj.get("detr_panoptic"), Mapping):
            with atomic_path(target) as tmp:
                torch.save(dict(obj, detr_panoptic=dict(obj["detr_panoptic"], postprocess=record)), tmp)
            return target
        if in_place:
            raise UserInputError(f"{path}: not a detr-panoptic checkpoint (no 'detr_panoptic' metadata): refusing "
                                 "to rewrite it in place; write a calibrated copy with --out instead")
    if in_place:  # .safetensors: the metadata lives in the sidecar
        sidecar = sidecar_path(path)
        if sidecar.is_file():
            meta = _read_json(sidecar)
        else:
            pretrained = load_checkpoint(path)
            meta = _metadata(pretrained.model, pretrained.category_map, None, _size_record(pretrained.input_size))
        atomic_write_json(sidecar, dict(meta, postprocess=record))
        return sidecar
    pretrained = load_checkpoint(source)
    return save_checkpoint(target, pretrained.model, category_map=pretrained.category_map,
                           input_size=_size_record(pretrained.input_size), postprocess=record)


def _size_record(input_size: tuple[int, int] | None) -> dict[str, int] | None:
    return None if input_size is None else {"min_size": int(input_size[0]), "max_size": int(input_size[1])}


# -- class head adaptation ------------------------------------------------------------------------------------
def adapt_class_head(state_dict: Mapping[str, torch.Tensor], new_num_classes: int,
                     row_map: Mapping[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` whose ``detr.class_embed`` has ``new_num_classes + 1`` rows.

    Rows start from ``nn.Linear``'s default initialisation; with ``row_map`` (new class index -> old class
    index) those rows are copied from the old head, and the "no object" row (last) from the old last row.
    """
    if new_num_classes < 1:
        raise ValueError(f"new_num_classes must be >= 1, got {new_num_classes}")
    out = dict(state_dict)
    weight, bias = state_dict[CLASS_HEAD_KEYS[0]], state_dict[CLASS_HEAD_KEYS[1]]
    old_rows, dim = weight.shape
    new_weight = torch.empty(new_num_classes + 1, dim, dtype=weight.dtype, device=weight.device)
    torch.nn.init.kaiming_uniform_(new_weight, a=math.sqrt(5))  # nn.Linear's default
    bound = 1 / math.sqrt(dim)
    new_bias = torch.empty(new_num_classes + 1, dtype=bias.dtype, device=bias.device).uniform_(-bound, bound)
    if row_map is not None:
        for new_index, old_index in row_map.items():
            if not (0 <= new_index < new_num_classes and 0 <= old_index < old_rows - 1):
                raise UserInputError(f"class head row map: {new_index} -> {old_index} is out of range "
                                     f"(new classes 0..{new_num_classes - 1}, old 0..{old_rows - 2})")
            new_weight[new_index] = weight[old_index]
            new_bias[new_index] = bias[old_index]
        new_weight[-1] = weight[-1]
        new_bias[-1] = bias[-1]
    out[CLASS_HEAD_KEYS[0]] = new_weight
    out[CLASS_HEAD_KEYS[1]] = new_bias
    return out
