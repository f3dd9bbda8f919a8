"""predict at 800x1600 (R50 with generated weights, 20 kept queries, result at 1024x2048) in two source trees.

Usage (each run in a fresh process; alternate them, the machine is noisy)::

    git worktree add /tmp/old <commit>
    python bench/compare_predict_commits.py /tmp/old old     # model.predict of the old API
    python bench/compare_predict_commits.py . new            # inference.PanopticPredictor

Prints one JSON line: the median of 3 timed calls after a warm-up, and a digest of the result.
"""
import json
import sys
import time

import torch

tree, which = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree + "/bench")
sys.path.insert(0, tree + "/src")
import bench_inference as b

from detr_panoptic.data.categories import coco_category_map
from detr_panoptic.models.detr import PanopticDETR

torch.manual_seed(0)
model = PanopticDETR(250).eval()
categories = coco_category_map()
model.category_map = categories  # read by the old tree's predict and by steer_class_head
b.steer_class_head(model, b.make_image(), 20)
image = b.make_image()
if which == "new":
    del model.category_map
    if len(sys.argv) > 3:
        model.set_channels_last(backbone=False, mask_head=False)
    from detr_panoptic.inference import PanopticPredictor, PredictorSettings

    predictor = PanopticPredictor(model, PredictorSettings(categories, threshold=b.THRESHOLD), device="cpu")

    def run():
        return predictor.predict_tensors([image], [b.ORIGINAL_SIZE])
else:
    def run():
        return model.predict([image], threshold=b.THRESHOLD, target_sizes=[b.ORIGINAL_SIZE])
result = run()
times = []
for _ in range(3):
    start = time.perf_counter()
    result = run()
    times.append(time.perf_counter() - start)
print(json.dumps({"tree": which, "median_s": sorted(times)[1], "times_s": times,
                  "segments": [(s["category_id"], s["area"]) for s in result[0].segments_info][:5]}))
