"""The Gradio page of ``detr-panoptic app`` (``pip install 'detr-panoptic[app]'``).

``build_app(models, examples=...)`` returns the ``gr.Blocks``; ``launch`` serves it. The handlers call
``app.session`` (one forward per image, post-processing on the cached output) and answer bad input with
a message in the page, never an exception that would leave the page half updated. API names (for
``gradio_client``): ``/analyse``, ``/postprocess``, ``/redraw``, ``/segment``, ``/checkpoint`` (a checkpoint's
post-processing setting, which the page then shows).
"""
from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detr_panoptic.app import require_gradio

require_gradio()  # the install hint when the ``app`` extra is missing
import gradio as gr

from detr_panoptic.app.session import (
    LOWEST_THRESHOLD,
    MAX_PIXELS,
    TABLE_HEADERS,
    Analysis,
    Setting,
    analyse,
    attention_picture,
    legend_html,
    open_image,
    overlay,
    segment_rows,
    timing_text,
    write_downloads,
)
from detr_panoptic.inference.predictor import PanopticPredictor
from detr_panoptic.models.postprocess import MERGE_MODES
from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

QUEUE_SIZE = 16  # requests waiting beyond this are refused ("queue full") rather than piling up
MAX_FILE_SIZE = "40mb"


@dataclass
class Shown:
    """A session's state: the cached analysis, the setting shown and its result, where its files go."""

    analysis: Analysis
    checkpoint: str
    setting: Setting
    result: Any
    folder: Path
    name: str = "image"
    notes: tuple[str, ...] = ()


class Models:
    """The checkpoints the page can choose among, each loaded once (``PanopticPredictor``)."""

    def __init__(self, predictors: Mapping[str, PanopticPredictor]) -> None:
        if not predictors:
            raise UserInputError("the app needs at least one checkpoint")
        self.predictors = dict(predictors)

    @property
    def names(self) -> list[str]:
        return list(self.predictors)

    def get(self, name: str | None) -> PanopticPredictor:
        if name not in self.predictors:
            raise UserInputError(f"unknown checkpoint {name!r}; this app serves {', '.join(self.names)}")
        return self.predictors[name]


def _image_input() -> Any:
    """An image input that hands over the uploaded file even when Pillow cannot open it, so that the app
    (``session.open_image``, which reads files as ``predict`` does) answers it with a message in the page."""
    image = gr.Image(label="image (upload, webcam or paste)", type="filepath",
                     sources=["upload", "webcam", "clipboard"], image_mode=None, height=320, elem_id="image")
    decode = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except Exception:  # noqa: BLE001 - whatever Pillow says, open_image says it again with the file's name
            return None if payload is None or payload.path is None else str(payload.path)

    image.preprocess = preprocess  # on this instance: a subclass would make Gradio write a .pyi beside us
    return image


def build_app(models: Models | Mapping[str, PanopticPredictor], *, examples: Sequence[str | Path] = (),
              lowest: float = LOWEST_THRESHOLD, max_pixels: int = MAX_PIXELS, queue_size: int = QUEUE_SIZE,
              work_dir: str | Path | None = None) -> Any:
    """The page (``gr.Blocks``, queued: one request at a time, at most ``queue_size`` waiting)."""
    models = models if isinstance(models, Models) else Models(models)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="detr-panoptic-app-"))
    handlers = _Handlers(models, lowest=lowest, max_pixels=max_pixels, work_dir=work)
    first = Setting.of(models.get(models.names[0]))
    with gr.Blocks(title="detr-panoptic", delete_cache=(3600, 3600)) as page:  # Gradio's copies: an hour
        gr.Markdown("## detr-panoptic: which query made which segment, and where it looked")
        state = gr.State(None, time_to_live=3600)
        with gr.Row():
            with gr.Column(scale=1):
                image = _image_input()
                if examples:
                    gr.Examples([[str(e)] for e in examples], inputs=[image], label="example street scenes")
                checkpoint = gr.Dropdown(models.names, value=models.names[0], label="checkpoint")
                threshold = gr.Slider(lowest, 0.99, value=max(first.threshold, lowest), step=0.01,
                                      label="keep threshold", elem_id="threshold")
                merge = gr.Radio(list(MERGE_MODES), value=first.merge_stuff, label="stuff merge mode")
                min_area = gr.Number(first.min_area, label="minimum segment area (pixels)", precision=0, minimum=0)
                min_visible = gr.Slider(0.0, 1.0, value=first.min_visible, step=0.05, elem_id="min-visible",
                                        label="minimum visible share of a thing's mask (0: the reference)")
                opacity = gr.Slider(0.0, 1.0, value=0.55, step=0.05, label="overlay opacity")
                with gr.Row():
                    things = gr.Checkbox(True, label="things")
                    stuff = gr.Checkbox(True, label="stuff")
            with gr.Column(scale=2):
                status = gr.Markdown("upload an image or pick an example", elem_id="status")
                picture = gr.Image(label="panoptic overlay", type="numpy", format="png", interactive=False,
                                   elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
                table = gr.Dataframe(headers=list(TABLE_HEADERS), label="segments (pick a row for its attention)",
                                     interactive=False, elem_id="segments")
                with gr.Row():
                    segment = gr.Dropdown([], label="segment", elem_id="segment")
                    per_head = gr.Checkbox(False, label="each head")
                attention = gr.Image(label="decoder attention and mask of the segment's query", type="numpy",
                                     format="png", interactive=False, elem_id="attention")
                attention_status = gr.Markdown("", elem_id="attention-status")
                downloads = gr.File(label="COCO panoptic PNG + JSON of the shown result", file_count="multiple",
                                    interactive=False, elem_id="downloads")
        controls = [threshold, merge, min_area, min_visible, opacity, things, stuff]
        shown = [state, picture, legend, table, segment, downloads, status, attention]
        image.change(handlers.analyse, [image, checkpoint, *controls], shown, api_name="analyse")
        checkpoint.change(handlers.setting_of, [checkpoint], [threshold, merge, min_area, min_visible],
                          api_name="checkpoint").then(
            handlers.analyse, [image, checkpoint, *controls], shown, api_name=False)
        post = [state, *controls]
        for control in (threshold, min_visible):
            control.release(handlers.postprocess, post, shown, api_name="postprocess" if control is threshold else False)
        for control in (merge, min_area):
            control.change(handlers.postprocess, post, shown, api_name=False)
        for control in (opacity, things, stuff):
            control.change(handlers.redraw, [state, opacity, things, stuff], [picture, legend, status],
                           api_name="redraw" if control is opacity else False)
        segment.change(handlers.segment, [state, segment, per_head], [attention, attention_status],
                       api_name="segment")
        per_head.change(handlers.segment, [state, segment, per_head], [attention, attention_status], api_name=False)
        table.select(handlers.pick_row, [state, per_head], [segment], api_name=False)
    page.queue(default_concurrency_limit=1, max_size=queue_size)
    return page


class _Handlers:
    """The event handlers; each returns a message for the page instead of raising on bad input."""

    def __init__(self, models: Models, *, lowest: float, max_pixels: int, work_dir: Path) -> None:
        self.models, self.lowest, self.max_pixels, self.work_dir = models, lowest, max_pixels, work_dir
        self._counter = 0
        self._lock = threading.Lock()

    def _folder(self) -> Path:
        with self._lock:
            self._counter += 1
            return self.work_dir / f"result-{self._counter:06d}"

    def setting_of(self, checkpoint: str) -> tuple[float, str, int, float]:
        s = Setting.of(self.models.get(checkpoint))
        return max(s.threshold, self.lowest), s.merge_stuff, s.min_area, s.min_visible

    def analyse(self, path: str | None, checkpoint: str, threshold: float, merge: str, min_area: float,
                min_visible: float, opacity: float, things: bool, stuff: bool) -> tuple:
        if not path:
            return _nothing("upload an image or pick an example")
        try:
            tick = time.perf_counter()
            picture, notes = open_image(path, max_pixels=self.max_pixels)
            load_seconds = time.perf_counter() - tick
            analysis = analyse(self.models.get(checkpoint), picture, lowest=self.lowest)
            analysis.seconds = {"load": load_seconds, **analysis.seconds}
            return self._show(analysis, checkpoint, _setting(threshold, merge, min_area, min_visible), opacity,
                              things, stuff,
                              notes, name=_file_stem(path))
        except (UserInputError, FileNotFoundError) as exc:
            return _nothing(f"**{_plain(exc)}**")

    def postprocess(self, state: Shown | None, threshold: float, merge: str, min_area: float, min_visible: float,
                    opacity: float, things: bool, stuff: bool) -> tuple:
        if state is None:
            return _nothing("upload an image first")
        try:
            return self._show(state.analysis, state.checkpoint, _setting(threshold, merge, min_area, min_visible),
                              opacity,
                              things, stuff, state.notes, seconds={}, name=state.name, folder=state.folder)
        except UserInputError as exc:
            return _unchanged(state, f"**{_plain(exc)}**")

    def _show(self, analysis: Analysis, checkpoint: str, setting: Setting, opacity: float, things: bool,
              stuff: bool, notes: Sequence[str], seconds: Mapping[str, float] | None = None, name: str = "image",
              folder: Path | None = None) -> tuple:
        result, post_seconds = analysis.result(setting)
        categories = analysis.predictor.settings.category_map
        tick = time.perf_counter()
        drawn = overlay(analysis.picture, result, categories, opacity=opacity, things=things, stuff=stuff)
        rows = segment_rows(result, categories)
        folder = folder or self._folder()  # one per image: a new setting rewrites its files
        files = write_downloads(result, categories, folder, name=name)
        timings = {**(analysis.seconds if seconds is None else seconds), "post-processing": post_seconds,
                   "drawing": time.perf_counter() - tick}
        state = Shown(analysis, checkpoint, setting, result, folder, name, tuple(notes))
        count = f"{len(rows)} segment{'s' if len(rows) != 1 else ''} (threshold {setting.threshold:.2f}, " \
                f"{setting.merge_stuff}, min area {setting.min_area}" \
                + (f", min visible {setting.min_visible:.2f})" if setting.min_visible else ")")
        choices = [(f"{r[0]}: {r[1]} {r[3]:.2f}", r[0]) for r in rows]
        return (state, drawn, legend_html(result, categories), _table(rows), gr.update(choices=choices, value=None),
                [str(f) for f in files], f"{count}\n\n"
                + timing_text(timings, analysis.predictor.device, notes), None)

    def redraw(self, state: Shown | None, opacity: float, things: bool, stuff: bool) -> tuple:
        if state is None:
            return None, "", "upload an image first"
        categories = state.analysis.predictor.settings.category_map
        tick = time.perf_counter()
        drawn = overlay(state.analysis.picture, state.result, categories, opacity=opacity, things=things,
                        stuff=stuff)
        return drawn, legend_html(state.result, categories), timing_text(
            {"drawing": time.perf_counter() - tick}, state.analysis.predictor.device, state.notes)

    def segment(self, state: Shown | None, segment_id: Any, per_head: bool) -> tuple:
        if state is None or segment_id in (None, ""):
            return None, ""
        try:
            tick = time.perf_counter()
            drawn = attention_picture(state.analysis, state.result, int(segment_id),
                                      state.analysis.predictor.settings.category_map, per_head=per_head)
            return drawn, timing_text({"attention figure": time.perf_counter() - tick},
                                      state.analysis.predictor.device, state.notes)
        except (UserInputError, ValueError) as exc:
            return None, f"**{_plain(exc)}**"

    def pick_row(self, state: Shown | None, per_head: bool, event: gr.SelectData) -> Any:
        row = event.row_value
        return gr.update(value=int(row[0])) if row else gr.update()


def _setting(threshold: float, merge: str, min_area: float, min_visible: float) -> Setting:
    if min_area is None or int(min_area) != min_area:
        raise UserInputError(f"minimum segment area must be a whole number of pixels, got {min_area}")
    return Setting(float(threshold), str(merge), int(min_area), float(min_visible))


def _file_stem(path: str) -> str:
    """The uploaded file's name without suffix, safe as a file name (the downloads are named after it)."""
    stem = re.sub(r"[^\w.-]+", "_", Path(path).stem).strip("._")[:80]
    return stem or "image"


def _plain(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _table(rows: list[list[Any]]) -> Any:
    import pandas

    return pandas.DataFrame(rows, columns=list(TABLE_HEADERS))


def _nothing(message: str) -> tuple:
    return None, None, "", _table([]), gr.update(choices=[], value=None), None, message, None


def _unchanged(state: Shown, message: str) -> tuple:
    return (state, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), message, gr.update())


def launch(page: Any, *, host: str = "127.0.0.1", port: int | None = None, block: bool = True,
           max_file_size: str | int = MAX_FILE_SIZE) -> Any:
    """Serve ``page`` on ``host:port`` (no share link, no server-side rendering); returns gradio's app."""
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    return page.launch(server_name=host, server_port=port, share=False, ssr_mode=False, quiet=not block,
                       prevent_thread_lock=not block, max_file_size=max_file_size, theme=theme,
                       footer_links=["api"], show_error=True)
