"""Models with generated weights for the export tests: a small one and an R50-shaped one (the official
checkpoint's layout, 250 classes)."""
from __future__ import annotations

import torch

from detr_panoptic.data.categories import Category, CategoryMap
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.utils.batching import pad_images

SMALL_CLASSES = 5


def randomise(model: PanopticDETR, seed: int = 0) -> PanopticDETR:
    """Matrices keep their initialisation; biases, norms and frozen BN statistics are drawn too, so that no
    parameter is trivially 0 or 1 (a swapped or dropped tensor then changes the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or tensor.dim() != 1:
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
                if ("norm" in name or ".bn" in name or ".gn" in name) and name.endswith("weight"):
                    tensor.add_(1.0)
    return model.eval()


def small_model(seed: int = 0, *, aux_loss: bool = False) -> PanopticDETR:
    torch.manual_seed(seed)
    model = PanopticDETR(SMALL_CLASSES, backbone="resnet18", hidden_dim=32, nheads=8, enc_layers=2, dec_layers=2,
                         dim_feedforward=64, num_queries=12, aux_loss=aux_loss)
    return randomise(model, seed)


def r50_model(seed: int = 0, *, aux_loss: bool = False) -> PanopticDETR:
    torch.manual_seed(seed)
    return randomise(PanopticDETR(250, aux_loss=aux_loss), seed)


def small_category_map() -> CategoryMap:
    names = ["car", "road", "person", "sky", "building"]
    return CategoryMap.contiguous(Category(id=10 + i, name=n, isthing=n in ("car", "person"))
                                  for i, n in enumerate(names))


def design_class_head(model: PanopticDETR, images: list[torch.Tensor], classes: list[int], *,
                      scale: float = 40.0) -> None:
    """Only ``classes`` and "no object" compete: their rows of the class head are the random rows scaled by
    ``scale``, centred on the mean decoder output of ``images`` and blind to the differences between the
    images' mean outputs (so each query's best class varies and its score spreads over (0, 1)); every
    other class gets a bias of -30.

    The head stays small (an exact least-squares fit of chosen labels needs weights ~100x larger on a random
    decoder, whose outputs hardly differ between queries, and magnifies float rounding as much).
    """
    with torch.no_grad():
        batch, mask = pad_images(images)
        hs = model._trunk(batch, mask)["hs"][-1]  # [B, Q, D]
        mean = hs.mean((0, 1))
        head = model.detr.class_embed
        rows = torch.tensor([*classes, model.num_classes])
        weight = torch.zeros_like(head.weight)
        weight[rows] = head.weight[rows] * scale
        if len(images) > 1:  # blind to what differs between the images' mean outputs: queries, not images, vary
            basis = torch.linalg.qr((hs.mean(1) - mean).T).Q  # [D, B]
            weight[rows] -= (weight[rows] @ basis) @ basis.T
        bias = torch.full_like(head.bias, -30.0)
        bias[rows] = -(weight[rows] @ mean)
        head.weight.copy_(weight)
        head.bias.copy_(bias)


def threshold_keeping(model: PanopticDETR, images: list[torch.Tensor], count: int, min_gap: float = 2e-3,
                      class_to_category: torch.Tensor | None = None) -> float:
    """A keep threshold under which exactly ``count`` queries of ``images`` are kept, halfway between the
    count-th and the next best score of queries whose best class is not "no object"; their scores must be
    at least ``min_gap`` apart (so that float rounding cannot change which queries are kept)."""
    with torch.no_grad():
        batch, mask = pad_images(images)
        scores, labels = model._trunk(batch, mask)["logits"][-1].softmax(-1).max(-1)
    candidate = labels != model.num_classes
    if class_to_category is not None:  # unused class indices count as "no object"
        candidate &= class_to_category[labels.clamp(max=model.num_classes - 1)] >= 0
    candidates = scores[candidate].sort(descending=True).values
    if len(candidates) <= count:
        raise AssertionError(f"only {len(candidates)} queries have an object class; {count} wanted")
    above, below = float(candidates[count - 1]), float(candidates[count])
    if above - below < min_gap:
        raise AssertionError(f"scores {above:.5f} and {below:.5f} around the threshold are too close")
    return (above + below) / 2


def threshold_keeping_about(model: PanopticDETR, images: list[torch.Tensor], count: int, min_gap: float = 2e-3,
                            class_to_category: torch.Tensor | None = None, spread: int = 3) -> tuple[float, int]:
    """``threshold_keeping`` for the count nearest to ``count`` (within ``spread``) whose scores are ``min_gap``
    apart: the scores of a random model differ between CPUs (oneDNN kernels) by more than a fixed count's gap
    may allow. Returns ``(threshold, kept count)``."""
    failures = []
    for candidate in sorted(range(max(1, count - spread), count + spread + 1), key=lambda c: (abs(c - count), c)):
        try:
            return threshold_keeping(model, images, candidate, min_gap, class_to_category), candidate
        except AssertionError as error:
            failures.append(f"{candidate}: {error}")
    raise AssertionError(f"no kept count near {count} has a clear threshold: {'; '.join(failures)}")


def design_mask_head(model: PanopticDETR) -> None:
    """Masks that depend on the query: the mask head's context (lay1 on the encoder features) and FPN adapters
    are switched off, its biases set to 0 and its group norms to identity affines.

    With random weights every query gets nearly the same mask (the shared context and biases dominate; the
    per-query part is ~1e-3 of the logits), so float rounding would decide many pixels of the argmax. Here
    the masks come from each query's attention alone and differ by ~1e-2 (median top-2 gap), ~1,000x the
    onnxruntime-vs-PyTorch difference.
    """
    head = model.mask_head
    with torch.no_grad():
        head.lay1.weight[:, :head.context_dim].zero_()
        for name, parameter in head.named_parameters():
            if name.startswith("adapter") or name.endswith("bias"):
                parameter.zero_()
            elif name.startswith("gn") and name.endswith("weight"):
                parameter.fill_(1.0)



def spread_queries(model: PanopticDETR, factor: float = 30.0) -> None:
    """Scale the learnt query positions by ``factor``: a random R50 decoder's outputs then differ between
    queries by ~10% of their size instead of ~0.5%, so a class head tells them apart with small weights
    (large ones would magnify float rounding)."""
    with torch.no_grad():
        model.detr.query_embed.weight.mul_(factor)
