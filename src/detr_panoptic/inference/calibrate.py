"""``calibrate``: the post-processing (keep threshold, stuff merge mode, minimum segment area, minimum visible
fraction of a thing's mask) that maximises PQ
on a validation split, measured for a whole grid of settings at little more than the cost of one evaluation.

How it stays cheap (per batch of images, one pass over the split):

1. the trunk runs once (``PanopticDETR.forward`` with ``mask_queries=``) and mask logits are computed,
   at 1/4 of the input, only for the queries kept at the **lowest** threshold of the grid. Every
   higher threshold keeps a subset of them (``postprocess.kept_queries``: best class not "no object",
   has a category, score > threshold), and in inference mode each query's mask is computed on its own,
   so it is bit-for-bit the mask ``PanopticDETR.predict`` computes at that threshold;
2. per image, the kept masks are upsampled to the input size once (``postprocess.upsampled_masks``:
   bilinear, each query's map from its own logits only, so a subset's maps are rows of it), and one
   ``postprocess.PixelWinner`` answers every setting's per-pixel argmax: a setting that keeps a subset
   of what an earlier one kept recomputes only the pixels whose winner is gone;
3. for every setting only the pixel assignment (``postprocess.assign_segments``, what
   ``panoptic_postprocess`` runs per image) and the PQ statistics of the image
   (``evaluation.PQAccumulator``, panopticapi-exact) run, against the ground truth already in memory.
   Settings that give the same post-processing input for an image share one run: thresholds that keep
   the same queries, and the two merge modes when no stuff class is kept twice (``merge`` and
   ``reference`` differ only then).

The loop is image-major: what post-processing needs (logits, packed masks, sizes) and the image's
ground truth are held for the batch in flight only, and one ``PQAccumulator`` per setting sums the
statistics. Memory is therefore bounded by one batch (as in ``evaluate``) whatever the split's size or the
grid; nothing has to be cached across images or spilled to disk.

The result is a ``CalibrationTable``: one row per setting (PQ, SQ, RQ, PQ things, PQ stuff, as
percentages, plus TP/FP/FN totals) and ``best``. ``checkpoints.write_postprocess`` stores the best setting as
the checkpoint's ``detr_panoptic.postprocess`` record, which ``PredictorSettings.from_checkpoint`` reads.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from detr_panoptic.inference.evaluators import with_pixels
from detr_panoptic.inference.predictor import PanopticPredictor
from detr_panoptic.inference.runner import make_loader
from detr_panoptic.inference.samples import InferenceSample
from detr_panoptic.inference.tasks import EvalData, build_eval_dataset
from detr_panoptic.models.postprocess import MERGE_MODES, MIN_AREA, PostprocessSettings
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.3 .. 0.95
DEFAULT_MERGE_MODES: tuple[str, ...] = ("reference", "merge")
DEFAULT_MIN_AREAS: tuple[int, ...] = (MIN_AREA,)
# 0 is the reference (no such rule); the others drop thing queries that win less of their own mask
DEFAULT_MIN_VISIBLES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
CALIBRATION_JSON = "calibration.json"
CALIBRATION_PNG = "calibration.png"
CALIBRATED_CHECKPOINT = "calibrated.pth"


Setting = PostprocessSettings  # one post-processing setting of the grid


@dataclass
class CalibrationRow:
    """PQ of one setting over the split: percentages (0..100), ``n``: categories seen; TP/FP/FN totals."""

    setting: Setting
    pq: float
    sq: float
    rq: float
    pq_things: float
    pq_stuff: float
    n: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    results: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # pq_compute's dict
    counts: dict[int, dict[str, float]] | None = field(default=None, repr=False, compare=False)  # per category

    def to_json(self) -> dict[str, Any]:
        return {**self.setting.as_dict(), "pq": self.pq, "sq": self.sq, "rq": self.rq, "pq_things": self.pq_things,
                "pq_stuff": self.pq_stuff, "n": self.n, "tp": self.tp, "fp": self.fp, "fn": self.fn}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> CalibrationRow:
        setting = Setting(float(record["threshold"]), str(record["merge_stuff"]), int(record["min_area"]),
                          float(record.get("min_visible", 0.0)))
        return cls(setting, *(float(record[k]) for k in ("pq", "sq", "rq", "pq_things", "pq_stuff")),
                   **{k: int(record.get(k, 0)) for k in ("n", "tp", "fp", "fn")})


@dataclass
class CalibrationTable:
    """The sweep's rows (in grid order: threshold, merge mode, minimum area, minimum visible) and how it ran.

    ``best``: the row with the highest PQ; ties go to the higher threshold (fewer segments), then the
    grid order. Iterating, ``len`` and indexing go over the rows.
    """

    rows: list[CalibrationRow]
    num_images: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    postprocess_seconds: float = 0.0
    postprocess_runs: int = 0
    lowest_threshold: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[CalibrationRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> CalibrationRow:
        return self.rows[index]

    @property
    def best(self) -> CalibrationRow:
        if not self.rows:
            raise UserInputError("the calibration table is empty")
        order = {id(r): i for i, r in enumerate(self.rows)}
        return max(self.rows, key=lambda r: (r.pq, r.setting.threshold, -order[id(r)]))

    def row(self, threshold: float, merge_stuff: str = "reference", min_area: int = MIN_AREA,
            min_visible: float = 0.0) -> CalibrationRow:
        """The row of one setting (``KeyError`` when it is not on the grid)."""
        for r in self.rows:
            s = r.setting
            if math.isclose(s.threshold, threshold, abs_tol=1e-9) and s.merge_stuff == merge_stuff \
                    and s.min_area == min_area and math.isclose(s.min_visible, min_visible, abs_tol=1e-9):
                return r
        raise KeyError(f"no row for threshold {threshold}, merge_stuff {merge_stuff}, min_area {min_area}, "
                       f"min_visible {min_visible}")

    def to_json(self) -> dict[str, Any]:
        return {"best": self.best.to_json(), "rows": [r.to_json() for r in self.rows], "num_images": self.num_images,
                "seconds": round(self.seconds, 3), "forward_seconds": round(self.forward_seconds, 3),
                "postprocess_seconds": round(self.postprocess_seconds, 3),
                "postprocess_runs": self.postprocess_runs, "lowest_threshold": self.lowest_threshold, **self.info}

    @classmethod
    def from_json(cls, record: Mapping[str, Any], *, source: str = "calibration table") -> CalibrationTable:
        try:
            rows = [CalibrationRow.from_json(r) for r in record["rows"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"{source}: not a calibration table ({exc!r})") from None
        known = {"best", "rows", "num_images", "seconds", "forward_seconds", "postprocess_seconds",
                 "postprocess_runs", "lowest_threshold"}
        return cls(rows, num_images=int(record.get("num_images", 0)), seconds=float(record.get("seconds", 0.0)),
                   forward_seconds=float(record.get("forward_seconds", 0.0)),
                   postprocess_seconds=float(record.get("postprocess_seconds", 0.0)),
                   postprocess_runs=int(record.get("postprocess_runs", 0)),
                   lowest_threshold=float(record.get("lowest_threshold", 0.0)),
                   info={k: v for k, v in record.items() if k not in known})

    def format(self) -> str:
        """The table as text, the best row marked with ``*``."""
        best = self.best
        lines = [(f"{'':1} {'threshold':>9} {'merge':>9} {'min_area':>8} {'visible':>7} {'PQ':>6} {'SQ':>6} {'RQ':>6} "
                  f"{'PQ_th':>6} {'PQ_st':>6} {'TP':>5} {'FP':>5} {'FN':>5}")]
        for r in self.rows:
            s = r.setting
            lines.append(f"{'*' if r is best else ' ':1} {s.threshold:>9.2f} {s.merge_stuff:>9} {s.min_area:>8d} "
                         f"{s.min_visible:>7.2f} "
                         f"{r.pq:>6.2f} {r.sq:>6.2f} {r.rq:>6.2f} {r.pq_things:>6.2f} {r.pq_stuff:>6.2f} "
                         f"{r.tp:>5d} {r.fp:>5d} {r.fn:>5d}")
        return "\n".join(lines)


# -- the grid --------------------------------------------------------------------------------------------
def make_grid(thresholds: Sequence[float] = DEFAULT_THRESHOLDS, merge_modes: Sequence[str] = DEFAULT_MERGE_MODES,
              min_areas: Sequence[int] = DEFAULT_MIN_AREAS,
              min_visibles: Sequence[float] = DEFAULT_MIN_VISIBLES) -> list[Setting]:
    """Every combination, in order (threshold, merge mode, minimum area, minimum visible); duplicates
    dropped; checked."""
    thresholds = [float(t) for t in thresholds]
    if not thresholds or not merge_modes or not min_areas or not min_visibles:
        raise UserInputError("the calibration grid is empty: give at least one threshold, merge mode, minimum area "
                             "and minimum visible fraction")
    for t in thresholds:
        if not 0.0 <= t < 1.0:
            raise UserInputError(f"calibration threshold {t} is outside [0, 1)")
    for mode in merge_modes:
        if mode not in MERGE_MODES:
            raise UserInputError(f"merge mode {mode!r} is not one of {', '.join(MERGE_MODES)}")
    areas = []
    for area in min_areas:
        if int(area) != area or int(area) < 0:
            raise UserInputError(f"minimum segment area {area} must be an integer >= 0")
        areas.append(int(area))
    visibles = [float(v) for v in min_visibles]
    for visible in visibles:
        if not 0.0 <= visible <= 1.0:
            raise UserInputError(f"minimum visible fraction {visible} is outside [0, 1]")
    grid: list[Setting] = []
    for t in sorted(set(thresholds)):
        for mode in dict.fromkeys(merge_modes):
            for area in dict.fromkeys(areas):
                for visible in dict.fromkeys(visibles):
                    grid.append(Setting(t, mode, area, visible))
    return grid


# -- the sweep -------------------------------------------------------------------------------------------
def calibrate(predictor: PanopticPredictor, dataset: Any, *, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
              merge_modes: Sequence[str] = DEFAULT_MERGE_MODES, min_areas: Sequence[int] = DEFAULT_MIN_AREAS,
              min_visibles: Sequence[float] = DEFAULT_MIN_VISIBLES, batch_size: int = 1,
              num_workers: int | None = None, limit: int | None = None, progress: bool = False) -> CalibrationTable:
    """PQ of every post-processing setting of the grid on ``dataset`` (a ``CocoPanopticDataset`` or a
    ``Subset`` of one), each equal to ``evaluate_dataset`` with that setting (see the module docstring).

    The predictor's input size, device and precision are used; its post-processing settings are not.
    ``batch_size``: images per forward pass (padding changes the masks slightly: compare with an
    evaluation run at the same batch size). Returns a ``CalibrationTable``.
    """
    from detr_panoptic.evaluation import PQAccumulator
    from detr_panoptic.inference.tasks import default_workers, evaluation_split

    start = time.perf_counter()
    grid = make_grid(thresholds, merge_modes, min_areas, min_visibles)
    lowest = min(s.threshold for s in grid)
    samples, count, gt = evaluation_split(predictor, dataset, limit=limit, what="calibrate on")
    base = samples.dataset
    accumulators = {s: PQAccumulator(gt["categories"]) for s in grid}
    categories = next(iter(accumulators.values())).categories  # parsed once, shared by the per-image runs
    loader = make_loader(torch.utils.data.Subset(samples, list(range(count))), batch_size=batch_size,
                         num_workers=default_workers(count) if num_workers is None else num_workers)
    sweep = _Sweep(predictor, grid, lowest)
    from tqdm import tqdm

    with tqdm(total=count, unit="image", desc="calibrate", disable=not progress) as bar:
        for batch in loader:
            for sample, results in sweep.run(batch):
                for group, result in results:
                    one = PQAccumulator(categories)
                    one.add(sample.target["gt_id_map"], sample.target["gt_segments"], result.id_map,
                            with_pixels(result), image_id=sample.image_id)
                    for setting in group:
                        accumulators[setting].merge(one)
            bar.update(len(batch))
    rows = [_row(setting, accumulators[setting]) for setting in grid]
    table = CalibrationTable(rows, num_images=count, seconds=time.perf_counter() - start,
                             forward_seconds=sweep.forward_seconds, postprocess_seconds=sweep.postprocess_seconds,
                             postprocess_runs=sweep.runs, lowest_threshold=lowest,
                             info={"gt_json": str(base.json_path), "batch_size": batch_size,
                                   "input_size": [predictor.settings.min_size, predictor.settings.max_size],
                                   "dtype": str(predictor.dtype), "num_settings": len(grid)})
    log.info("calibrated %d settings on %d images in %.1f s (forward %.1f s, %d post-processing runs %.1f s): "
             "best PQ %.2f at %s", len(grid), count, table.seconds, table.forward_seconds, table.postprocess_runs,
             table.postprocess_seconds, table.best.pq, table.best.setting)
    return table


def _row(setting: Setting, accumulator: Any) -> CalibrationRow:
    results = accumulator.compute()
    totals = {k: 0.0 for k in ("tp", "fp", "fn")}
    per_category = accumulator.counts()
    for counts in per_category.values():
        for k in totals:
            totals[k] += counts[k]
    return CalibrationRow(setting, pq=100.0 * results["All"]["pq"], sq=100.0 * results["All"]["sq"],
                          rq=100.0 * results["All"]["rq"], pq_things=100.0 * results["Things"]["pq"],
                          pq_stuff=100.0 * results["Stuff"]["pq"], n=int(results["All"]["n"]),
                          **{k: round(v) for k, v in totals.items()}, results=results, counts=per_category)


class _Sweep:
    """One forward pass per batch (masks of the queries kept at the grid's lowest threshold), then every
    distinct post-processing of each image (``PanopticPostProcessor.sweep``)."""

    def __init__(self, predictor: PanopticPredictor, grid: Sequence[Setting], lowest: float) -> None:
        self.predictor = predictor
        self.grid = list(grid)
        self.lowest = lowest
        self.forward_seconds = 0.0
        self.postprocess_seconds = 0.0
        self.runs = 0

    def run(self, batch: Sequence[Any]) -> Iterator[tuple[InferenceSample, list[tuple[list[Setting], Any]]]]:
        samples = [s for s in batch if isinstance(s, InferenceSample)]
        if len(samples) != len(batch):
            raise UserInputError("calibration needs every image of the split to be readable")
        if not samples:
            return
        tick = time.perf_counter()
        output = self.predictor.forward([s.image for s in samples], mask_threshold=self.lowest)
        self.forward_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        per_image = self.predictor.postprocessor.sweep(output, self.grid, [tuple(s.orig_size) for s in samples])
        for sample, results in zip(samples, per_image):
            self.runs += len(results)
            results = [(group, result.cpu()) for group, result in results]
            self.postprocess_seconds += time.perf_counter() - tick
            yield sample, results
            tick = time.perf_counter()


# -- writing the result ----------------------------------------------------------------------------------
def write_table(table: CalibrationTable, out_dir: str | os.PathLike, *, chart: bool = True) -> dict[str, Path]:
    """``<out_dir>/calibration.json`` (atomically) and, with ``chart``, ``<out_dir>/calibration.png``."""
    out_dir = Path(out_dir)
    written = {"json": out_dir / CALIBRATION_JSON}
    atomic_write_json(written["json"], table.to_json())
    if chart:
        from detr_panoptic.visualize.charts import plot_calibration

        written["chart"] = plot_calibration(table, out_dir / CALIBRATION_PNG)
    return written


def calibrate_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, data: EvalData, *,
                         in_place: bool = False, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                         merge_modes: Sequence[str] = DEFAULT_MERGE_MODES,
                         min_areas: Sequence[int] = DEFAULT_MIN_AREAS,
                         min_visibles: Sequence[float] = DEFAULT_MIN_VISIBLES, batch_size: int = 1,
                         device: str | None = "auto", dtype: str | None = None, size: int | None = None,
                         max_size: int | None = None, limit: int | None = None, progress: bool = True
                         ) -> dict[str, Any]:
    """The ``calibrate`` command: sweep, write ``calibration.json``/``.png`` and the calibrated checkpoint
    (``<out_dir>/calibrated.pth``, or ``checkpoint`` itself with ``in_place``). Returns
    ``{"table", "json", "chart", "checkpoint"}``."""
    from detr_panoptic.checkpoints import write_postprocess
    make_grid(thresholds, merge_modes, min_areas, min_visibles)  # a bad grid fails before the model is loaded
    dataset = build_eval_dataset(data)
    predictor = PanopticPredictor.from_pretrained(checkpoint, device=device, dtype=dtype, size=size,
                                                  max_size=max_size)
    table = calibrate(predictor, dataset, thresholds=thresholds, merge_modes=merge_modes, min_areas=min_areas,
                      min_visibles=min_visibles, batch_size=batch_size, limit=limit, progress=progress)
    table.info["checkpoint"] = str(checkpoint)
    written = write_table(table, out_dir)
    target = write_postprocess(checkpoint, table.best.setting.as_dict(), in_place=in_place,
                               out=Path(out_dir) / CALIBRATED_CHECKPOINT)
    log.info("wrote %s, %s and %s", written["json"], written.get("chart"), target)
    return {"table": table, "json": written["json"], "chart": written.get("chart"), "checkpoint": target}


__all__ = [
    "CALIBRATED_CHECKPOINT",
    "CALIBRATION_JSON",
    "CALIBRATION_PNG",
    "DEFAULT_MERGE_MODES",
    "DEFAULT_MIN_AREAS",
    "DEFAULT_MIN_VISIBLES",
    "DEFAULT_THRESHOLDS",
    "CalibrationRow",
    "CalibrationTable",
    "Setting",
    "calibrate",
    "calibrate_checkpoint",
    "make_grid",
    "write_table",
]
