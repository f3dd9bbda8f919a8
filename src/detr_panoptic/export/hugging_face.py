"""Write a model as a Hugging Face ``DetrForSegmentation`` folder, without transformers installed.

The folder holds ``config.json`` (a ``DetrConfig``: sizes, ``id2label``/``label2id``, transformers' own
ResNet as the backbone with ``use_pretrained_backbone: false``), ``model.safetensors`` (the weights under
the names ``DetrForSegmentation.save_pretrained`` writes) and ``preprocessor_config.json`` (a
``DetrImageProcessor`` with the checkpoint's input size). ``config.json`` also carries our own metadata
under ``"detr_panoptic"`` (category map, input size, post-processing settings; transformers keeps unknown
keys as config attributes), so ``checkpoints.load_checkpoint(folder)`` restores the model bit-exactly.
``auxiliary_loss`` is always false: the folder is for inference, and with it true transformers computes
other outputs than the reference for the same weights (the training flag is kept in our metadata).

The names are the inverse of ``models.weight_names.hugging_face_key_to_official``: every written name is checked
to map back to the official name it came from.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from detr_panoptic.checkpoints import FORMAT_VERSION
from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.models.backbone import BOTTLENECK, RESNET_BLOCKS, resnet_channels
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.weight_names import hugging_face_key_to_official
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_path, atomic_write_json

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
UNUSED_LABEL = "N/A"  # id2label of class indices without a category (as in the COCO detection configs)

_ATTENTION_IN_PROJ = re.compile(r"^(detr\.transformer\..*\.(?:self_attn|multihead_attn))\.in_proj_(weight|bias)$")
_BACKBONE_LAYER = re.compile(r"^detr\.backbone\.0\.body\.layer(\d)\.(\d+)\.")
_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^detr\.backbone\.0\.body\.conv1\.", "BB.embedder.embedder.convolution."),
    (r"^detr\.backbone\.0\.body\.bn1\.", "BB.embedder.embedder.normalization."),
    (r"^(BB\.encoder\.stages\.\d+\.layers\.\d+)\.downsample\.0\.", r"\1.shortcut.convolution."),
    (r"^(BB\.encoder\.stages\.\d+\.layers\.\d+)\.downsample\.1\.", r"\1.shortcut.normalization."),
    (r"^BB\.", "detr.model.backbone.conv_encoder.model."),
    (r"^detr\.transformer\.decoder\.norm\.", "detr.model.decoder.layernorm."),
    (r"^detr\.transformer\.(encoder|decoder)\.", r"detr.model.\1."),
    (r"\.multihead_attn\.", ".encoder_attn."),
    (r"\.linear1\.", ".fc1."),
    (r"\.linear2\.", ".fc2."),
    (r"^(detr\.model\.encoder\.layers\.\d+)\.norm1\.", r"\1.self_attn_layer_norm."),
    (r"^(detr\.model\.encoder\.layers\.\d+)\.norm2\.", r"\1.final_layer_norm."),
    (r"^(detr\.model\.decoder\.layers\.\d+)\.norm1\.", r"\1.self_attn_layer_norm."),
    (r"^(detr\.model\.decoder\.layers\.\d+)\.norm2\.", r"\1.encoder_attn_layer_norm."),
    (r"^(detr\.model\.decoder\.layers\.\d+)\.norm3\.", r"\1.final_layer_norm."),
    (r"^detr\.input_proj\.", "detr.model.input_projection."),
    (r"^detr\.query_embed\.", "detr.model.query_position_embeddings."),
    (r"^detr\.class_embed\.", "detr.class_labels_classifier."),
    (r"^detr\.bbox_embed\.", "detr.bbox_predictor."),
]]
_CONV_IN_BLOCK = re.compile(r"^(BB\.encoder\.stages\.\d+\.layers\.\d+)\.(conv|bn)(\d)\.")


def official_key_to_hugging_face(key: str) -> str:
    """The ``DetrForSegmentation`` (saved) name of one official key that is not a fused ``in_proj``."""
    key = _BACKBONE_LAYER.sub(lambda m: f"BB.encoder.stages.{int(m.group(1)) - 1}.layers.{m.group(2)}.", key)
    key = _CONV_IN_BLOCK.sub(lambda m: f"{m.group(1)}.layer.{int(m.group(3)) - 1}."
                                       f"{'convolution' if m.group(2) == 'conv' else 'normalization'}.", key)
    for pattern, replacement in _RULES:
        key = pattern.sub(replacement, key)
    return key


def official_to_hugging_face_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-name weights -> ``DetrForSegmentation`` names; fused q/k/v projections are split.

    Raises ``RuntimeError`` if a written name would not read back as the key it came from (the two
    mappings must stay each other's inverse).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        match = _ATTENTION_IN_PROJ.match(key)
        if match:
            prefix = official_key_to_hugging_face(f"{match.group(1)}.x").removesuffix(".x")
            for part, chunk in zip("qkv", value.chunk(3)):
                out[f"{prefix}.{part}_proj.{match.group(2)}"] = chunk
            continue
        name = official_key_to_hugging_face(key)
        if hugging_face_key_to_official(name) != key:
            raise RuntimeError(f"Hugging Face name {name} of {key} maps back to {hugging_face_key_to_official(name)}")
        out[name] = value
    return out


def _labels(category_map: CategoryMap | None, num_classes: int) -> tuple[dict[str, str], dict[str, int]]:
    if category_map is None:
        names = [f"LABEL_{i}" for i in range(num_classes)]
    else:
        names = [UNUSED_LABEL if c is None else c.name
                 for c in (category_map.category_of_class(i) for i in range(num_classes))]
    id2label = {str(i): name for i, name in enumerate(names)}
    label2id: dict[str, int] = {}
    for i, name in enumerate(names):
        if name != UNUSED_LABEL:
            label2id.setdefault(name, i)
    return id2label, label2id


def _check_mask_head_fits(model: PanopticDETR) -> None:
    """transformers' mask head normalises each width with ``min(8, width)`` groups and needs
    ``hidden_dim + nheads`` divisible by 8; ours uses ``gcd(8, width)`` (the reference's 8 where it divides).
    Where the two differ, ``DetrForSegmentation`` could not load the folder or would compute other masks."""
    head = model.mask_head
    norms = [module for name, module in head.named_children() if name.startswith("gn")]
    if any(norm.num_groups != min(8, norm.num_channels) for norm in norms):
        widths = ", ".join(str(norm.num_channels) for norm in norms)
        raise UserInputError(
            f"this model cannot be written as a Hugging Face folder: transformers' mask head needs every width "
            f"of the mask head ({widths}; the first is hidden_dim {model.config['hidden_dim']} + nheads "
            f"{model.config['nheads']}) to be a multiple of 8, or 1, 2 or 4; use --format onnx or safetensors")


def hugging_face_config(model: PanopticDETR, *, category_map: CategoryMap | None = None,
                        metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of ``model`` (a ``DetrConfig``), with ``metadata`` under ``"detr_panoptic"``."""
    config = model.config.to_dict()
    if config["dilation"]:
        raise UserInputError("a DC5 (dilation) model cannot be written as a Hugging Face folder: transformers' "
                             "own ResNet backbone has no dilation (only its timm backbone does)")
    _check_mask_head_fits(model)
    backbone = config["backbone"]
    stage_names = ["stem", "stage1", "stage2", "stage3", "stage4"]
    backbone_config = {
        "model_type": "resnet", "num_channels": 3, "embedding_size": 64,
        "hidden_sizes": list(resnet_channels(backbone)), "depths": list(RESNET_BLOCKS[backbone]),
        "layer_type": "bottleneck" if BOTTLENECK[backbone] else "basic", "hidden_act": "relu",
        "downsample_in_first_stage": False, "downsample_in_bottleneck": False,
        "out_features": stage_names[1:], "out_indices": [1, 2, 3, 4], "stage_names": stage_names,
    }
    id2label, label2id = _labels(category_map, config["num_classes"])
    return {
        "architectures": ["DetrForSegmentation"], "model_type": "detr",
        "use_timm_backbone": False, "use_pretrained_backbone": False, "backbone": None,
        "backbone_config": backbone_config, "num_channels": 3, "dilation": False,
        "d_model": config["hidden_dim"], "num_queries": config["num_queries"],
        "encoder_layers": config["enc_layers"], "decoder_layers": config["dec_layers"],
        "encoder_attention_heads": config["nheads"], "decoder_attention_heads": config["nheads"],
        "encoder_ffn_dim": config["dim_feedforward"], "decoder_ffn_dim": config["dim_feedforward"],
        "activation_function": "relu", "position_embedding_type": "sine",
        # the official DETR's one dropout acts on the attention weights, after attention and in the FFN
        "dropout": config["dropout"], "attention_dropout": config["dropout"],
        "activation_dropout": config["dropout"], "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        # false whatever the model trained with (its aux_loss travels in "detr_panoptic"'s model_config):
        # with true, transformers (5.x) feeds each decoder layer the layer-normalised output of the one
        # before, which the reference does not (it normalises a copy for the auxiliary heads only)
        "auxiliary_loss": False, "is_encoder_decoder": True,
        "id2label": id2label, "label2id": label2id,
        "detr_panoptic": dict(metadata or {}),
    }


def image_processor_config(min_size: int, max_size: int | None) -> dict[str, Any]:
    """``preprocessor_config.json``: a ``DetrImageProcessor`` with our resize and ImageNet normalisation."""
    size: dict[str, int] = {"shortest_edge": int(min_size)}
    if max_size is not None:
        size["longest_edge"] = int(max_size)
    return {"image_processor_type": "DetrImageProcessor", "format": "coco_panoptic", "do_resize": True,
            "size": size, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "do_convert_annotations": True,
            "do_pad": True}


def export_hugging_face(model: PanopticDETR, out_dir: str | os.PathLike, *,
                        category_map: CategoryMap | None = None,
                        input_size: tuple[int, int | None] | None = None,
                        postprocess: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as a ``DetrForSegmentation`` folder (see the module docstring); returns the folder.

    ``input_size`` (``(min_size, max_size)``) and ``postprocess`` (``{threshold, merge_stuff, min_area}``)
    are what the checkpoint records; they travel in ``config.json``'s ``"detr_panoptic"`` entry.
    Files are written atomically; other files in ``out_dir`` are left alone.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    metadata: dict[str, Any] = {"format_version": FORMAT_VERSION, "model_config": model.config.to_dict(),
                                "category_map": category_map.to_json() if category_map is not None else None}
    if input_size is not None:
        metadata["input_size"] = {"min_size": int(input_size[0]),
                                  "max_size": None if input_size[1] is None else int(input_size[1])}
    if postprocess is not None:
        metadata["postprocess"] = dict(postprocess)
    config = hugging_face_config(model, category_map=category_map, metadata=metadata)
    state = official_to_hugging_face_state(model.state_dict())
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_json(out / "config.json", config)
        min_size, max_size = input_size if input_size is not None else (800, 1333)
        atomic_write_json(out / "preprocessor_config.json", image_processor_config(min_size, max_size))
    except OSError as exc:
        raise UserInputError(f"{out}: cannot write the Hugging Face folder ({exc})") from None
    return out
