"""``PanopticDETR``: DETR (backbone, transformer, class and box heads) plus the panoptic mask branch.

Module names follow the official checkpoint (``detr.backbone.0.body...``, ``detr.transformer...``,
``bbox_attention``, ``mask_head``) so its state dict loads with ``strict=True``.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detr_panoptic.models.backbone import BackboneWithPosition, ResNetBackbone, thaw_batch_norms
from detr_panoptic.models.config import DETRConfig
from detr_panoptic.models.mask_head import MaskHeadSmallConv, MHAttentionMap
from detr_panoptic.models.outputs import DETROutput
from detr_panoptic.models.position import PositionEmbeddingSine
from detr_panoptic.models.query_branches import QueryBranch, compose_queries
from detr_panoptic.models.transformer import Transformer, group_attention_mask
from detr_panoptic.utils.batching import pad_images

MaskQueries = Callable[[DETROutput], Sequence[torch.Tensor]]
MASK_CHUNK = 32  # queries per batch when decoding masks without autograd on an accelerator
QUERY_GROUPS_SEED = 20_230_715  # the extra query groups' initialisation (enable_query_groups)


class MLP(nn.Module):
    """Linear layers with ReLU in between (keys ``layers.0..n-1``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    """Detection part: backbone + position, ``input_proj``, transformer, ``query_embed``, heads."""

    def __init__(self, num_classes: int, backbone: BackboneWithPosition, transformer: Transformer,
                 num_queries: int) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.backbone = backbone
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)


class PanopticDETR(nn.Module):
    """DETR for panoptic segmentation (the reference's ``DETRsegm``), with official parameter names.

    Input: a list of normalised ``[3, H_i, W_i]`` images, or a padded batch ``[B, 3, H, W]`` plus
    ``mask [B, H, W]`` (True on padding). See ``forward``. The model returns raw outputs; panoptic results
    come from ``models.postprocess.PanopticPostProcessor`` (``model(images, mask_queries=processor.kept_queries)``
    computes masks for the kept queries only).
    """

    def __init__(self, num_classes: int = 250, *, backbone: str = "resnet50", dilation: bool = False,
                 hidden_dim: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, num_queries: int = 100,
                 aux_loss: bool = False) -> None:
        super().__init__()
        # the one description of this model (checked there): checkpoints store it, exports read it
        self.config = DETRConfig(num_classes, backbone=backbone, dilation=dilation, hidden_dim=hidden_dim,
                                 nheads=nheads, enc_layers=enc_layers, dec_layers=dec_layers,
                                 dim_feedforward=dim_feedforward, dropout=dropout, num_queries=num_queries,
                                 aux_loss=aux_loss)
        self.num_classes = num_classes
        self.aux_loss = aux_loss
        resnet = ResNetBackbone(backbone, dilation)
        self.detr = DETR(num_classes, BackboneWithPosition(resnet, PositionEmbeddingSine(hidden_dim // 2)),
                         Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout),
                         num_queries)
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        channels = resnet.num_channels
        self.mask_head = MaskHeadSmallConv(hidden_dim, nheads, [channels[2], channels[1], channels[0]])
        self.query_groups = 1
        # Attributes (parameters or modules) that exist for training only: ``state_dict()`` leaves them out,
        # so checkpoints hold exactly the official keys; ``training_state_dict()`` holds them for last.pth.
        self.training_only: set[str] = {"group_query_embed", "query_branches"}
        self.group_query_embed: nn.Parameter | None = None
        # Training-only query branches (denoising, one-to-many: models/query_branches.py), run in train()
        # mode when forward() is given the targets; add_query_branch registers them.
        self.query_branches = nn.ModuleDict()
        self.register_state_dict_post_hook(_drop_training_only)
        self.register_load_state_dict_post_hook(_training_only_not_missing)


    @classmethod
    def from_config(cls, config: DETRConfig) -> PanopticDETR:
        """The model ``config`` describes (random weights)."""
        return cls(**config.to_dict())
    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """The training-only state (``self.training_only``: extra query groups, and any module a training
        feature registers there) as ``{key: tensor}``, keys like ``state_dict``'s; empty without it. It goes
        into ``last.pth`` beside the official weights, so a resumed run restores it exactly."""
        state: dict[str, torch.Tensor] = {}
        for name in sorted(self.training_only):
            value = getattr(self, name, None)
            if isinstance(value, nn.Parameter):
                state[name] = value.detach().clone()
            elif isinstance(value, nn.Module):
                state.update({f"{name}.{k}": v.detach().clone() for k, v in value.state_dict().items()})
        return state

    def load_training_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore ``training_state_dict()``'s output into the same training setup (same query groups...).
        A key this model has no place for, or a place without a key, is a ``ValueError``."""
        own = self.training_state_dict()
        if set(own) != set(state):
            raise ValueError(f"training state does not fit this model: saved keys {sorted(state)}, the model's "
                             f"{sorted(own)} (were train.query_groups or other training-only settings changed?)")
        with torch.no_grad():
            for name in sorted(self.training_only):
                value = getattr(self, name, None)
                if isinstance(value, nn.Parameter):
                    if value.shape != state[name].shape:
                        raise ValueError(f"training state {name}: shape {tuple(state[name].shape)}, the model's "
                                         f"{tuple(value.shape)}")
                    value.copy_(state[name])
                elif isinstance(value, nn.Module):
                    prefix = name + "."
                    value.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def enable_query_groups(self, groups: int) -> PanopticDETR:
        """Group-DETR training (``train.query_groups``): ``groups - 1`` extra groups of ``num_queries``
        queries, used in ``train()`` mode only, each group matched one-to-one on its own with the
        decoder's self-attention restricted to the group. The first group is the official
        ``detr.query_embed``; the extra queries (``group_query_embed``, initialised like it) are training
        state only: ``state_dict()`` leaves them out, so checkpoints keep the official keys, and
        ``eval()`` mode (inference, validation) runs the official queries alone, as without groups.
        1 removes the extra groups. Returns the model."""
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"query groups must be an integer >= 1, got {groups!r}")
        if groups == self.query_groups:
            return self
        self.query_groups = groups
        if groups == 1:
            self.group_query_embed = None
            return self
        official = self.detr.query_embed.weight
        # nn.Embedding's initialisation, from a fixed generator: every process of a distributed run starts
        # with the same extra queries (state_dict() leaves them out, so DDP does not broadcast them), and
        # the global random stream is left as it was.
        generator = torch.Generator().manual_seed(QUERY_GROUPS_SEED)
        extra = torch.randn((groups - 1) * official.shape[0], official.shape[1], generator=generator)
        # Frozen with the official queries (freeze.transformer): call this after the freeze policies.
        self.group_query_embed = nn.Parameter(extra.to(device=official.device, dtype=official.dtype),
                                              requires_grad=official.requires_grad)
        return self

    def add_query_branch(self, branch: QueryBranch) -> PanopticDETR:
        """Register a training-only query branch (``models.query_branches``) under ``branch.name``. Its own
        parameters always train, whatever the freeze policies leave of the model: they are never part of it
        (with a frozen decoder they still train the heads through it). Returns the model."""
        branch.to(self.detr.query_embed.weight.device)
        self.query_branches[branch.name] = branch
        return self

    def _query_embeddings(self, groups: int) -> torch.Tensor:
        official = self.detr.query_embed.weight
        if groups == 1:
            return official
        assert self.group_query_embed is not None and groups == self.query_groups
        return torch.cat([official, self.group_query_embed])

    def set_channels_last(self, backbone: bool = True, mask_head: bool = True) -> PanopticDETR:
        """Memory format of the convolutional parts, the ResNet and the mask head: channels-last (the
        default; faster oneDNN convolutions on CPU, see bench/bench_channels_last.py) or NCHW. Outputs are
        equal to float rounding either way. Returns the model."""
        self.detr.backbone[0].channels_last = backbone
        self.mask_head.channels_last = mask_head
        return self

    # -- the shared trunk -------------------------------------------------------------------------
    @staticmethod
    def _batch(images: Sequence[torch.Tensor] | torch.Tensor, mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            if mask is None:
                mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
            elif mask.shape != (images.shape[0], *images.shape[-2:]):
                raise ValueError(f"mask must be [B, H, W] = {(images.shape[0], *images.shape[-2:])}, "
                                 f"got {tuple(mask.shape)}")
            return images, mask.to(torch.bool)
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = [images]
        if mask is not None:
            raise ValueError("mask is only accepted with a padded batch tensor [B, 3, H, W]")
        return pad_images(list(images))

    def _trunk(self, batch: torch.Tensor, mask: torch.Tensor, need_weights: bool = False,
               query_groups: int = 1, targets: Sequence[Mapping] | None = None) -> dict:
        levels, position = self.detr.backbone(batch, mask)
        feature, level_mask = levels[-1]
        projected = self.detr.input_proj(feature)
        queries = self._query_embeddings(query_groups)
        plan = None
        if targets is not None and len(self.query_branches):
            group_mask = group_attention_mask(queries.shape[0], query_groups, queries.device) \
                if query_groups > 1 else None
            plan = compose_queries(queries, group_mask, list(self.query_branches.values()), targets, batch.shape[0])
        hs, memory, attentions = self.detr.transformer(
            projected, level_mask, queries if plan is None else plan.position, position, need_weights, query_groups,
            query_content=None if plan is None else plan.content, self_attn_mask=None if plan is None else plan.self_mask)
        logits = self.detr.class_embed(hs)
        boxes = self.detr.bbox_embed(hs).sigmoid()
        branches = {}
        if plan is not None:  # the branches' queries follow the main ones: split them off
            branches = plan.outputs(logits, boxes, aux=self.aux_loss)
            hs, logits, boxes = (t[:, :, :plan.num_main] for t in (hs, logits, boxes))
        return {"levels": levels, "mask": level_mask, "projected": projected, "memory": memory, "hs": hs,
                "logits": logits, "boxes": boxes, "attentions": attentions, "branches": branches}

    def _masks(self, trunk: dict, query_indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mask logits [N, H/4, W/4] for the packed queries ``query_indices`` (per image).

        Without autograd, each query runs on its own (batch of one) after the per-image parts: a query's
        mask is then bit-for-bit the same whichever other queries are computed, so a forward with
        ``mask_queries`` (kept queries only) reproduces the all-queries forward exactly, and no per-query copy of the
        1/4-resolution maps is ever held for all queries at once. With autograd, one batched pass.
        """
        hs_last, memory, pad_mask = trunk["hs"][-1], trunk["memory"], trunk["mask"]
        device = hs_last.device
        fpns = [trunk["levels"][i][0] for i in (2, 1, 0)]
        size = tuple(memory.shape[-2:])
        queries = self.bbox_attention.project_queries(hs_last)  # [B, Q, heads, dh], all queries
        keys = self.bbox_attention.project_keys(memory)  # [B, heads, dh, hw]
        flat_mask = pad_mask.flatten(1)
        context, laterals = self.mask_head.prepare(trunk["projected"], fpns)
        image_index = torch.cat([torch.full((len(q),), b, dtype=torch.long, device=device)
                                 for b, q in enumerate(query_indices)])
        query_index = torch.cat([q.to(device=device, dtype=torch.long) for q in query_indices])
        def batched(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            # index_select, not queries[image_index, query_index]: the same rows, and a backward that
            # is deterministic on CPU (advanced indexing accumulates its gradient in a varying order)
            flat_queries = queries.flatten(0, 1).index_select(0, images * queries.shape[1] + rows)
            attention = self.bbox_attention.attend(flat_queries, keys.index_select(0, images), flat_mask[images], size)
            return self.mask_head.decode(context, attention, laterals, images)

        if torch.is_grad_enabled() or image_index.numel() == 0:
            return batched(image_index, query_index)
        if decode_in_chunks(device):
            # one query at a time is launch-bound on a GPU: chunks of queries (equal to float rounding there,
            # where the convolutions may choose their algorithm by batch size anyway), with no host sync
            return torch.cat([batched(image_index[s:s + MASK_CHUNK], query_index[s:s + MASK_CHUNK])
                              for s in range(0, image_index.numel(), MASK_CHUNK)])
        masks = []
        for b, q in zip(image_index.tolist(), query_index.tolist()):
            attention = self.bbox_attention.attend(queries[b, q:q + 1], keys[b:b + 1], flat_mask[b:b + 1], size)
            one = torch.zeros(1, dtype=torch.long, device=device)
            masks.append(self.mask_head.decode(context[b:b + 1], attention, [lat[b:b + 1] for lat in laterals], one))
        return torch.cat(masks)

    # -- public API -----------------------------------------------------------------------------------
    def thaw_backbone_batch_norms(self, *, stem: bool = False) -> int:
        """Let the backbone's batch norms train with batch statistics (for a backbone trained from
        scratch; ``models.backbone.thaw_batch_norms``); the stem's (conv1, layer1) only with ``stem``.
        Returns how many norms were thawed. Checkpoints keep the official frozen-norm keys."""
        body = self.detr.backbone[0].body
        parts = [body] if stem else [body.layer2, body.layer3, body.layer4]
        return sum(thaw_batch_norms(part) for part in parts)

    def forward(self, images: Sequence[torch.Tensor] | torch.Tensor, mask: torch.Tensor | None = None, *,
                mask_queries: MaskQueries | None = None, return_attention: bool = False,
                targets: Sequence[Mapping] | None = None) -> DETROutput:
        """Run the model.

        images: list of normalised [3, H_i, W_i] tensors, or a padded batch [B, 3, H, W] with ``mask``
        [B, H, W] (True on padding).
        mask_queries: optional ``f(DETROutput without masks) -> list[LongTensor]`` (query indices per
        image); then only those masks are computed, packed as ``pred_masks [N, H/4, W/4]``.
        return_attention: fill ``attentions`` with ``decoder_cross`` (per layer [B, heads, Q, h*w]),
        ``encoder_self`` (last encoder layer, [B, heads, h*w, h*w]) and ``feature_size`` (h, w).
        Returns ``DETROutput`` with pred_logits [B, Q, C+1], pred_boxes [B, Q, 4] (normalised cxcywh)
        and pred_masks [B, Q, H/4, W/4] by default; in ``train()`` mode with query groups
        (``enable_query_groups``) Q is ``groups * num_queries`` and ``output.query_groups`` says so.
        targets: the batch's targets (dataset contract), for the training-only query branches
        (``add_query_branch``): in ``train()`` mode their outputs go to ``output.branches``; ignored otherwise.
        """
        batch, pad_mask = self._batch(images, mask)
        groups = self.query_groups if self.training else 1
        trunk = self._trunk(batch, pad_mask, return_attention, groups, targets if self.training else None)
        logits, boxes = trunk["logits"], trunk["boxes"]
        aux = [DETROutput(pred_logits=lg, pred_boxes=bx, query_groups=groups) for lg, bx in zip(logits[:-1], boxes[:-1])] \
            if self.aux_loss else []
        output = DETROutput(pred_logits=logits[-1], pred_boxes=boxes[-1], aux_outputs=aux,
                            input_size=tuple(batch.shape[-2:]), query_groups=groups, branches=trunk["branches"],
                            image_sizes=_unpadded_sizes(images, mask, pad_mask))
        b, q = logits.shape[1], logits.shape[2]
        if mask_queries is None:
            all_queries = [torch.arange(q, device=batch.device)] * b
            masks = self._masks(trunk, all_queries)
            output.pred_masks = masks.view(b, q, *masks.shape[-2:])
        else:
            selected = [torch.as_tensor(s, dtype=torch.long, device=batch.device) for s in mask_queries(output)]
            if len(selected) != b:
                raise ValueError(f"mask_queries returned {len(selected)} index tensors for {b} images")
            output.pred_masks = self._masks(trunk, selected)
            output.mask_queries = selected
        if return_attention:
            output.attentions = dict(trunk["attentions"], feature_size=tuple(trunk["memory"].shape[-2:]))
        return output


def _is_training_only(key: str, names: set[str]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in names)


def _drop_training_only(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: training-only parameters and modules are not model weights."""
    for key in [k for k in state_dict if k.startswith(prefix)
                and _is_training_only(k[len(prefix):], module.training_only)]:  # type: ignore[arg-type]
        del state_dict[key]


def _training_only_not_missing(module: nn.Module, incompatible: nn.modules.module._IncompatibleKeys) -> None:
    """Loading the (official) weights into a model with training-only parts keeps those as they are."""
    names: set[str] = module.training_only  # type: ignore[assignment]
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not _is_training_only(k, names)]


def _unpadded_sizes(images: Sequence[torch.Tensor] | torch.Tensor, mask: torch.Tensor | None,
                    padding_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Each image's (h, w): from the list's shapes, or the padded batch's size, without reading a device
    tensor (no synchronisation in a training step); only a batch given with its own mask is measured."""
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        images = [images]
    if not isinstance(images, torch.Tensor):
        return [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
    if mask is None:
        return [(int(images.shape[-2]), int(images.shape[-1]))] * int(images.shape[0])
    return image_sizes(padding_mask)


def decode_in_chunks(device: torch.device) -> bool:
    """Masks without autograd in chunks of ``MASK_CHUNK`` queries (accelerators) or one by one (the CPU,
    bit-for-bit equal whichever queries are computed)."""
    return device.type != "cpu"


def image_sizes(padding_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Unpadded (h, w) of each image of a padded batch (images sit in the top-left corner)."""
    valid = ~padding_mask
    heights = valid.any(dim=2).sum(dim=1).tolist()
    widths = valid.any(dim=1).sum(dim=1).tolist()
    return [(int(h), int(w)) for h, w in zip(heights, widths)]
