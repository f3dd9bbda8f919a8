"""Panoptic quality (panopticapi-exact, vectorised, parallel) and the COCO panoptic file format."""
from detr_panoptic.evaluation.panoptic_format import (
    PanopticPredictionWriter,
    id_map_to_rgb,
    load_panoptic_json,
    read_id_png,
    rgb_to_id_map,
    save_panoptic_predictions,
    segment_boxes_and_areas,
    write_id_png,
)
from detr_panoptic.evaluation.pq import (
    PQAccumulator,
    format_results,
    image_pq_stats,
    match_annotations,
    pq_compute,
    results_to_metrics,
    results_to_percentages,
)

__all__ = [
    "PQAccumulator",
    "PanopticPredictionWriter",
    "format_results",
    "id_map_to_rgb",
    "image_pq_stats",
    "load_panoptic_json",
    "match_annotations",
    "pq_compute",
    "read_id_png",
    "results_to_metrics",
    "results_to_percentages",
    "rgb_to_id_map",
    "save_panoptic_predictions",
    "segment_boxes_and_areas",
    "write_id_png",
]
