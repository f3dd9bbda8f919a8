"""Process pools that are safe to start from a busy process.

``fork`` copies the parent with whatever locks its other threads hold at that moment (PyTorch's
OpenMP pool, TensorBoard writers, a prefetching thread, tqdm's monitor), and a child that then
needs such a lock waits forever. Pools here start from a ``forkserver``: a small single-threaded
server that forks the workers, cheap after the first pool. Where it does not exist, ``spawn``.
"""
from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

# Imported once by the fork server, so that every worker starts with them already loaded (a worker
# forked from the server pays no import time: pools over a few images stay cheap).
_PRELOAD = ["numpy", "PIL.Image", "PIL.PngImagePlugin", "detr_panoptic.data.cityscapes",
            "detr_panoptic.evaluation.pq"]


def process_context() -> BaseContext:
    """The multiprocessing context for every pool in this package."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")
