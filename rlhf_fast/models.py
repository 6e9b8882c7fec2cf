"""Loading what a run starts from, for the CLI and the demo: tokenizers, causal LMs (a local
Hugging Face folder, a hub id found in the local Hugging Face cache, or a fresh seeded tiny
Llama), the PPO policy with its value head, reward models and reward functions. Errors are
``LoadError`` naming the setting and the path.

    tok = load_tokenizer("tiny")                              # the built-in byte-level tokenizer
    lm = load_causal_lm("tiny", tok, seed=0)                  # the same weights for the same seed
    lm = load_causal_lm("runs/sft/final", tok)                # AutoModelForCausalLM.from_pretrained
    lm = load_causal_lm("Qwen/Qwen2.5-0.5B", tok, **load_kwargs(cfg))   # hub id; dtype etc. from the config

A hub id is looked up in the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) first; when it is
not there it is downloaded unless ``HF_HUB_OFFLINE=1``, in which case the error names the cache.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch

TINY = "tiny"


class LoadError(ValueError):
    """A model, tokenizer or reward function could not be loaded; the message names the setting."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids downloads."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_hub_id(key: str, name: str) -> Path:
    """The local folder of hub model ``name`` ("org/model"): its snapshot in the Hugging Face
    cache, else downloaded (config, weights, tokenizer files) unless offline."""
    from huggingface_hub import constants, snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken", "*.jinja"]
    try:
        return Path(snapshot_download(name, cache_dir=cache, local_files_only=True, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - not in the cache (LocalEntryNotFoundError and friends)
        if hub_offline():
            raise LoadError(f"{key}: {name} is not a folder and is not in the Hugging Face cache {cache} "
                            "(HF_HUB_OFFLINE is set, so it is not downloaded)") from e
    try:
        return Path(snapshot_download(name, cache_dir=cache, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - no network, unknown repo, gated repo, ...
        raise LoadError(f"{key}: {name} is not a folder, not in the Hugging Face cache {cache}, and could not "
                        f"be downloaded ({type(e).__name__}: {e})") from None


def load_kwargs(cfg) -> dict:
    """``from_pretrained`` kwargs from a trainer config: ``model_dtype``, ``trust_remote_code``,
    ``attn_implementation`` (unless "auto": the trainer resolves it) and ``model_init_kwargs``."""
    kw = json.loads(cfg.model_init_kwargs) if getattr(cfg, "model_init_kwargs", "") else {}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(cfg, "model_dtype", "auto"))
    if dtype is not None:
        kw["dtype"] = dtype
    if getattr(cfg, "trust_remote_code", False):
        kw["trust_remote_code"] = True
    if getattr(cfg, "attn_implementation", "auto") != "auto":
        kw["attn_implementation"] = cfg.attn_implementation
    return kw


def check_model_dir(key: str, path) -> Path:
    """``path`` as a Path when it is a folder holding a Hugging Face model (a config.json); a hub
    id ("org/model") is resolved through the Hugging Face cache (``resolve_hub_id``)."""
    p = Path(path)
    if not p.is_dir() and not p.exists() and _HUB_ID.match(str(path)) and str(path).count("/") == 1:
        p = resolve_hub_id(key, str(path))
    if not p.is_dir():
        raise LoadError(f"{key}: {path} is not a folder (expected a local Hugging Face model folder or a hub id "
                        "'org/model')")
    if not (p / "config.json").is_file():
        raise LoadError(f"{key}: {path} holds no config.json (expected a local Hugging Face model folder)")
    return p


def load_tokenizer(model: str, tokenizer: str | None = None, *, trust_remote_code: bool = False):
    """The tokenizer of ``tokenizer`` (a folder) or else of ``model``: "tiny" is the built-in
    byte-level tokenizer."""
    from transformers import AutoTokenizer

    from rlhf_fast.tokenizer import byte_tokenizer

    src, key = (tokenizer, "tokenizer") if tokenizer else (model, "model")
    if src == TINY:
        return byte_tokenizer()
    p = check_model_dir(key, src) if not Path(src).is_dir() else Path(src)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise LoadError(f"{key}: {src} holds no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)


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


def load_causal_lm(path: str, tokenizer, *, key: str = "model", seed: int = 0, **kwargs):
    """``AutoModelForCausalLM`` from a local folder or hub id (``kwargs`` to ``from_pretrained``:
    ``dtype``, ``attn_implementation``, ``trust_remote_code``, ...; see ``load_kwargs``), or the
    seeded tiny Llama for "tiny"."""
    from transformers import AutoModelForCausalLM

    if path == TINY:
        return tiny_causal_lm(tokenizer, seed=seed).to(kwargs.get("dtype", torch.float32))
    return AutoModelForCausalLM.from_pretrained(check_model_dir(key, path), **kwargs)


def load_policy(path: str, tokenizer, *, value_head: bool, seed: int = 0, **kwargs):
    """The RL policy: a PolicyValueModel (PPO: with its value head, loaded when the folder has
    one) or a plain causal LM (GRPO); ``kwargs`` as for ``load_causal_lm``."""
    from rlhf_fast.trainer.model import PolicyValueModel

    if value_head and path != TINY:
        return PolicyValueModel.from_pretrained(check_model_dir("model", path), value_head=True, **kwargs)
    return load_causal_lm(path, tokenizer, seed=seed, **kwargs)


def load_reward_model(path: str, tokenizer, *, key: str = "model", seed: int = 0, **kwargs):
    """A one-label sequence classifier from a reward-model or causal-LM folder (a fresh scalar
    head, drawn from ``seed``), or on the seeded tiny Llama for "tiny"."""
    from rlhf_fast.trainer.reward import reward_model_from_pretrained

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if path == TINY:
        with tempfile.TemporaryDirectory() as d:
            tiny_causal_lm(tokenizer, seed=seed).save_pretrained(d)
            torch.manual_seed(seed)
            return reward_model_from_pretrained(d, pad_token_id=pad, **kwargs)
    folder = check_model_dir(key, path)
    torch.manual_seed(seed)
    return reward_model_from_pretrained(folder, pad_token_id=pad, **kwargs)


def load_reward_fn(spec: str):
    """``package.module:function`` -> the function (called as f(prompts, completions, **columns))."""
    if ":" not in spec:
        raise LoadError(f"reward_fn={spec!r}: expected 'package.module:function'")
    mod, name = spec.split(":", 1)
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise LoadError(f"reward_fn={spec!r}: {e}") from None
    except Exception as e:  # a SyntaxError or an error raised while the module runs at import
        raise LoadError(f"reward_fn={spec!r}: importing {mod} failed: {type(e).__name__}: {e}") from e
    try:
        fn = getattr(module, name)
    except AttributeError as e:
        raise LoadError(f"reward_fn={spec!r}: {e}") from None
    if not callable(fn):
        raise LoadError(f"reward_fn={spec!r} is not callable")
    return fn
