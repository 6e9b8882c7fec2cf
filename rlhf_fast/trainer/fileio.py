"""Durable file writes: fsync of files and folders, and atomic replacement (temp file + fsync +
rename), so a process killed at any point leaves the old content or the new, never a part."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(path) -> None:
    """fsync every file under ``path`` and every folder."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def write_atomic(path, data: str | bytes) -> None:
    """``path`` holds its old content or ``data``, never a part: written to
    ``.<name>.tmp-<pid>`` beside it, fsynced, renamed over it, and the folder fsynced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
