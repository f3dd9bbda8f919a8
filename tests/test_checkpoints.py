"""checkpoints: formats (official, ours, safetensors, URL, alias), config inference, class-head handling,
refusing pickled code, export and class-head adaptation."""
from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import logging
import os
import threading

import pytest
import torch

from detr_panoptic import checkpoints
from detr_panoptic.checkpoints import (
    adapt_class_head,
    export_safetensors,
    infer_model_config,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)
from detr_panoptic.data.categories import Category, CategoryMap
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.utils.errors import UserInputError

TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 48,
            "num_queries": 6}


@pytest.fixture(scope="module")
def tiny() -> PanopticDETR:
    torch.manual_seed(0)
    return PanopticDETR(7, **TINY)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        if key not in skip:
            assert torch.equal(sa[key], sb[key]), key


def test_official_format_loads_and_config_is_inferred(tiny, tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": tiny.state_dict()}, path)
    model = load_pretrained(path)
    assert_same_weights(model, tiny)
    assert model.config == tiny.config.replace(aux_loss=False)
    assert load_checkpoint(path).category_map is None  # 7 classes: not the COCO layout


def test_reference_training_checkpoint_with_namespace_args(tiny, tmp_path):
    path = tmp_path / "checkpoint.pth"
    optimizer = torch.optim.AdamW(tiny.parameters())
    torch.save({"model": tiny.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
                "args": argparse.Namespace(lr=1e-4, backbone="resnet18", masks=True)}, path)
    assert_same_weights(load_pretrained(path, aux_loss=True), tiny)


def test_config_inference_for_r50_and_r101_blocks():
    schema = PanopticDETR(250, backbone="resnet101", enc_layers=1, dec_layers=1, num_queries=3).state_dict()
    config = infer_model_config(schema)
    assert config == {"num_classes": 250, "num_queries": 3, "hidden_dim": 256, "enc_layers": 1, "dec_layers": 1,
                          "dim_feedforward": 2048, "nheads": 8, "backbone": "resnet101"}


def test_our_checkpoint_round_trip_keeps_metadata(tiny, tmp_path):
    categories = CategoryMap.contiguous(Category(i + 1, f"c{i}", i < 3) for i in range(7))
    config = tiny.config.replace(aux_loss=True, dropout=0.0)
    path = save_checkpoint(tmp_path / "run" / "last.pth", tiny, category_map=categories, model_config=config,
                           extra={"step": 12, "epoch": 1, "best_pq": 40.5})
    raw = torch.load(path, weights_only=True)  # loadable without custom classes, as the reference would
    assert set(raw["model"]) == set(tiny.state_dict()) and raw["step"] == 12
    assert raw["detr_panoptic"]["format_version"] == 1
    loaded = load_checkpoint(path)
    model = loaded.model
    assert_same_weights(model, tiny)
    assert loaded.category_map == categories
    assert model.config.aux_loss is True and model.config.dropout == 0.0
    assert model.config == config  # the typed config round-trips through the checkpoint's plain record
    assert raw["detr_panoptic"]["model_config"] == config.to_dict()
    assert loaded.input_size is None and loaded.postprocess is None  # not recorded
    assert not hasattr(model, "category_map") and not hasattr(model, "input_size")  # the module holds weights
    assert not list(tmp_path.glob("run/.*tmp*"))  # atomic: no temporary file left


def test_the_training_input_size_rides_along(tiny, tmp_path, caplog):
    path = save_checkpoint(tmp_path / "a.pth", tiny, category_map=None, model_config=None,
                           input_size={"min_size": 128, "max_size": 256})
    assert torch.load(path, weights_only=True)["detr_panoptic"]["input_size"] == {"min_size": 128, "max_size": 256}
    assert load_checkpoint(path).input_size == (128, 256)
    raw = torch.load(path, weights_only=True)
    raw["detr_panoptic"]["input_size"] = {"min_size": 300, "max_size": 200}  # longer side below shorter
    torch.save(raw, tmp_path / "bad.pth")
    assert load_checkpoint(tmp_path / "bad.pth").input_size is None
    assert "ignoring a malformed input_size" in caplog.text


def test_safetensors_export_with_sidecar(tiny, tmp_path):
    categories = CategoryMap.contiguous(Category(i + 1, f"c{i}", False) for i in range(7))
    path = export_safetensors(tiny, tmp_path / "model.safetensors", category_map=categories,
                              input_size={"min_size": 64, "max_size": 96},
                              postprocess={"threshold": 0.6, "merge_stuff": "merge", "min_area": 2})
    assert (tmp_path / "model.json").is_file()
    loaded = load_checkpoint(path)
    assert_same_weights(loaded.model, tiny)
    assert loaded.category_map == categories and loaded.input_size == (64, 96)
    assert loaded.postprocess == {"threshold": 0.6, "merge_stuff": "merge", "min_area": 2}
    (tmp_path / "model.json").unlink()  # without the sidecar: config from the weights, no categories
    bare = load_checkpoint(path)
    assert_same_weights(bare.model, tiny) and bare.category_map is None


def test_250_class_official_checkpoint_gets_coco_categories(tmp_path):
    model = PanopticDETR(250, **TINY)
    torch.save({"model": model.state_dict()}, tmp_path / "coco.pth")
    loaded = load_checkpoint(tmp_path / "coco.pth")
    assert loaded.category_map is not None and loaded.category_map.num_classes == 250
    assert loaded.category_map.is_thing()[1] and not loaded.category_map.is_thing()[200]


def test_other_num_classes_reinitialises_only_the_class_head(tiny, tmp_path, caplog):
    torch.save({"model": tiny.state_dict()}, tmp_path / "w.pth")
    with caplog.at_level(logging.INFO, logger="detr_panoptic.checkpoints"):
        model = load_pretrained(tmp_path / "w.pth", num_classes=3)
    assert model.detr.class_embed.weight.shape == (4, 32)
    for key, value in model.state_dict().items():
        if not key.startswith("detr.class_embed"):
            assert torch.equal(value, tiny.state_dict()[key]), key
    assert "detr.class_embed.weight" in caplog.text and "not loaded" in caplog.text


def test_other_shape_mismatch_is_an_error_listing_the_keys(tiny, tmp_path):
    torch.save({"model": tiny.state_dict()}, tmp_path / "w.pth")
    with pytest.raises(UserInputError, match=r"detr\.query_embed\.weight"):
        load_pretrained(tmp_path / "w.pth", num_queries=9)
    with pytest.raises(UserInputError, match="unknown model option"):
        load_pretrained(tmp_path / "w.pth", num_querys=9)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "missing.pth")


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Exploit(str(marker))}, path)
    with pytest.raises(UserInputError, match="refusing to load"):
        load_pretrained(path)
    assert not marker.exists()


@pytest.fixture
def http_folder(tmp_path, monkeypatch):
    """Serve tmp_path/www over http://127.0.0.1 and point TORCH_HOME into tmp_path."""
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_url_is_downloaded_once_into_the_hub_cache_with_hash_check(tiny, http_folder, tmp_path, monkeypatch):
    root, base = http_folder
    staging = tmp_path / "w.pth"
    torch.save({"model": tiny.state_dict()}, staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    name = f"tiny-panoptic-{digest}.pth"
    (root / name).write_bytes(staging.read_bytes())
    model = load_pretrained(f"{base}/{name}")
    assert_same_weights(model, tiny)
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / name
    assert cached.is_file()
    (root / name).unlink()  # second time: from the cache
    assert_same_weights(load_pretrained(f"{base}/{name}"), tiny)

    (root / "tiny-panoptic-deadbeef.pth").write_bytes(staging.read_bytes())
    with pytest.raises(UserInputError, match="(?i)hash"):
        load_pretrained(f"{base}/tiny-panoptic-deadbeef.pth")
    assert not (cached.parent / "tiny-panoptic-deadbeef.pth").exists()

    (root / name).write_bytes(staging.read_bytes())
    monkeypatch.setitem(checkpoints.OFFICIAL_URLS, "coco-r50-panoptic", f"{base}/{name}")
    assert_same_weights(load_pretrained("coco-r50-panoptic"), tiny)


def test_aliases_point_at_the_official_files():
    assert checkpoints.OFFICIAL_URLS["coco-r50-panoptic"] == \
        "https://dl.fbaipublicfiles.com/detr/detr-r50-panoptic-00ce5173.pth"
    assert checkpoints.OFFICIAL_URLS["coco-r50-dc5-panoptic"].endswith("detr-r50-dc5-panoptic-da08f1b1.pth")
    assert checkpoints.OFFICIAL_URLS["coco-r101-panoptic"].endswith("detr-r101-panoptic-40021d53.pth")
    assert checkpoints.ALIAS_OVERRIDES["coco-r50-dc5-panoptic"] == {"dilation": True}


def test_adapt_class_head_row_map_and_no_object_row(tiny):
    state = tiny.state_dict()
    adapted = adapt_class_head(state, 3, row_map={0: 5, 2: 1})
    weight, bias = adapted["detr.class_embed.weight"], adapted["detr.class_embed.bias"]
    old_weight, old_bias = state["detr.class_embed.weight"], state["detr.class_embed.bias"]
    assert weight.shape == (4, 32) and bias.shape == (4,)
    assert torch.equal(weight[0], old_weight[5]) and torch.equal(weight[2], old_weight[1])
    assert torch.equal(weight[3], old_weight[-1]) and torch.equal(bias[3], old_bias[-1])
    assert not torch.equal(weight[1], old_weight[1])
    assert adapted["mask_head.lay1.weight"] is state["mask_head.lay1.weight"]
    PanopticDETR(3, **TINY).load_state_dict(adapted, strict=True)
    fresh = adapt_class_head(state, 3)
    assert fresh["detr.class_embed.weight"].shape == (4, 32)
    with pytest.raises(UserInputError):
        adapt_class_head(state, 3, row_map={3: 0})
