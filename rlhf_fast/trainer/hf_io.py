"""Weights on disk: Hugging Face folders, safetensors files, tied parameters.

    save_weights(model, folder)            # model.save_pretrained(folder), or one model.safetensors
    save_weights(model, folder, state_dict=sd)   # the same files from a given (e.g. gathered) state
    sd = read_weights(model, folder)       # the full state dict those files hold (keys as model.state_dict())
    load_weights(model, folder)            # read_weights + load_state_dict, in place (exact copies)

A model that owns its own file format (``PolicyValueModel``) provides ``save_pretrained(folder,
state_dict=None)`` and ``read_weights(folder)``; these functions defer to it. Tied parameters
(an LM head sharing the embedding) are stored once and filled in under every name on read.
A PEFT model (LoRA) writes its adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
what ``PeftModel.from_pretrained`` loads) and its trainable tensors (``trainable.safetensors``);
reading takes the frozen base weights from the model itself (they never change in training).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TRAINABLE_FILE = "trainable.safetensors"  # a PEFT model's trainable tensors, keyed as its state_dict()


def is_peft(model) -> bool:
    """Whether ``model`` is a PEFT wrapper (``get_peft_model(...)``, ``PeftModel.from_pretrained``)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def unwrap_peft(model):
    """The model a PEFT wrapper (``get_peft_model(...)``) holds, with its adapters injected in
    place; ``model`` itself when it is not wrapped."""
    return model.get_base_model() if is_peft(model) else model


@contextlib.contextmanager
def quiet_hf_progress():
    """No "Writing model shards" bars from transformers while saving (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def read_safetensors(directory, prefix: str = "", pattern: str = "model*.safetensors") -> dict:
    """``{prefix + key: tensor}`` of every ``directory/pattern`` file (one file or HF shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} weights in {directory}")
    return {prefix + k: v for f in files for k, v in load_file(str(f)).items()}


def untied(model: torch.nn.Module, sd: dict) -> dict:
    """``sd`` with one key per tied parameter (safetensors refuses shared tensors), contiguous."""
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    dup = {n for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}
    return {k: v.contiguous() for k, v in sd.items() if k not in dup}


def complete(model: torch.nn.Module, sd: dict, where) -> dict:
    """``sd`` with tied parameters saved once filled in under every name; an error naming
    ``where`` when keys are missing or unknown to ``model``."""
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    sd = dict(sd)
    for names in aliases.values():
        have = [n for n in names if n in sd]
        for n in names:
            if n not in sd and have:
                sd[n] = sd[have[0]]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(f"{where}: weights missing for {missing[:5]}, unknown weights {unexpected[:5]}")
    return sd


def save_weights(model: torch.nn.Module, directory, state_dict: dict | None = None) -> None:
    """Writes ``model``'s weights (or ``state_dict``, keyed as ``model.state_dict()``) to
    ``directory``: the model's own ``save_pretrained`` (a Hugging Face or PolicyValueModel
    folder), else one ``model.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        kw = {} if state_dict is None else {"state_dict": state_dict, "safe_serialization": True}
        with quiet_hf_progress():
            model.save_pretrained(directory, **kw)
        if is_peft(model):
            from safetensors.torch import save_file

            sd = model.state_dict() if state_dict is None else state_dict
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items() if k in trainable},
                      str(directory / TRAINABLE_FILE))
    elif state_dict is None:
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))
    else:
        from safetensors.torch import save_file

        save_file(untied(model, state_dict), str(directory / "model.safetensors"))


def read_weights(model: torch.nn.Module, directory) -> dict:
    """The full state dict (CPU tensors, keys as ``model.state_dict()``) that
    :func:`save_weights` wrote to ``directory``: through ``model.read_weights`` when the model
    owns its format, else the folder's ``model*.safetensors``."""
    if hasattr(model, "read_weights"):
        sd = model.read_weights(directory)
    elif is_peft(model):
        sd = {**model.state_dict(), **read_safetensors(directory, pattern=TRAINABLE_FILE)}
    else:
        sd = read_safetensors(directory)
    return complete(model, sd, directory)


def load_weights(model: torch.nn.Module, directory) -> None:
    """Loads what :func:`save_weights` wrote into ``model`` in place (exact copies)."""
    model.load_state_dict(read_weights(model, directory))


# ---------------------------------------------------------------------------- stop tokens and padding in exports
def write_stop_tokens(directory, stop_ids, pad_id=None) -> None:
    """Sets ``eos_token_id`` (every stop id; see ``stops.py``) and ``pad_token_id`` in
    ``directory/generation_config.json`` (created when missing), so a vanilla ``generate`` on
    the exported model stops where rlhf_fast's rollouts stop."""
    from transformers import GenerationConfig

    directory = Path(directory)
    try:
        gen = GenerationConfig.from_pretrained(directory)
    except OSError:
        gen = GenerationConfig()
    ids = [int(i) for i in stop_ids]
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if pad_id is not None:
        gen.pad_token_id = int(pad_id)
    gen.save_pretrained(directory)


PAD_TOKEN = "<|rlhf_fast_pad|>"


def distinct_pad(model: torch.nn.Module, tokenizer, stop_ids):
    """A tokenizer whose pad token is no stop token, with ``model.config.pad_token_id`` set to
    it: Hugging Face's sequence classifiers read the rightmost token that is not the pad, which
    must be the stop token a reward model scores at. The tokenizer itself when its pad already
    qualifies; else a copy with ``PAD_TOKEN`` added (and ``model``'s embeddings grown by it)."""
    import copy

    pad = tokenizer.pad_token_id
    if pad is None or int(pad) in set(stop_ids):
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        pad = tokenizer.pad_token_id
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and emb.num_embeddings <= pad:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.pad_token_id = int(pad)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        text.pad_token_id = int(pad)
    return tokenizer
