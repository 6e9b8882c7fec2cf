"""Atomic, verified training checkpoints, for one process or every rank of a torchrun job.

Layout under ``root``::

    root/step-000010/model/              the model's weights (``hf_io.save_weights``)
    root/step-000010/optimizer.pt        optimizer.state_dict()
    root/step-000010/trainer_state.pt    {"step", "scheduler", "rng", **state}
    root/step-000010/trainer_state.json  {"step": 10} (for humans and tools)
    root/step-000010/manifest.json       size and sha256 of every other file, written last
    root/latest                          text file naming the newest complete checkpoint

A save writes everything into ``root/.tmp-step-000010-<pid>``, the manifest last, fsyncs each
file and the folder, renames the folder to ``step-000010`` and only then rewrites ``latest``
(temp file + fsync + ``os.replace``). Stale ``.tmp-step-*`` folders and ``.latest.tmp-*`` files
of killed runs are removed by the next save.

A load verifies the manifest first and names the file that is missing, truncated or changed
(``CorruptCheckpointError``). ``latest_checkpoint`` falls back to the newest checkpoint that
verifies, with a warning, when ``latest`` is empty, dangling or names a corrupt checkpoint.

Under a process group every rank calls ``save_checkpoint`` / ``load_checkpoint`` /
``export_pretrained``: rank 0 writes the full state gathered from the shards (the files of a
single-process run, so any world size resumes any other) and reads it back, broadcasting it.

    save_checkpoint(out / "checkpoints", step, model=model, optimizer=opt, scheduler=sched,
                    state={"kl_coef": 0.05}, generators={"shuffle": gen}, keep_last=2)
    path = latest_checkpoint(out / "checkpoints")          # None when there is none
    state = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)   # RNGs restored too
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

from rlhf_fast.trainer import hf_io
from rlhf_fast.trainer.collectives import broadcast_object
from rlhf_fast.trainer.fileio import fsync_dir, fsync_tree, serializer_errors, write_atomic, writing
from rlhf_fast.trainer.process_group import barrier, is_distributed, rank
from rlhf_fast.trainer.sharding import full_state_dicts, load_full_state_dicts

_STEP_DIR = re.compile(r"^step-(\d+)$")
LATEST = "latest"
MANIFEST = "manifest.json"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or changed since it was written (named in the message)."""


# ---------------------------------------------------------------------------- RNG states
def rng_state(generators: dict | None = None) -> dict:
    """Python, numpy, torch (CPU + every CUDA device) RNG states, plus named torch Generators."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    return state


def set_rng_state(state: dict, generators: dict | None = None) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k not in state.get("generators", {}):
            raise KeyError(f"checkpoint holds no state for generator {k!r}")
        g.set_state(state["generators"][k])


# ---------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: {"files": {relative path: {"size", "sha256"}}} of every file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def verify_checkpoint(path) -> Path:
    """``path`` when its manifest and every file it lists are intact, else CorruptCheckpointError
    naming the bad file."""
    path = Path(path)
    manifest = path / MANIFEST
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no such folder)")
    try:
        entries = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{manifest} is missing (the save did not finish)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{manifest} is unreadable: {e}") from None
    for rel, meta in entries.items():
        f = path / rel
        if not f.is_file():
            raise CorruptCheckpointError(f"{f} is missing")
        if f.stat().st_size != meta["size"]:
            raise CorruptCheckpointError(f"{f} has {f.stat().st_size} bytes, the manifest says {meta['size']}")
        if _sha256(f) != meta["sha256"]:
            raise CorruptCheckpointError(f"{f} differs from its sha256 in the manifest")
    return path


# ---------------------------------------------------------------------------- finding checkpoints
def list_checkpoints(root) -> list[Path]:
    """Checkpoint folders under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root) -> Path | None:
    """The checkpoint ``root/latest`` names, verified; when ``latest`` is empty, dangling or names a
    corrupt checkpoint, the newest one that verifies (with a warning). None when ``root`` holds no
    checkpoint at all; CorruptCheckpointError when it holds some and none verifies."""
    root = Path(root)
    pointer = root / LATEST
    candidates = list_checkpoints(root)
    if not pointer.exists() and not candidates:
        return None
    problem, name = f"{pointer} is missing", None
    if pointer.exists():
        name = pointer.read_text().strip()
        if not name:
            problem = f"{pointer} is empty"
        else:
            try:
                return verify_checkpoint(root / name)
            except (CorruptCheckpointError, FileNotFoundError) as e:
                problem = f"{pointer} names {name}: {e}"
    for path in reversed(candidates):
        if path.name == name:
            continue
        try:
            verify_checkpoint(path)
        except (CorruptCheckpointError, FileNotFoundError) as e:
            problem += f"; skipped {path.name}: {e}"
            continue
        warnings.warn(f"{problem}; falling back to {path}")
        return path
    raise CorruptCheckpointError(f"no complete checkpoint under {root}: {problem}")


# ---------------------------------------------------------------------------- save / load
def save_checkpoint(root, step: int, *, model=None, optimizer=None, scheduler=None, state: dict | None = None,
                    generators: dict | None = None, keep_last: int | None = 2) -> Path | None:
    """Writes checkpoint ``root/step-{step:06d}`` atomically and points ``root/latest`` at it.

    Args:
        root: folder holding the checkpoints.
        step: the number of completed training steps (resume starts at this step).
        model: saved with ``hf_io.save_weights`` (its full state, gathered under a process group).
        optimizer, scheduler: their ``state_dict()`` is saved.
        state: extra picklable trainer state (e.g. a KL controller's ``state_dict()``).
        generators: named ``torch.Generator`` objects whose states are saved with the global RNGs.
        keep_last: delete all but the newest ``keep_last`` checkpoints (None keeps all).
    Returns the checkpoint's path (on rank 0; None on the other ranks, which only help gather).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last!r}")
    msd = osd = None
    if is_distributed() and model is not None:
        msd, osd = full_state_dicts(model, optimizer)  # every rank all-gathers; rank 0 keeps the result
    path = None
    if rank() == 0:
        osd = osd if osd is not None else (optimizer.state_dict() if optimizer is not None else None)
        path = _write(Path(root), step, model, msd, osd, scheduler, state, generators, keep_last)
    barrier()  # the checkpoint is complete on disk when any rank goes on
    return path


def _write(root: Path, step, model, msd, osd, scheduler, state, generators, keep_last) -> Path:
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    pointer = root / LATEST
    before = pointer.read_text().strip() if pointer.is_file() else ""
    intact = f"{pointer} still names {before}" if before else "no checkpoint was saved before"
    try:  # a failure (a full disk) removes the part written; latest and earlier checkpoints are untouched
        with writing(root / name, "checkpoint", intact, serializer_errors()):
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in root.glob(f".{LATEST}.tmp-*"):
                stale.unlink(missing_ok=True)
            tmp.mkdir()
            if model is not None:
                hf_io.save_weights(model, tmp / "model", state_dict=msd)
            if osd is not None:
                torch.save(osd, tmp / "optimizer.pt")
            full = dict(state or {})
            full.update(step=step, rng=rng_state(generators))
            if scheduler is not None:
                full["scheduler"] = scheduler.state_dict()
            torch.save(full, tmp / "trainer_state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
            write_manifest(tmp)  # last: a folder with a valid manifest is complete
            fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / name
    if final.exists():  # re-saving a step (e.g. after a resume): move the old copy out first
        old = root / f".tmp-{name}-old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    with writing(pointer, "the checkpoint pointer", f"{final} is complete; "
                 f"{f'latest still names {before}' if before else 'latest is unchanged'}"):
        write_atomic(pointer, name + "\n")
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _read(path: Path, what: str, map_location="cpu"):
    try:
        return torch.load(path / what, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise CorruptCheckpointError(f"{path / what} cannot be read: {e}") from None


def load_checkpoint(path, *, model=None, optimizer=None, scheduler=None, generators: dict | None = None,
                    restore_rng: bool = True, map_location="cpu") -> dict:
    """Restores what :func:`save_checkpoint` wrote, in place, after verifying it; returns the
    trainer state dict (``state["step"]`` and the extra keys given to ``save_checkpoint``).
    Under a process group only rank 0 reads ``path`` (no shared file system needed) and the
    states are broadcast; each rank keeps its shard. CUDA RNG states are then not restored."""
    path = Path(path)
    state = msd = osd = None
    if rank() == 0:
        verify_checkpoint(path)
        state = _read(path, "trainer_state.pt")
        if is_distributed():
            msd = hf_io.read_weights(model, path / "model") if model is not None else None
            osd = _read(path, "optimizer.pt") if optimizer is not None else None
        else:
            if model is not None:
                hf_io.load_weights(model, path / "model")
            if optimizer is not None:
                optimizer.load_state_dict(_read(path, "optimizer.pt", map_location))
    if is_distributed():
        state = broadcast_object(state)
        if model is not None:
            load_full_state_dicts(model, optimizer, msd, osd)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        rng = state["rng"] if not is_distributed() else {k: v for k, v in state["rng"].items() if k != "cuda"}
        set_rng_state(rng, generators)
    return state


def export_pretrained(model: torch.nn.Module, path, tokenizer=None, stop_ids=None) -> Path:
    """Writes ``model`` as a Hugging Face folder (``save_pretrained``; a PolicyValueModel with its
    value head) and the tokenizer to ``path``; ``stop_ids`` go into its generation_config.json
    (``hf_io.write_stop_tokens``). Under a process group every rank calls it and rank 0 writes
    the gathered full weights."""
    path = Path(path)
    msd = full_state_dicts(model)[0] if is_distributed() else None
    if rank() == 0:
        with writing(path, "the model", errors=serializer_errors()):
            hf_io.save_weights(model, path, state_dict=msd)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(path)
            if stop_ids:
                hf_io.write_stop_tokens(path, stop_ids, getattr(tokenizer, "pad_token_id", None))
    barrier()
    return path
