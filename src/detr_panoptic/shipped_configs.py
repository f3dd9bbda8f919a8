"""The configs shipped with the package (``detr_panoptic/configs/*.yaml``, package data found through
``importlib.resources`` so that they work from an installed wheel): ``list_configs`` names them,
``find_config`` turns a name or a path into a file (``config.load_config`` reads it)."""
from __future__ import annotations

import importlib.resources
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from detr_panoptic.utils.errors import UserInputError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CONFIG_PACKAGE_DIR = "configs"  # under the detr_panoptic package


def _shipped_root() -> Traversable:
    return importlib.resources.files("detr_panoptic").joinpath(CONFIG_PACKAGE_DIR)


def _shipped_files() -> dict[str, Traversable]:
    """Shipped config name (``cityscapes/recipe_two_stages``) -> its resource, sorted by name."""
    found: dict[str, Traversable] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml"):
                found[prefix + child.name[: -len(".yaml")]] = child

    root = _shipped_root()
    if root.is_dir():
        walk(root, "")
    return dict(sorted(found.items()))


def _description(text: str) -> str:
    """The first sentence of a config's leading comment block, on one line."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        stripped = line.lstrip("#").strip()
        if not stripped:
            break
        lines.append(stripped)
    block = " ".join(lines)
    end = block.find(". ")
    return block[: end + 1] if end >= 0 else block


def list_configs() -> dict[str, str]:
    """The shipped configs: name (as ``find_config`` takes it) -> a one-line description."""
    return {name: _description(res.read_text(encoding="utf-8")) for name, res in _shipped_files().items()}


def find_config(name_or_path: str | Path) -> Path:
    """The YAML file for a path or a shipped config name (``demo``, ``cityscapes/recipe_two_stages``).

    An existing file wins over a shipped config of the same name; ``.yaml`` may be left out of a name.
    When it is neither, ``FileNotFoundError`` lists the shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path).replace("\\", "/").removesuffix(".yaml")
    shipped = _shipped_files()
    if name in shipped:
        resource = shipped[name]
        if isinstance(resource, Path):
            return resource
        # A package that is not plain files (a zip import): give the caller a real file.
        copy_dir = Path(tempfile.mkdtemp(prefix="detr-panoptic-config-"))
        copied = copy_dir / f"{name.replace('/', '_')}.yaml"
        copied.write_text(resource.read_text(encoding="utf-8"), encoding="utf-8")
        return copied
    if path.exists():
        raise UserInputError(f"config {name_or_path}: not a file")
    raise FileNotFoundError(f"config file not found: {name_or_path} (not a file, nor a shipped config; "
                            f"shipped: {', '.join(shipped) or 'none'}; `detr-panoptic config --list` shows them)")
