"""The torchrun process group: joining it, this rank's place and device, leaving it cleanly.

A trainer built in a process that torchrun launched (``WORLD_SIZE > 1``) joins the job by
itself (``init_distributed``: NCCL on CUDA, one GPU per rank, else gloo). Outside torchrun every
function here answers for a single process (rank 0 of 1) and ``init_distributed`` is a no-op.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0
_STATE = {"hooks": False, "failed": False}


def is_distributed() -> bool:
    """True once a default process group exists (torchrun, or the caller's own init)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(name: str = "auto") -> torch.device:
    """This rank's device: "auto" / "cuda" mean ``cuda:LOCAL_RANK`` under torchrun (one GPU per
    rank), "auto" is the CPU without CUDA; an explicit "cpu" or "cuda:N" is taken as is."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")  # a ConfigError in the trainers
        if dev.index is None:
            dev = torch.device("cuda", local_rank() if is_distributed() or _launched() else torch.cuda.current_device())
    return dev


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> bool:
    """Joins the torchrun job when this process was launched with ``WORLD_SIZE > 1`` and no
    default process group exists yet; returns whether a process group exists afterwards.

    Backend NCCL when this rank's device is CUDA, else gloo. ``timeout_s`` bounds every
    collective (default: env ``RLHF_FAST_DIST_TIMEOUT_S`` or 30 min), so a rank whose peer died
    fails instead of hanging. Installs the exit handling of ``_install_exit_hooks``."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not _launched():
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get("RLHF_FAST_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    dev = rank_device(device)
    kw = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kw["device_id"] = dev
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s), **kw)
    _install_exit_hooks()
    return True


def shutdown() -> None:
    """Barrier, then ``destroy_process_group`` (without the barrier gloo ranks that leave first
    sometimes abort the others at exit). A no-op when no process group exists."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
    dist.destroy_process_group()


def report_failure(exc: BaseException) -> None:
    """Prints ``[rank r/world] failed`` with the traceback to stderr (every rank, not only rank
    0) and records it in torchrun's error file, so the job summary names the first failure."""
    where = f"[rank {rank()}/{world_size()}]" if is_distributed() else f"[rank {os.environ.get('RANK', '?')}]"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    print(f"{where} failed:\n{text}", file=sys.stderr, flush=True)
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        try:  # the handler formats the exception being handled (traceback.format_exc)
            raise exc
        except BaseException as e:
            get_error_handler().record_exception(e)
    except Exception:  # pragma: no cover - recording is best effort
        pass


@contextlib.contextmanager
def distributed_run(device: str = "auto", timeout_s: float | None = None):
    """The body of a torchrun entry point (a CLI's ``main``)::

        with distributed_run(cfg.device):
            trainer = PPOTrainer(...); trainer.train()

    Joins the job (``init_distributed``); on success leaves through ``shutdown`` (barrier +
    destroy); on an exception (or ``SystemExit`` with a non-zero code) reports it on this rank
    and re-raises without a barrier: the peers may be blocked in a collective, and torchrun
    stops them when this process exits non-zero."""
    init_distributed(device, timeout_s)
    try:
        yield
    except SystemExit as e:
        if e.code not in (0, None):
            _STATE["failed"] = True
        else:
            shutdown()
        raise
    except BaseException as e:
        _STATE["failed"] = True
        report_failure(e)
        e.__rlhf_fast_reported__ = True  # the excepthook does not print it again
        raise
    shutdown()


def _install_exit_hooks() -> None:
    """For trainers that joined the job by themselves: an unhandled exception is reported with
    its rank (``report_failure``) and skips the exit barrier; a clean exit runs ``shutdown``."""
    if _STATE["hooks"]:
        return
    _STATE["hooks"] = True

    def excepthook(tp, value, tb):  # replaces Python's printing of the traceback
        _STATE["failed"] = True
        if not getattr(value, "__rlhf_fast_reported__", False):
            report_failure(value)

    sys.excepthook = excepthook

    def at_exit():
        if not _STATE["failed"]:
            shutdown()

    atexit.register(at_exit)


def barrier() -> None:
    """Waits for every rank (a no-op outside a process group)."""
    if is_distributed():
        dist.barrier()

