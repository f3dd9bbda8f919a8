"""Remote checkpoint sources: a W&B artifact or a Hugging Face Hub model, fetched into a local cache.

``fetch_remote(source)`` is the one resolver that ``checkpoints.load_checkpoint`` (and so ``--checkpoint``,
``model.init``, ``PanopticPredictor.from_pretrained``, ``export`` and the applications built on them) runs
before reading a source:

* a local file or folder that exists is never fetched: it wins over an id of the same spelling;
* ``wandb:ENTITY/PROJECT/NAME:ALIAS`` (``ENTITY/`` optional: the W&B default entity; ``:ALIAS`` optional:
  ``latest``): the artifact, downloaded with ``wandb.Api`` (the ``wandb`` extra) into
  ``<cache>/wandb/ENTITY/PROJECT/NAME/<version>/`` once, then the checkpoint file in it (the artifacts our
  training logs hold one ``best.pth``/``last.pth``) or the Hugging Face folder it is. A version alias
  (``:v3``) already downloaded is read from the cache without asking W&B;
* ``ORG/NAME`` or ``ORG/NAME@REVISION``: a Hugging Face Hub model repository, fetched with
  ``huggingface_hub`` (the ``hub`` extra) into its own cache (``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1``
  only the cache is read. The snapshot folder is then read as a local Hugging Face folder;
* anything else (a URL, an alias, a path that does not exist) is not remote: ``None``.

A failure is one line (``UserInputError``): what was asked, why it failed, how to pass a local file instead.
``<cache>`` is ``$DETR_PANOPTIC_CACHE``, else ``$XDG_CACHE_HOME/detr-panoptic``, else ``~/.cache/detr-panoptic``.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

WANDB_PREFIX = "wandb:"
WANDB_HINT = "pip install 'detr-panoptic[wandb]'"
HUB_HINT = "pip install 'detr-panoptic[hub]'"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
# ORG/NAME[@REVISION] as the Hub spells repository ids; file names with a checkpoint suffix are paths.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
WANDB_ID = re.compile(r"^(?P<path>(?:[\w.-]+/)?[\w.-]+/[\w.-]+)(?::(?P<alias>[\w.-]+))?$")
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A fetched source: ``path`` (a checkpoint file or a Hugging Face folder, in a local cache) and
    ``description`` (what was asked and where it lies, for messages)."""

    path: Path
    description: str


def cache_dir() -> Path:
    """Where W&B artifacts are downloaded to (see the module docstring)."""
    if os.environ.get("DETR_PANOPTIC_CACHE"):
        return Path(os.environ["DETR_PANOPTIC_CACHE"]).expanduser()
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "detr-panoptic"


def is_hub_id(text: str) -> bool:
    """``ORG/NAME`` or ``ORG/NAME@REVISION``, not a file name with a checkpoint suffix."""
    match = HUB_ID.match(text)
    return match is not None and not match.group("repo").lower().endswith((*CHECKPOINT_SUFFIXES, ".json"))


def fetch_remote(source: str | os.PathLike) -> RemoteCheckpoint | None:
    """The local copy of a remote ``source`` (fetched now if needed), or None when ``source`` is local
    (an existing path), a URL, an alias or simply not found (the caller reports that)."""
    text = str(source)
    if Path(text).expanduser().exists():
        return None
    if text.startswith(WANDB_PREFIX):
        return fetch_wandb_artifact(text)
    if is_hub_id(text):
        return fetch_hub_model(text)
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# -- Weights & Biases ------------------------------------------------------------------------------------
def _local_hint(source: str) -> str:
    return f"or download it where W&B is reachable (wandb artifact get {source.removeprefix(WANDB_PREFIX)} " \
           "--root DIR) and pass the checkpoint file in it: --checkpoint DIR/FILE"


def fetch_wandb_artifact(source: str) -> RemoteCheckpoint:
    """``wandb:[ENTITY/]PROJECT/NAME[:ALIAS]`` -> the checkpoint in its cached download (see the module docstring)."""
    match = WANDB_ID.match(source.removeprefix(WANDB_PREFIX))
    if match is None:
        raise UserInputError(f"{source}: expected wandb:ENTITY/PROJECT/NAME:ALIAS (e.g. "
                             "wandb:my-team/detr-panoptic/run-abc123-checkpoint:best), or a local checkpoint file")
    name, alias = match.group("path"), match.group("alias") or "latest"
    root = cache_dir() / "wandb" / Path(*name.split("/"))
    if re.fullmatch(r"v\d+", alias) and (root / alias).is_dir():  # a version never changes: no need to ask
        return RemoteCheckpoint(checkpoint_in(root / alias, source), f"{source} ({root / alias})")
    try:
        import wandb
    except ImportError:
        raise UserInputError(f"{source}: reading a W&B artifact needs the wandb package: {WANDB_HINT}, "
                             f"{_local_hint(source)}") from None
    try:  # wandb raises its own errors, requests' and ValueError for a missing artifact or login
        artifact = wandb.Api().artifact(f"{name}:{alias}")
        version = str(artifact.version)
        folder = root / version
        if not folder.is_dir():
            _download_artifact(artifact, folder)
    except Exception as exc:  # noqa: BLE001 (the W&B client's failures are many; each becomes one line)
        raise UserInputError(f"{source}: cannot download the W&B artifact ({_first_line(exc)}); "
                             f"log in with `wandb login` and check the name, {_local_hint(source)}") from None
    log.info("%s: W&B artifact version %s in %s", source, version, folder)
    return RemoteCheckpoint(checkpoint_in(folder, source), f"{source} ({folder})")


def _download_artifact(artifact: Any, folder: Path) -> None:
    """Download into a temporary sibling, then rename: a killed download leaves no half folder behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        artifact.download(root=str(partial))
        try:
            partial.rename(folder)
        except OSError:
            if not folder.is_dir():  # another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def checkpoint_in(folder: Path, source: str) -> Path:
    """The one checkpoint of a downloaded artifact: a Hugging Face folder (``config.json``) or its single
    checkpoint file (``.pth``/``.pt``/``.ckpt``/``.bin``/``.safetensors``, at any depth)."""
    if (folder / "config.json").is_file():
        return folder
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(files) == 1:
        return files[0]
    found = ", ".join(str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()) or "no files"
    what = "several checkpoint files" if files else "no checkpoint file"
    raise UserInputError(f"{source}: the artifact holds {what} ({found}, in {folder}); "
                         f"pass the one to load with --checkpoint {folder}/FILE")


# -- Hugging Face Hub ------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as huggingface_hub read it at import."""
    now = any(os.environ.get(name, "").strip().lower() in TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        from huggingface_hub import constants
    except ImportError:
        return now
    return now or bool(constants.HF_HUB_OFFLINE)


def fetch_hub_model(source: str) -> RemoteCheckpoint:
    """``ORG/NAME[@REVISION]`` -> the snapshot folder holding ``config.json`` and the weights
    (``model.safetensors``, else ``pytorch_model.bin``)."""
    match = HUB_ID.match(source)
    assert match is not None
    repo, revision = match.group("repo"), match.group("revision")
    local = "or pass a local checkpoint file or Hugging Face folder instead"
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise UserInputError(f"{source}: no such local file or folder, and reading it as a Hugging Face Hub id "
                             f"needs huggingface_hub: {HUB_HINT}, {local}") from None
    offline = hub_offline()

    def download(name: str) -> str:
        return huggingface_hub.hf_hub_download(repo, name, revision=revision, local_files_only=offline)

    try:
        config = Path(download("config.json"))
        for name in HUB_WEIGHTS:
            try:
                download(name)
                break
            except EntryNotFoundError:
                continue
        else:
            raise UserInputError(f"{source}: the Hub repository has config.json but none of {', '.join(HUB_WEIGHTS)}"
                                 f"{' in the cache (HF_HUB_OFFLINE is set)' if offline else ''}; {local}")
    except UserInputError:
        raise
    except LocalEntryNotFoundError:  # its text is generic: the reason is offline mode or no connection
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise UserInputError(f"{source}: no such local file or folder, and not in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}) while {why}; download it where the Hub "
                             f"is reachable (hf download {repo}), {local}") from None
    except (OSError, ValueError) as exc:  # RepositoryNotFoundError, RevisionNotFoundError, HTTP errors, bad ids
        raise UserInputError(f"{source}: no such local file or folder, and the Hugging Face Hub could not "
                             f"provide it ({_first_line(exc)}); {local}") from None
    log.info("%s: Hugging Face Hub snapshot %s", source, config.parent)
    return RemoteCheckpoint(config.parent, f"{source} ({config.parent})")
