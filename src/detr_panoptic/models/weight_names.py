"""Parameter names: a Hugging Face ``DetrForSegmentation`` state dict (saved or in-memory names, timm or
transformers ResNet) <-> the official DETR names ``PanopticDETR`` uses. Pure renaming (and the q/k/v
projections fused into ``in_proj_*`` or split again); ``checkpoints`` reads, ``export.hugging_face`` writes.
``infer_model_config``: what the official names and shapes tell about the architecture.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from detr_panoptic.models.backbone import BOTTLENECK, RESNET_BLOCKS
from detr_panoptic.utils.errors import UserInputError

_HF_BACKBONE_PREFIX = re.compile(r"^detr\.model\.backbone\.(?:conv_encoder\.)?model\.")
_HF_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    # transformers' own ResNet (AutoBackbone)
    (r"^BB\.embedder\.embedder\.convolution\.", "BB.conv1."),
    (r"^BB\.embedder\.embedder\.normalization\.", "BB.bn1."),
    (r"^BB\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.", r"BB.layerS\1.\2.downsample.0."),
    (r"^BB\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.", r"BB.layerS\1.\2.downsample.1."),
    (r"^BB\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.", r"BB.layerS\1.\2.convJ\3."),
    (r"^BB\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.", r"BB.layerS\1.\2.bnJ\3."),
    (r"^BB\.", "detr.backbone.0.body."),
    # transformer
    (r"^detr\.model\.(encoder|decoder)\.", r"detr.transformer.\1."),
    (r"\.encoder_attn\.", ".multihead_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.(?:mlp\.)?fc1\.", ".linear1."),
    (r"\.(?:mlp\.)?fc2\.", ".linear2."),
    (r"^(detr\.transformer\.encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(detr\.transformer\.encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"^(detr\.transformer\.decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(detr\.transformer\.decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
    (r"^(detr\.transformer\.decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"^detr\.transformer\.decoder\.layernorm\.", "detr.transformer.decoder.norm."),
    # heads and projections
    (r"^detr\.model\.input_projection\.", "detr.input_proj."),
    (r"^detr\.model\.query_position_embeddings\.", "detr.query_embed."),
    (r"^detr\.class_labels_classifier\.", "detr.class_embed."),
    (r"^detr\.bbox_predictor\.", "detr.bbox_embed."),
    (r"^bbox_attention\.q_proj\.", "bbox_attention.q_linear."),
    (r"^bbox_attention\.k_proj\.", "bbox_attention.k_linear."),
    # transformers >= 5 in-memory mask-head names
    (r"^mask_head\.conv(\d)\.conv\.", r"mask_head.lay\1."),
    (r"^mask_head\.conv(\d)\.norm\.", r"mask_head.gn\1."),
    (r"^mask_head\.fpn_stages\.(\d)\.fpn_adapter\.", r"mask_head.adapterF\1."),
    (r"^mask_head\.fpn_stages\.(\d)\.refine\.conv\.", r"mask_head.layF\1."),
    (r"^mask_head\.fpn_stages\.(\d)\.refine\.norm\.", r"mask_head.gnF\1."),
    (r"^mask_head\.output_conv\.", "mask_head.out_lay."),
]]
_OFFSETS = [(re.compile(r"layerS(\d+)"), "layer", 1), (re.compile(r"convJ(\d+)"), "conv", 1),
            (re.compile(r"bnJ(\d+)"), "bn", 1), (re.compile(r"adapterF(\d+)"), "adapter", 1),
            (re.compile(r"layF(\d+)"), "lay", 3), (re.compile(r"gnF(\d+)"), "gn", 3)]
_QKV = re.compile(r"^(.*)\.(q|k|v)_proj\.(weight|bias)$")


def is_hugging_face_state(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("detr.model.", "detr.class_labels_classifier.")) for k in state)


def hugging_face_key_to_official(key: str) -> str:
    """Official name of one ``DetrForSegmentation`` key; q/k/v projections keep their ``q_proj`` etc. suffix
    (``hugging_face_to_official`` fuses them into ``in_proj_weight``/``in_proj_bias``)."""
    key = _HF_BACKBONE_PREFIX.sub("BB.", key)
    for pattern, replacement in _HF_RULES:
        key = pattern.sub(replacement, key)
    for pattern, name, offset in _OFFSETS:
        key = pattern.sub(lambda m, n=name, o=offset: f"{n}{int(m.group(1)) + o}", key)
    return key


def official_to_hugging_face(state: Mapping[str, torch.Tensor], hf_keys: list[str]) -> dict[str, torch.Tensor]:
    """The inverse mapping, for the keys ``hf_keys`` of a ``DetrForSegmentation`` (saved or in-memory names)."""
    out = {}
    for key in hf_keys:
        official = hugging_face_key_to_official(key)
        match = _QKV.match(official)
        if match and ".bbox_attention" not in official:
            fused = state[f"{match.group(1)}.in_proj_{match.group(3)}"]
            out[key] = fused.chunk(3)["qkv".index(match.group(2))]
        else:
            out[key] = state[official]
    return out


def hugging_face_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``DetrForSegmentation`` state dict (saved or in-memory names, timm or transformers ResNet)
    to the official DETR keys; q/k/v projections are fused into ``in_proj_weight``/``in_proj_bias``."""
    renamed = {hugging_face_key_to_official(key): value for key, value in state.items()}
    fused: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in renamed.items():
        match = _QKV.match(key)
        if match and ".bbox_attention" not in key:
            parts.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
        else:
            fused[key] = value
    for (prefix, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise UserInputError(f"Hugging Face weights: {prefix} lacks one of q/k/v_proj.{kind}")
        fused[f"{prefix}.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return fused


def infer_model_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor kwargs readable from official-name weights (not: dilation, dropout, aux_loss)."""
    try:
        hidden_dim = int(state["detr.query_embed.weight"].shape[1])
        config: dict[str, Any] = {
            "num_classes": int(state["detr.class_embed.weight"].shape[0]) - 1,
            "num_queries": int(state["detr.query_embed.weight"].shape[0]),
            "hidden_dim": hidden_dim,
        }
    except KeyError as exc:
        raise UserInputError(f"weights lack {exc.args[0]}: not a DETR panoptic state dict "
                             f"(first keys: {sorted(state)[:5]})") from None

    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for k in state if (m := pattern.match(k))})

    config["enc_layers"] = count("detr.transformer.encoder.layers.")
    config["dec_layers"] = count("detr.transformer.decoder.layers.")
    for stack in ("encoder", "decoder"):
        ffn = state.get(f"detr.transformer.{stack}.layers.0.linear1.weight")
        if ffn is not None:
            config["dim_feedforward"] = int(ffn.shape[0])
            break
    lay1 = state.get("mask_head.lay1.weight")
    if lay1 is not None:
        config["nheads"] = int(lay1.shape[1]) - hidden_dim
    bottleneck = "detr.backbone.0.body.layer1.0.conv3.weight" in state
    blocks = tuple(count(f"detr.backbone.0.body.layer{i}.") for i in range(1, 5))
    for name, name_blocks in RESNET_BLOCKS.items():
        if name_blocks == blocks and BOTTLENECK[name] == bottleneck:
            config["backbone"] = name
            break
    else:
        raise UserInputError(f"backbone with blocks {blocks} ({'bottleneck' if bottleneck else 'basic'}) is not "
                             f"one of ResNet-18/34/50/101")
    return config
