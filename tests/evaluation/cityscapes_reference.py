"""cityscapesScripts' pixel-level and instance-level evaluators, run on a results folder with the
least patching that lets them run on today's numpy (for the equivalence tests and bench/).

Patches, each undone afterwards: ``np.in1d`` (removed in numpy 2.4) -> ``np.isin`` (same values; the
callers reshape the result); the evaluators' JSON writers (``writeDict2JSON``: numpy integers break it,
and the instance evaluator writes ``matches.json`` into the working folder and a ground-truth cache
beside its own module) -> nothing; results are taken from the returned dicts."""
from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def patched(*modules: Any) -> Iterator[None]:
    had_in1d = hasattr(np, "in1d")
    saved_in1d = getattr(np, "in1d", None)
    saved = [(m, m.writeDict2JSON) for m in modules]
    np.in1d = np.isin
    for module, _ in saved:
        module.writeDict2JSON = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for module, writer in saved:
            module.writeDict2JSON = writer
        if had_in1d:
            np.in1d = saved_in1d
        else:
            del np.in1d


def reference_pixel_level(semantic_dir: str | os.PathLike, root: str | os.PathLike, split: str = "val"
                          ) -> dict[str, Any]:
    """``evaluateImgLists``' result dict (classScores, classInstScores, categoryScores, ..., averageScore*)."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as pixel

    args = pixel.args
    args.quiet, args.JSONOutput, args.evalPixelAccuracy, args.evalInstLevelScore = True, False, False, True
    args.predictionPath, args.predictionWalk = str(semantic_dir), None
    gt = sorted(glob.glob(os.path.join(str(root), "gtFine", split, "*", "*_gtFine_labelIds.png")))
    with patched(pixel):
        predictions = [pixel.getPrediction(args, g) for g in gt]
        return pixel.evaluateImgLists(predictions, gt, args)


def reference_instance_level(instance_dir: str | os.PathLike, root: str | os.PathLike, split: str = "val",
                             *, cache: str | os.PathLike) -> dict[str, Any]:
    """``evaluateImgLists``' result dict (``averages``: allAp, allAp50%, classes)."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as instance

    args = instance.args
    args.quiet, args.JSONOutput, args.distanceAvailable = True, False, False
    args.gtInstancesFile = str(Path(cache) / "gtInstances_never_written.json")
    args.predictionPath, args.predictionWalk = os.path.abspath(str(instance_dir)), None
    gt = sorted(glob.glob(os.path.join(os.path.abspath(str(root)), "gtFine", split, "*", "*_gtFine_instanceIds.png")))
    with patched(instance):
        predictions = [instance.getPrediction(g, args) for g in gt]
        return instance.evaluateImgLists(predictions, gt, args)
