"""One self-contained HTML page for a run or evaluation folder.

Everything is embedded (images as base64 ``data:`` URIs, CSS inline), so the file can be mailed or
opened from anywhere. What the page shows depends on what the folder holds:

* ``metrics.jsonl`` (a training run): the last validation and training losses (and class accuracy), loss,
  accuracy and PQ curves,
  per-class PQ/SQ/RQ (table and bars) of the last validation;
* ``metrics.json`` (``evaluate``; also looked for in ``eval/``): PQ/SQ/RQ for All/Things/Stuff and
  per class;
* ``calibration.json`` / ``calibration.png`` (``calibrate``): the chosen post-processing, the PQ-vs-threshold
  chart and the best settings;
* ``overlays/*.png`` anywhere below (``predict``): example overlays;
* attention figures (``attention`` output: ``queries_*.png``, ``encoder.png``, ``masks.png``);
* other figures (``plots/``, charts next to the metrics), and ``config.yaml``.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_text

log = logging.getLogger(__name__)

HEADER_COLOR = "#1f3b5a"   # the page's header band; the report test looks for it in a screenshot
ACCENT_COLOR = "#e8a33d"
ATTENTION_NAMES = ("queries_", "encoder", "masks")
MAX_IMAGE_WIDTH = 1400
SKIP_DIRS = {"predictions", "tb", "checkpoints", "__pycache__"}

CSS = f"""
body {{ font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 0; background: #f4f5f7; color: #222; }}
header {{ background: {HEADER_COLOR}; color: white; padding: 28px 40px; border-bottom: 6px solid {ACCENT_COLOR}; }}
header h1 {{ margin: 0 0 6px 0; font-size: 28px; }}
header p {{ margin: 0; opacity: 0.85; font-size: 14px; }}
main {{ padding: 10px 40px 40px 40px; }}
section {{ background: white; border-radius: 6px; padding: 14px 22px; margin: 18px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,0.12); }}
h2 {{ color: {HEADER_COLOR}; border-bottom: 2px solid {ACCENT_COLOR}; padding-bottom: 4px; }}
table {{ border-collapse: collapse; margin: 8px 0; font-size: 14px; }}
th, td {{ border: 1px solid #d0d4da; padding: 4px 10px; text-align: right; }}
th {{ background: #e9edf2; }}
td.name, th.name {{ text-align: left; }}
figure {{ display: inline-block; margin: 8px; vertical-align: top; max-width: 100%; }}
figure img {{ max-width: 100%; border: 1px solid #d0d4da; }}
figcaption {{ font-size: 12px; color: #555; }}
pre {{ background: #f0f2f5; padding: 10px; overflow-x: auto; font-size: 12px; }}
.empty {{ color: #777; font-style: italic; }}
"""


# -- encoding -----------------------------------------------------------------------------------------
def image_data_uri(image: Image.Image, *, photo: bool = False, max_width: int = MAX_IMAGE_WIDTH) -> str:
    """``data:`` URI of ``image``, shrunk to ``max_width``; JPEG for photos (small), PNG otherwise (sharp)."""
    image = image.convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if photo:
        image.save(buffer, format="JPEG", quality=85)
        mime = "image/jpeg"
    else:
        image.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def file_data_uri(path: Path, *, photo: bool = False) -> str | None:
    try:
        with Image.open(path) as image:
            return image_data_uri(image, photo=photo)
    except (OSError, ValueError) as exc:
        log.warning("report: skipping unreadable image %s (%s)", path, exc)
        return None


def figure_data_uri(fig: Figure, *, dpi: int = 90) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


# -- HTML pieces ----------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if value and abs(value) < 0.01 else f"{value:.{digits}f}"


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, name_columns: int = 1) -> str:
    head = "".join(f'<th class="name">{_e(h)}</th>' if i < name_columns else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = "".join(f'<td class="name">{_e(v)}</td>' if i < name_columns else f"<td>{_number(v)}</td>"
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_figure(uri: str, caption: str = "", *, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    return (f'<figure{style}><img src="{uri}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


# -- reading the folder --------------------------------------------------------------------------------
def _eval_metrics(folder: Path) -> tuple[Path, dict] | None:
    for path in (folder / "metrics.json", folder / "eval" / "metrics.json"):
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except ValueError as exc:
                raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    return None


def _scaled(groups: Mapping[str, Mapping[str, Any]], scale: float) -> dict[str, dict[str, Any]]:
    return {name: {k: (v * scale if k in ("pq", "sq", "rq") and isinstance(v, (int, float)) else v)
                   for k, v in group.items()} for name, group in groups.items() if isinstance(group, Mapping)}


def _summary_from_eval(metrics: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None]:
    """Summary table and per-class values (percent) of an evaluation's ``metrics.json``.

    Two forms are understood: the flat metrics-file form (``pq, sq, rq, n, pq_things, ...,
    per_class``, percentages) and ``pq_compute``'s nested form (``All/Things/Stuff``, fractions).
    """
    per_class = metrics.get("per_class") if isinstance(metrics.get("per_class"), Mapping) else None
    if any(isinstance(metrics.get(k), Mapping) for k in ("All", "Things", "Stuff")):
        groups = _scaled({k: metrics[k] for k in ("All", "Things", "Stuff") if k in metrics}, 100.0)
        per_class = _scaled(per_class, 100.0) if per_class else None
    else:
        groups = {}
        for name, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
            if f"pq{suffix}" in metrics:
                groups[name] = {k: metrics.get(f"{k}{suffix}", "") for k in ("pq", "sq", "rq", "n")}
    rows = [(name, g.get("pq", ""), g.get("sq", ""), g.get("rq", ""), g.get("n", "")) for name, g in groups.items()]
    table = html_table(["", "PQ", "SQ", "RQ", "categories"], rows) if rows else '<p class="empty">no PQ values</p>'
    return table, per_class


def per_class_table(per_class: Mapping[Any, Mapping[str, Any]], names: Mapping[str, str]) -> str:
    """Classes sorted by PQ (percent), weakest first: those are the ones to look at."""
    rows = []
    for key, values in per_class.items():
        if not isinstance(values, Mapping):
            continue
        name = values.get("name") or names.get(str(key), str(key))
        rows.append((name, key, values.get("pq", ""), values.get("sq", ""), values.get("rq", ""),
                     values.get("tp", ""), values.get("fp", ""), values.get("fn", "")))
    rows.sort(key=lambda r: r[2] if isinstance(r[2], (int, float)) else float("inf"))
    has_counts = any(r[5] != "" for r in rows)
    header = ["class", "id", "PQ", "SQ", "RQ"] + (["TP", "FP", "FN"] if has_counts else [])
    return html_table(header, [r if has_counts else r[:5] for r in rows], name_columns=2)


def _pngs(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*.png")):
        relative = path.relative_to(folder).parts
        if any(part in SKIP_DIRS or part.startswith(".") for part in relative[:-1]):
            continue
        found.append(path)
    return found


def _is_attention(path: Path) -> bool:
    return path.name.startswith(ATTENTION_NAMES) or any("attention" in p for p in path.parts[-3:-1])


def _calibration_section(folder: Path) -> tuple[str, str, str] | None:
    """``calibrate``'s ``calibration.json`` (the chosen setting, the best rows) and ``calibration.png``."""
    path = folder / "calibration.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        rows, best = list(record["rows"]), record["best"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{path}: not a calibration table ({exc!r})") from None
    if not rows:
        return None
    setting = (f"threshold {_number(best['threshold'])}, merge_stuff {best['merge_stuff']}, min_area {best['min_area']}, "
               f"min_visible {_number(best.get('min_visible', 0.0))}")
    body = [(f"<p>Chosen: <b>{_e(setting)}</b>: PQ {_number(best['pq'])} (things {_number(best['pq_things'])}, "
             f"stuff {_number(best['pq_stuff'])}) over {record.get('num_images', 0)} image(s), {len(rows)} "
             f"settings.</p>")]
    if (folder / "calibration.png").is_file():
        uri = file_data_uri(folder / "calibration.png")
        if uri:
            body.append(html_figure(uri, "PQ against the keep threshold"))
    top = sorted(rows, key=lambda r: -r["pq"])[:10]
    body.append(html_table(["threshold", "merge", "min area", "min visible", "PQ", "SQ", "RQ", "PQ things", "PQ stuff"],
                           [(f"{r['threshold']:.2f}", r["merge_stuff"], r["min_area"], f"{r.get('min_visible', 0.0):.2f}",
                             r["pq"], r["sq"], r["rq"], r["pq_things"], r["pq_stuff"]) for r in top], name_columns=4))
    return "Post-processing calibration", "".join(body), "calibration"


# -- the page ---------------------------------------------------------------------------------------------
def _run_sections(folder: Path) -> tuple[list[tuple[str, str, str]], dict | None]:
    """The training run's sections (last validation and step, curves) and its last per-class PQ."""
    from detr_panoptic.visualize import curves

    train, val = curves.split_records(curves.read_metrics(folder))
    body, per_class = [], None
    if val:
        last = val[-1]
        keys = [k for k in curves.PQ_KEYS if k in last]
        body.append(f"<p>Last of {len(val)} validation(s), at step {_e(last.get('step', '?'))} "
                    f"(epoch {_e(last.get('epoch', '?'))}):</p>")
        body.append(html_table([k.upper().replace("_", " ") for k in keys], [[last[k] for k in keys]], name_columns=0))
        best = max(val, key=lambda r: r.get("pq", float("-inf")) if isinstance(r.get("pq"), (int, float))
                   else float("-inf"))
        if "pq" in best:
            body.append(f"<p>Best PQ {_number(best['pq'])} at step {_e(best.get('step', '?'))}.</p>")
        per_class = curves.last_per_class(val)
    if train:
        last = train[-1]
        keys = curves.loss_keys([last]) + [k for k in (*curves.ACCURACY_KEYS, "lr", "step_time") if k in last]
        body.append(f"<p>Last training step {_e(last.get('step', '?'))} (epoch {_e(last.get('epoch', '?'))}), "
                    f"{len(train)} logged steps:</p>")
        body.append(html_table(keys, [[last[k] for k in keys]], name_columns=0))
    sections = [("Training run", "".join(body) or '<p class="empty">metrics.jsonl is empty</p>', "run")]
    plots = [html_figure(figure_data_uri(curves.plot_losses(train, val)), "losses")]
    if curves.has_accuracy(train):
        plots.append(html_figure(figure_data_uri(curves.plot_accuracy(train, val)),
                                 "class accuracy of the matched queries (last layer) and class_error"))
    plots.append(html_figure(figure_data_uri(curves.plot_pq(val)), "panoptic quality"))
    if curves.has_diagnostics(val):
        plots.append(html_figure(figure_data_uri(curves.plot_diagnostics(val)),
                                 "image-dependence of the encoder memory, decoder output and box centres"))
    sections.append(("Curves", "".join(plots), "curves"))
    return sections, per_class


def _per_class_section(per_class: dict, categories: Any, drawn: set[str]) -> tuple[str, str, str]:
    from detr_panoptic.visualize import curves

    body = per_class_table(per_class, {str(c["id"]): c["name"] for c in categories or []})
    try:
        chart = curves.per_class_figure({"per_class": per_class}, categories=categories)
        body = html_figure(figure_data_uri(chart), "per-class PQ / SQ / RQ") + body
        drawn.update({"per_class", "per_class_pq"})
    except (ImportError, ValueError, KeyError) as exc:  # a chart is a bonus: the table is there
        log.warning("report: no per-class chart (%s)", exc)
    return "Per class (weakest first)", body, "per-class"


def _picture_sections(folder: Path, out: Path, drawn: set[str], max_images: int) -> list[tuple[str, str, str]]:
    """Overlays, attention maps and other figures found in the folder (charts drawn here skipped)."""
    pngs = [p for p in _pngs(folder) if p.resolve() != out.resolve()]
    pngs = [p for p in pngs if p.stem not in drawn or p.parent.name == "overlays"]
    overlays = [p for p in pngs if p.parent.name == "overlays"]
    attention = sorted((p for p in pngs if p not in overlays and _is_attention(p)),
                       key=lambda p: (str(p.parent), [p.name.startswith(n) for n in ATTENTION_NAMES].index(True)
                                      if p.name.startswith(ATTENTION_NAMES) else len(ATTENTION_NAMES), p.name))
    others = [p for p in pngs if p not in overlays and p not in attention]
    sections = []
    for heading, paths, anchor, photo in (("Example overlays", overlays, "overlays", True),
                                          ("Attention maps", attention, "attention", True),
                                          ("Figures", others, "figures", False)):
        if not paths:
            continue
        figures = []
        for path in paths[:max_images]:
            uri = file_data_uri(path, photo=photo)
            if uri:
                figures.append(html_figure(uri, str(path.relative_to(folder))))
        more = f'<p class="empty">and {len(paths) - max_images} more</p>' if len(paths) > max_images else ""
        sections.append((heading, "".join(figures) + more, anchor))
    return sections


def _page(title: str, folder: Path, sections: Sequence[tuple[str, str, str]]) -> str:
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    contents = " &middot; ".join(f'<a href="#{a}" style="color:white">{_e(t)}</a>' for t, _, a in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(folder.resolve())} &middot; generated {generated}</p>"
        f"<p>{contents}</p></header><main>"
        + "".join(section(t, b, a) for t, b, a in sections)
        + "</main></body></html>\n"
    )


def build_report(folder: str | Path, out: str | Path | None = None, *, max_images: int = 12,
                 title: str | None = None, lead_sections: Sequence[tuple[str, str, str]] = ()) -> Path:
    """Write the HTML report of ``folder`` to ``out`` (default ``<folder>/report.html``); return its path.

    ``lead_sections``: ``(title, HTML body, anchor)`` sections placed first (an application's own summary).

    Raises ``FileNotFoundError`` if the folder does not exist and ``UserInputError`` if it holds
    nothing to report (no metrics, no figures).
    """
    from detr_panoptic.visualize import curves

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder} (expected a run or evaluation folder)")
    out = Path(out) if out is not None else folder / "report.html"
    sections: list[tuple[str, str, str]] = list(lead_sections)
    drawn: set[str] = set()  # stems of charts drawn fresh here: their PNG copies in the folder are skipped
    per_class = None
    if (folder / "metrics.jsonl").is_file():
        run_sections, per_class = _run_sections(folder)
        sections += run_sections
        drawn.update({"losses", "accuracy", "pq", "diagnostics"})
    evaluation = _eval_metrics(folder)
    if evaluation is not None:
        path, metrics = evaluation
        table, eval_per_class = _summary_from_eval(metrics)
        sections.append((f"Evaluation ({path.relative_to(folder)})", table, "evaluation"))
        per_class = eval_per_class or per_class
    calibration = _calibration_section(folder)
    if calibration is not None:
        sections.append(calibration)
        drawn.add("calibration")
    if per_class:
        sections.append(_per_class_section(per_class, curves.run_categories(folder), drawn))
    sections += _picture_sections(folder, out, drawn, max_images)
    if (folder / "config.yaml").is_file():
        sections.append(("Configuration", f"<pre>{_e((folder / 'config.yaml').read_text())}</pre>", "config"))
    if not sections:
        raise UserInputError(f"nothing to report in {folder}: expected metrics.jsonl, metrics.json, "
                             "overlays/ or attention figures")
    atomic_write_text(out, _page(title or f"detr-panoptic report: {folder.resolve().name}", folder, sections))
    return out
