"""Files of runs and data, local or on cloud storage: every path a stage reads or writes goes
through here, on ``etils.epath`` (as orbax's checkpoints do), so a workdir may be
``gs://bucket/run`` as well as ``runs/main``.

Paths stay strings (``os.path.join`` and ``os.path.dirname`` keep a ``gs://`` prefix on POSIX);
the functions below take them. Object stores have no rename or append: ``write_atomic``
there writes the object whole (a single object write is atomic on GCS), and ``append``
rewrites it (metrics files are small).
"""

from __future__ import annotations

import os
from typing import IO

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://", "az://")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_PREFIXES)


def absolute(path: str) -> str:
    """A local path made absolute; a URL as it is."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def open(path: str, mode: str = "r", encoding: str | None = "utf-8") -> IO:  # noqa: A001
    """Open a file (text modes in ``encoding``); ``makedirs`` its directory first to write."""
    if "b" in mode:
        return epath.Path(path).open(mode)
    return epath.Path(path).open(mode, encoding=encoding)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
    return epath.Path(path).is_file()


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str) -> list[str]:
    return sorted(p.name for p in epath.Path(path).iterdir())


def read_text(path: str) -> str:
    return epath.Path(path).read_text(encoding="utf-8")


def write_atomic(path: str, text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it held: a temporary file renamed over it
    (local), one object write (cloud storage)."""
    if is_remote(path):
        epath.Path(path).write_text(text, encoding="utf-8")
        return
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def append(path: str, text: str) -> None:
    """Add ``text`` at the end of ``path`` (created when missing)."""
    if is_remote(path):
        old = read_text(path) if exists(path) else ""
        epath.Path(path).write_text(old + text, encoding="utf-8")
        return
    with open(path, "a") as f:
        f.write(text)
