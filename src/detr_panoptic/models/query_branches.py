"""Training-only query branches: extra decoder queries that speed up training and leave the model unchanged.

A branch (``QueryBranch``: ``models.denoising.DenoisingQueries``, ``models.one_to_many.OneToManyQueries``)
adds queries to the decoder in ``train()`` mode when the trainer passes the targets: its own positional
queries, optionally its own content (the decoder input, zeros for DETR's queries), and its own
supervision (``BranchOutput.losses``, named ``loss_<branch>_*``). The decoder's self-attention mask
keeps the model's queries (the official ones and the Group-DETR groups, "main" below) from ever seeing
a branch, and the branches from seeing each other; a branch may see the main queries (denoising does,
as in DN-DETR). The main queries' outputs are therefore exactly what they would be without branches,
for the same weights: matching, the main losses, the masks, inference and every export are untouched.

The branches live in ``PanopticDETR.query_branches`` (an ``nn.ModuleDict``, training-only state: left
out of ``state_dict()``, kept in ``last.pth``'s ``training_state`` for an exact resume). Their
parameters are initialised from a fixed generator, so every process of a distributed run starts equal
(DDP does not broadcast what ``state_dict()`` leaves out) and the global random stream is untouched.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Targets = Sequence[Mapping[str, Any]]


@dataclass
class BranchQueries:
    """One branch's decoder queries for a batch.

    position: [B, n, D] positional queries (DETR's ``query_pos``); content: [B, n, D] decoder input, or
    None for zeros (DETR's); self_mask: Bool [n, n] (True: may attend) inside the branch, None for all;
    sees_main: whether the branch's queries may attend to the main queries; about: what the branch needs
    back to build its losses (``QueryBranch.output``).
    """

    position: torch.Tensor
    content: torch.Tensor | None = None
    self_mask: torch.Tensor | None = None
    sees_main: bool = False
    about: Any = None


class BranchOutput:
    """A branch's predictions (every decoder layer, or the last only without ``aux_loss``) and its losses:
    ``losses(criterion, targets, num_boxes) -> {name: unweighted loss}`` (names ``loss_<branch>_ce``,
    ``..._bbox``, ``..._giou`` for the last layer and ``..._<i>`` for the auxiliary layer i)."""

    def losses(self, criterion: Any, targets: Targets, num_boxes: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def named_layer_losses(branch: str, layers: int,
                       layer_losses: Callable[[int], tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
                       ) -> dict[str, torch.Tensor]:
    """``BranchOutput.losses``' naming: ``layer_losses(layer) -> (class loss, {"loss_bbox", "loss_giou"})``
    for each decoder layer, as ``loss_<branch>_ce|bbox|giou`` (last layer) and ``..._<layer>`` (the others)."""
    out: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        class_loss, box = layer_losses(layer)
        suffix = "" if layer == layers - 1 else f"_{layer}"
        out[f"loss_{branch}_ce{suffix}"] = class_loss
        out[f"loss_{branch}_bbox{suffix}"] = box["loss_bbox"]
        out[f"loss_{branch}_giou{suffix}"] = box["loss_giou"]
    return out


class QueryBranch(nn.Module):
    """The interface of a training-only query branch (see the module docstring)."""

    name: str = "branch"

    def queries(self, targets: Targets, batch_size: int, device: torch.device) -> BranchQueries:
        raise NotImplementedError

    def output(self, class_logits: torch.Tensor, boxes: torch.Tensor, queries: BranchQueries) -> BranchOutput:
        """``class_logits`` [L, B, n, C+1] and ``boxes`` [L, B, n, 4] (normalised cxcywh) of the branch's
        queries, L the decoder layers supervised."""
        raise NotImplementedError


@dataclass
class BranchPlan:
    """The decoder input with every branch appended after the ``num_main`` main queries
    (``compose_queries``): position / content [B, Q', D], self-attention mask Bool [Q', Q']."""

    num_main: int
    position: torch.Tensor
    content: torch.Tensor
    self_mask: torch.Tensor
    parts: list[tuple[QueryBranch, BranchQueries, slice]] = field(default_factory=list)

    def outputs(self, class_logits: torch.Tensor, boxes: torch.Tensor, *, aux: bool) -> dict[str, BranchOutput]:
        """Each branch's output from the decoder's class logits / boxes of all Q' queries, [L, B, Q', *]."""
        layers = slice(None) if aux else slice(-1, None)
        return {branch.name: branch.output(class_logits[layers, :, part], boxes[layers, :, part], queries)
                for branch, queries, part in self.parts}


def compose_queries(main_queries: torch.Tensor, main_mask: torch.Tensor | None,
                    branches: Sequence[QueryBranch], targets: Targets, batch_size: int) -> BranchPlan:
    """The main queries ``[Q, D]`` (their self-attention mask ``main_mask`` [Q, Q] or None for all) followed
    by each branch's queries; main queries never attend to a branch, branches never to each other."""
    device = main_queries.device
    num_main = main_queries.shape[0]
    positions = [main_queries.unsqueeze(0).expand(batch_size, -1, -1)]
    contents: list[torch.Tensor | None] = [None]
    parts = []
    start = num_main
    for branch in branches:
        queries = branch.queries(targets, batch_size, device)
        count = queries.position.shape[1]
        parts.append((branch, queries, slice(start, start + count)))
        positions.append(queries.position.to(main_queries.dtype))
        contents.append(queries.content)
        start += count
    position = torch.cat(positions, dim=1)
    content = torch.cat([torch.zeros_like(p) if c is None else c.to(p.dtype) for p, c in zip(positions, contents)],
                        dim=1)
    mask = torch.zeros(start, start, dtype=torch.bool, device=device)
    mask[:num_main, :num_main] = True if main_mask is None else main_mask
    for _, queries, part in parts:
        mask[part, part] = True if queries.self_mask is None else queries.self_mask.to(device)
        if queries.sees_main:
            mask[part, :num_main] = True
    return BranchPlan(num_main, position, content, mask, parts)


def branch_loss_weights(weight_dict: Mapping[str, float], branch: str, weight: float) -> dict[str, float]:
    """Weights of a branch's losses: ``weight`` times the main loss of the same kind and layer
    (``loss_ce_0`` -> ``loss_<branch>_ce_0``); the mask losses have no branch counterpart."""
    kinds = ("loss_ce", "loss_bbox", "loss_giou")
    out = {}
    for name, value in weight_dict.items():
        kind = next((k for k in kinds if name == k or name.startswith(k + "_")), None)
        if kind is not None:
            out["loss_" + branch + name[len("loss"):]] = weight * value
    return out


def seeded_init_(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise ``module``'s parameters from a fixed generator: linear weights and embeddings like
    ``nn.Linear`` / ``nn.Embedding`` do (uniform in +-1/sqrt(fan_in), standard normal), biases uniform in
    +-1/sqrt(fan_in). Every process gets the same values and the global random stream is left as it was."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                bound = 1 / math.sqrt(sub.in_features)
                sub.weight.copy_(torch.rand(sub.weight.shape, generator=generator) * 2 * bound - bound)
                if sub.bias is not None:
                    sub.bias.copy_(torch.rand(sub.bias.shape, generator=generator) * 2 * bound - bound)
            elif isinstance(sub, nn.Embedding):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator))
    return module
