"""Loading what a run starts from, for the CLI and the demo: tokenizers, causal LMs (a local
Hugging Face folder or a fresh seeded tiny Llama), the PPO policy with its value head, reward
models and reward functions. Errors are ``LoadError`` naming the setting and the path.

    tok = load_tokenizer("tiny")                              # the built-in byte-level tokenizer
    lm = load_causal_lm("tiny", tok, seed=0)                  # the same weights for the same seed
    lm = load_causal_lm("runs/sft/final", tok)                # AutoModelForCausalLM.from_pretrained
"""
from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

import torch

TINY = "tiny"


class LoadError(ValueError):
    """A model, tokenizer or reward function could not be loaded; the message names the setting."""


def check_model_dir(key: str, path) -> Path:
    """``path`` as a Path when it is a folder holding a Hugging Face model (a config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise LoadError(f"{key}: {path} is not a folder (expected a local Hugging Face model folder)")
    if not (p / "config.json").is_file():
        raise LoadError(f"{key}: {path} holds no config.json (expected a local Hugging Face model folder)")
    return p


def load_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer of ``tokenizer`` (a folder) or else of ``model``: "tiny" is the built-in
    byte-level tokenizer."""
    from transformers import AutoTokenizer

    from rlhf_fast.tokenizer import byte_tokenizer

    src, key = (tokenizer, "tokenizer") if tokenizer else (model, "model")
    if src == TINY:
        return byte_tokenizer()
    p = Path(src)
    if not p.is_dir():
        raise LoadError(f"{key}: {src} is not a folder (expected a local Hugging Face model folder)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise LoadError(f"{key}: {src} holds no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(src)


def tiny_causal_lm(tokenizer, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                   max_positions: int = 512, seed: int = 0):
    """A fresh Llama sized for CPU runs, its weights drawn from ``seed`` (the same for the same
    seed, whatever ran before)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def load_causal_lm(path: str, tokenizer, *, key: str = "model", seed: int = 0):
    """``AutoModelForCausalLM`` from a local folder, or the seeded tiny Llama for "tiny"."""
    from transformers import AutoModelForCausalLM

    if path == TINY:
        return tiny_causal_lm(tokenizer, seed=seed)
    return AutoModelForCausalLM.from_pretrained(check_model_dir(key, path))


def load_policy(path: str, tokenizer, *, value_head: bool, seed: int = 0):
    """The RL policy: a PolicyValueModel (PPO: with its value head, loaded when the folder has
    one) or a plain causal LM (GRPO)."""
    from rlhf_fast.trainer.model import PolicyValueModel

    if value_head and path != TINY:
        return PolicyValueModel.from_pretrained(check_model_dir("model", path), value_head=True)
    return load_causal_lm(path, tokenizer, seed=seed)


def load_reward_model(path: str, tokenizer, *, key: str = "model", seed: int = 0):
    """A one-label sequence classifier from a reward-model or causal-LM folder (a fresh scalar
    head, drawn from ``seed``), or on the seeded tiny Llama for "tiny"."""
    from rlhf_fast.trainer.reward import reward_model_from_pretrained

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if path == TINY:
        with tempfile.TemporaryDirectory() as d:
            tiny_causal_lm(tokenizer, seed=seed).save_pretrained(d)
            torch.manual_seed(seed)
            return reward_model_from_pretrained(d, pad_token_id=pad)
    folder = check_model_dir(key, path)
    torch.manual_seed(seed)
    return reward_model_from_pretrained(folder, pad_token_id=pad)


def load_reward_fn(spec: str):
    """``package.module:function`` -> the function (called as f(prompts, completions))."""
    if ":" not in spec:
        raise LoadError(f"reward_fn={spec!r}: expected 'package.module:function'")
    mod, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise LoadError(f"reward_fn={spec!r}: {e}") from None
    if not callable(fn):
        raise LoadError(f"reward_fn={spec!r} is not callable")
    return fn
