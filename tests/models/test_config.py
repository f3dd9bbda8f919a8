"""DETRConfig: the one description of a PanopticDETR (built from it, held by it, stored in checkpoints)."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from detr_panoptic.config import ModelConfig
from detr_panoptic.models.config import DETRConfig
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.utils.errors import UserInputError

TINY = DETRConfig(5, backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                  dim_feedforward=32, num_queries=6, aux_loss=True)


def test_the_model_is_built_from_its_config_and_holds_it():
    model = PanopticDETR.from_config(TINY)
    assert model.config == TINY and model.num_classes == 5 and model.aux_loss
    assert model.detr.query_embed.weight.shape == (6, 32) and len(model.detr.transformer.decoder.layers) == 2
    assert PanopticDETR(5, backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                        dim_feedforward=32, num_queries=6, aux_loss=True).config == TINY
    assert TINY["hidden_dim"] == 32 and TINY.architecture()["num_queries"] == 6


def test_dict_round_trip_and_bad_records():
    assert DETRConfig.from_dict(TINY.to_dict()) == TINY
    assert DETRConfig.from_dict({"num_classes": 7, "something_newer": 1}) == DETRConfig(7)  # extra keys ignored
    with pytest.raises(UserInputError, match="x.pth.*hidden_dim must be an int"):
        DETRConfig.from_dict({"hidden_dim": "wide"}, source="x.pth")
    with pytest.raises(UserInputError, match="aux_loss must be a bool"):
        DETRConfig.from_dict({"aux_loss": 1})
    with pytest.raises(UserInputError, match="divisible by nheads"):
        DETRConfig.from_dict({"hidden_dim": 30, "nheads": 4})
    with pytest.raises(UserInputError, match="unknown model option.*'depth'"):
        TINY.replace(depth=3)
    with pytest.raises(ValueError, match="backbone"):
        DETRConfig(backbone="vit")


def test_the_training_config_gives_the_architecture():
    section = ModelConfig(backbone="resnet18", hidden_dim=64, num_queries=9, dropout=0.0, aux_loss=True)
    config = section.detr_config(num_classes=11)
    assert config == DETRConfig(11, backbone="resnet18", hidden_dim=64, num_queries=9, dropout=0.0, aux_loss=True)
    assert set(DETRConfig.ARCHITECTURE) < set(DETRConfig.field_names())


def test_the_packaged_start_points_record_reads_as_a_config():
    """Checkpoints written before the typed config (format_version 1) keep loading."""
    sidecar = resources.files("detr_panoptic.resources") / "demo_start_point.json"
    record = json.loads(sidecar.read_text())
    config = DETRConfig.from_dict(record["model_config"], source=str(sidecar))
    assert config.to_dict() == {k: record["model_config"][k] for k in DETRConfig.field_names()}
