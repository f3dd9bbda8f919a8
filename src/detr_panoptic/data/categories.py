"""Categories and the explicit category-id <-> class-index mapping.

A model predicts class *indices* 0..C-1 (index C is "no object"); datasets and COCO panoptic files
speak category *ids*. ``CategoryMap`` holds both sides and travels inside our checkpoints so that
inference knows the classes. Two layouts exist:

* ``contiguous``: class index i is the i-th category (sorted by id) -- what we train new heads with;
* ``identity``: class index == category id, with unused indices -- the official COCO checkpoint
  (250 classes, category ids 1..200, ids <= 90 are things).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from detr_panoptic.utils.errors import UserInputError

if TYPE_CHECKING:
    import torch

UNUSED = -1  # class index that maps to no category (identity layout)


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] = (128, 128, 128)
    supercategory: str = ""

    def to_json(self) -> dict[str, Any]:
        """COCO panoptic category record (``isthing`` as 0/1, as in the COCO files)."""
        return {"id": self.id, "name": self.name, "isthing": int(self.isthing), "color": list(self.color),
                "supercategory": self.supercategory}

    @classmethod
    def from_json(cls, record: Mapping[str, Any], *, source: str = "categories") -> Category:
        try:
            color = tuple(int(c) for c in record.get("color", (128, 128, 128)))
            return cls(id=int(record["id"]), name=str(record["name"]), isthing=bool(record["isthing"]),
                       color=color if len(color) == 3 else (128, 128, 128),
                       supercategory=str(record.get("supercategory", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"{source}: bad category record {dict(record)!r}: needs id, name, isthing "
                                 f"({exc})") from None


@dataclass(frozen=True)
class CategoryMap:
    """Categories plus ``class_ids[class_index] -> category id`` (``UNUSED`` for unused indices)."""

    categories: tuple[Category, ...]
    class_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        ids = [c.id for c in self.categories]
        if len(set(ids)) != len(ids):
            raise UserInputError(f"duplicate category ids in {ids}")
        used = [i for i in self.class_ids if i != UNUSED]
        missing = set(used) - set(ids)
        if missing:
            raise UserInputError(f"class_ids refer to unknown category ids {sorted(missing)}")
        if len(set(used)) != len(used):
            raise UserInputError("a category id appears twice in class_ids")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, categories: Iterable[Category]) -> CategoryMap:
        cats = tuple(sorted(categories, key=lambda c: c.id))
        return cls(categories=cats, class_ids=tuple(c.id for c in cats))

    @classmethod
    def identity(cls, categories: Iterable[Category], num_classes: int) -> CategoryMap:
        cats = tuple(sorted(categories, key=lambda c: c.id))
        if cats and cats[-1].id >= num_classes:
            raise UserInputError(f"category id {cats[-1].id} does not fit in {num_classes} classes")
        present = {c.id for c in cats}
        return cls(categories=cats, class_ids=tuple(i if i in present else UNUSED for i in range(num_classes)))

    @classmethod
    def from_coco_json(cls, records: Sequence[Mapping[str, Any]], *, source: str = "categories") -> CategoryMap:
        """Contiguous map from a COCO ``categories`` list."""
        return cls.contiguous(Category.from_json(r, source=source) for r in records)

    # -- queries --------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def by_id(self) -> dict[int, Category]:
        return {c.id: c for c in self.categories}

    def class_index(self, category_id: int) -> int:
        try:
            return self._index_of()[category_id]
        except KeyError:
            raise UserInputError(f"category id {category_id} is not one of the known categories "
                                 f"{sorted(self._index_of())}") from None

    def _index_of(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.class_ids) if cid != UNUSED}

    def category_of_class(self, class_index: int) -> Category | None:
        cid = self.class_ids[class_index]
        return None if cid == UNUSED else self.by_id()[cid]

    def is_thing(self) -> torch.Tensor:
        """Bool [num_classes]: True where the class is a thing (unused indices: False)."""
        import torch  # here, so that converter workers that only read categories never load torch

        cats = self.by_id()
        return torch.tensor([cid != UNUSED and cats[cid].isthing for cid in self.class_ids], dtype=torch.bool)

    def class_to_category_tensor(self) -> torch.Tensor:
        """Long [num_classes]: category id per class index (``UNUSED`` where none)."""
        import torch

        return torch.tensor(self.class_ids, dtype=torch.long)

    # -- serialisation ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"categories": [c.to_json() for c in self.categories], "class_ids": list(self.class_ids)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "category map") -> CategoryMap:
        try:
            cats = tuple(Category.from_json(r, source=source) for r in data["categories"])
            return cls(categories=cats, class_ids=tuple(int(i) for i in data["class_ids"]))
        except (KeyError, TypeError) as exc:
            raise UserInputError(f"{source}: expected 'categories' and 'class_ids' ({exc})") from None


def coco_panoptic_categories() -> tuple[Category, ...]:
    """The 133 COCO panoptic categories (ids 1..200), as shipped with panopticapi."""
    text = resources.files("detr_panoptic.resources").joinpath("coco_panoptic_categories.json").read_text()
    return tuple(Category.from_json(r) for r in json.loads(text))


def coco_category_map(num_classes: int = 250) -> CategoryMap:
    """The official checkpoint's layout: class index == COCO category id, 250 classes.

    The released model treats ids <= 90 as things; that matches the ``isthing`` flags of the file.
    """
    return CategoryMap.identity(coco_panoptic_categories(), num_classes)
