"""``PixelWinner``: the per-pixel argmax over a subset of the kept queries' upsampled masks, bit for bit
``torch.argmax``, answering shrinking subsets incrementally (post-processing's small-segment loop, a
calibration sweep, the app's settings)."""
from __future__ import annotations

import torch


class PixelWinner:
    """Per pixel, the first channel with the highest value (``torch.argmax(0)``, bit for bit) among a
    subset of the channels of ``masks`` [K, h, w].

    Post-processing asks for shrinking subsets (small segments dropped and argmax run again; and, in a
    calibration sweep, the queries kept at ever higher thresholds): when the subset is inside one asked
    for before, only the pixels whose winner left are recomputed. (The first highest channel of a set
    that is still in a subset is the first highest of the subset.) A full pass is a running maximum over
    the channels, several times faster on the CPU than ``argmax`` over the leading dimension.
    """

    CACHED = 4  # answers kept for reuse

    def __init__(self, masks: torch.Tensor) -> None:
        self.masks = masks
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # (subset Bool [K], winner Long [h, w])
        self._positive_areas: torch.Tensor | None = None

    def positive_areas(self) -> torch.Tensor:
        """Long [K]: pixels where each channel is > 0 (a mask logit: probability > 0.5), counted once and
        kept, since a calibration sweep asks for them once per setting."""
        if self._positive_areas is None:
            self._positive_areas = (self.masks > 0).flatten(1).sum(1)
        return self._positive_areas

    def __call__(self, subset: torch.Tensor) -> torch.Tensor:
        """Long [h, w]: the winning channel (index into the K channels) among ``subset`` (Bool [K], not empty)."""
        subset = subset.to(torch.bool)
        count = int(subset.sum())
        if count == 0:
            raise ValueError("PixelWinner needs at least one channel")
        base = None
        for entry in self._cache:  # the smallest cached superset
            if bool((entry[0] | subset).eq(entry[0]).all()) and (base is None or entry[0].sum() < base[0].sum()):
                base = entry
        if base is not None and bool(base[0].eq(subset).all()):
            return base[1]
        if base is not None:
            winner = base[1].clone()
            flat = winner.view(-1)
            lost = (~subset[flat]).nonzero().squeeze(1)
            if lost.numel():
                channels = subset.nonzero().squeeze(1)
                # the lost pixels' columns first, then the subset's rows: never a copy of whole maps
                values = self.masks.reshape(self.masks.shape[0], -1).index_select(1, lost).index_select(0, channels)
                flat[lost] = channels[_first_max(values)]
        else:
            winner = _running_argmax(self.masks, subset.nonzero().squeeze(1))
        self._cache.append((subset.clone(), winner))
        del self._cache[:-self.CACHED]
        return winner


def _first_max(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(0)`` for [k, n]."""
    return _running_argmax(values, torch.arange(values.shape[0], device=values.device))


def _running_argmax(masks: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``masks[channels].argmax(0)`` mapped back to channel indices, by a running maximum (strictly greater
    replaces, so the first of equal maxima wins, as argmax). NaN (never produced by a finite model) falls
    back to ``argmax``, which treats it as the maximum."""
    order = channels.tolist()
    best = masks[order[0]].clone()
    winner = torch.full(best.shape, order[0], dtype=torch.long, device=masks.device)
    better = torch.empty(best.shape, dtype=torch.bool, device=masks.device)
    for channel in order[1:]:
        torch.gt(masks[channel], best, out=better)
        torch.maximum(best, masks[channel], out=best)
        winner.masked_fill_(better, channel)
    if bool(best.isnan().any()):
        return channels[masks[channels].argmax(0)]
    return winner
