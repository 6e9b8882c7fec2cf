"""Atomic training checkpoints: a crash mid-save never leaves a corrupt latest checkpoint.

Layout under ``root``::

    root/step-000010/model/          model.save_pretrained(...) (safetensors), or model.safetensors
    root/step-000010/optimizer.pt    optimizer.state_dict()
    root/step-000010/trainer_state.pt  {"step", "scheduler", "rng", **state}
    root/step-000010/trainer_state.json  {"step": 10} (for humans and tools)
    root/latest                      text file naming the newest complete checkpoint ("step-000010")

How a save stays atomic: everything is written into ``root/.tmp-step-000010-<pid>``, each file
and the folder are fsync'ed, the folder is renamed to ``step-000010`` (``os.replace``), and only
then is ``latest`` rewritten (temp file + fsync + ``os.replace``). A crash at any point leaves
``latest`` naming the previous complete checkpoint; stale ``.tmp-*`` folders are removed by the
next save.

Usage (any trainer)::

    from rlhf_fast.trainer.checkpoint import save_checkpoint, load_checkpoint, latest_checkpoint
    save_checkpoint(out / "checkpoints", step, model=model, optimizer=opt, scheduler=sched,
                    state={"kl_coef": 0.05}, keep_last=2)
    path = latest_checkpoint(out / "checkpoints")          # None when there is none
    if path is not None:
        state = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
        start = state["step"]                              # RNG states are restored too

``model`` may be a PolicyValueModel (saved as an HF checkpoint + value head), any Hugging Face
``PreTrainedModel`` (``save_pretrained``), or any ``nn.Module`` (one safetensors file).
RNG states (python, numpy, torch CPU and CUDA) are saved and restored by default; pass extra
``torch.Generator`` objects through ``generators={"name": gen}`` to save and restore them too.
Under torch.distributed, ``rlhf_fast.trainer.distributed.save_checkpoint`` / ``load_checkpoint``
gather a sharded model's state to rank 0 and write it through these functions (same files), and
broadcast it back on load.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
LATEST = "latest"


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


# ---------------------------------------------------------------------------- model weights
def save_model_weights(model: torch.nn.Module, directory: Path, state_dict: dict | None = None) -> None:
    """``model.save_pretrained(directory)`` when the model has it, else one safetensors file.

    ``state_dict``: the weights to write instead of the model's own (keys as
    ``model.state_dict()``), e.g. the full state gathered from a sharded model; written in the
    same layout (see :func:`_save_state_dict`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        from rlhf_fast.trainer.model import quiet_hf_progress

        with quiet_hf_progress():
            _save_state_dict(model, state_dict, directory)
        return
    if hasattr(model, "save_pretrained"):
        from rlhf_fast.trainer.model import quiet_hf_progress

        with quiet_hf_progress():
            model.save_pretrained(directory)
    else:
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Loads what :func:`save_model_weights` wrote into ``model`` in place (exact copies).

    Uses ``model.load_weights(directory)`` when the model defines it (PolicyValueModel);
    otherwise reads ``directory/model*.safetensors`` (one file or HF shards) into the model.
    Keys missing from the files are allowed only for tied parameters (e.g. an LM head tied
    to the embeddings, which ``save_pretrained`` stores once).
    """
    directory = Path(directory)
    if hasattr(model, "load_weights"):
        model.load_weights(directory)
        return
    load_state_dict_files(model, directory)


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _save_state_dict(model: torch.nn.Module, sd: dict, directory: Path) -> None:
    """Writes ``sd`` where ``save_model_weights(model, directory)`` would write the model's own
    weights: a PolicyValueModel as its HF policy checkpoint + value head + critic, a Hugging Face
    model through ``save_pretrained(state_dict=...)``, anything else as model.safetensors."""
    from rlhf_fast.trainer.model import META_FILE, VALUE_HEAD_FILE, PolicyValueModel

    if isinstance(model, PolicyValueModel):
        from safetensors.torch import save_file

        model.policy.save_pretrained(directory, state_dict=_sub(sd, "policy."), safe_serialization=True)
        meta = {"value_head": model.value_head is not None, "separate_critic": model.critic is not None}
        (directory / META_FILE).write_text(json.dumps(meta) + "\n")
        if model.value_head is not None:
            save_file({k: v.contiguous() for k, v in _sub(sd, "value_head.").items()}, str(directory / VALUE_HEAD_FILE))
        if model.critic is not None:
            model.critic.save_pretrained(directory / "critic", state_dict=_sub(sd, "critic."), safe_serialization=True)
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, state_dict=sd, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file(_untied(model, sd), str(directory / "model.safetensors"))


def _untied(model: torch.nn.Module, sd: dict) -> dict:
    """``sd`` with one key per tied parameter (safetensors refuses shared tensors)."""
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    dup = {n for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}
    return {k: v.contiguous() for k, v in sd.items() if k not in dup}


def read_model_weights(model: torch.nn.Module, directory: Path) -> dict:
    """The full state dict (keys as ``model.state_dict()``, CPU tensors) that
    :func:`save_model_weights` wrote to ``directory``, for loading into a model that cannot read
    the files in place (a sharded one). Tied parameters saved once are filled in under every
    name."""
    from safetensors.torch import load_file

    from rlhf_fast.trainer.model import META_FILE, VALUE_HEAD_FILE, PolicyValueModel

    directory = Path(directory)

    def files(d: Path, prefix: str = "") -> dict:
        found = sorted(d.glob("model*.safetensors"))
        if not found:
            raise FileNotFoundError(f"no model*.safetensors weights in {d}")
        return {prefix + k: v for f in found for k, v in load_file(str(f)).items()}

    if isinstance(model, PolicyValueModel):
        meta = json.loads((directory / META_FILE).read_text())
        mine = {"value_head": model.value_head is not None, "separate_critic": model.critic is not None}
        if meta != mine:
            raise ValueError(f"{directory} holds a model with {meta}, this one has {mine}")
        sd = files(directory, "policy.")
        if model.value_head is not None:
            sd.update({"value_head." + k: v for k, v in load_file(str(directory / VALUE_HEAD_FILE)).items()})
        if model.critic is not None:
            sd.update(files(directory / "critic", "critic."))
    else:
        sd = files(directory)
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in aliases.values():
        have = [n for n in names if n in sd]
        for n in names:
            if n not in sd and have:
                sd[n] = sd[have[0]]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(f"{directory}: weights missing for {missing[:5]}, unknown weights {unexpected[:5]}")
    return sd


def load_state_dict_files(model: torch.nn.Module, directory: Path, pattern: str = "model*.safetensors") -> None:
    """Loads ``directory/pattern`` files into ``model`` (strict, except for tied parameters)."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} weights in {directory}")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise KeyError(f"{directory}: weights for unknown parameters {unexpected[:5]}")
    if missing:
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers(remove_duplicate=False)))
        loaded = {params[k].data_ptr() for k in sd if k in params}
        untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
        # non-persistent buffers (e.g. rotary inv_freq) never appear in state_dict, so only
        # parameters and persistent buffers can be reported missing here
        if untied:
            raise KeyError(f"{directory}: no weights for {untied[:5]}")


# ---------------------------------------------------------------------------- fsync helpers
def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------- save / load
def list_checkpoints(root) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.pt").exists()]


def latest_checkpoint(root) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def save_checkpoint(root, step: int, *, model=None, optimizer=None, scheduler=None, state: dict | None = None,
                    generators: dict | None = None, keep_last: int | None = 2, model_state_dict: dict | None = None,
                    optimizer_state_dict: dict | None = None) -> Path:
    """Writes checkpoint ``root/step-{step:06d}`` atomically and points ``root/latest`` at it.

    Args:
        root: folder holding the checkpoints.
        step: the number of completed training steps (resume starts at this step).
        model: saved with :func:`save_model_weights`.
        optimizer, scheduler: their ``state_dict()`` is saved.
        state: extra picklable trainer state (e.g. a KL controller's ``state_dict()``).
        generators: named ``torch.Generator`` objects whose states are saved with the global RNGs.
        keep_last: delete all but the newest ``keep_last`` checkpoints (None keeps all).
        model_state_dict, optimizer_state_dict: states to write instead of ``model``'s and
            ``optimizer.state_dict()`` (e.g. gathered from a sharded model; same layout on disk).
    Returns the checkpoint's path.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    if model is not None:
        save_model_weights(model, tmp / "model", state_dict=model_state_dict)
    if optimizer is not None or optimizer_state_dict is not None:
        torch.save(optimizer_state_dict if optimizer_state_dict is not None else optimizer.state_dict(),
                   tmp / "optimizer.pt")
    full = dict(state or {})
    full.update(step=step, rng=rng_state(generators))
    if scheduler is not None:
        full["scheduler"] = scheduler.state_dict()
    torch.save(full, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
    _fsync_tree(tmp)
    final = root / name
    if final.exists():  # re-saving a step (e.g. after a resume): move the old copy out first
        old = root / f".tmp-{name}-old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, name + "\n")
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, *, model=None, optimizer=None, scheduler=None, generators: dict | None = None,
                    restore_rng: bool = True, map_location="cpu") -> dict:
    """Restores what :func:`save_checkpoint` wrote, in place; returns the trainer state dict
    (``state["step"]`` and any extra keys given to ``save_checkpoint``)."""
    path = Path(path)
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.pt)")
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if model is not None:
        load_model_weights(model, path / "model")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=map_location, weights_only=False))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"], generators)
    return state
