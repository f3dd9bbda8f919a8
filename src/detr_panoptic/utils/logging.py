"""Logging set-up: one format, quiet on non-zero ranks of a distributed run."""
from __future__ import annotations

import logging
import os


def process_rank() -> int:
    """Global rank from the launcher's environment (``torchrun`` sets ``RANK``); 0 when not distributed."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(debug: bool = False) -> None:
    """Configure the root logger: INFO (DEBUG with ``debug``) on rank 0, WARNING elsewhere."""
    level = logging.DEBUG if debug else logging.INFO
    if process_rank() != 0:
        level = logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else "%(asctime)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", force=True)
