"""A policy and a value head on one transformer body.

    hidden = trunk(input_ids, attention_mask, position_ids).last_hidden_state     # (B, L, H)
    h = hidden[:, P - 1 : L - 1]              # the states that predict response tokens P .. L-1
    logits = lm_head(h)                        # (B, R, V): prompt positions never reach the LM head
    values = value_head(h).squeeze(-1)         # (B, R): V(s_t) before response token t

``trunk`` is the causal LM's ``base_model`` (a ``LlamaModel``, ``GPT2Model``, ...) and
``lm_head`` its ``get_output_embeddings()``; with ``separate_critic=True`` the values come from
a second trunk (a copy of the policy's) instead. Position ids are ``cumsum(attention_mask) - 1``,
as Hugging Face ``generate`` uses, so left-padded rows score exactly what was sampled.

Saved as a normal Hugging Face checkpoint (``AutoModelForCausalLM.from_pretrained(dir)`` loads
the policy) with ``value_head.safetensors``, ``value_model.json`` and, for a separate critic,
``critic/`` (an ``AutoModel`` checkpoint) beside it.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.trainer.hf_io import load_weights, quiet_hf_progress, read_safetensors

VALUE_HEAD_FILE = "value_head.safetensors"
META_FILE = "value_model.json"


def resolve_attn_implementation(requested: str, device) -> str:
    """"auto" -> "flash_attention_2" when flash-attn imports and ``device`` is CUDA, else "sdpa"."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting attended tokens only (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_trunk(causal_lm: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face causal LM (everything but the LM head)."""
    trunk = getattr(causal_lm, "base_model", None)
    if trunk is None or trunk is causal_lm:
        raise TypeError(f"{type(causal_lm).__name__} has no separate base_model trunk; pass an "
                        "AutoModelForCausalLM (e.g. LlamaForCausalLM, GPT2LMHeadModel)")
    return trunk


def check_plain_lm_head(causal_lm: nn.Module) -> None:
    """Logits must be exactly ``lm_head(hidden)``; models that post-process them are refused."""
    cfg = causal_lm.config
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        raise NotImplementedError(f"{type(causal_lm).__name__}: final_logit_softcapping is not supported")
    if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        raise NotImplementedError(f"{type(causal_lm).__name__}: logit_scale is not supported")


def trunk_hidden(trunk: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """(B, L, H) last hidden states (after the trunk's final norm)."""
    out = trunk(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def response_logits(causal_lm: nn.Module, input_ids, attention_mask, response_start: int) -> torch.Tensor:
    """(B, L - P, V) logits that predict tokens ``input_ids[:, P:]`` (P = response_start), with
    the LM head applied to those positions only. Works for a policy or a frozen reference."""
    _check_start(response_start, input_ids)
    hidden = trunk_hidden(lm_trunk(causal_lm), input_ids, attention_mask)
    return causal_lm.get_output_embeddings()(hidden[:, response_start - 1 : -1])


def _check_start(response_start, input_ids):
    if not 1 <= response_start < input_ids.shape[1]:
        raise ValueError(f"response_start must lie in [1, {input_ids.shape[1]}) for input_ids of shape "
                         f"{tuple(input_ids.shape)}, got {response_start}")


class PolicyValueModel(nn.Module):
    """A Hugging Face causal LM (the policy) plus a value head (hidden -> 1) on its trunk.

    Args:
        policy: an ``AutoModelForCausalLM`` model.
        value_head: add the value head (PPO); False for a bare policy (GRPO).
        separate_critic: compute values on a second trunk, initialised as a copy of the
            policy's (``critic`` overrides the copy).
    """

    def __init__(self, policy: nn.Module, *, value_head: bool = True, separate_critic: bool = False,
                 critic: nn.Module | None = None):
        super().__init__()
        lm_trunk(policy)
        check_plain_lm_head(policy)
        self.policy = policy
        if critic is not None and not separate_critic:
            raise ValueError("critic was given but separate_critic=False")
        self.critic = (critic if critic is not None else copy.deepcopy(lm_trunk(policy))) if separate_critic else None
        self.value_head = None
        if value_head:
            hidden = policy.config.get_text_config().hidden_size
            # zero-initialised: V = 0 until the value loss has spoken, instead of noise of size ~1
            # that would dominate the first advantages of small rewards
            self.value_head = nn.Linear(hidden, 1, dtype=torch.float32, device=policy.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config, *, value_head: bool = True, separate_critic: bool = False,
                    attn_implementation: str = "sdpa", dtype=None) -> "PolicyValueModel":
        """A freshly initialised model from a ``transformers`` config (e.g. a tiny LlamaConfig)."""
        from transformers import AutoModelForCausalLM

        kwargs = {"attn_implementation": attn_implementation}
        if dtype is not None:
            kwargs["dtype"] = dtype
        policy = AutoModelForCausalLM.from_config(config, **kwargs)
        return cls(policy, value_head=value_head, separate_critic=separate_critic)

    @classmethod
    def from_pretrained(cls, path, *, value_head: bool = True, separate_critic: bool | None = None,
                        attn_implementation: str = "sdpa", dtype=None) -> "PolicyValueModel":
        """Loads a local HF causal-LM folder (e.g. an SFT checkpoint). The value head and critic
        are loaded when the folder has them, else initialised (the critic as the policy's copy).
        ``separate_critic=None`` follows the folder (False when it has no value_model.json)."""
        from transformers import AutoModel, AutoModelForCausalLM

        path = Path(path)
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
        if separate_critic is None:
            separate_critic = bool(meta.get("separate_critic", False))
        kwargs = {"attn_implementation": attn_implementation}
        if dtype is not None:
            kwargs["dtype"] = dtype
        policy = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        critic = None
        if separate_critic and (path / "critic").is_dir():
            critic = AutoModel.from_pretrained(path / "critic", **kwargs)
        model = cls(policy, value_head=value_head, separate_critic=separate_critic, critic=critic)
        if value_head and (path / VALUE_HEAD_FILE).exists():
            head = read_safetensors(path, pattern=VALUE_HEAD_FILE)
            model.value_head.load_state_dict({k: v.to(model.value_head.weight.device) for k, v in head.items()})
        return model

    # ------------------------------------------------------------------ the file format (one writer, one reader)
    def file_meta(self) -> dict:
        """What ``value_model.json`` records: which parts the folder holds."""
        return {"value_head": self.value_head is not None, "separate_critic": self.critic is not None}

    def save_pretrained(self, path, state_dict: dict | None = None, **_) -> None:
        """The policy as a HF safetensors checkpoint; ``value_model.json``, the value head and
        the critic (``critic/``) beside it. ``state_dict``: weights to write instead of the
        model's own (keys as ``self.state_dict()``, e.g. gathered from a sharded model)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        own = state_dict is None
        sd = self.state_dict() if own else state_dict

        def part(prefix):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

        with quiet_hf_progress():
            kw = {} if own else {"state_dict": part("policy.")}
            self.policy.save_pretrained(path, safe_serialization=True, **kw)
            (path / META_FILE).write_text(json.dumps(self.file_meta()) + "\n")
            if self.value_head is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in part("value_head.").items()},
                          str(path / VALUE_HEAD_FILE))
            if self.critic is not None:
                kw = {} if own else {"state_dict": part("critic.")}
                self.critic.save_pretrained(path / "critic", safe_serialization=True, **kw)

    def read_weights(self, path) -> dict:
        """The state dict (keys as ``self.state_dict()``, tied weights once) that
        ``save_pretrained`` wrote to ``path``; an error when the folder holds other parts."""
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        if meta != self.file_meta():
            raise ValueError(f"{path} holds a model with {meta}, this one has {self.file_meta()}")
        sd = read_safetensors(path, "policy.")
        if self.value_head is not None:
            sd.update(read_safetensors(path, "value_head.", pattern=VALUE_HEAD_FILE))
        if self.critic is not None:
            sd.update(read_safetensors(path / "critic", "critic."))
        return sd

    def load_weights(self, path) -> None:
        """Loads what ``save_pretrained`` wrote into this model in place (exact copies)."""
        load_weights(self, path)

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        return self.policy.device

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer's activations in backward (policy and critic trunks)."""
        for m in (self.policy, self.critic):
            if m is None:
                continue
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids, attention_mask, response_start: int, *, with_values: bool = True):
        """One pass for the logits and values of the response positions.

        Args:
            input_ids: (B, L) prompt (left-padded to a common length P) + response tokens.
            attention_mask: (B, L) 1 on real tokens, 0 on padding.
            response_start: P, the index of the first response token.
            with_values: also compute values (needs the value head).
        Returns:
            logits (B, L - P, V) in the model's (autocast) dtype, predicting ``input_ids[:, P:]``;
            values (B, L - P) fp32, or None.
        """
        _check_start(response_start, input_ids)
        hidden = trunk_hidden(lm_trunk(self.policy), input_ids, attention_mask)
        scored = hidden[:, response_start - 1 : -1]
        logits = self.policy.get_output_embeddings()(scored)
        values = None
        if with_values:
            if self.value_head is None:
                raise ValueError("with_values=True but this PolicyValueModel has no value head")
            if self.critic is not None:
                scored = trunk_hidden(self.critic, input_ids, attention_mask)[:, response_start - 1 : -1]
            values = self._values(scored)
        return logits, values

    def _values(self, hidden) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    def score_sequences(self, input_ids, attention_mask) -> torch.Tensor:
        """(B,) the value head at each row's last attended token: this model used as a reward
        model (a trunk with a scalar head)."""
        if self.value_head is None:
            raise ValueError("score_sequences needs a value head")
        trunk = self.critic if self.critic is not None else lm_trunk(self.policy)
        hidden = trunk_hidden(trunk, input_ids, attention_mask)
        last = last_token_index(attention_mask)
        return self._values(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last attended position (works for left and right padding)."""
    L = attention_mask.shape[1]
    return L - 1 - attention_mask.ne(0).flip(-1).to(torch.uint8).argmax(-1)
