"""utils.parallel: the start method, and worker processes that fail (raise, get killed, die at start-up)
give an error at once instead of a hang."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from detr_panoptic.utils import parallel
from detr_panoptic.utils.parallel import WorkerDiedError, map_in_processes

REPO_ROOT = Path(__file__).resolve().parents[2]


def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"job {x} is bad")
    return x


def killed_on_two(x: int) -> int:
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    if x > 2:
        threading.Event().wait()  # forever: only a pool that gives up on the other jobs can end
    return x


@contextlib.contextmanager
def another_thread():
    """A Python thread running meanwhile: pools then start from the fork server, not by fork."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture(params=["as_started", "forkserver"])
def start(request):
    if request.param == "forkserver":
        with another_thread():
            assert parallel.start_method() != "fork"
            yield
    else:
        yield


def test_results_come_in_order(start):
    assert list(map_in_processes(square, range(7), 2)) == [x * x for x in range(7)]


def test_an_error_in_a_job_is_raised_as_it_was(start):
    with pytest.raises(ValueError, match="job 3 is bad"):
        list(map_in_processes(fail_on_three, range(6), 2))


@pytest.mark.timeout(120)  # a hang fails here
def test_a_killed_worker_fails_the_pool_instead_of_hanging(start):
    """Job 2 kills its worker and the jobs after it never end: the pool must report the death at once and
    stop the other worker, not wait for every job."""
    with pytest.raises(WorkerDiedError, match="died before returning its result"):
        list(map_in_processes(killed_on_two, range(8), 2))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is chosen on Linux only")
def test_fork_only_without_other_python_threads():
    code = ("from detr_panoptic.utils.parallel import start_method; import threading; print(start_method()); "
            "threading.Thread(target=threading.Event().wait, daemon=True).start(); print(start_method())")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    assert out[0] == "fork" and out[1] in ("forkserver", "spawn")


def test_a_worker_dying_at_start_up_is_reported_with_the_cause(tmp_path):
    # A script that starts a pool at module level, while another thread runs (so no fork): each
    # worker imports the script again and dies there. multiprocessing.Pool would replace the dead
    # workers forever; here the script ends at once with an error that says what to do.
    script = tmp_path / "pool_script.py"
    script.write_text(textwrap.dedent("""
        import threading
        from detr_panoptic.utils.parallel import map_in_processes
        from tests.utils.test_parallel import square

        threading.Thread(target=threading.Event().wait, daemon=True).start()
        print(list(map_in_processes(square, range(4), 2)))
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]))
    completed = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                               timeout=60, check=False)
    assert completed.returncode != 0
    assert "WorkerDiedError" in completed.stderr
    assert 'if __name__ == "__main__":' in completed.stderr
