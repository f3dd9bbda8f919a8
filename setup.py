"""The build's one compiled part: PNG unfiltering for fast panoptic-PNG decoding (optional).

Everything else is declared in pyproject.toml. ``optional=True``: without a C compiler the install
still succeeds, and PNGs decode through libvips or Pillow instead (same pixels, slower).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("detr_panoptic.utils._png_unfilter", ["src/detr_panoptic/utils/_png_unfilter.c"], optional=True)])
