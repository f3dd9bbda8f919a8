"""The demo: the whole system on generated data, on a laptop CPU, with no download.

``run_demo(out)`` (``detr-panoptic demo``, ``make demo``) runs, each phase timed and resumable:

1. **data**: a synthetic Cityscapes tree (``data.synthetic``) converted to COCO panoptic by our converter
   (``data.cityscapes.convert_cityscapes``); and a *source domain* standing in for COCO: other scenes from
   the same generator, labelled with a different, coarser, COCO-style label set (``SOURCE_LABELS``: COCO
   panoptic ids and names such as ``person`` for persons and riders, ``building-other-merged`` for
   buildings and walls, ``stop sign`` as a *thing*; no pole class), written as a COCO panoptic dataset.
2. **start point**: ``init`` (a real checkpoint: file, URL or alias, ``checkpoints.load_pretrained``), else
   the config's ``demo.start_point`` (the demo's: ``resources/demo_start_point.safetensors``, a source-domain
   model pre-trained by this very pipeline with ``pretrain_only``), else (or with ``pretrain``) a
   pre-training on the source domain in this run (backbone included: there are no ImageNet weights
   offline), saved in the official checkpoint format (``{"model": state_dict}``, official keys, plus our
   metadata) as ``<out>/source_model.pth``.
3. **fine-tuning** with the training engine (``engine.training.train``) on a chained config: ``stage1``
   (transformer frozen: heads train) from the start point with the class head adapted to the Cityscapes
   classes, then ``stage2`` (attention frozen) from stage 1's best checkpoint; backbone frozen, as in the
   recipe.
4. **evaluation**: PQ on the synthetic val split (``inference.evaluate_dataset``: predictions written in
   COCO panoptic format, panopticapi-exact PQ) of the start point, stage 1 and stage 2; with
   ``demo.calibrate_images``, ``inference.calibrate`` on that many *train* images, the best setting stored
   in a copy of the final checkpoint and evaluated on val; overlays, attention maps, curves and the HTML
   report of the final (calibrated) model.

The recipe's settings live in the shipped config ``demo`` (``demo_quick`` for ``quick``; files under
``detr_panoptic/configs/``, found by ``config.find_config``): a normal
chained ``Config`` (stages ``pretrain``, ``stage1``, ``stage2``) plus a ``demo:`` section read here
(``DemoSettings``: image size and counts, what the scenes hold, how many pictures, time budgets per
phase). The demo departs from the reference recipe where a CPU forces it, and says so in the config:
small ResNet-18 model, low resolution, scenes without structures thinner than the mask head resolves,
batch 2 with a higher learning rate, 1,700 pre-training steps. The pre-training starts from random
weights, so the demo initialises them for it: the backbone's frozen batch norms are calibrated on the data
(``calibrate_frozen_batchnorm``) and then train as batch norms (``freeze.batch_norm: false``), and the mask
head's weights on the query attention maps are amplified (``amplify_mask_attention``); without the latter
every query predicts the same mask for far longer than the demo trains.

Outputs under ``out``::

    data/cityscapes/  data/source/     the generated data (Cityscapes layout; COCO panoptic)
    source_model.pth                   the source-domain model, official checkpoint format
    pretrain/ stage1/ stage2/          training run folders (config.yaml, metrics.jsonl, checkpoints/)
    eval/{start,stage1,stage2}/        predictions + metrics.json per evaluated model
    summary/                           what the report shows: overlays/, attention/, plots/, metrics
    metrics.json  report.html          the summary (final pq, sq, rq, pq_things, pq_stuff; per stage)

Re-running with the same settings reuses finished phases (data, trained stages); different settings in
the same folder are refused rather than mixed.

The modules: ``settings`` (the config, the run folder's fingerprint), ``data`` (target and source domains),
``start`` (the pre-training's initialisation, the start point exports), ``report`` (summary, figures,
report, benchmark record); this one runs the phases in order (``run_demo``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from detr_panoptic.config import Config, find_config
from detr_panoptic.demo.data import (
    SOURCE_LABELS,
    MemoryDataset,
    prepare_source_data,
    prepare_target_data,
    source_categories,
    source_segments,
)
from detr_panoptic.demo.report import (
    PHASES,
    bench_record,
    flat_metrics,
    last_val_metrics,
    load_average,
    packaged_source_metrics,
    pq_table,
    summarise,
    val_curve,
    write_figures,
    write_report,
)
from detr_panoptic.demo.settings import (
    DemoSettings,
    check_run_folder,
    demo_config_path,
    demo_configs,
    load_demo_config,
    run_fingerprint,
    start_point_path,
)
from detr_panoptic.demo.start import (
    amplify_mask_attention,
    calibrate_frozen_batchnorm,
    export_source_model,
    export_start_point,
    random_calibrated_init,
)
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_json, file_digest

log = logging.getLogger(__name__)

__all__ = ["PHASES", "SOURCE_LABELS", "DemoSettings", "MemoryDataset", "PhaseTimer", "amplify_mask_attention",
           "bench_record", "calibrate_frozen_batchnorm", "demo_config_path", "demo_configs", "export_source_model",
           "export_start_point", "load_demo_config", "pq_table", "prepare_source_data", "prepare_target_data",
           "random_calibrated_init", "run_demo", "source_categories", "source_segments", "start_point_path"]


@dataclass
class PhaseTimer:
    budgets: Mapping[str, float]
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        log.info("demo: %s ...", name)
        try:
            return fn()
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 2)
            budget = self.budgets.get(name)
            if budget is not None and elapsed > budget:
                log.warning("demo: phase %s took %.0f s, over its %.0f s budget", name, elapsed, budget)
            else:
                log.info("demo: %s done in %.1f s", name, elapsed)


@dataclass
class DemoRun:
    """One demo run: its inputs, and what the phases hand on to each other."""

    out: Path
    settings: DemoSettings
    raw: dict[str, Any]
    config_path: Path
    init: str | None
    packaged_start: Path | None
    device: str
    seed: int
    workers: int
    progress: bool
    quick: bool
    timer: PhaseTimer
    clock: tuple[float, float] = field(default_factory=lambda: (time.perf_counter(), time.process_time()))
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_pq: dict[str, Any] | None = None
    stages: list[Config] = field(default_factory=list)
    datasets: dict[str, Any] = field(default_factory=dict)  # "train", "val" of the target domain
    pretrain_init: str | None = None  # --pretrain-only --init: the model the pre-training continues from

    @property
    def eval_threshold(self) -> float:
        return self.stages[0].train.eval_threshold

    @property
    def final_checkpoint(self) -> Path:
        return Path(self.stages[-1].train.output_dir) / "checkpoints" / "best.pth"

    # -- the phases --------------------------------------------------------------------------------------------
    def prepare_data(self) -> dict[str, Path]:
        """The target domain; the source domain too when this run pre-trains."""
        target_root, source_root = self.out / "data" / "cityscapes", self.out / "data" / "source"
        prepare_target_data(target_root, self.settings, seed=self.seed, workers=self.workers)
        if self.init is None:
            return prepare_source_data(source_root, self.settings, seed=self.seed)
        return {s: source_root / f"panoptic_{s}.json" for s in ("train", "val")}

    def pretrain(self, config: Config) -> Path:
        """Pre-train on the source domain (from a calibrated random initialisation); the source model."""
        from detr_panoptic.data.coco_panoptic import CocoPanopticDataset
        from detr_panoptic.engine.training import train

        d = config.data
        train_set = CocoPanopticDataset(d.train_json, d.train_panoptic_dir, d.train_image_dir,
                                        min_size=d.min_size, max_size=d.max_size)
        val_set = CocoPanopticDataset(d.val_json, d.val_panoptic_dir, d.val_image_dir,
                                      category_map=train_set.category_map, min_size=d.min_size, max_size=d.max_size)
        memory_train = MemoryDataset(train_set)
        check_pretrain_length(config)
        if self.pretrain_init is not None:  # --pretrain-only --init: continue from that model
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, init=self.pretrain_init))
        if config.model.init is None:  # random weights: calibrate the backbone's frozen norms first
            init_path = self.out / "pretrain_init.pth"
            if not init_path.is_file():
                images = [memory_train[i][0] for i in range(min(16, len(memory_train)))]
                init_path = random_calibrated_init(init_path, config, train_set.category_map, images,
                                                   mask_attention_gain=self.settings.mask_attention_gain)
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, init=str(init_path)))
        result = train(config, datasets=(memory_train, val_set, train_set.category_map))[0]
        target = self.out / "source_model.pth"
        if not target.is_file() or target.stat().st_mtime < result.last_checkpoint.stat().st_mtime:
            export_source_model(result.last_checkpoint, target)
        self.source_pq = last_val_metrics(self.out / "pretrain" / "metrics.jsonl")
        return target

    def finish_pretrain_only(self, config: Config) -> dict[str, Any]:
        """``pretrain_only``: the source model as the fp16 start point, with how it was made."""
        threads = torch.get_num_threads()
        about = {"source_domain": self.source_pq, "seed": self.seed, "config": self.config_path.name,
                 "steps": config.train.max_steps, "built": time.strftime("%Y-%m-%d"),
                 "command": f"OMP_NUM_THREADS={threads} detr-panoptic demo --pretrain-only "
                            f"--config {self.config_path.stem} --seed {self.seed}"
                            + (f" --init {Path(self.pretrain_init).name}" if self.pretrain_init else ""),
                 "threads": threads,  # CPU training is bit-reproducible for a thread count
                 "seconds": round(self.timer.seconds.get("pretrain", 0.0), 1),  # this process's share
                 **val_curve(self.out / "pretrain" / "metrics.jsonl")}
        if self.pretrain_init is not None:
            about["continued_from"] = continued_from(self.pretrain_init)
        weights = export_start_point(self.out / "source_model.pth", self.out / "source_model.safetensors",
                                     about=about)
        summary = {"source_domain": self.source_pq, "source_model": str(weights),
                   "seconds": dict(self.timer.seconds, total=round(time.perf_counter() - self.clock[0], 1)),
                   "config": str(self.config_path), "seed": self.seed, "settings": self.settings.to_dict()}
        atomic_write_json(self.out / "metrics.json", summary)
        return summary

    def load_target(self) -> None:
        from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset

        data, root = self.stages[0].data, self.out / "data" / "cityscapes"
        train_set = cityscapes_panoptic_dataset(root, "train", min_size=data.min_size, max_size=data.max_size)
        self.datasets = {"train": train_set, "val": cityscapes_panoptic_dataset(
            root, "val", category_map=train_set.category_map, min_size=data.min_size, max_size=data.max_size)}

    def _evaluate(self, name: str, predictor: Any, **extra: Any) -> None:
        from detr_panoptic.inference import evaluate_dataset

        self.evaluations[name] = evaluate_dataset(predictor, self.datasets["val"], self.out / "eval" / name,
                                                  batch_size=4, workers=1, progress=False, chart=False,
                                                  **extra)["metrics"]

    def evaluate_start(self) -> None:
        """PQ of the model stage 1 starts from (its class head adapted, not yet trained)."""
        from detr_panoptic.engine.training import build_model
        from detr_panoptic.inference import PanopticPredictor, PredictorSettings

        first, category_map = self.stages[0], self.datasets["train"].category_map
        torch.manual_seed(first.train.seed)
        model = build_model(first.model, category_map)
        settings = PredictorSettings(category_map, min_size=first.data.min_size, max_size=first.data.max_size,
                                     threshold=self.eval_threshold)
        self._evaluate("start", PanopticPredictor(model, settings, device=self.device))

    def finetune(self, config: Config, train_set: MemoryDataset) -> None:
        from detr_panoptic.engine.training import train

        train(config, datasets=(train_set, self.datasets["val"], self.datasets["train"].category_map))

    def evaluate_stages(self) -> None:
        from detr_panoptic.inference import PanopticPredictor

        for stage in self.stages:
            best = Path(stage.train.output_dir) / "checkpoints" / "best.pth"
            predictor = PanopticPredictor.from_pretrained(best, device=self.device, threshold=self.eval_threshold)
            self._evaluate(stage.name.split("/")[-1], predictor, extra_metrics={"checkpoint": str(best)})

    def calibrate(self) -> dict[str, Any]:
        """``calibrate`` on train images, the best setting stored in a copy of the final checkpoint, evaluated."""
        from detr_panoptic.checkpoints import write_postprocess
        from detr_panoptic.inference import PanopticPredictor
        from detr_panoptic.inference.calibrate import calibrate, write_table

        train_set = self.datasets["train"]
        count = min(self.settings.calibrate_images, len(train_set))
        table = calibrate(PanopticPredictor.from_pretrained(self.final_checkpoint, device=self.device),
                          torch.utils.data.Subset(train_set, list(range(count))), batch_size=4, num_workers=0)
        written = write_table(table, self.out / "summary")  # the report draws summary/calibration.{json,png}
        calibrated = write_postprocess(self.final_checkpoint, table.best.setting.as_dict(),
                                       out=self.out / "calibration" / "calibrated.pth")
        predictor = PanopticPredictor.from_pretrained(calibrated, device=self.device)  # the stored setting applies
        self._evaluate("calibrated", predictor, extra_metrics={"checkpoint": str(calibrated)})
        return {**flat_metrics(self.evaluations["calibrated"]), "setting": table.best.setting.as_dict(),
                "train_images": count, "checkpoint": str(calibrated), "chart": str(written.get("chart", ""))}

    def report(self, calibrated: dict[str, Any] | None) -> dict[str, Any]:
        """Figures of the final (calibrated) model, ``summary/``, ``report.html`` and ``metrics.json``."""
        summary_dir = self.out / "summary"
        summary = summarise(self.evaluations, source_pq=self.source_pq, settings=self.settings,
                            config_path=self.config_path, init=self.init, seed=self.seed,
                            final_checkpoint=self.final_checkpoint, quick=self.quick)
        if self.packaged_start is not None:
            summary["init"] = (f"start point {self.packaged_start.name} (demo.start_point; `detr-panoptic demo "
                               f"--pretrain-only` rebuilds it)")
            summary["source_domain"] = packaged_source_metrics(self.packaged_start)
        summary["threshold"] = self.eval_threshold  # class-score threshold of the per-stage evaluations
        if calibrated is not None:
            summary["calibrated"] = calibrated
            # the top level is the model the report shows: stage 2 with its calibrated post-processing
            summary.update(flat_metrics(self.evaluations["calibrated"]), checkpoint=calibrated["checkpoint"])
        summary["final"] = "calibrated" if calibrated is not None else "stage2"
        # The pictures show the final model with the calibrated post-processing when there is one.
        checkpoint = Path(calibrated["checkpoint"]) if calibrated is not None else self.final_checkpoint
        threshold = None if calibrated is not None else self.eval_threshold
        self.timer.run("figures", lambda: write_figures(checkpoint, self.datasets["val"], summary_dir, self.settings,
                                                        self.stages, device=self.device, threshold=threshold))
        summary["seconds"] = dict(self.timer.seconds, total=round(time.perf_counter() - self.clock[0], 1))
        summary["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                              "platform": platform.platform(), "load_average": load_average()}
        atomic_write_json(summary_dir / "metrics.json", {k: v for k, v in summary.items() if k != "stages"} |
                          {"per_class": self.evaluations[summary["final"]].get("per_class", {})})
        write_report(summary_dir, self.out / "report.html", summary)
        summary["seconds"]["total"] = round(time.perf_counter() - self.clock[0], 1)
        # CPU seconds of this process (all its threads; not the data-conversion workers): on a machine shared
        # with other jobs, wall time grows but this does not.
        summary["cpu_seconds"] = round(time.process_time() - self.clock[1], 1)
        atomic_write_json(self.out / "metrics.json", summary)
        return summary


def continued_from(init: str) -> dict[str, Any]:
    """What a continued pre-training (``--pretrain-only --init``) started from: the file and its digest, and
    how that model was made when its sidecar says (a start point's ``demo`` record, its curve left out)."""
    from detr_panoptic.checkpoints import sidecar_path

    record: dict[str, Any] = {"init": init}
    if Path(init).is_file():
        record["sha256"] = file_digest(init)
        try:
            made = json.loads(sidecar_path(init).read_text()).get("demo", {})
        except (OSError, ValueError):
            made = {}
        record.update({k: v for k, v in made.items() if k != "source_val_curve"} if isinstance(made, dict) else {})
    return record


def check_pretrain_length(config: Config) -> None:
    """A pre-training run folder resumed with another ``max_steps`` (wsd only: ``run_fingerprint`` lets it
    through) must not have begun the decay of either length: until then its rates equal a run configured with
    the new length from the start; after, they would not."""
    import yaml

    tc, folder = config.train, Path(config.train.output_dir)
    last, saved = folder / "checkpoints" / "last.pth", folder / "config.yaml"
    if tc.scheduler != "wsd" or not (last.is_file() and saved.is_file()):
        return
    old = (yaml.safe_load(saved.read_text()).get("train") or {}).get("max_steps")
    if old is None or old == tc.max_steps:
        return
    step = int(torch.load(last, map_location="cpu", weights_only=True)["step"])
    if step > min(old, tc.max_steps) - tc.decay_steps:
        raise UserInputError(f"{folder}: this pre-training ran {step} steps of max_steps {old}; with max_steps "
                             f"{tc.max_steps} its rate would differ from step {min(old, tc.max_steps) - tc.decay_steps} "
                             f"on (the last {tc.decay_steps} steps fall), so it cannot be resumed with that length; "
                             f"use another --out")
    log.info("demo: pre-training resumed at step %d with max_steps %d instead of %d (wsd: still in its stable "
             "part, so it ends as if configured so)", step, tc.max_steps, old)


def _open_run(out: Path, *, quick: bool, init: str | None, device: str, seed: int,
              config_path: str | os.PathLike | None, workers: int | None, progress: bool, pretrain: bool,
              pretrain_only: bool) -> DemoRun:
    """The run's settings, checked (device, options, the folder's earlier settings) before any work."""
    from detr_panoptic.utils.devices import resolve_device

    clock = (time.perf_counter(), time.process_time())
    path = find_config(config_path) if config_path is not None else demo_config_path(quick)
    settings, raw = load_demo_config(path)
    resolve_device(device)  # fail early on a bad device
    if init is not None and pretrain:
        raise UserInputError("demo: --init gives the start point; it cannot be combined with --pretrain (with "
                             "--pretrain-only it is the model the pre-training continues from)")
    packaged_start, pretrain_init, key = None, None, init
    if pretrain_only and init is not None:  # continue the pre-training from init (a packaged name or a path)
        pretrain_init, init = str(resolve_start(init)), None
        key = "pretrain from " + (file_digest(pretrain_init) if Path(pretrain_init).is_file() else pretrain_init)
    elif init is None and not (pretrain or pretrain_only) and settings.start_point:
        packaged_start = start_point_path(settings.start_point)
        init, key = str(packaged_start), file_digest(packaged_start)
    fingerprint = run_fingerprint(settings, raw, seed=seed, init=key)
    out.mkdir(parents=True, exist_ok=True)
    check_run_folder(out, fingerprint)
    return DemoRun(out, settings, raw, path, init, packaged_start, device, seed,
                   workers if workers is not None else min(2, os.cpu_count() or 1), progress, quick,
                   PhaseTimer(settings.budgets), clock=clock, pretrain_init=pretrain_init)


def resolve_start(name: str) -> str | Path:
    """``--init`` of a continued pre-training: a packaged start point's name, else as given (a file, URL or
    alias, ``checkpoints.load_pretrained``)."""
    try:
        return start_point_path(name)
    except UserInputError:
        return name


def run_demo(out: str | os.PathLike = "runs/demo", *, quick: bool = False, init: str | None = None,
             device: str = "auto", seed: int = 0, config_path: str | os.PathLike | None = None,
             workers: int | None = None, progress: bool = True, pretrain: bool = False,
             pretrain_only: bool = False) -> dict[str, Any]:
    """Run the demo into ``out`` (see the module docstring); returns the summary written to
    ``<out>/metrics.json`` (final ``pq, sq, rq, pq_things, pq_stuff``, ``stages``, ``seconds``).

    The start point is ``init`` if given, else the config's packaged ``demo.start_point`` (unless
    ``pretrain``), else a pre-training on the source domain in this run.
    ``pretrain_only``: generate the source domain, pre-train on it and stop, with the source model also
    written as ``<out>/source_model.safetensors`` in fp16 (how the packaged start point is rebuilt);
    the summary then holds ``source_domain`` and ``seconds`` only."""
    run = _open_run(Path(out), quick=quick, init=init, device=device, seed=seed, config_path=config_path,
                    workers=workers, progress=progress, pretrain=pretrain, pretrain_only=pretrain_only)
    source = run.timer.run("data", run.prepare_data)
    pretrain_config, finetune_config = demo_configs(run.raw, out=run.out, target_root=run.out / "data" / "cityscapes",
                                                    source=source, init=run.init, device=device, seed=seed,
                                                    progress=progress)
    run.stages = finetune_config.resolve_stages()
    if run.init is None:
        run.timer.run("pretrain", lambda: run.pretrain(pretrain_config))
    if pretrain_only:
        return run.finish_pretrain_only(pretrain_config)
    run.load_target()
    run.timer.run("start", run.evaluate_start)
    memory_train = MemoryDataset(run.datasets["train"])  # decoded once; not counted as fine-tuning time
    run.timer.run("finetune", lambda: run.finetune(finetune_config, memory_train))
    run.timer.run("evaluate", run.evaluate_stages)
    calibrated = run.timer.run("calibrate", run.calibrate) if run.settings.calibrate_images else None
    return run.report(calibrated)
