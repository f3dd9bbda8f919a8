"""pq_compute's worker threads: a script without a main guard, failures in a worker, Ctrl-C, and how
many threads a set of images gets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from detr_panoptic.evaluation import pq, pq_compute
from detr_panoptic.utils.errors import UserInputError
from tests.evaluation.pq_cases import assert_same_results, reference_pq

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_script(path: Path, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``python path`` in a fresh process with the checkout's src on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]))
    return subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=path.parent, check=False, **kwargs)


def case_arguments(case) -> str:
    return ", ".join(repr(str(p)) for p in (case.gt_json_path, case.pred_json_path, case.gt_folder,
                                             case.pred_folder))


@pytest.mark.parametrize("workers", ["None", "2"])
def test_a_script_without_main_guard_works(make_case, tmp_path, workers):
    # As most users write it: the call at module level, no `if __name__ == "__main__":`. The old
    # forkserver pool imported this script again in each worker, which died, and the call waited forever.
    case = make_case(21, num_images=8)
    script = tmp_path / "evaluate_script.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import detr_panoptic

        results = detr_panoptic.pq_compute({case_arguments(case)}, workers={workers})
        print("RESULT " + json.dumps(results))
    """))
    completed = run_script(script, timeout=60)
    assert completed.returncode == 0, completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, completed.stdout  # the script ran once, not again in workers
    results = json.loads(lines[0][len("RESULT "):])
    results["per_class"] = {int(k): v for k, v in results["per_class"].items()}
    assert_same_results(results, reference_pq(case))


def test_a_decoder_raising_in_a_worker_thread_is_raised_at_once(make_case, monkeypatch):
    """The images after the failing one wait until the pool has dropped its queue: only those a thread had
    already taken (at most one per thread) are decoded; without the cancellation all would be."""
    case = make_case(3, num_images=40)
    names = [a["file_name"] for a in case.gt_json["annotations"]]
    failing = 5
    read = pq.read_id_png
    taken_after = []
    cancelled = threading.Event()

    class Pool(pq.ThreadPoolExecutor):
        """pq's pool, with ``cancelled`` set once ``shutdown`` has dropped the queued tasks (before joining)."""

        def shutdown(self, wait=True, *, cancel_futures=False):
            super().shutdown(wait=False, cancel_futures=cancel_futures)
            if cancel_futures:
                cancelled.set()
            super().shutdown(wait=wait)

    def decode(path, **kwargs):
        if "gt" in Path(path).parent.name:
            index = names.index(Path(path).name)
            if index == failing:
                raise RuntimeError(f"decoder crashed on {path}")
            if index > failing:
                taken_after.append(index)
                assert cancelled.wait(timeout=60), "the pool never dropped its queue"
        return read(path, **kwargs)

    monkeypatch.setattr(pq, "read_id_png", decode)
    monkeypatch.setattr(pq, "ThreadPoolExecutor", Pool)
    with pytest.raises(RuntimeError, match=f"decoder crashed on .*{names[failing]}"):
        pq_compute(case.gt_json_path, case.pred_json_path, case.gt_folder, case.pred_folder, workers=2)
    assert cancelled.is_set()
    assert len(taken_after) <= 2, taken_after  # the images after the failure were dropped, not all decoded
    assert not [t for t in threading.enumerate() if t.name.startswith("pq")]  # the threads are gone


def test_a_corrupt_png_in_a_worker_thread_names_the_file(make_case):
    case = make_case(4, num_images=6)
    name = case.pred_json["annotations"][4]["file_name"]
    data = (case.pred_folder / name).read_bytes()
    (case.pred_folder / name).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserInputError, match=f"{name}: cannot decode the PNG"):
        pq_compute(case.gt_json_path, case.pred_json_path, case.gt_folder, case.pred_folder, workers=2)


def test_ctrl_c_stops_promptly(make_case, tmp_path):
    """Ctrl-C arrives while both threads are inside an image (their decoders wait for it): the evaluation
    stops after those images, the other 30-odd are never decoded."""
    case = make_case(5, num_images=40, height=240, width=320)
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, threading
        import detr_panoptic
        from detr_panoptic.evaluation import pq

        read, interrupted, lock, calls = pq.read_id_png, threading.Event(), threading.Lock(), [0]

        def say(line):  # whole lines, one thread at a time
            with lock:
                sys.stdout.write(line + "\\n")
                sys.stdout.flush()

        def decode(path, **kwargs):
            with lock:
                calls[0] += 1
                call = calls[0]
            if call in (9, 10):  # both threads (two decodes per image) are inside an image
                say("inside")
            if call >= 9:
                interrupted.wait(timeout=60)
                say("decoded after Ctrl-C")
            return read(path, **kwargs)

        def on_sigint(signum, frame):
            interrupted.set()
            raise KeyboardInterrupt

        pq.read_id_png = decode
        signal.signal(signal.SIGINT, on_sigint)
        print("started", flush=True)
        while True:
            detr_panoptic.pq_compute({case_arguments(case)}, workers=2)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]))
    process = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "started"
        assert [process.stdout.readline().strip() for _ in range(2)] == ["inside", "inside"]
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert "KeyboardInterrupt" in stderr
    # the images being decoded are finished (each thread may have taken one more before the queue was
    # dropped), the rest of the 40 are not
    assert stdout.count("decoded after Ctrl-C") <= 8, stdout


def fake_pairs(tmp_path: Path, count: int, height: int, width: int) -> list:
    from detr_panoptic.evaluation import write_id_png

    write_id_png(tmp_path / "first.png", np.ones((height, width), np.int64))
    return [({"image_id": i, "file_name": "first.png"}, {"image_id": i}) for i in range(count)]


def test_small_sets_get_one_thread_large_ones_all_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(pq, "available_cores", lambda: 4)
    # 2 x 48 x 64 pixels per image: even 100 images are less work than one thread's share.
    assert pq.choose_workers(fake_pairs(tmp_path, 100, 48, 64), str(tmp_path)) == 1
    assert pq.choose_workers(fake_pairs(tmp_path, 1, 1024, 2048), str(tmp_path)) == 1  # one image
    assert pq.choose_workers(fake_pairs(tmp_path, 2, 1024, 2048), str(tmp_path)) == 2
    assert pq.choose_workers(fake_pairs(tmp_path, 16, 1024, 2048), str(tmp_path)) == 4  # the cores
    assert pq.choose_workers(fake_pairs(tmp_path, 5, 512, 512), str(tmp_path)) == 2  # 2.6 M pixels
    assert pq.choose_workers([], str(tmp_path)) == 1


def test_workers_overrides_the_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(pq, "available_cores", lambda: 4)
    pairs = fake_pairs(tmp_path, 100, 48, 64)
    assert pq.choose_workers(pairs, str(tmp_path), 3) == 3
    assert pq.choose_workers(pairs, str(tmp_path), 0) == 1
    assert pq.choose_workers(pairs[:2], str(tmp_path), 8) == 2  # never more than one per image
    missing = [({"image_id": 0, "file_name": "nowhere.png"}, {})] * 8  # unreadable: counted as large
    assert pq.choose_workers(missing, str(tmp_path)) == 4


def test_a_small_set_runs_in_the_calling_thread(make_case, monkeypatch):
    case = make_case(6, num_images=5)
    threads = []
    pair_stats = pq._pair_stats
    monkeypatch.setattr(pq, "_pair_stats", lambda *args: threads.append(threading.get_ident()) or pair_stats(*args))
    assert_same_results(pq_compute(case.gt_json_path, case.pred_json_path, case.gt_folder, case.pred_folder),
                        reference_pq(case))
    assert set(threads) == {threading.get_ident()}
