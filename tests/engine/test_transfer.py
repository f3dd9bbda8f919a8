"""Class-head transfer: re-initialisation and the row-by-row warm start from COCO names."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from detr_panoptic.data.categories import CategoryMap, coco_category_map
from detr_panoptic.data.cityscapes import cityscapes_categories
from detr_panoptic.engine.transfer import adapt_to_classes, load_class_table, new_class_head
from detr_panoptic.utils.errors import UserInputError


def _cityscapes_map() -> CategoryMap:
    return CategoryMap.from_coco_json(cityscapes_categories())


class _Holder(nn.Module):
    """The attributes adapt_to_classes touches on a PanopticDETR."""

    def __init__(self, num_classes: int, category_map: CategoryMap) -> None:
        super().__init__()
        self.detr = nn.Module()
        self.detr.class_embed = nn.Linear(16, num_classes + 1)
        self.num_classes = num_classes
        self.config = {"num_classes": num_classes}


def test_packaged_table_maps_the_examples_of_the_issue():
    table = load_class_table()
    assert table["person"] == "person" and table["rider"] == "person"
    assert table["sky"] == "sky-other-merged" and table["vegetation"] == "tree-merged"
    assert table["building"] == "building-other-merged" and table["pole"] is None
    coco_names = {c.name for c in coco_category_map().categories}
    assert all(v in coco_names for v in table.values() if v is not None)


def test_warm_start_copies_rows_by_name_and_the_no_object_row():
    coco = coco_category_map()
    target = _cityscapes_map()
    model = _Holder(coco.num_classes, coco)
    old = model.detr.class_embed
    report = adapt_to_classes(model, target, source_map=coco, warm_start=True)
    head = model.detr.class_embed
    assert head.out_features == target.num_classes + 1 and model.num_classes == target.num_classes
    name_to_target = {target.category_of_class(i).name: i for i in range(target.num_classes)}
    coco_index = {c.name: coco.class_index(c.id) for c in coco.categories}
    for target_name, source_name in [("sidewalk", "pavement-merged"), ("rider", "person"), ("car", "car")]:
        torch.testing.assert_close(head.weight[name_to_target[target_name]], old.weight[coco_index[source_name]])
        torch.testing.assert_close(head.bias[name_to_target[target_name]], old.bias[coco_index[source_name]])
    torch.testing.assert_close(head.weight[-1], old.weight[-1])
    pole = head.weight[name_to_target["pole"]]
    assert not any(torch.equal(pole, row) for row in old.weight)
    assert "pole" in report.random and report.copied["vegetation"] == "tree-merged"


def test_without_warm_start_every_row_is_new():
    coco = coco_category_map()
    model = _Holder(coco.num_classes, coco)
    old = model.detr.class_embed.weight.detach().clone()
    assert adapt_to_classes(model, _cityscapes_map(), source_map=coco, warm_start=False) is None
    new = model.detr.class_embed.weight
    assert not any(torch.equal(new[-1], row) for row in old)


def test_same_classes_keep_the_head():
    target = _cityscapes_map()
    model = _Holder(target.num_classes, target)
    head = model.detr.class_embed
    adapt_to_classes(model, target, source_map=target, warm_start=True)
    assert model.detr.class_embed is head


def test_identity_names_warm_start_without_a_table_entry(tmp_path):
    source = _cityscapes_map()
    target = CategoryMap.contiguous([c for c in source.categories if c.name in ("car", "road", "sky")])
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"map": {"sky": None}}))
    old = nn.Linear(8, source.num_classes + 1)
    _, report = new_class_head(old, target.num_classes, source_map=source, target_map=target,
                                  warm_start=True, table=load_class_table(table))
    assert set(report.copied) == {"car", "road"} and report.random == ("sky",)


def test_bad_tables_are_reported(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"map": {"car": 3}}))
    with pytest.raises(UserInputError, match="target class names"):
        load_class_table(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_class_table(tmp_path / "missing.json")
