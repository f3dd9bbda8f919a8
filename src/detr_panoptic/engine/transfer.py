"""Transfer learning: start from a checkpoint trained on other classes (the COCO panoptic model).

Everything but the class head carries over. The class head (``detr.class_embed``, C+1 rows, the last
for "no object") is re-initialised for the target classes and, optionally, *warm-started* row by row:
target class i takes the weights and bias of the source class with the matching name, per a table
(``resources/coco_to_cityscapes_classes.json`` by default: ``sidewalk -> pavement-merged``,
``vegetation -> tree-merged``, ``rider -> person`` ...). Names missing from the table are looked up
under their own name in the source categories (so any source trained on the same names warm-starts
fully); ``null`` in the table keeps the random row. The "no object" row is copied from the source.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from detr_panoptic.checkpoints import CLASS_HEAD_KEYS, adapt_class_head
from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.models.config import DETRConfig
from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

DEFAULT_TABLE = "coco_to_cityscapes_classes.json"


def load_class_table(path: str | Path | None = None) -> dict[str, str | None]:
    """The warm-start table ``target name -> source name (or None)``; the packaged one when ``path`` is None.

    The file is JSON: either the mapping itself or an object with a ``map`` key holding it.
    """
    if path is None:
        text = resources.files("detr_panoptic.resources").joinpath(DEFAULT_TABLE).read_text(encoding="utf-8")
        source = f"resources/{DEFAULT_TABLE}"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"class warm-start table not found: {path} (expected a JSON object "
                                    f"target name -> source name)")
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{source}: not valid JSON: {exc}") from None
    table = data.get("map", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, str))
                                              for k, v in table.items()):
        raise UserInputError(f"{source}: expected a JSON object mapping target class names to source class "
                             f"names (or null), optionally under the key 'map'")
    return dict(table)


@dataclass(frozen=True)
class WarmStartReport:
    """Which target classes got which source row (by name); the rest stayed random."""

    copied: dict[str, str] = field(default_factory=dict)
    random: tuple[str, ...] = ()

    def format(self) -> str:
        pairs = ", ".join(f"{t}<-{s}" for t, s in self.copied.items()) or "none"
        return f"class head warm start: {len(self.copied)} rows copied ({pairs}); " \
               f"{len(self.random)} random ({', '.join(self.random) or 'none'}); no-object row copied"


def class_row_sources(source_map: CategoryMap, target_map: CategoryMap,
                      table: Mapping[str, str | None] | None) -> dict[int, int]:
    """``target class index -> source class index`` for the rows that can be warm-started."""
    source_index = {}
    for index in range(source_map.num_classes):
        category = source_map.category_of_class(index)
        if category is not None:
            source_index.setdefault(category.name, index)
    rows = {}
    for index in range(target_map.num_classes):
        category = target_map.category_of_class(index)
        if category is None:
            continue
        name = table.get(category.name, category.name) if table is not None else category.name
        if name is not None and name in source_index:
            rows[index] = source_index[name]
    return rows


def new_class_head(old_head: nn.Linear, num_classes: int, *, source_map: CategoryMap | None = None,
                   target_map: CategoryMap | None = None, warm_start: bool = False,
                   table: Mapping[str, str | None] | None = None) -> tuple[nn.Linear, WarmStartReport | None]:
    """A fresh ``Linear(hidden, num_classes + 1)`` (PyTorch's default initialisation, as the reference),
    optionally warm-started from ``old_head`` rows matched by class name (``checkpoints.adapt_class_head``)."""
    rows: dict[int, int] | None = None
    if warm_start:
        if source_map is None or target_map is None:
            raise UserInputError("model.class_warm_start needs the category names of both the source checkpoint "
                                 "and the dataset (the checkpoint has no category map)")
        if source_map.num_classes + 1 != old_head.out_features:
            raise UserInputError(f"the source category map has {source_map.num_classes} classes but the "
                                 f"checkpoint's class head has {old_head.out_features - 1} (+1 no-object)")
        rows = class_row_sources(source_map, target_map, table)
    state = adapt_class_head({CLASS_HEAD_KEYS[0]: old_head.weight.detach(), CLASS_HEAD_KEYS[1]: old_head.bias.detach()},
                             num_classes, row_map=rows)
    head = nn.Linear(old_head.in_features, num_classes + 1).to(device=old_head.weight.device,
                                                               dtype=old_head.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(state[CLASS_HEAD_KEYS[0]])
        head.bias.copy_(state[CLASS_HEAD_KEYS[1]])
    if rows is None:
        return head, None
    assert source_map is not None and target_map is not None
    names = {i: target_map.category_of_class(i) for i in range(target_map.num_classes)}
    copied = {names[t].name: source_map.category_of_class(s).name for t, s in rows.items()}  # type: ignore[union-attr]
    randoms = tuple(c.name for i, c in names.items() if c is not None and i not in rows)
    return head, WarmStartReport(copied=copied, random=randoms)


def same_classes(a: CategoryMap | None, b: CategoryMap | None) -> bool:
    """Same class indices for the same category ids and names (so the class head can be kept)."""
    if a is None or b is None:
        return False
    if a.class_ids != b.class_ids:
        return False
    names_a = {c.id: c.name for c in a.categories}
    names_b = {c.id: c.name for c in b.categories}
    return all(names_a.get(i) == names_b.get(i) for i in a.class_ids if i >= 0)


def adapt_to_classes(model: nn.Module, target_map: CategoryMap, *, source_map: CategoryMap | None,
                     warm_start: bool = False, table_path: str | Path | None = None) -> WarmStartReport | None:
    """Give ``model`` (a ``PanopticDETR`` loaded from another dataset) a class head for ``target_map``.

    Keeps the head when the classes are the same; otherwise re-initialises it (optionally warm-started).
    ``source_map``: the checkpoint's categories (None: unknown, the head is re-initialised). Sets
    ``model.num_classes`` (and ``model.config.num_classes``); the categories live with the caller.
    """
    detr = model.detr  # type: ignore[attr-defined]
    if same_classes(source_map, target_map) and detr.class_embed.out_features == target_map.num_classes + 1:
        log.info("the checkpoint has the dataset's %d classes: class head kept", target_map.num_classes)
        return None
    table = load_class_table(table_path) if warm_start else None
    head, report = new_class_head(detr.class_embed, target_map.num_classes, source_map=source_map,
                                  target_map=target_map, warm_start=warm_start, table=table)
    detr.class_embed = head
    model.num_classes = target_map.num_classes
    if isinstance(getattr(model, "config", None), DETRConfig):
        model.config = model.config.replace(num_classes=target_map.num_classes)
    log.info("class head re-initialised for %d classes%s", target_map.num_classes,
             f"; {report.format()}" if report else "")
    return report
