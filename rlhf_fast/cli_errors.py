"""What the CLI checks before a stage runs, and which errors it reports as one line.

    check_start(command, cfg)    before anything is written: the output folder can be written and
                                 holds no other run, resume_from exists, the device exists, and
                                 (demo) every stage's settings are valid
    save_settings(...)           output_dir/run_config.yaml; forget_failed_start removes it again
                                 when the run fails before it logged or saved anything
    user_errors()                the exception classes printed as ``rlhf-fast <cmd>: error: ...``
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from rlhf_fast.settings import CLIError


def user_errors() -> tuple:
    """The exception classes that mean a user mistake or a fault of the machine (a bad setting,
    file, folder or checkpoint, a run that stopped on NaN/Inf, a full disk): printed as one
    line, the traceback only with --debug."""
    from rlhf_fast.data import DataError
    from rlhf_fast.models import LoadError
    from rlhf_fast.trainer.checkpoint import CorruptCheckpointError
    from rlhf_fast.trainer.config import ConfigError
    from rlhf_fast.trainer.fileio import WriteError
    from rlhf_fast.trainer.rollout import RewardFunctionError
    from rlhf_fast.trainer.runtime import NonFiniteError, OutputDirInUseError

    return (CLIError, DataError, ConfigError, LoadError, OutputDirInUseError, CorruptCheckpointError, NonFiniteError,
            RewardFunctionError, WriteError, FileNotFoundError, FileExistsError)


def check_output_dir(out: Path) -> None:
    """``out`` is a folder this process can write into, or can be created: else CLIError saying
    why (a file in the way, a read-only folder or file system)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == out else f"cannot be created: {probe} is a file"
        raise CLIError(f"output_dir {out} {where}, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is read-only" if probe == out else f"cannot be created: {probe} is read-only"
        raise CLIError(f"output_dir {out} {where} (no permission to write, or a read-only file system)")


def check_start(command: str, cfg) -> None:
    """Before anything runs or is written: output_dir can be written and a fresh run must not
    land on another run's output_dir (unless overwrite_output_dir); resume_from must name a
    checkpoint folder; the device must exist; a demo checks every stage's settings."""
    from rlhf_fast.trainer.runtime import resolve_device, run_in_progress

    out = Path(cfg.output_dir)
    check_output_dir(out)
    resume = getattr(cfg, "resume_from", "")
    if resume and resume != "latest" and not Path(resume).is_dir():
        raise CLIError(f"resume_from={resume}: no such checkpoint folder")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # under torchrun each rank picks its own device later
        resolve_device(cfg.device)
    if command == "demo":
        from rlhf_fast.demo import Demo, demo_outputs

        Demo(cfg, log=lambda *a: None).check_settings()
    if resume or cfg.overwrite_output_dir:
        return
    if command == "demo":
        used = ", ".join(demo_outputs(out)) or None
    else:
        used = run_in_progress(out)
    if used:
        what = "set overwrite_output_dir=true to replace it" + ("" if command == "demo" else
                                                               ", resume_from=latest to continue it")
        raise CLIError(f"output_dir {out} already holds a run ({used}); {what}, or choose another output_dir")


def save_settings(command, cfg, run) -> Path | None:
    """output_dir/run_config.yaml: every setting of this run, reusable as --config (rank 0 writes;
    the other ranks get None)."""
    import yaml

    from rlhf_fast.trainer.fileio import write_atomic, writing

    if os.environ.get("RANK", "0") != "0":
        return None
    out = Path(cfg.output_dir)
    path = out / "run_config.yaml"
    with writing(path, "the run's settings"):
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, yaml.safe_dump({**run, **dataclasses.asdict(cfg)}, sort_keys=False))
    return path


def forget_failed_start(saved: Path | None, existed: bool) -> None:
    """A run that failed before it logged or saved anything leaves no run_config.yaml (nor the
    output folder, when this run created it and it is empty)."""
    from rlhf_fast.trainer.runtime import run_in_progress

    if saved is None or not saved.parent.is_dir() or run_in_progress(saved.parent):
        return
    saved.unlink(missing_ok=True)
    if not existed and not any(saved.parent.iterdir()):
        saved.parent.rmdir()
