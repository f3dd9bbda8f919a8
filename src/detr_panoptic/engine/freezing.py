"""Freeze policies for fine-tuning, composable and applied by one function.

Parameters are recognised by their official DETR names (with or without the ``detr.`` prefix of the
panoptic wrapper), so the policies work on ``PanopticDETR`` and on any module that uses those names:

==================  ===========================================================================
part                parameter names
==================  ===========================================================================
backbone            ``detr.backbone.*``
input_proj          ``detr.input_proj.*``
query_embed         ``detr.query_embed.*``
encoder             ``detr.transformer.encoder.*``
decoder             ``detr.transformer.decoder.*`` (its layers and the shared final norm)
class_embed         ``detr.class_embed.*``
bbox_embed          ``detr.bbox_embed.*``
bbox_attention      ``bbox_attention.*``
mask_head           ``mask_head.*``
==================  ===========================================================================

Policies (each only ever *freezes*; they compose by union):

* ``backbone``: the backbone (the recipe's backbone lr 0).
* ``backbone_stem`` (default on): when the backbone trains, its stem -- ``conv1``, ``bn1`` and ``layer1``
  -- stays frozen and only layer2..layer4 train, as in the reference DETR (whose backbone trains only
  the parameters named ``layer2``, ``layer3``, ``layer4``).
* ``transformer`` (stage 1): input_proj, query_embed, encoder and decoder. Together with ``backbone`` (the
  default) only the class, box and mask heads and ``bbox_attention`` train, as the recipe says. The
  backbone stays governed by its own flag, so ``backbone: false, transformer: true`` fine-tunes the
  backbone and the heads.
* ``attention`` (stage 2): every attention layer of the transformer -- ``self_attn`` of encoder and
  decoder layers and the decoder's ``multihead_attn`` (cross-attention). ``bbox_attention`` is part of the
  mask head (it makes the mask head's input, not the features) and keeps training.
* ``first_layers: N``: encoder layers 0..N-1 and decoder layers 0..N-1.

Freezing sets ``requires_grad = False`` and nothing else: dropout and other train-mode behaviour are
unchanged (as in the reference). Autograd records no graph for operations none of whose inputs require
gradients, so a frozen prefix of the network (the backbone; with ``transformer`` also input_proj,
encoder and decoder) runs without building one; no ``torch.no_grad`` switch is needed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

PARTS: tuple[str, ...] = ("backbone", "input_proj", "query_embed", "encoder", "decoder", "class_embed",
                          "bbox_embed", "bbox_attention", "mask_head", "other")

_LAYER = re.compile(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.")
_STEM = re.compile(r"^backbone\.0\.body\.(conv1|bn1|layer1)\.")
_ATTENTION = re.compile(r"^transformer\.(encoder|decoder)\.layers\.\d+\.(self_attn|multihead_attn)\.")


def _local_name(name: str) -> str:
    """Drop the DDP ``module.`` and the panoptic wrapper's ``detr.`` prefixes."""
    for prefix in ("module.", "detr."):
        name = name.removeprefix(prefix)
    return name


def parameter_part(name: str) -> str:
    """Which part of the model (one of ``PARTS``) a parameter name belongs to."""
    local = _local_name(name)
    head = local.split(".", 1)[0]
    if head == "transformer":
        second = local.split(".")[1] if "." in local else ""
        return second if second in ("encoder", "decoder") else "other"
    return head if head in PARTS else "other"


def is_frozen_by(name: str, *, backbone: bool, transformer: bool, attention: bool, first_layers: int,
                 backbone_stem: bool = True) -> bool:
    """Whether the freeze policies freeze the parameter ``name``."""
    part = parameter_part(name)
    local = _local_name(name)
    if backbone and part == "backbone":
        return True
    if backbone_stem and part == "backbone" and _STEM.match(local):
        return True
    if transformer and part in ("input_proj", "query_embed", "encoder", "decoder"):
        return True
    if attention and _ATTENTION.match(local):
        return True
    if first_layers > 0:
        layer = _LAYER.match(local)
        if layer and int(layer.group(2)) < first_layers:
            return True
    return False


@dataclass(frozen=True)
class FreezeReport:
    """Trainable and total parameter counts per part (parts without parameters are left out)."""

    parts: dict[str, tuple[int, int]]

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.parts.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts.values())

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {part: {"trainable": t, "total": n} for part, (t, n) in self.parts.items()}

    def format(self) -> str:
        """A small table: one line per part, then the total."""
        width = max(len(p) for p in [*self.parts, "total"])
        lines = [f"{'part':<{width}}  {'trainable':>12}  {'total':>12}"]
        for part, (t, n) in self.parts.items():
            state = "frozen" if t == 0 else ("partly frozen" if t < n else "trains")
            lines.append(f"{part:<{width}}  {t:>12,}  {n:>12,}  {state}")
        lines.append(f"{'total':<{width}}  {self.trainable:>12,}  {self.total:>12,}")
        return "\n".join(lines)


def freeze_report(model: nn.Module) -> FreezeReport:
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        entry = counts.setdefault(parameter_part(name), [0, 0])
        entry[1] += param.numel()
        if param.requires_grad:
            entry[0] += param.numel()
    return FreezeReport({p: (counts[p][0], counts[p][1]) for p in PARTS if p in counts})


def apply_freeze(model: nn.Module, *, backbone: bool = True, transformer: bool = False, attention: bool = False,
                 first_layers: int = 0, backbone_stem: bool = True) -> FreezeReport:
    """Freeze parameters of ``model`` per the policies (see the module docstring); return the report.

    Parameters not frozen by any policy are set trainable, so applying a config to a model loaded
    with other flags gives the same result as applying it to a fresh one.
    """
    if first_layers < 0:
        raise ValueError(f"freeze.first_layers must be >= 0, got {first_layers}")
    for name, param in model.named_parameters():
        frozen = is_frozen_by(name, backbone=backbone, transformer=transformer, attention=attention,
                              first_layers=first_layers, backbone_stem=backbone_stem)
        param.requires_grad_(not frozen)
    return freeze_report(model)
