"""The app's API through ``gradio_client`` against a page served on 127.0.0.1: results equal ``predict``'s,
post-processing without a new forward, attention, downloads, and bad input answered in the page."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file

pytestmark = pytest.mark.timeout(300)  # a bound, not a speed test: a loaded 2-core machine is slow

DEFAULTS = {"threshold": 0.3, "merge": "reference", "min_area": 4, "min_visible": 0.0, "opacity": 0.55, "things": True,
            "stuff": True}


@pytest.fixture(scope="module")
def client(served):
    return Client(served.url, verbose=False, download_files=served.work_dir / "downloads")


def analyse(client, path, checkpoint: str = "toy", **changes):
    s = {**DEFAULTS, **changes}
    return client.predict(handle_file(str(path)), checkpoint, s["threshold"], s["merge"], s["min_area"],
                          s["min_visible"], s["opacity"], s["things"], s["stuff"], api_name="/analyse")


def postprocess(client, **changes):
    s = {**DEFAULTS, **changes}
    return client.predict(s["threshold"], s["merge"], s["min_area"], s["min_visible"], s["opacity"], s["things"],
                          s["stuff"], api_name="/postprocess")


def rows(outputs) -> list[list]:
    return outputs[2]["data"]


def expected_rows(served, path, **settings) -> list[tuple]:
    count = served.counter.count
    result = served.predictor.with_settings(**settings)(path)[0]
    served.counter.count = count  # the reference prediction's own forward is not the app's
    return [(s["id"], s["area"], s["query"]) for s in result.segments_info if s["area"] > 0]


def test_upload_then_settings_then_attention_with_one_forward(served, client, street):
    before = served.counter.count
    first = analyse(client, street)
    assert served.counter.count == before + 1
    overlay, _legend, _table, _segment, _downloads, status, attention = first
    assert Image.open(overlay).size == Image.open(street).size
    assert [(r[0], r[4], r[6]) for r in rows(first)] == expected_rows(served, street, threshold=0.3)
    assert f"{len(rows(first))} segments (threshold 0.30" in status and "device cpu" in status
    assert attention is None

    higher = postprocess(client, threshold=0.9)
    assert [(r[0], r[4], r[6]) for r in rows(higher)] == expected_rows(served, street, threshold=0.9)
    assert 0 < len(rows(higher)) < len(rows(first))
    merged = postprocess(client, threshold=0.5, merge="merge", min_area=50)
    assert [(r[0], r[4], r[6]) for r in rows(merged)] == \
        expected_rows(served, street, threshold=0.5, merge_stuff="merge", min_area=50)
    visible = postprocess(client, threshold=0.5, merge="merge", min_area=50, min_visible=0.6)
    assert [(r[0], r[4], r[6]) for r in rows(visible)] == \
        expected_rows(served, street, threshold=0.5, merge_stuff="merge", min_area=50, min_visible=0.6)
    assert served.counter.count == before + 1  # post-processing only

    segment = rows(merged)[0][0]
    picture, status = client.predict(segment, False, api_name="/segment")
    heads, _ = client.predict(segment, True, api_name="/segment")
    assert Image.open(heads).width > Image.open(picture).width  # a panel per head instead of their mean
    assert served.counter.count == before + 2  # one forward with attention, on the first pick

    png, json_path = merged[4]
    record = json.loads(Path(json_path).read_text())
    assert [s["id"] for s in record["annotations"][0]["segments_info"]] == [r[0] for r in rows(merged)]
    ids = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    assert set(np.unique(ids[..., 0] + 256 * ids[..., 1]).tolist()) <= {0} | {r[0] for r in rows(merged)}


def test_redraw_filters_things_and_stuff(client, street):
    analyse(client, street)
    both, _, _ = client.predict(0.55, True, True, api_name="/redraw")
    none, legend, _ = client.predict(0.55, False, False, api_name="/redraw")
    original = np.asarray(Image.open(street).convert("RGB"))
    assert not np.array_equal(np.asarray(Image.open(both)), original)
    assert np.array_equal(np.asarray(Image.open(none)), original)  # nothing drawn
    assert legend.count("legend-item") == len(analyse(client, street)[2]["data"])


def test_a_checkpoint_brings_its_setting_and_its_results(served, client, street):
    assert client.predict("toy-strict", api_name="/checkpoint") == (0.7, "merge", 10, 0.5)
    assert client.predict("toy", api_name="/checkpoint") == (0.3, "reference", 4, 0.0)
    outputs = analyse(client, street, "toy-strict", threshold=0.7, merge="merge", min_area=10, min_visible=0.5)
    assert [(r[0], r[4], r[6]) for r in rows(outputs)] == \
        expected_rows(served, street, threshold=0.7, merge_stuff="merge", min_area=10, min_visible=0.5)
    assert "threshold 0.70, merge, min area 10, min visible 0.50" in outputs[5]
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not in the list of choices"):  # only those the app was given
        analyse(client, street, "nowhere.pth")


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_unreadable_uploads_get_a_message_and_the_page_keeps_working(served, client, odd_images, street, kind):
    outputs = analyse(client, odd_images[kind])
    assert "cannot read image" in outputs[5]
    assert outputs[0] is None and rows(outputs) == []
    assert rows(analyse(client, street))  # still serving


@pytest.mark.parametrize("kind", ["16-bit", "cmyk", "rgba", "exif"])
def test_odd_images_are_answered_as_predict_answers_them(served, client, odd_images, kind):
    outputs = analyse(client, odd_images[kind])
    assert [(r[0], r[4], r[6]) for r in rows(outputs)] == expected_rows(served, odd_images[kind], threshold=0.3)
    if kind == "exif":
        assert Image.open(outputs[0]).size == (96, 192)  # upright


def test_images_over_the_size_limit_are_downscaled_with_a_message(client, street, tmp_path):
    big = tmp_path / "big.png"
    Image.open(street).resize((600, 300)).save(big)  # the served page's limit: 200 x 400 pixels
    outputs = analyse(client, big)
    assert "over the app's limit" in outputs[5] and "downscaled to" in outputs[5]
    assert Image.open(outputs[0]).size == (400, 200)
    assert rows(outputs)


def test_settings_out_of_range_are_refused_and_the_page_keeps_working(client, street):
    from gradio_client.exceptions import AppError

    analyse(client, street)
    with pytest.raises(AppError, match="less than minimum value 0.05"):
        postprocess(client, threshold=0.01)
    with pytest.raises(AppError, match="less than minimum value 0"):
        postprocess(client, min_area=-1)
    assert rows(postprocess(client, threshold=0.5))


def settled(job, timeout: float = 60.0) -> str:
    """Wait (bounded) until ``job`` waits in the queue ("queued") or was turned away ("refused")."""
    import time

    from gradio_client.utils import Status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.done():
            error = job.exception()
            return "refused" if error is not None and "queue is full" in str(error).lower() else "done"
        if job.status().code in (Status.IN_QUEUE, Status.PROCESSING):
            return "queued"
        time.sleep(0.05)
    raise AssertionError(f"job neither queued nor refused after {timeout} s: {job.status()}")


def test_the_queue_is_bounded(served, street):
    """While one request runs (held inside the forward pass), ``queue_size`` (4) wait and the rest are refused."""
    import threading

    client = Client(served.url, verbose=False, download_files=False)
    entered, release = threading.Event(), threading.Event()

    def hold(*args) -> None:
        entered.set()
        release.wait(timeout=60)

    handle = served.predictor.model.register_forward_pre_hook(hold)
    try:
        jobs = [client.submit(handle_file(str(street)), "toy", 0.3, "reference", 4, 0.55, True, True,
                              api_name="/analyse")]
        assert entered.wait(timeout=60)
        jobs += [client.submit(handle_file(str(street)), "toy", 0.3, "reference", 4, 0.55, True, True,
                               api_name="/analyse") for _ in range(7)]
        refused = [job for job in jobs[1:] if settled(job) == "refused"]
        release.set()
        finished = [job for job in jobs if job not in refused]
        for job in finished:
            assert rows(job.result(timeout=60))
    finally:
        release.set()
        handle.remove()
    assert len(refused) == 3 and len(finished) == 5
