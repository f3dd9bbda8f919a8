"""``DETRConfig``: the one description of a ``PanopticDETR`` (Hugging Face's ``DetrConfig`` plays this role).

The model is built from it (``PanopticDETR.from_config``), holds it (``model.config``), checkpoints store
it (``to_dict()`` as ``detr_panoptic.model_config``; ``from_dict`` reads every checkpoint written so far),
the ONNX and Hugging Face exports read it, and the training config's ``model`` section gives its
architecture (``config.ModelConfig.detr_config``). The categories (names, thing flags, category ids) live
beside it in the checkpoint (``data.categories.CategoryMap``), as ``id2label`` beside HF's config.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from detr_panoptic.utils.errors import UserInputError

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


@dataclass(frozen=True)
class DETRConfig:
    """Architecture (defaults: the official DETR-R50 panoptic) plus the two training switches.

    num_classes: class indices 0..C-1 (index C is "no object"). backbone: a ResNet; dilation: DC5 (the last
    stage dilated). hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward: the transformer.
    num_queries: decoder queries. dropout: in the transformer. aux_loss: predictions of every decoder layer
    (for the auxiliary losses).
    """

    num_classes: int = 250
    backbone: str = "resnet50"
    dilation: bool = False
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    aux_loss: bool = False

    # What the weights' shapes (and the official file names) fix; dropout and aux_loss can change freely.
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("backbone", "dilation", "hidden_dim", "nheads", "enc_layers",
                                               "dec_layers", "dim_feedforward", "num_queries")

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.num_queries < 1 or self.dec_layers < 1:
            raise ValueError(f"num_classes, num_queries and dec_layers must be >= 1, got "
                             f"{self.num_classes}, {self.num_queries}, {self.dec_layers}")
        if self.hidden_dim % 2 or self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be even and divisible by nheads {self.nheads}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> DETRConfig:
        """A copy with ``changes`` (unknown names raise ``UserInputError``)."""
        self.check_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def check_names(cls, names: Mapping[str, Any] | set[str], what: str = "model option") -> None:
        unknown = sorted(set(names) - set(cls.field_names()))
        if unknown:
            raise UserInputError(f"unknown {what}(s) {unknown}; expected some of {list(cls.field_names())}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what a checkpoint's ``detr_panoptic.model_config`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], *, source: str = "model config") -> DETRConfig:
        """From ``to_dict``'s keys (missing: defaults); keys it does not know are ignored (a checkpoint may
        carry more); bad values raise ``UserInputError`` naming ``source``."""
        try:
            return cls(**{name: _checked(name, record[name]) for name in cls.field_names() if name in record})
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"{source}: bad model config {dict(record)!r}: {exc}") from None

    def __getitem__(self, name: str) -> Any:
        """``config["hidden_dim"]``: read access by name, as on the dict it replaces."""
        if name not in self.field_names():
            raise KeyError(name)
        return getattr(self, name)

    def architecture(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.ARCHITECTURE}


_KINDS = {"backbone": str, "dilation": bool, "dropout": float, "aux_loss": bool}  # the other fields: int


def _checked(name: str, value: Any) -> Any:
    kind = _KINDS.get(name, int)
    if (kind is bool) != isinstance(value, bool) or (kind is not str and isinstance(value, str)):
        raise ValueError(f"{name} must be a{'n' if kind is int else ''} {kind.__name__}, got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return kind(value)
