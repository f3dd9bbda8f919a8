"""``run_inference(predictor, loader, evaluators)``: the loop every command that runs the model goes through.

``make_loader`` batches a dataset of ``InferenceSample``s with ``torch.utils.data.DataLoader`` (decoding
and preprocessing in ``num_workers`` worker processes, ahead of the model); ``run_inference`` runs
the predictor on each batch and hands samples and results to every evaluator.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from detr_panoptic.inference.evaluators import Evaluator
from detr_panoptic.inference.predictor import PanopticPredictor
from detr_panoptic.inference.samples import InferenceSample, Skipped
from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def make_loader(dataset: torch.utils.data.Dataset, *, batch_size: int = 1, num_workers: int = 0
                ) -> torch.utils.data.DataLoader:
    """Batches (lists) of a sample dataset in order; ``num_workers`` > 0 decodes in worker processes."""
    if batch_size < 1:
        raise UserInputError(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UserInputError(f"the number of loader workers must be >= 0, got {num_workers}")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=_as_list, prefetch_factor=2 if num_workers else None)


@dataclass
class InferenceRun:
    """What ``run_inference`` did: each evaluator's result by name, images run, inputs skipped, seconds."""

    outputs: dict[str, Any]
    num_images: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0


def run_inference(predictor: PanopticPredictor, loader: Iterable[Sequence[InferenceSample | Skipped]],
                  evaluators: Sequence[Evaluator], *, progress: bool = False, total: int | None = None,
                  description: str = "inference", reset: bool = True) -> InferenceRun:
    """Run ``predictor`` over ``loader``'s batches, feeding every evaluator; returns their results.

    ``loader`` yields lists of ``InferenceSample`` (``make_loader``), possibly with ``Skipped`` entries
    (unreadable inputs under ``skip_bad``), which are logged and listed in the result.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    if reset:
        for evaluator in evaluators:
            evaluator.reset()
    skipped: list[tuple[Path, str]] = []
    count = 0
    with tqdm(total=total, unit="image", desc=description, disable=not progress) as bar:
        for batch in loader:
            samples = [s for s in batch if isinstance(s, InferenceSample)]
            for item in batch:
                if isinstance(item, Skipped):
                    log.warning("skipping: %s", item.reason)
                    skipped.append((item.path, item.reason))
            if samples:
                results = predictor.predict_batch(samples)
                for evaluator in evaluators:
                    evaluator.process(samples, results)
            count += len(samples)
            bar.update(len(batch))
    outputs = {evaluator.name: evaluator.evaluate() for evaluator in evaluators}
    return InferenceRun(outputs=outputs, num_images=count, skipped=skipped, seconds=time.perf_counter() - start)
