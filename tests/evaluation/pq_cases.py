"""Generated COCO panoptic cases (small PNGs + JSON) and the cityscapesscripts reference evaluator."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 3, "name": "bicycle", "isthing": 1, "color": [119, 11, 32]},
    {"id": 6, "name": "truck", "isthing": 1, "color": [0, 0, 70]},  # never in ground truth
    {"id": 7, "name": "road", "isthing": 0, "color": [128, 64, 128]},
    {"id": 8, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 9, "name": "building", "isthing": 0, "color": [70, 70, 70]},
    {"id": 10, "name": "wall", "isthing": 0, "color": [102, 102, 156]},
]
IGNORED_CATEGORY = 4  # appears in ground truth but not in the categories list (panopticapi ignores it)
THINGS = [1, 2, 3]
STUFF = [7, 8, 9, 10]


def to_rgb(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


@dataclass
class Case:
    gt_json: dict[str, Any]
    pred_json: dict[str, Any]
    gt_maps: dict[Any, np.ndarray] = field(default_factory=dict)
    pred_maps: dict[Any, np.ndarray] = field(default_factory=dict)
    root: Path | None = None

    @property
    def gt_json_path(self) -> Path:
        return self.root / "gt.json"

    @property
    def pred_json_path(self) -> Path:
        return self.root / "pred.json"

    @property
    def gt_folder(self) -> Path:
        return self.root / "gt"

    @property
    def pred_folder(self) -> Path:
        return self.root / "pred"

    def write(self, root: Path) -> Case:
        self.root = root
        self.gt_folder.mkdir(parents=True, exist_ok=True)
        self.pred_folder.mkdir(parents=True, exist_ok=True)
        for ann in self.gt_json["annotations"]:
            Image.fromarray(to_rgb(self.gt_maps[ann["image_id"]])).save(self.gt_folder / ann["file_name"])
        for ann in self.pred_json["annotations"]:
            Image.fromarray(to_rgb(self.pred_maps[ann["image_id"]])).save(self.pred_folder / ann["file_name"])
        self.gt_json_path.write_text(json.dumps(self.gt_json))
        self.pred_json_path.write_text(json.dumps(self.pred_json))
        return self


def _rect(rng: np.random.Generator, h: int, w: int, min_size: int = 4) -> tuple[slice, slice]:
    y0 = int(rng.integers(0, h - min_size))
    x0 = int(rng.integers(0, w - min_size))
    y1 = int(rng.integers(y0 + min_size, min(h, y0 + h // 2) + 1))
    x1 = int(rng.integers(x0 + min_size, min(w, x0 + w // 2) + 1))
    return slice(y0, y1), slice(x0, x1)


def generate_case(seed: int, num_images: int = 3, height: int = 48, width: int = 64,
                  string_ids: bool = False) -> Case:
    """Random scenes exercising void, crowd, ignored categories, near-0.5 IoUs, void/crowd FPs."""
    rng = np.random.default_rng(seed)
    gt_annotations, pred_annotations, gt_maps, pred_maps = [], [], {}, {}
    for index in range(num_images):
        image_id = f"city_{seed:03d}_{index:06d}" if string_ids else seed * 100 + index
        h, w = height, width
        # Ground truth: stuff bands, then thing rectangles, then void, with ids cat * 1000 + k.
        gt = np.zeros((h, w), np.int64)
        segments: dict[int, dict[str, Any]] = {}
        cuts = sorted(rng.choice(np.arange(4, h - 4), size=2, replace=False).tolist())
        bands = [(0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], h)]
        for (y0, y1), cat in zip(bands, rng.choice(STUFF, size=3, replace=False).tolist()):
            sid = cat * 1000
            gt[y0:y1] = sid
            segments[sid] = {"id": sid, "category_id": cat, "iscrowd": 0}
        for k in range(int(rng.integers(3, 8))):
            cat = int(rng.choice(THINGS + [IGNORED_CATEGORY]))
            sid = cat * 1000 + 1 + k if rng.random() > 0.2 else int(rng.integers(1 << 16, 1 << 24))
            gt[_rect(rng, h, w)] = sid
            segments[sid] = {"id": sid, "category_id": cat,
                             "iscrowd": int(cat in THINGS and rng.random() < 0.25)}
        for _ in range(int(rng.integers(0, 3))):
            gt[_rect(rng, h, w, 2)] = 0
        if rng.random() < 0.3:  # an id in the PNG that the JSON does not list: neither void nor matched
            gt[_rect(rng, h, w, 2)] = 999
        present = set(np.unique(gt).tolist())
        segments_info = []
        for sid, seg in segments.items():
            if sid not in present:
                continue
            seg["area"] = int((gt == sid).sum())
            ys, xs = np.nonzero(gt == sid)
            seg["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            segments_info.append(seg)
        rng.shuffle(segments_info)

        # Prediction: ground truth shifted, some categories swapped, extra blobs on void and crowd.
        pred_cat = {s["id"]: s["category_id"] for s in segments_info}
        pred_cat[0] = None
        pred_cat[999] = 9
        shifted = np.roll(gt, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        source = np.where(rng.random((h, w)) < 0.03, np.roll(gt, 1, axis=1), shifted)
        pred = np.zeros((h, w), np.int64)
        pred_segments = []
        next_id = 1
        for sid in np.unique(source).tolist():
            cat = pred_cat.get(sid)
            if cat is None or rng.random() < 0.1:  # keep void; sometimes drop a segment
                continue
            if cat == IGNORED_CATEGORY or rng.random() < 0.15:
                cat = int(rng.choice(THINGS + STUFF))
            pred[source == sid] = next_id
            pred_segments.append({"id": next_id, "category_id": cat})
            next_id += 1
        crowds = [s for s in segments_info if s["iscrowd"]]
        for _ in range(int(rng.integers(1, 4))):
            # a blob over void or over a crowd region, sometimes with the crowd's category
            if crowds and rng.random() < 0.6:
                crowd = crowds[int(rng.integers(len(crowds)))]
                ys, xs = np.nonzero(gt == crowd["id"])
                cy, cx = int(ys.mean()), int(xs.mean())
                cat = crowd["category_id"] if rng.random() < 0.7 else int(rng.choice(THINGS))
            else:
                voids = np.argwhere(gt == 0)
                if len(voids) == 0:
                    continue
                cy, cx = voids[int(rng.integers(len(voids)))].tolist()
                cat = int(rng.choice(THINGS + STUFF))
            r = int(rng.integers(2, 6))
            pred[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = next_id
            pred_segments.append({"id": next_id, "category_id": cat})
            next_id += 1
        present = set(np.unique(pred).tolist())
        pred_segments = [s for s in pred_segments if s["id"] in present]
        # Random ids (1..2^24-1) so that all three RGB channels are used.
        new_ids = rng.choice(np.arange(1, 1 << 24), size=len(pred_segments), replace=False)
        relabel = np.zeros(next_id, np.int64)
        for seg, new in zip(pred_segments, new_ids.tolist()):
            relabel[seg["id"]] = new
            seg["id"] = new
        pred = relabel[pred]

        file_name = f"{image_id}.png"
        gt_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments_info})
        pred_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": pred_segments})
        gt_maps[image_id], pred_maps[image_id] = gt, pred
    rng.shuffle(pred_annotations)
    gt_json = {"images": [{"id": a["image_id"], "file_name": a["file_name"], "height": height, "width": width}
                          for a in gt_annotations],
               "annotations": gt_annotations, "categories": copy.deepcopy(CATEGORIES)}
    return Case(gt_json, {"annotations": pred_annotations}, gt_maps, pred_maps)


def reference_pq(case: Case) -> dict[str, Any]:
    """cityscapesscripts' evalPanopticSemanticLabeling (panopticapi's algorithm), in this process."""
    from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as reference

    categories = {c["id"]: c for c in case.gt_json["categories"]}
    predictions = {a["image_id"]: a for a in case.pred_json["annotations"]}
    pairs = [(copy.deepcopy(a), copy.deepcopy(predictions[a["image_id"]])) for a in case.gt_json["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stats = reference.pq_compute_single_core(0, pairs, str(case.gt_folder), str(case.pred_folder), categories)
    return reference.average_pq(stats, categories)


def assert_same_results(ours: dict[str, Any], theirs: dict[str, Any], tol: float = 1e-12) -> None:
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == theirs[name]["n"], name
        for metric in ("pq", "sq", "rq"):
            assert abs(ours[name][metric] - theirs[name][metric]) <= tol, (name, metric)
    assert set(ours["per_class"]) == set(theirs["per_class"])
    for cid, values in theirs["per_class"].items():
        for metric in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][cid][metric] - values[metric]) <= tol, (cid, metric)
