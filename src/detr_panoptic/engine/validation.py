"""Training validation: ``make_validator`` runs the very path of ``detr-panoptic evaluate`` on a shard of the
val split (``inference.run_inference`` with the PQ, detection and Cityscapes evaluators) from a hook."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.models.detr import PanopticDETR

log = logging.getLogger(__name__)


def make_validator(dataset: Dataset, category_map: CategoryMap, *, min_size: int, max_size: int | None,
                   threshold: float, batch_size: int, rank: int, world_size: int, device: torch.device,
                   num_workers: int = 0, diagnostic_images: int = 8, metrics: Sequence[str] = ("pq",)
                   ) -> Callable[[nn.Module], dict[str, Any]]:
    """``validate(model) -> metrics`` (percentages, ``per_class`` by category id): ``run_inference`` with a
    ``PQEvaluator``, the very path of ``detr-panoptic evaluate`` (same preprocessing, same predictor, PQ at
    the original resolution), so a checkpoint gets one PQ figure. Each process takes every
    ``world_size``-th image and the statistics are summed across processes.

    The record also holds the detection figures of things (``things_recall`` ...; ``DetectionEvaluator``)
    and, on the first ``diagnostic_images`` val images, how much the encoder memory, the decoder output
    and the boxes depend on the image (``diag_*``; ``engine.diagnostics``): a detector that collapses to
    image-independent queries shows on the curve as it happens.

    ``metrics`` (``train.val_metrics``): PQ always; ``miou`` and/or ``ap`` add Cityscapes' pixel-level and
    instance-level scores (``miou, iiou, category_miou, category_iiou, ap, ap50``;
    ``inference.CityscapesMetrics``, the semantic map and instances from the queries as ``evaluate``
    makes them), for Cityscapes categories.
    """
    from detr_panoptic.engine.diagnostics import image_dependence
    from detr_panoptic.evaluation.pq import results_to_percentages
    from detr_panoptic.inference import (
        DatasetSamples,
        DetectionEvaluator,
        PanopticPredictor,
        PQEvaluator,
        PredictorSettings,
        detection_metrics,
        make_loader,
        run_inference,
    )
    from detr_panoptic.inference.cityscapes_writer import CityscapesMetrics
    from detr_panoptic.inference.tasks import DEFAULT_DENSE_OUTPUTS

    cityscapes = bool({"miou", "ap"} & set(metrics))
    samples = DatasetSamples(dataset, min_size=min_size, max_size=max_size)
    shard = Subset(samples, range(rank, len(samples), world_size))
    settings = PredictorSettings(category_map, min_size=min_size, max_size=max_size, threshold=threshold)
    probe = [samples[i].image for i in range(min(diagnostic_images, len(samples)))]

    def validate(model: nn.Module) -> dict[str, Any]:
        predictor = PanopticPredictor(model, settings, device=device)  # type: ignore[arg-type]
        evaluators: list[Any] = [PQEvaluator(category_map), DetectionEvaluator(category_map)]
        if cityscapes:
            predictor = predictor.with_dense_outputs(DEFAULT_DENSE_OUTPUTS)
            evaluators.append(CityscapesMetrics(category_map))
        run = run_inference(predictor, make_loader(shard, batch_size=batch_size, num_workers=num_workers),
                            evaluators)
        record = results_to_percentages(run.outputs["pq"])
        record.update(detection_metrics(run.outputs["detection"]))
        if cityscapes:
            record.update(run.outputs["cityscapes"])
        metrics_out = record
        if len(probe) >= 2 and isinstance(model, PanopticDETR):
            metrics_out.update(image_dependence(model, probe))
        return metrics_out

    return validate
