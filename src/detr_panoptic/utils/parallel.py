"""Worker pools that cannot hang: safe to start from a busy process and from a script without a main guard.

Two hazards decide how worker processes start:

* ``fork`` copies the parent with whatever locks its other threads hold at that moment (PyTorch's
  OpenMP pool, TensorBoard writers, a prefetching thread, tqdm's monitor), and a child that then
  needs such a lock waits forever. A process with a single thread has no such locks to copy.
* ``forkserver`` and ``spawn`` start every worker by importing the caller's ``__main__`` again. A
  script that calls a pool at module level (no ``if __name__ == "__main__":``) runs again in each
  worker, whose own pool start then fails: the worker dies during start-up.

So ``process_context()`` forks where that is safe (Linux, no other Python thread): no import,
no main module run again, the cheapest start. Elsewhere it starts workers from a ``forkserver`` (a
small single-threaded server that forks them), else ``spawn``. ``process_pool`` and ``map_in_processes``
run jobs on a ``concurrent.futures.ProcessPoolExecutor`` (never ``multiprocessing.Pool``, which
replaces a worker that dies at start-up by another forever and never reports it): a worker that dies,
at start-up or later, fails the pool within moments with ``WorkerDiedError``, which says what
happened and what to do.

Work that releases the GIL (the evaluator's PNG decoding) uses threads instead and starts no process
at all (``evaluation.pq``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing.context import BaseContext

# multiprocessing and concurrent.futures.process are imported where a pool starts: the evaluator,
# which only asks for available_cores(), starts no process and need not pay their import (~10 ms).

# Imported once by the fork server, so that every worker starts with them already loaded (a worker
# forked from the server pays no import time: pools over a few images stay cheap).
_PRELOAD = ["numpy", "PIL.Image", "PIL.PngImagePlugin", "detr_panoptic.data.cityscapes",
            "detr_panoptic.evaluation.pq"]


class WorkerDiedError(RuntimeError):
    """A pool's worker process ended without returning its job's result."""


def available_cores() -> int:
    """Cores this process may run on (the CPU affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def start_method() -> str:
    """The start method ``process_context()`` uses now: ``fork`` on Linux when this process runs no
    other Python thread, else ``forkserver`` where it exists, else ``spawn``.

    The jobs of this package's pools use numpy, Pillow, zlib-ng, libvips and our C code, never torch:
    forking is safe for them unless another Python thread may hold a lock the child needs (logging,
    stdout, a queue; TensorBoard's writer is such a thread; tqdm's monitor is not, see
    ``_HARMLESS_THREADS``). The C libraries'
    own threads are no hazard to these jobs: OpenBLAS and glibc's malloc re-arm their locks at fork,
    ``utils.png`` stops using libvips in a child forked after libvips started its threads, and
    torch's thread pool is never entered by a job.
    """
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods and not _other_python_threads():
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


# Threads that hold no lock a pool job needs: tqdm's monitor sleeps on an event and, awake, touches
# only tqdm's own bars (jobs never use tqdm); it outlives the bars that started it.
_HARMLESS_THREADS = ("tqdm_monitor",)


def _other_python_threads() -> list[threading.Thread]:
    current = threading.current_thread()
    return [t for t in threading.enumerate() if t is not current and t.name not in _HARMLESS_THREADS]


def process_context() -> BaseContext:
    """The multiprocessing context for a pool started now (see ``start_method``)."""
    import multiprocessing

    method = start_method()
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(_PRELOAD)
    return context


def process_pool(workers: int, **kwargs: Any) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes started by ``process_context()``.

    Raises ``RuntimeError`` in a worker process that is still importing the main script (a script
    that starts a pool at module level, without ``if __name__ == "__main__":``, run again by a
    forkserver or spawn worker): such a worker would otherwise start a pool of its own and redo the
    script's work; this way it dies at start-up and the parent's pool reports ``WorkerDiedError``.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if getattr(multiprocessing.current_process(), "_inheriting", False):  # multiprocessing's own test
        raise RuntimeError("a process pool was started while a worker process was importing the main "
                           "script: put the script's work under `if __name__ == \"__main__\":`")
    return ProcessPoolExecutor(max_workers=workers, mp_context=process_context(), **kwargs)


def map_in_processes(function: Callable[[Any], Any], jobs: Iterable[Any], workers: int) -> Iterator[Any]:
    """``function(job)`` for every job, in order, computed by ``workers`` processes.

    The pool starts and every job is queued here, before the first result is asked for: start it
    before starting threads of your own (a progress bar's monitor), so that it may fork. Iterate the
    result to the end or ``close()`` it. An exception in a job is raised there as it was raised in
    the worker. A worker that dies (killed, crashed, or failed at start-up) raises
    ``WorkerDiedError`` at once. On any error, on Ctrl-C and on ``close()``, the jobs not yet started
    are dropped and the pool is shut down.
    """
    from concurrent.futures.process import BrokenProcessPool

    method = start_method()  # for the error message: the one process_pool uses just after
    pool = process_pool(workers)
    try:
        futures = [pool.submit(function, job) for job in jobs]
    except BaseException as exc:
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(exc, BrokenProcessPool):  # a worker died at start-up
            raise WorkerDiedError(_died_message(method)) from exc
        raise
    return _Results(pool, futures, method)


class _Results:
    """The results of ``map_in_processes``: an iterator whose ``close()`` shuts the pool down even
    before the first result (a generator's would not run then)."""

    def __init__(self, pool: ProcessPoolExecutor, futures: list[Any], method: str) -> None:
        self._pool, self._futures, self._method = pool, iter(futures), method

    def __iter__(self) -> _Results:
        return self

    def __next__(self) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        try:
            future = next(self._futures)
        except StopIteration:
            self.close()
            raise
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self.close()
            raise WorkerDiedError(_died_message(self._method)) from exc
        except BaseException:  # an error in the job, Ctrl-C while waiting
            self.close()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __del__(self) -> None:  # dropped without close(): stop the queued jobs, do not wait
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=False, cancel_futures=True)


def _died_message(method: str) -> str:
    message = ("a worker process died before returning its result (killed, out of memory, crashed, "
               f"or failed at start-up; started by {method!r})")
    if method != "fork":
        message += (": if this runs from a script that calls it at module level, put the call under "
                    "`if __name__ == \"__main__\":` (each worker imports the script again), or use workers=1")
    return message
