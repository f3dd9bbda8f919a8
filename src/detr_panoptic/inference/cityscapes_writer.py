"""Cityscapes' benchmark formats from panoptic results: ``CityscapesWriter`` (an evaluator:
``reset / process / evaluate``) writes, per image::

    <folder>/semantic/<stem>.png       labelIds (8-bit), the original size
    <folder>/instance/<stem>.txt       one line per instance: "masks/<stem>_<k>.png <labelId> <confidence>"
    <folder>/instance/masks/<stem>_<k>.png   0/255, the original size

as cityscapesScripts' evaluators and the test server read them (``detr-panoptic cityscapes-eval`` scores
them). ``<stem>`` is the image id for dataset images (``<city>_<seq>_<frame>``), else the input's stem.

The semantic map and the instances come from the result: its query-based ``semantic`` / ``instances``
when the predictor computed them (``PanopticPredictor.with_dense_outputs``), else read off the panoptic
segments (the choice measured in docs/metrics.md):

* semantic: each pixel takes the labelId of its panoptic segment's category (VOID -> 0, unlabeled);
* instances: each thing segment is one instance, its confidence the segment's class probability.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detr_panoptic.inference.samples import InferenceSample
from detr_panoptic.models.outputs import PanopticResult
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from detr_panoptic.utils.png_grey import encode_grey8_png

NUM_LABEL_IDS = 34


def thing_ids(categories: Any) -> set[int]:
    from detr_panoptic.evaluation.panoptic_format import category_records

    return {int(r["id"]) for r in category_records(categories) if r.get("isthing") in (1, True)}


def cityscapes_label_ids(categories: Any) -> dict[int, int]:
    """Category id -> Cityscapes labelId, by the category's name (so that labelId and trainId category
    sets both work); a category without a Cityscapes name keeps its id when that is a labelId."""
    from cityscapesscripts.helpers.labels import name2label

    from detr_panoptic.evaluation.panoptic_format import category_records

    table = {}
    for record in category_records(categories):
        category_id, name = int(record["id"]), str(record.get("name", ""))
        if name in name2label and name2label[name].id >= 0:
            table[category_id] = name2label[name].id
        elif 0 <= category_id < NUM_LABEL_IDS:
            table[category_id] = category_id
        else:
            raise UserInputError(f"category {category_id} ({name!r}) is not a Cityscapes label: the Cityscapes "
                                 "formats need a model with Cityscapes categories")
    return table


def result_stem(sample: InferenceSample) -> str:
    image_id = sample.image_id
    return str(image_id) if isinstance(image_id, str) else Path(sample.file_name).stem


def semantic_labels(result: PanopticResult, label_ids: Mapping[int, int]) -> np.ndarray:
    """uint8 ``[H, W]`` labelIds: the result's query-based ``semantic`` map when it has one, else
    ``semantic_from_panoptic``; no category -> 0 (unlabeled)."""
    if result.semantic is None:
        return semantic_from_panoptic(result, label_ids)
    categories = result.semantic.cpu().numpy()
    lookup = np.zeros(max([int(categories.max(initial=0))] + list(label_ids)) + 2, np.uint8)
    for category_id, label_id in label_ids.items():
        lookup[category_id] = label_id
    return lookup[categories]  # -1 (no category) reads the last entry, 0


def result_instances(result: PanopticResult, label_ids: Mapping[int, int], things: set[int]
                     ) -> list[tuple[np.ndarray, int, float]]:
    """The result's query-based ``instances`` when it has them, else ``instances_from_panoptic``."""
    if result.instances is None:
        return instances_from_panoptic(result, label_ids, things)
    return [(mask.cpu().numpy(), label_ids[int(c)], float(score)) for mask, c, score in result.instances]


def semantic_from_panoptic(result: PanopticResult, label_ids: Mapping[int, int]) -> np.ndarray:
    """uint8 ``[H, W]`` labelIds: each segment's category's labelId, VOID -> 0."""
    id_map = result.id_map.cpu().numpy()
    largest = max([int(id_map.max(initial=0))] + [int(s["id"]) for s in result.segments_info])
    lookup = np.zeros(largest + 1, np.uint8)
    for segment in result.segments_info:
        lookup[int(segment["id"])] = label_ids[int(segment["category_id"])]
    return lookup[id_map]


def instances_from_panoptic(result: PanopticResult, label_ids: Mapping[int, int], things: set[int]
                            ) -> list[tuple[np.ndarray, int, float]]:
    """(bool mask ``[H, W]``, labelId, confidence) per segment of a thing category (``things``)."""
    id_map = result.id_map.cpu().numpy()
    return [(id_map == int(s["id"]), label_ids[int(s["category_id"])], float(s.get("score", 1.0)))
            for s in result.segments_info if int(s["category_id"]) in things]


class CityscapesWriter:
    """Writes each result in Cityscapes' semantic and instance formats (see the module docstring)."""

    name = "cityscapes"

    def __init__(self, folder: str | os.PathLike, categories: Any) -> None:
        self.folder = Path(folder)
        self.label_ids = cityscapes_label_ids(categories)
        self.things = thing_ids(categories)
        self.reset()

    def reset(self) -> None:
        self.written: list[str] = []
        for part in ("semantic", "instance", "instance/masks"):
            (self.folder / part).mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.folder / part)

    def process(self, samples: Sequence[InferenceSample], results: Sequence[PanopticResult]) -> None:
        for sample, result in zip(samples, results):
            stem = result_stem(sample)
            semantic = semantic_labels(result, self.label_ids)
            atomic_write_bytes(self.folder / "semantic" / f"{stem}.png", encode_grey8_png(semantic))
            lines = []
            for k, (mask, label_id, confidence) in enumerate(result_instances(result, self.label_ids, self.things)):
                name = f"masks/{stem}_{k}.png"
                atomic_write_bytes(self.folder / "instance" / name, encode_grey8_png(mask.astype(np.uint8) * 255))
                lines.append(f"{name} {label_id} {confidence:.6f}\n")
            atomic_write_text(self.folder / "instance" / f"{stem}.txt", "".join(lines))
            self.written.append(stem)

    def evaluate(self) -> dict[str, Any]:
        return {"folder": self.folder, "images": list(self.written)}


class CityscapesMetrics:
    """Cityscapes' pixel-level (mIoU, iIoU) and instance-level (AP, AP50) scores in memory, against each
    sample's ``target`` (the converted panoptic ground truth; training validation). Summed / gathered
    across processes under ``torch.distributed``, as ``PQEvaluator``.

    The converted ground truth keeps instanceIds' values for the scored labels and makes the ignored
    ones VOID: the pixel-level scores are exactly those of the gtFine files (an ignored label's pixels
    count nowhere either way); for AP, caravan and trailer instances become ignored pixels (in gtFine
    they are not), a difference only for predictions lying on them. ``cityscapes-eval`` on the written
    files is the reference path.
    """

    name = "cityscapes"

    def __init__(self, categories: Any) -> None:
        self.label_ids = cityscapes_label_ids(categories)
        self.things = thing_ids(categories)
        self.reset()

    def reset(self) -> None:
        from detr_panoptic.evaluation.instance import InstanceAccumulator
        from detr_panoptic.evaluation.semantic import PixelLevelAccumulator

        self.pixel = PixelLevelAccumulator()
        self.instance = InstanceAccumulator()

    def _ground_truth(self, target: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(labelIds uint8, instanceIds uint16) from a converted panoptic ground truth."""
        ids = np.asarray(target["gt_id_map"].cpu() if hasattr(target["gt_id_map"], "cpu") else target["gt_id_map"])
        segments = target["gt_segments"]
        largest = max([int(ids.max(initial=0))] + [int(s["id"]) for s in segments])
        labels = np.zeros(largest + 1, np.uint8)
        instances = np.zeros(largest + 1, np.uint16)
        for segment in segments:
            label = self.label_ids[int(segment["category_id"])]
            value = int(segment["id"])
            labels[value] = label
            instances[value] = value if value >= 1000 else label
        return labels[ids], instances[ids]

    def process(self, samples: Sequence[InferenceSample], results: Sequence[PanopticResult]) -> None:
        from detr_panoptic.evaluation.instance import InstancePrediction
        from detr_panoptic.evaluation.pq_stats import runs

        for sample, result in zip(samples, results):
            if sample.target is None:
                raise UserInputError(f"image {sample.image_id!r}: Cityscapes scores need ground truth")
            gt_labels, gt_instances = self._ground_truth(sample.target)
            predicted = semantic_labels(result, self.label_ids)
            label_runs, instance_runs, pred_runs, lengths = runs(gt_labels, gt_instances, predicted)
            self.pixel.add_runs(label_runs.astype(np.int64), instance_runs.astype(np.int64),
                                pred_runs.astype(np.int64), lengths, source=f"image {sample.image_id!r}")
            self.instance.add(gt_instances, [InstancePrediction(label, score, np.flatnonzero(mask))
                                             for mask, label, score in result_instances(result, self.label_ids,
                                                                                        self.things)])

    def evaluate(self) -> dict[str, Any]:
        """Percentages: ``miou, iiou, category_miou, category_iiou, ap, ap50`` (None where undefined)."""
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
            total = torch.as_tensor(self.pixel.state(), dtype=torch.float64, device=device)
            torch.distributed.all_reduce(total)
            self.pixel.load_state(total.cpu().numpy())
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.instance.records())
            self.reset_instances(gathered)
        from detr_panoptic.evaluation.cityscapes import metrics_from_results

        metrics = metrics_from_results(pixel=self.pixel.compute(), instance=self.instance.compute())
        return {k: metrics[k] for k in ("miou", "iiou", "category_miou", "category_iiou", "ap", "ap50")}

    def reset_instances(self, gathered: Sequence[Any]) -> None:
        from detr_panoptic.evaluation.instance import InstanceAccumulator

        self.instance = InstanceAccumulator()
        for records in gathered:
            self.instance.merge_records(records)
