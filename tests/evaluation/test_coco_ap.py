"""evaluation/coco_ap.py against pycocotools' COCOeval (segm) on generated panoptic ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from detr_panoptic.evaluation.coco_ap import MaskAPAccumulator

pycocotools = pytest.importorskip("pycocotools")  # in the dev extra


def scene(rng: np.random.Generator, height: int = 120, width: int = 160):
    ids = np.zeros((height, width), np.int64)
    segments = []
    for k in range(1, int(rng.integers(2, 9))):
        h, w = int(rng.integers(3, 70)), int(rng.integers(3, 90))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        ids[y:y + h, x:x + w] = k
    for k in np.unique(ids).tolist():
        if k:
            segments.append({"id": k, "category_id": int(rng.integers(1, 4)), "iscrowd": int(rng.random() < 0.15),
                             "area": int((ids == k).sum())})
    detections = []
    for segment in segments:
        for _ in range(int(rng.integers(0, 3))):
            mask = np.roll(ids == segment["id"], tuple(int(v) for v in rng.integers(-6, 7, 2)), axis=(0, 1))
            category = segment["category_id"] if rng.random() < 0.8 else int(rng.integers(1, 4))
            detections.append((mask, category, float(rng.random())))
    for _ in range(int(rng.integers(0, 4))):
        mask = np.zeros((height, width), bool)
        y, x = int(rng.integers(0, height - 10)), int(rng.integers(0, width - 10))
        mask[y:y + int(rng.integers(2, 40)), x:x + int(rng.integers(2, 40))] = True
        detections.append((mask, int(rng.integers(1, 4)), float(rng.random())))
    return ids, segments, detections


def reference(images) -> np.ndarray:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in (1, 2, 3)]}
    results = []
    for image_id, (ids, segments, detections) in enumerate(images, 1):
        gt["images"].append({"id": image_id, "height": ids.shape[0], "width": ids.shape[1]})
        for s in segments:
            rle = mask_utils.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id":
                                      s["category_id"], "iscrowd": s["iscrowd"], "area": s["area"],
                                      "segmentation": rle, "bbox": list(mask_utils.toBbox(rle))})
        for mask, category, score in detections:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": image_id, "category_id": category, "segmentation": rle, "score": score})
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(results), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[:6]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_ap_equals_pycocotools(seed):
    rng = np.random.default_rng(seed)
    images = [scene(rng) for _ in range(6)]
    ours = MaskAPAccumulator([1, 2, 3])
    for ids, segments, detections in images:
        ours.add(ids, segments, [(np.flatnonzero(m), c, s) for m, c, s in detections if m.any()])
    stats = ours.compute()
    expected = reference([(i, s, [d for d in dets if d[0].any()]) for i, s, dets in images])
    got = [stats[k] for k in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
