"""The demo: the whole pipeline on generated data, an application on the library (``detr-panoptic demo``).

Nothing in the library imports this package.
"""
from detr_panoptic.demo.pipeline import bench_record, load_demo_config, pq_table, run_demo

__all__ = ["bench_record", "load_demo_config", "pq_table", "run_demo"]
