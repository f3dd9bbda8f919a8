"""Atomic file writes: a crash or a kill never leaves a half-written file behind."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; finished files get the usual 0666 & ~umask.
_FILE_MODE = 0o666 & ~_current_umask()


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp(\.[^.]*)?$")  # atomic_path's names (tempfile.mkstemp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file lives in the same folder (same filesystem) so ``os.replace`` is atomic.
    On error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)  # again: some writers (safetensors) replace the file with an owner-only one
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files that ``atomic_path`` leaves in ``folder`` when its process is killed
    mid-write (``.<name>.<random characters>.tmp<suffix>``; the finished files are never touched);
    returns how many. Writers call it when they (re)start on a folder: one writer per output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        if _TEMPORARY.match(entry.name) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
    return removed


def file_digest(*paths: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) of the files' bytes, in order: which weights a file (or files) holds."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    dump_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **dump_kwargs))


def check_writable_folder(folder: str | os.PathLike, *, what: str = "output folder") -> None:
    """Fail before any work when ``folder`` cannot be created or written (creates nothing).

    ``NotADirectoryError`` when it, or a parent, is a file; ``PermissionError`` when the nearest existing
    folder is not writable. ``what`` names it in the message (``train.output_dir``, ``output folder``).
    """
    path = Path(folder)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise NotADirectoryError(f"{what} {path} {where}, not a folder")
    if not os.access(existing if existing.exists() else Path.cwd(), os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be created in {existing})"
        raise PermissionError(f"{what} {path}: cannot write there{where}: permission denied")
