"""Durable file writes: fsync of files and folders, and atomic replacement (temp file + fsync +
rename), so a process killed at any point leaves the old content or the new, never a part."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


class WriteError(OSError):
    """A file of the run could not be written (a full disk, a read-only or missing folder); the
    message names the file and what is still intact."""


def serializer_errors() -> tuple:
    """What a failed write raises besides OSError: torch.save's RuntimeError ("enforce fail at
    inline_container.cc" on a full disk) and safetensors' SafetensorError."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return (RuntimeError,)
    return (RuntimeError, SafetensorError)


@contextlib.contextmanager
def writing(path, what: str, intact: str = "", errors: tuple = ()):
    """Turns an OSError (or one of ``errors``, e.g. ``serializer_errors()``) raised inside into a
    WriteError naming ``what`` (e.g. "checkpoint") and ``path``, plus ``intact`` (what the
    failure left untouched). A WriteError passes as it is."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, *errors) as e:
        raise write_error(e, path, what, intact) from e


def write_error(e: BaseException, path, what: str, intact: str = "") -> WriteError:
    """The WriteError of ``writing`` for the failure ``e``."""
    code = getattr(e, "errno", None)
    why = (e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}")[:300]
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
    if not full and not isinstance(e, OSError):  # torch.save says "unexpected pos": look at the disk
        free = _free_bytes(path)
        full = free is not None and free < 1 << 20
        why += f" (the disk is full: {free} bytes free)" if full else ""
    hint = " (free some space, or point output_dir at another disk)" if full else ""
    err = WriteError(f"cannot write {what} {path}: {why}{hint}{'; ' + intact if intact else ''}")
    err.errno = code
    return err


def _free_bytes(path) -> int | None:
    """Free bytes of the file system holding ``path`` (its nearest existing folder)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:  # pragma: no cover
        return None


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
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: the old content stays, the part goes
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
