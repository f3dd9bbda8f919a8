from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from detr_panoptic.config import (
    Config,
    apply_overrides,
    config_from_dict,
    find_config,
    list_configs,
    load_config,
    read_yaml,
    save_config,
)
from detr_panoptic.utils.errors import UserInputError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = REPO_ROOT / "src" / "detr_panoptic" / "configs"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_reference_recipe() -> None:
    cfg = load_config()
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 1e-4
    assert cfg.train.batch_size == 1 and cfg.train.clip_max_norm == 0.1
    assert cfg.freeze.backbone is True and cfg.train.lr_backbone == 0.0
    assert cfg.data.augment is False and cfg.data.min_size == 800 and cfg.data.max_size == 1333


def test_round_trip_load_override_save_reload(tmp_path: Path) -> None:
    path = write(tmp_path, "model: {num_queries: 50}\ntrain: {lr: 2.0e-4, epochs: 3}\nname: exp\n")
    cfg = load_config(path, ["train.lr=5e-5", "freeze.transformer=true", "data.root=/x/y"])
    assert cfg.train.lr == 5e-5 and isinstance(cfg.train.lr, float)
    assert cfg.freeze.transformer is True
    assert cfg.model.num_queries == 50 and cfg.train.epochs == 3 and cfg.data.root == "/x/y"
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert not list(tmp_path.glob(".*tmp*")), "atomic save left a temporary file"


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {learning_rate: 0.1}\n")
    with pytest.raises(UserInputError) as info:
        load_config(path)
    assert "train.learning_rate" in str(info.value) and str(path) in str(info.value)


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "optimizer: {lr: 0.1}\n")
    with pytest.raises(UserInputError, match="optimizer"):
        load_config(path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("train: {epochs: three}\n", "train.epochs"),
        ("train: {epochs: 2.5}\n", "train.epochs"),
        ("freeze: {backbone: 1}\n", "freeze.backbone"),
        ("model: {backbone: resnet7}\n", "model.backbone"),
        ("train: {lr: fast}\n", "train.lr"),
        ("data: {root: 3}\n", "data.root"),
    ],
)
def test_wrong_types_name_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserInputError) as info:
        load_config(path)
    assert key in str(info.value) and str(path) in str(info.value)


def test_int_is_accepted_for_float_and_optional() -> None:
    cfg = config_from_dict({"train": {"lr": 1, "max_steps": None}, "model": {"init": None}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps is None and cfg.model.init is None


def test_bad_override_syntax() -> None:
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])
    with pytest.raises(UserInputError, match="SECTION.KEY"):
        load_config(None, ["lr=0.1"])
    with pytest.raises(UserInputError, match="train.nope"):
        load_config(None, ["train.nope=1"])


def test_apply_overrides_does_not_mutate_input() -> None:
    data = {"train": {"lr": 0.1}}
    out = apply_overrides(data, ["train.lr=0.2"])
    assert data["train"]["lr"] == 0.1 and out["train"]["lr"] == 0.2


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")
    with pytest.raises(UserInputError, match="not valid YAML"):
        load_config(write(tmp_path, "train: {lr: [1,\n"))
    with pytest.raises(UserInputError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_stages_resolve_with_init_from_previous_stage(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name: cs
train: {output_dir: runs/cs, epochs: 4}
freeze: {backbone: true}
stages:
  - name: stage1
    freeze: {transformer: true}
  - name: stage2
    freeze: {attention: true}
    train: {epochs: 2}
    model: {init: "@stage1/best"}
""",
    )
    cfg = load_config(path)
    stage1, stage2 = cfg.resolve_stages()
    assert stage1.freeze.transformer and not stage1.freeze.attention
    assert stage2.freeze.attention and not stage2.freeze.transformer
    assert stage1.train.epochs == 4 and stage2.train.epochs == 2
    assert stage1.train.output_dir == str(Path("runs/cs/stage1"))
    assert stage2.model.init == str(Path("runs/cs/stage1/checkpoints/best.pth"))
    assert stage1.stages == () and stage2.name == "cs/stage2"
    # A chained config survives the round trip as well.
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


def test_stage_errors(tmp_path: Path) -> None:
    bad_key = write(tmp_path, "stages:\n  - name: a\n    train: {nope: 1}\n", "a.yaml")
    with pytest.raises(UserInputError, match="nope"):
        load_config(bad_key)
    forward_ref = write(tmp_path, "stages:\n  - name: a\n    model: {init: '@b/best'}\n  - name: b\n", "b.yaml")
    with pytest.raises(UserInputError, match="not an earlier stage"):
        load_config(forward_ref).resolve_stages()
    twice = write(tmp_path, "stages:\n  - name: a\n  - name: a\n", "c.yaml")
    with pytest.raises(UserInputError, match="twice"):
        load_config(twice)


def test_no_stages_resolves_to_itself() -> None:
    cfg = Config()
    assert cfg.resolve_stages() == [cfg]


@pytest.mark.parametrize("path", sorted(SHIPPED_DIR.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    if "demo" in read_yaml(path):
        # The demo's configs are training configs plus a `demo:` section that the demo reads.
        from detr_panoptic.demo import load_demo_config

        _, raw = load_demo_config(path)
        cfg = config_from_dict(raw, source=str(path))
    else:
        cfg = load_config(path)
    assert cfg.resolve_stages()


def test_list_configs_names_every_shipped_file() -> None:
    shipped = list_configs()
    on_disk = {p.relative_to(SHIPPED_DIR).with_suffix("").as_posix() for p in SHIPPED_DIR.rglob("*.yaml")}
    assert set(shipped) == on_disk and {"demo", "demo_quick", "cityscapes/recipe_two_stages"} <= on_disk
    for name, description in shipped.items():
        assert description and "\n" not in description and not description.startswith("#"), name


def test_find_config_by_name_or_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = SHIPPED_DIR / "cityscapes" / "recipe_two_stages.yaml"
    assert find_config("cityscapes/recipe_two_stages").resolve() == recipe.resolve()
    assert find_config("cityscapes/recipe_two_stages.yaml").resolve() == recipe.resolve()
    assert load_config("cityscapes/recipe_two_stages") == load_config(recipe)
    # A file of the same name in the working folder wins over the shipped config.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("train: {epochs: 3}\n")
    assert find_config("demo") == Path("demo") and load_config("demo").train.epochs == 3
    with pytest.raises(FileNotFoundError, match="cityscapes/nope.*shipped: .*cityscapes/recipe_two_stages"):
        find_config("cityscapes/nope")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(UserInputError, match="folder.yaml: not a file"):
        find_config("folder.yaml")
