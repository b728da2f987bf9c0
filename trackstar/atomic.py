"""Atomic writes: write to a temp file (or folder) beside the target, fsync, then rename into place, so a
crash never leaves a half-written file under the final name. One helper per kind of writer: an open file
(`atomic_open`), a whole text (`atomic_write_text`), a library that wants a file name (`atomic_path`:
safetensors, faiss, matplotlib) and a folder (`atomic_dir`, `replace_dir`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _temp_name(path: Path, suffix: str) -> Path:
    """A fresh, hidden file name beside `path` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp file name beside `path` for writers that take a name; on clean exit fsync it and rename it to
    `path`, else delete it. `suffix` keeps an extension a writer reads the format from (".tmp.png")."""
    path = Path(path)
    tmp = _temp_name(path, suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file next to `path`; on clean exit fsync and rename it to `path`, else delete it."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) as the whole content of `path`, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the finished folder `src` to `dest`: an old `dest` is first renamed aside, then removed, so `dest`
    is always either the old folder or the new one."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.rmdir(old)
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temp folder beside `path`; on clean exit it replaces `path` (`replace_dir`), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
