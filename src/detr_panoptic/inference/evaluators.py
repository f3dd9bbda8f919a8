"""Evaluators: what ``run_inference`` does with each batch of results (detectron2's protocol).

An evaluator has ``reset()``, ``process(samples, results)`` and ``evaluate() -> result``; ``name`` keys
its result in ``InferenceRun.outputs``. Here:

* ``PQEvaluator``: panoptic quality in memory (``evaluation.PQAccumulator``, panopticapi-exact),
  summed across processes under DDP; ``evaluate()`` returns ``pq_compute``'s dict (fractions);
* ``PanopticWriter``: COCO panoptic PNG per image + one JSON (``images``, ``annotations``,
  ``categories``); restartable: every finished image is journalled, and a run started again with the
  same settings skips them (``done``);
* ``OverlayWriter``: the panoptic result drawn over each image;
* ``DetectionEvaluator``: do the kept queries *find* the things (recall at box IoU >= 0.5, kept queries
  per ground-truth thing, mask IoU; ``evaluation.detection``), apart from how well they segment them.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.inference.samples import InferenceSample, load_image
from detr_panoptic.models.outputs import PanopticResult
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_json

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    name: str

    def reset(self) -> None: ...

    def process(self, samples: Sequence[InferenceSample], results: Sequence[PanopticResult]) -> None: ...

    def evaluate(self) -> Any: ...


def with_pixels(result: PanopticResult) -> list[dict[str, Any]]:
    """The result's segments that have at least one pixel (panopticapi rejects empty ones; so does the writer)."""
    return [s for s in result.segments_info if int(s.get("area", 1)) > 0]


class PQEvaluator:
    """PQ of the results against each sample's ``target`` (ground truth at the original size)."""

    name = "pq"

    def __init__(self, categories: Any) -> None:
        self.categories = categories
        self.reset()

    def reset(self) -> None:
        from detr_panoptic.evaluation.pq import PQAccumulator

        self.accumulator = PQAccumulator(self.categories)

    def process(self, samples: Sequence[InferenceSample], results: Sequence[PanopticResult]) -> None:
        for sample, result in zip(samples, results):
            if sample.target is None:
                raise UserInputError(f"image {sample.image_id!r}: PQ needs ground truth (a dataset sample)")
            self.accumulator.add(sample.target["gt_id_map"], sample.target["gt_segments"], result.id_map,
                                 with_pixels(result), image_id=sample.image_id)

    def evaluate(self) -> dict[str, Any]:
        """``pq_compute``'s dict (fractions), over every process when ``torch.distributed`` is initialised."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
            total = self.accumulator.to_tensor(device=device)
            torch.distributed.all_reduce(total)
            self.accumulator.load_tensor(total.cpu())
        return self.accumulator.compute()


class DetectionEvaluator:
    """Detection figures of things (``evaluation.detection.DetectionAccumulator``) from each result's kept
    queries against the sample's ground truth, and the same for its thing segments (``segments``: what the
    output shows, after the post-processing dropped some kept queries); gathered across processes under DDP."""

    name = "detection"

    def __init__(self, category_map: CategoryMap, *, iou_threshold: float = 0.5) -> None:
        self.thing_ids = [c.id for c in category_map.categories if c.isthing]
        self.iou_threshold = iou_threshold
        self.reset()

    def reset(self) -> None:
        from detr_panoptic.evaluation.detection import DetectionAccumulator

        self.accumulator = DetectionAccumulator(self.iou_threshold)
        self.segments = DetectionAccumulator(self.iou_threshold)

    def process(self, samples: Sequence[InferenceSample], results: Sequence[PanopticResult]) -> None:
        from detr_panoptic.evaluation.detection import panoptic_detection_inputs

        for sample, result in zip(samples, results):
            if sample.target is None:
                raise UserInputError(f"image {sample.image_id!r}: detection figures need ground truth")
            for accumulator, segments in ((self.accumulator, False), (self.segments, True)):
                accumulator.add(**panoptic_detection_inputs(sample.target["gt_id_map"], sample.target["gt_segments"],
                                                            result, self.thing_ids, segments=segments))

    def evaluate(self) -> dict[str, Any]:
        pair = (self.accumulator, self.segments)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, pair)
            pair = gathered[0]
            for other in gathered[1:]:
                pair[0].merge(other[0])
                pair[1].merge(other[1])
        return {**pair[0].compute(), "segments": pair[1].compute()}


def detection_metrics(figures: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``things_*`` keys of a ``DetectionEvaluator`` result, for metrics records (plus the per-class dict)."""
    keys = ("recall", "kept_per_gt", "duplicates_per_gt", "kept_ratio", "mask_iou")
    segments = figures.get("segments") or {}
    return {**{f"things_{k}": figures.get(k) for k in keys},
            **{f"things_segment_{k}": segments.get(k) for k in ("recall", "duplicates_per_gt")},
            "detection_per_class": figures.get("per_class", {})}


class OverlayWriter:
    """``<folder>/<stem of file_name>.png``: the result drawn over the image (``visualize.draw_panoptic``)."""

    name = "overlays"

    def __init__(self, folder: str | os.PathLike, category_map: CategoryMap, *,
                 draw: Callable[..., Any] | None = None, limit: int | None = None) -> None:
        self.folder = Path(folder)
        self.category_map = category_map
        self.draw = draw
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        from detr_panoptic.utils.io import remove_stale_temporaries

        self.written: list[Path] = []
        remove_stale_temporaries(self.folder)  # left by a run killed mid-write

    def process(self, samples: Sequence[InferenceSample], results: Sequence[PanopticResult]) -> None:
        from detr_panoptic.visualize.overlay import draw_panoptic, save_image

        for sample, result in zip(samples, results):
            if self.limit is not None and len(self.written) >= self.limit:
                return
            picture = sample.original if sample.original is not None else load_image(sample.path)
            path = self.folder / f"{Path(sample.file_name).stem}.png"
            save_image((self.draw or draw_panoptic)(picture, result, self.category_map), path)
            self.written.append(path)

    def evaluate(self) -> list[Path]:
        return list(self.written)


class PanopticWriter:
    """COCO panoptic predictions: ``<png_folder>/<file_name>`` per image and ``json_path``.

    PNGs are written atomically as they come; the JSON once ``evaluate()`` is called. With
    ``resume=True`` each finished image is also appended to ``<json_path>.progress.jsonl`` (after its
    PNG is in place), and a writer opened again on the same folder with the same ``fingerprint`` (what
    determines the result: checkpoint, settings) adopts those images (``done``) instead of predicting
    them again; a different fingerprint starts over. ``evaluate()`` writes the JSON and removes the journal.
    """

    name = "predictions"

    def __init__(self, json_path: str | os.PathLike, png_folder: str | os.PathLike | None = None, *,
                 categories: Any = None, resume: bool = False, fingerprint: Mapping[str, Any] | None = None) -> None:
        self.json_path = Path(json_path)
        self.png_folder = Path(png_folder) if png_folder is not None else self.json_path.with_suffix("")
        self.categories = categories
        self.resume = resume
        self.fingerprint = dict(fingerprint or {})
        self.journal_path = self.json_path.with_name(self.json_path.name + ".progress.jsonl")
        self.reset()

    def reset(self) -> None:
        from detr_panoptic.evaluation import PanopticPredictionWriter

        if getattr(self, "_journal", None) is not None:
            self._journal.close()
        self._journal = None
        try:
            self.png_folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserInputError(f"cannot create the output folder {self.png_folder}: {exc.strerror}") from None
        if not os.access(self.png_folder, os.W_OK):
            raise UserInputError(f"the output folder {self.png_folder} is not writable")
        from detr_panoptic.utils.io import remove_stale_temporaries

        for folder in {self.png_folder, self.json_path.parent}:  # left by a run killed mid-write
            remove_stale_temporaries(folder)
        self._writer = PanopticPredictionWriter(self.json_path, self.png_folder, self.categories)
        self.images: list[dict[str, Any]] = []
        self.done: dict[str, dict[str, Any]] = {}  # PNG file name -> journal entry (resumed images)
        if self.resume:
            self.done = self._read_journal()
            for entry in self.done.values():
                self._writer.annotations.append(entry["annotation"])
                self._writer._file_names.add(entry["annotation"]["file_name"])
                self.images.append(entry["image"])
            if self.done:
                log.info("%s: %d image(s) already predicted by an interrupted run with the same settings: kept",
                         self.png_folder, len(self.done))
            self._journal = self.journal_path.open("a" if self.done else "w", encoding="utf-8")
            if not self.done:
                self._append({"kind": "header", "fingerprint": self.fingerprint})

    def _read_journal(self) -> dict[str, dict[str, Any]]:
        if not self.journal_path.is_file():
            return {}
        entries: dict[str, dict[str, Any]] = {}
        with self.journal_path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a killed run may be cut short
                    log.debug("%s: line %d unreadable: ignored", self.journal_path, number + 1)
                    continue
                if number == 0:
                    if record.get("kind") != "header" or record.get("fingerprint") != self.fingerprint:
                        log.info("%s: written with other settings: predicting every image again", self.png_folder)
                        return {}
                    continue
                name = record.get("annotation", {}).get("file_name")
                if name and (self.png_folder / name).is_file():
                    entries[name] = record
        return entries

    def _append(self, record: Mapping[str, Any]) -> None:
        self._journal.write(json.dumps(record) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def process(self, samples: Sequence[InferenceSample], results: Sequence[PanopticResult]) -> None:
        for sample, result in zip(samples, results):
            annotation = self._writer.add(sample.image_id, result.id_map, result.segments_info,
                                          file_name=sample.file_name)
            image = dict(sample.image_info)
            self.images.append(image)
            if self.resume:
                self._append({"kind": "image", "image": image, "annotation": annotation})

    @property
    def annotations(self) -> list[dict[str, Any]]:
        return self._writer.annotations

    def evaluate(self) -> dict[str, Any]:
        """Write the JSON (atomically), drop the journal; ``{"json", "png_folder", "num_images"}``."""
        atomic_write_json(self.json_path, {"images": self.images, "annotations": self._writer.annotations,
                                           "categories": self._writer.categories})
        if self._journal is not None:
            self._journal.close()
            self._journal = None
            self.journal_path.unlink(missing_ok=True)
        return {"json": self.json_path, "png_folder": self.png_folder, "num_images": len(self.images)}
