"""Remote checkpoint sources: a Hugging Face Hub id read from a pre-populated huggingface_hub cache with
HF_HUB_OFFLINE=1, a W&B artifact that our training logged read back through a stand-in for ``wandb``,
and each failure as one line (exit 2 on the command line). No network is used: a Hub id is only ever
read from the cache here, and no W&B server can run in the test environment, so ``wandb.Api`` and
``wandb.init`` are replaced by an in-memory stand-in that keeps what a run logs the way W&B does (a
copy of the file per version, aliases that move to the newest version that carries them)."""
from __future__ import annotations

import builtins
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from detr_panoptic.checkpoint_sources import fetch_remote, is_hub_id
from detr_panoptic.checkpoints import load_checkpoint, save_checkpoint
from detr_panoptic.cli import main
from detr_panoptic.utils.errors import UserInputError
from tests.export.models import small_category_map, small_model

huggingface_hub = pytest.importorskip("huggingface_hub")
hub_constants = pytest.importorskip("huggingface_hub.constants")
REPO = "example-org/tiny-detr-panoptic"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _same_pretrained(a, b):
    assert a.model.state_dict().keys() == b.model.state_dict().keys()
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert a.model.config == b.model.config
    assert a.category_map.to_json() == b.category_map.to_json()
    assert (a.input_size, a.postprocess) == (b.input_size, b.postprocess)


def _hf_folder(folder: Path, seed: int = 0) -> Path:
    from detr_panoptic.export.hugging_face import export_hugging_face

    return export_hugging_face(small_model(seed), folder, category_map=small_category_map(), input_size=(64, 96),
                               postprocess={"threshold": 0.6, "merge_stuff": "merge", "min_area": 4})


def _populate_hub_cache(cache: Path, folder: Path, repo: str = REPO, revision: str = REVISION) -> None:
    """The layout huggingface_hub keeps: models--ORG--NAME/snapshots/<commit>/<files>, refs/main -> commit."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        shutil.copy(path, snapshot / path.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    folder = _hf_folder(tmp_path / "exported")
    cache = tmp_path / "hf-cache"
    _populate_hub_cache(cache, folder)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub itself finds the files (the layout is right, not just right for our reader)
    found = huggingface_hub.try_to_load_from_cache(REPO, "model.safetensors")
    assert found == str(cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / REVISION / "model.safetensors")
    return folder


def test_hub_id_loads_from_the_offline_cache_as_the_folder(hub_cache):
    from_hub = load_checkpoint(REPO)
    _same_pretrained(from_hub, load_checkpoint(hub_cache))
    assert from_hub.description.startswith(f"{REPO} (") and REVISION in from_hub.description
    assert from_hub.postprocess["threshold"] == 0.6 and from_hub.input_size == (64, 96)
    pinned = load_checkpoint(f"{REPO}@{REVISION}")
    _same_pretrained(pinned, from_hub)


def test_predictor_from_pretrained_takes_a_hub_id(hub_cache):
    from detr_panoptic.inference.predictor import PanopticPredictor

    predictor = PanopticPredictor.from_pretrained(REPO, device="cpu")
    assert predictor.settings.category_map.to_json() == small_category_map().to_json()
    assert (predictor.settings.min_size, predictor.settings.max_size, predictor.settings.threshold) == (64, 96, 0.6)


def test_a_local_path_wins_over_a_hub_id_of_the_same_spelling(hub_cache, tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    _hf_folder(workdir / REPO, seed=1)  # ./example-org/tiny-detr-panoptic: another model
    monkeypatch.chdir(workdir)
    assert fetch_remote(REPO) is None
    local = load_checkpoint(REPO)
    assert local.description == REPO
    _same_pretrained(local, load_checkpoint(workdir / REPO))
    assert not torch.equal(local.model.state_dict()["detr.class_embed.bias"],
                           load_checkpoint(hub_cache).model.state_dict()["detr.class_embed.bias"])


def test_what_counts_as_a_hub_id():
    assert is_hub_id("facebook/detr-resnet-50-panoptic") and is_hub_id("facebook/detr-resnet-50-panoptic@main")
    for text in ("runs/best.pth", "model.safetensors", "/abs/path", "./a/b", "a/b/c", "coco-r50-panoptic",
                 "https://example.com/x.pth", "wandb:team/project/name:best", "export/model.json"):
        assert not is_hub_id(text), text


# -- failure modes: one line each --------------------------------------------------------------------------
def cli_fails(argv: list[str], capsys, *needles: str) -> str:
    """Exit status 2 and one error line, no traceback, holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith(f"detr-panoptic {argv[0]}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err and err.splitlines()[-1] == lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def export_argv(checkpoint: str, out: Path) -> list[str]:
    return ["export", "--checkpoint", checkpoint, "--format", "safetensors", "--out", str(out)]


def test_hub_id_not_in_the_cache_while_offline(hub_cache, tmp_path, capsys):
    line = cli_fails(export_argv("example-org/not-cached", tmp_path / "out"), capsys,
                     "example-org/not-cached", "not in the Hugging Face cache", "HF_HUB_OFFLINE is set",
                     "pass a local checkpoint file")
    assert "hf download example-org/not-cached" in line
    cli_fails(export_argv(f"{REPO}@v2.0", tmp_path / "out"), capsys, f"{REPO}@v2.0", "HF_HUB_OFFLINE is set")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("online_error,needle", [
    ("unreachable", "not in the Hugging Face cache (CACHE) while the Hub could not be reached"),
    ("refused", "the Hugging Face Hub could not provide it (ConnectionError: 404 Repository Not Found)"),
])
def test_hub_id_online_failures(online_error, needle, monkeypatch, tmp_path, capsys):
    """Without HF_HUB_OFFLINE: the download is attempted; its failure (stood in for here: no network may be
    used) is one line."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    calls = []

    def download(repo, name, *, revision, local_files_only):
        calls.append((repo, name, revision, local_files_only))
        if online_error == "unreachable":
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub\nand more")
        raise ConnectionError("404 Repository Not Found\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    line = cli_fails(export_argv(f"{REPO}@dev", tmp_path / "out"), capsys, f"{REPO}@dev",
                     needle.replace("CACHE", str(tmp_path / "empty-cache")), "pass a local checkpoint file")
    assert "second line" not in line and "and more" not in line
    assert calls == [(REPO, "config.json", "dev", False)]


def _hide_module(monkeypatch, name: str) -> None:
    real_import = builtins.__import__

    def hidden(module, *args, **kwargs):
        if module == name or module.startswith(f"{name}."):
            raise ImportError(f"No module named {name!r}")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", hidden)


def test_hub_id_without_huggingface_hub(monkeypatch, tmp_path, capsys):
    _hide_module(monkeypatch, "huggingface_hub")
    cli_fails(export_argv(REPO, tmp_path / "out"), capsys, REPO, "needs huggingface_hub",
              "pip install 'detr-panoptic[hub]'", "pass a local checkpoint file")


def test_wandb_without_the_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DETR_PANOPTIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    _hide_module(monkeypatch, "wandb")
    cli_fails(export_argv("wandb:team/proj/run1-checkpoint:best", tmp_path / "out"), capsys,
              "wandb:team/proj/run1-checkpoint:best", "pip install 'detr-panoptic[wandb]'",
              "wandb artifact get team/proj/run1-checkpoint:best", "--checkpoint")


def test_wandb_source_that_is_not_an_artifact_name(tmp_path, capsys):
    cli_fails(export_argv("wandb:just-a-name", tmp_path / "out"), capsys, "wandb:just-a-name",
              "expected wandb:ENTITY/PROJECT/NAME:ALIAS", "local checkpoint file")


# -- W&B: a stand-in for the W&B service ------------------------------------------------------------------
class FakeWandb:
    """``wandb.init`` / ``wandb.Artifact`` (what ``engine.metrics_log.WandbWriter`` uses) and ``wandb.Api``
    (what ``checkpoint_sources`` uses), sharing one in-memory store of logged artifact versions."""

    def __init__(self, *, entity: str = "team", unreachable: bool = False) -> None:
        self.entity = entity
        self.unreachable = unreachable
        self.versions: dict[str, list[dict]] = {}  # "entity/project/name" -> [{"files", "aliases"}]
        self.downloads = 0
        fake = self

        class Artifact:
            def __init__(self, name, type, metadata=None):
                self.name, self.type, self.metadata, self.files = name, type, metadata, {}

            def add_file(self, path, name):
                self.files[name] = Path(path).read_bytes()  # W&B uploads a copy at log time

        class Run:
            id = "run123"

            def __init__(self, project):
                self.project = project

            def log(self, data, step):
                pass

            def log_artifact(self, artifact, aliases):
                versions = fake.versions.setdefault(f"{fake.entity}/{self.project}/{artifact.name}", [])
                for version in versions:  # an alias names one version: it moves to the newest
                    version["aliases"] -= set(aliases)
                versions.append({"files": dict(artifact.files), "aliases": {*aliases, "latest"}})
                for version in versions[:-1]:
                    version["aliases"].discard("latest")

            def finish(self):
                pass

        self.module = types.SimpleNamespace(init=lambda project, **kw: Run(project), Artifact=Artifact,
                                            Api=lambda: self)

    def artifact(self, name: str):
        if self.unreachable:
            raise ConnectionError("HTTPSConnectionPool(host='api.wandb.ai', port=443): Max retries exceeded\n"
                                  "more detail on a second line")
        path, _, alias = name.partition(":")
        for number, version in enumerate(self.versions.get(path, [])):
            if alias in version["aliases"] or alias == f"v{number}":
                return FakeArtifactVersion(self, version["files"], f"v{number}")
        raise ValueError(f"artifact '{name}' not found in '{path.rsplit('/', 1)[0]}'")


class FakeArtifactVersion:
    def __init__(self, service: FakeWandb, files: dict[str, bytes], version: str) -> None:
        self.service, self.files, self.version = service, files, version

    def download(self, root: str) -> str:
        self.service.downloads += 1
        for name, data in self.files.items():
            (Path(root) / name).write_bytes(data)
        return root


@pytest.fixture
def wandb_service(tmp_path, monkeypatch):
    service = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", service.module)
    monkeypatch.setenv("DETR_PANOPTIC_CACHE", str(tmp_path / "cache"))
    return service


def test_a_checkpoint_our_training_logged_to_wandb_loads_back(wandb_service, tmp_path):
    from detr_panoptic.engine.training import train_stage
    from tests.engine.toys import tiny_config, toy_datasets

    config = tiny_config(tmp_path / "run", train={"max_steps": 2},
                         logging={"wandb": True, "wandb_log_checkpoints": True, "wandb_project": "detr-panoptic"})
    train_stage(config, datasets=toy_datasets(), evaluate=lambda model: {"pq": 12.0})
    assert "team/detr-panoptic/run123-checkpoint" in wandb_service.versions
    source = "wandb:team/detr-panoptic/run123-checkpoint:best"
    loaded = load_checkpoint(source)
    want = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pth")
    _same_pretrained(loaded, want)
    assert loaded.input_size == want.input_size is not None
    assert loaded.metadata["model_config"] == want.metadata["model_config"]
    assert loaded.description.startswith(source) and str(tmp_path / "cache" / "wandb") in loaded.description
    # the newest version is "last" (the default alias, latest); asking again downloads nothing new; a version
    # number already downloaded is read from the cache without asking W&B at all
    latest = fetch_remote("wandb:team/detr-panoptic/run123-checkpoint")
    assert latest.path.read_bytes() == (tmp_path / "run" / "checkpoints" / "last.pth").read_bytes()
    downloads = wandb_service.downloads
    best = fetch_remote(source)
    assert wandb_service.downloads == downloads and best.description == loaded.description
    wandb_service.unreachable = True
    version = best.path.parent.name
    assert fetch_remote(f"wandb:team/detr-panoptic/run123-checkpoint:{version}").path == best.path
    with pytest.raises(UserInputError, match="Max retries exceeded"):
        fetch_remote(source)  # an alias can move: it is always asked


def test_wandb_artifact_download_failures(wandb_service, tmp_path, capsys):
    cli_fails(export_argv("wandb:team/detr-panoptic/missing:best", tmp_path / "out"), capsys,
              "wandb:team/detr-panoptic/missing:best", "cannot download the W&B artifact", "not found",
              "wandb login", "--checkpoint")
    wandb_service.unreachable = True
    line = cli_fails(export_argv("wandb:team/detr-panoptic/run123-checkpoint:best", tmp_path / "out"), capsys,
                     "cannot download the W&B artifact", "Max retries exceeded")
    assert "second line" not in line
    assert not list((tmp_path / "cache").rglob("*.pth"))


def test_wandb_artifact_without_one_checkpoint_file(wandb_service, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "a.pth", small_model(), category_map=small_category_map(),
                                 model_config=small_model().config)
    run = wandb_service.module.init(project="p")
    two = wandb_service.module.Artifact("two-files", "model")
    two.add_file(checkpoint, "best.pth")
    two.add_file(checkpoint, "last.pth")
    run.log_artifact(two, aliases=["best"])
    none = wandb_service.module.Artifact("no-checkpoint", "model")
    none.add_file(tmp_path / "a.pth", "notes.txt")
    run.log_artifact(none, aliases=["best"])
    cli_fails(export_argv("wandb:team/p/two-files:best", tmp_path / "out"), capsys,
              "several checkpoint files (best.pth, last.pth", "pass the one to load with --checkpoint")
    cli_fails(export_argv("wandb:team/p/no-checkpoint:best", tmp_path / "out"), capsys,
              "no checkpoint file (notes.txt")
    with pytest.raises(UserInputError, match="several checkpoint files"):
        load_checkpoint("wandb:team/p/two-files:v0")  # now from the cache
