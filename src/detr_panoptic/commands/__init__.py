"""Subcommands of the ``detr-panoptic`` CLI, one module per area, each with ``register(subparsers)``."""
