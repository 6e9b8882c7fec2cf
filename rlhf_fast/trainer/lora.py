"""LoRA through PEFT for every stage: the trainable model gets adapters, the rest stays frozen.

    model = apply_lora(causal_lm, cfg)          # get_peft_model(causal_lm, lora_config(cfg)), or as given
    with adapters_disabled(model): ...           # the base model: PPO/GRPO's reference, no second copy
    export_merged(model, "final/merged")         # full weights, vanilla transformers loads them

``cfg.lora_r > 0`` (with ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``) or
``cfg.peft_config`` (a JSON file of ``peft.LoraConfig`` fields) turns LoRA on; a model already
wrapped by PEFT is used as it is. The export (``save_pretrained``) of a PEFT model writes the
adapter (``adapter_config.json`` + ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base,
folder)`` loads it). For PPO the value head (outside the PEFT model) trains in full beside the
trunk's adapters. A reward model (``*ForSequenceClassification``) keeps its ``score`` head
trainable (``modules_to_save``).
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

from torch import nn

from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.hf_io import is_peft, quiet_hf_progress, write_stop_tokens


def lora_enabled(cfg) -> bool:
    return bool(getattr(cfg, "lora_r", 0) or getattr(cfg, "peft_config", ""))


def lora_config(cfg, *, task_type: str = "CAUSAL_LM"):
    """The ``peft.LoraConfig`` that ``cfg`` asks for (None when LoRA is off)."""
    if not lora_enabled(cfg):
        return None
    from peft import LoraConfig

    if cfg.peft_config:
        path = Path(cfg.peft_config)
        if path.is_dir():
            path = path / "adapter_config.json"
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"peft_config={cfg.peft_config!r}: cannot read a JSON object of LoraConfig fields ({e})") from None
        if not isinstance(fields, dict):
            raise ConfigError(f"peft_config={cfg.peft_config!r}: expected a JSON object of LoraConfig fields")
        fields = {k: v for k, v in fields.items() if k not in ("base_model_name_or_path", "revision", "peft_type")}
        fields.setdefault("task_type", task_type)
        try:
            return LoraConfig(**fields)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"peft_config={cfg.peft_config!r}: {e}") from None
    targets = cfg.lora_target_modules.strip()
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type=task_type)


def apply_lora(model: nn.Module, cfg, *, task_type: str = "CAUSAL_LM") -> nn.Module:
    """``model`` wrapped by ``get_peft_model`` when ``cfg`` asks for LoRA (its base weights frozen,
    the adapters trainable); unchanged when LoRA is off or the model is already a PEFT model."""
    if is_peft(model):
        return model
    lcfg = lora_config(cfg, task_type=task_type)
    if lcfg is None:
        return model
    from peft import get_peft_model

    if task_type == "SEQ_CLS" and not lcfg.modules_to_save:
        lcfg.modules_to_save = ["score"]
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:  # e.g. target modules not found
        raise ConfigError(f"lora_target_modules={cfg.lora_target_modules!r}: {e}") from None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Runs a PEFT model as its base model (adapters off) inside the block."""
    with model.disable_adapter():
        yield


def export_merged(model: nn.Module, path, tokenizer=None, stop_ids=None) -> Path:
    """Writes a PEFT model's adapters merged into its base weights (a copy; ``model`` is left as
    it is) as a plain Hugging Face folder that vanilla transformers loads with no missing keys;
    ``stop_ids`` go into its generation_config.json as in ``checkpoint.export_pretrained``."""
    if not is_peft(model):
        raise TypeError(f"export_merged needs a PEFT model, got {type(model).__name__}")
    path = Path(path)
    merged = copy.deepcopy(model).merge_and_unload()
    with quiet_hf_progress():
        merged.save_pretrained(path, safe_serialization=True)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(path)
    if stop_ids:
        write_stop_tokens(path, stop_ids, getattr(tokenizer, "pad_token_id", None))
    return path


def parameter_storages(*modules: nn.Module) -> int:
    """Bytes of the distinct parameter storages of ``modules`` (shared storages counted once)."""
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            key = p.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return total

