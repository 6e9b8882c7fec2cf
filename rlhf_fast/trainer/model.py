"""A policy and a value head on one transformer body.

    hidden = trunk(input_ids, attention_mask, position_ids).last_hidden_state     # (B, L, H)
    h = hidden[:, P - 1 : L - 1]              # the states that predict response tokens P .. L-1
    logits = lm_head(h)                        # (B, R, V): prompt positions never reach the LM head
    values = value_head(h).squeeze(-1)         # (B, R): V(s_t) before response token t

``trunk`` is the causal LM's ``base_model`` (a ``LlamaModel``, ``GPT2Model``, ...; under a PEFT
wrapper, the wrapped model's) and ``lm_head`` its ``get_output_embeddings()`` followed by the
head's logit transform read from the config (``logit_transform``: Granite's ``logits_scaling``,
Cohere's ``logit_scale``, Gemma2's ``final_logit_softcapping``); with ``separate_critic=True`` the values come from
a second trunk (a copy of the policy's) instead. Position ids are ``cumsum(attention_mask) - 1``,
as Hugging Face ``generate`` uses, so left-padded rows score exactly what was sampled.

With ``return_hidden=True`` (the trainers' ``lm_head="fused"``) the LM head is not called:
``forward`` returns ``lm_head.HeadInputs`` (h, the head's weight and bias, its logit transform)
and the from-hidden ops (``linear_token_logprobs``, ``linear_ppo_policy_loss``) form the
log-probs chunk by chunk, so no (B, R, V) tensor exists. The weight is read inside the forward,
where FSDP has gathered it.

Saved as a normal Hugging Face checkpoint (``AutoModelForCausalLM.from_pretrained(dir)`` loads
the policy) with ``value_head.safetensors``, ``value_model.json`` and, for a separate critic,
``critic/`` (an ``AutoModel`` checkpoint) beside it.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.trainer.hf_io import (
    TRAINABLE_FILE,
    is_peft,
    load_weights,
    quiet_hf_progress,
    read_safetensors,
    unwrap_peft,
)
from rlhf_fast.trainer.lm_head import (
    HeadInputs,
    causal_lm_head_operands,
    head_logits,
    head_operands,
    logit_transform,
    transform_logits,
)

VALUE_HEAD_FILE = "value_head.safetensors"
META_FILE = "value_model.json"


def resolve_attn_implementation(requested: str, device, config=None) -> str:
    """"auto" -> "eager" for a model whose attention soft-caps its scores (``config`` with
    ``attn_logit_softcapping``, e.g. Gemma2: only eager attention applies the cap), else
    "flash_attention_2" when flash-attn imports and ``device`` is CUDA, else "sdpa"."""
    if requested != "auto":
        return requested
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "eager"
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting attended tokens only (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_trunk(causal_lm: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face causal LM (everything but the LM head)."""
    causal_lm = unwrap_peft(causal_lm)
    trunk = getattr(causal_lm, "base_model", None)
    if trunk is None or trunk is causal_lm:
        raise TypeError(f"{type(causal_lm).__name__} has no separate base_model trunk; pass an "
                        "AutoModelForCausalLM (e.g. LlamaForCausalLM, GPT2LMHeadModel)")
    return trunk


def head_width(causal_lm: nn.Module) -> int:
    """The width of the trunk's output that the LM head reads (not always ``hidden_size``: OPT
    with ``word_embed_proj_dim`` projects first)."""
    head = unwrap_peft(causal_lm).get_output_embeddings()
    width = getattr(head, "in_features", None)
    return int(width) if width is not None else int(head.weight.shape[-1])


def moe_router(config) -> tuple[int, int] | None:
    """(num_experts, top_k) of a mixture-of-experts config with a learned router, else None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    k = getattr(text, "num_experts_per_tok", None)
    return (int(n), int(k)) if n and k and not isinstance(n, bool) else None


def router_aux_loss_coef(model: nn.Module, override: float | None = None) -> float:
    """The router auxiliary-loss coefficient: ``override`` unless None, else the config's
    ``router_aux_loss_coef``; 0 for a model without a router."""
    cfg = unwrap_peft(model).config
    if moe_router(cfg) is None:
        return 0.0
    if override is not None:
        return float(override)
    return float(getattr(cfg.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0)


def trunk_forward(trunk: nn.Module, input_ids, attention_mask, *, router_aux: bool = False):
    """(hidden (B, L, H), aux): the trunk's last hidden states (after its final norm) and, with
    ``router_aux``, the Switch load-balancing loss of its routers over the attended tokens, as the
    model family's own ``load_balancing_loss_func`` computes it (a 0-d tensor; None otherwise)."""
    kw = {"output_router_logits": True} if router_aux else {}
    out = trunk(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kw)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if not router_aux:
        return hidden, None
    spec = moe_router(trunk.config)
    logits = getattr(out, "router_logits", None)
    if spec is None or not logits:
        raise ValueError(f"{type(trunk).__name__} returned no router logits; the router aux loss needs a "
                         "mixture-of-experts model")
    fn = getattr(sys.modules[type(trunk).__module__], "load_balancing_loss_func", None)
    if fn is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as fn
    aux = fn(tuple(logits), spec[0], spec[1], attention_mask)
    return hidden, torch.as_tensor(aux, dtype=torch.float32, device=hidden.device).float()


def trunk_hidden(trunk: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """(B, L, H) last hidden states (after the trunk's final norm)."""
    return trunk_forward(trunk, input_ids, attention_mask)[0]


def response_logits(causal_lm: nn.Module, input_ids, attention_mask, response_start: int) -> torch.Tensor:
    """(B, L - P, V) logits that predict tokens ``input_ids[:, P:]`` (P = response_start), with
    the LM head applied to those positions only. Works for a policy or a frozen reference."""
    _check_start(response_start, input_ids)
    hidden = trunk_hidden(lm_trunk(causal_lm), input_ids, attention_mask)
    return head_logits(causal_lm, hidden[:, response_start - 1 : -1])


def response_hidden(causal_lm: nn.Module, input_ids, attention_mask, response_start: int) -> HeadInputs:
    """What ``response_logits`` feeds its LM head (``HeadInputs``: hidden (B, L - P, H), the head's
    weight, bias and logit transform), without calling it."""
    _check_start(response_start, input_ids)
    hidden = trunk_hidden(lm_trunk(causal_lm), input_ids, attention_mask)
    return causal_lm_head_operands(causal_lm, hidden[:, response_start - 1 : -1])


def _check_start(response_start, input_ids):
    if not 1 <= response_start < input_ids.shape[1]:
        raise ValueError(f"response_start must lie in [1, {input_ids.shape[1]}) for input_ids of shape "
                         f"{tuple(input_ids.shape)}, got {response_start}")


class PolicyValueModel(nn.Module):
    """A Hugging Face causal LM (the policy) plus a value head (hidden -> 1) on its trunk.

    Args:
        policy: an ``AutoModelForCausalLM`` model, or one wrapped by PEFT (``get_peft_model``).
        value_head: add the value head (PPO); False for a bare policy (GRPO). Its width is the
            LM head's input width (``head_width``).
        separate_critic: compute values on a second trunk, initialised as a copy of the
            policy's (``critic`` overrides the copy).
    """

    def __init__(self, policy: nn.Module, *, value_head: bool = True, separate_critic: bool = False,
                 critic: nn.Module | None = None):
        super().__init__()
        lm_trunk(policy)
        # (logit_scale, softcap) of the head, from the config (refuses an unknown head transform)
        self.logit_scale, self.softcap = logit_transform(unwrap_peft(policy).config)
        self.policy = policy
        if critic is not None and not separate_critic:
            raise ValueError("critic was given but separate_critic=False")
        self.critic = (critic if critic is not None else copy.deepcopy(lm_trunk(policy))) if separate_critic else None
        self.value_head = None
        if value_head:
            hidden = head_width(policy)
            # zero-initialised: V = 0 until the value loss has spoken, instead of noise of size ~1
            # that would dominate the first advantages of small rewards
            self.value_head = nn.Linear(hidden, 1, dtype=torch.float32, device=policy.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config, *, value_head: bool = True, separate_critic: bool = False,
                    attn_implementation: str | None = None, dtype=None) -> PolicyValueModel:
        """A freshly initialised model from a ``transformers`` config (e.g. a tiny LlamaConfig)."""
        from transformers import AutoModelForCausalLM

        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        policy = AutoModelForCausalLM.from_config(config, **kwargs)
        return cls(policy, value_head=value_head, separate_critic=separate_critic)

    @classmethod
    def from_pretrained(cls, path, *, value_head: bool = True, separate_critic: bool | None = None,
                        attn_implementation: str | None = None, dtype=None, trust_remote_code: bool = False,
                        **model_init_kwargs) -> PolicyValueModel:
        """Loads a local HF causal-LM folder (e.g. an SFT checkpoint). The value head and critic
        are loaded when the folder has them, else initialised (the critic as the policy's copy).
        ``separate_critic=None`` follows the folder (False when it has no value_model.json).
        ``attn_implementation``, ``dtype``, ``trust_remote_code`` and ``model_init_kwargs`` go to
        every ``from_pretrained`` (the policy's and the critic's)."""
        from transformers import AutoModel, AutoModelForCausalLM

        path = Path(path)
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
        if separate_critic is None:
            separate_critic = bool(meta.get("separate_critic", False))
        kwargs = {**model_init_kwargs, "trust_remote_code": trust_remote_code}
        if attn_implementation:  # None: transformers' default (sdpa where the family supports it, else eager)
            kwargs["attn_implementation"] = attn_implementation
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
        """What ``value_model.json`` records: which parts the folder holds (``lora``: the policy
        is written as a PEFT adapter, ``adapter_config.json`` + ``adapter_model.safetensors``)."""
        meta = {"value_head": self.value_head is not None, "separate_critic": self.critic is not None}
        return {**meta, "lora": True} if is_peft(self.policy) else meta

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
            if is_peft(self.policy):  # the adapter, and every trainable policy tensor for read_weights
                trainable = {n for n, p in self.named_parameters() if p.requires_grad and n.startswith("policy.")}
                save_file({k: v.detach().contiguous().cpu() for k, v in sd.items() if k in trainable},
                          str(path / TRAINABLE_FILE))
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
        if is_peft(self.policy):  # frozen base weights as they are (never trained), trained ones from the file
            sd = {k: v for k, v in self.state_dict().items() if k.startswith("policy.")}
            sd.update(read_safetensors(path, pattern=TRAINABLE_FILE))
        else:
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

    def forward(self, input_ids, attention_mask, response_start: int, *, with_values: bool = True,
                with_aux: bool = False, return_hidden: bool = False):
        """One pass for the logits (or the LM head's inputs) and values of the response positions.

        Args:
            input_ids: (B, L) prompt (left-padded to a common length P) + response tokens.
            attention_mask: (B, L) 1 on real tokens, 0 on padding.
            response_start: P, the index of the first response token.
            with_values: also compute values (needs the value head).
            with_aux: also return the policy's router auxiliary loss (a mixture-of-experts model).
            return_hidden: return the LM head's inputs (``HeadInputs``) instead of calling it.
        Returns:
            logits (B, L - P, V) in the model's (autocast) dtype (fp32 after a logit transform),
            predicting ``input_ids[:, P:]``, or with ``return_hidden`` the ``HeadInputs`` (hidden
            (B, L - P, H), weight (V, H), bias, logit_scale, softcap); values (B, L - P) fp32, or
            None; with ``with_aux`` a third item, the router aux loss (0-d fp32).
        """
        _check_start(response_start, input_ids)
        hidden, aux = trunk_forward(lm_trunk(self.policy), input_ids, attention_mask, router_aux=with_aux)
        scored = hidden[:, response_start - 1 : -1]
        head = unwrap_peft(self.policy).get_output_embeddings()
        if return_hidden:
            logits = head_operands(scored, head, self.logit_scale, self.softcap)
        else:
            logits = transform_logits(head(scored), self.logit_scale, self.softcap)
        values = None
        if with_values:
            if self.value_head is None:
                raise ValueError("with_values=True but this PolicyValueModel has no value head")
            if self.critic is not None:
                scored = trunk_hidden(self.critic, input_ids, attention_mask)[:, response_start - 1 : -1]
            values = self._values(scored)
        return (logits, values, aux) if with_aux else (logits, values)

    def _values(self, hidden) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    def score_sequences(self, input_ids, attention_mask, *, with_aux: bool = False):
        """(B,) the value head at each row's last attended token: this model used as a reward
        model (a trunk with a scalar head: the sequence-scoring head of a causal LM that has no
        ``*ForSequenceClassification`` class). ``with_aux``: (scores, router aux loss)."""
        if self.value_head is None:
            raise ValueError("score_sequences needs a value head")
        trunk = self.critic if self.critic is not None else lm_trunk(self.policy)
        hidden, aux = trunk_forward(trunk, input_ids, attention_mask, router_aux=with_aux)
        last = last_token_index(attention_mask)
        scores = self._values(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        return (scores, aux) if with_aux else scores


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last attended position (works for left and right padding)."""
    L = attention_mask.shape[1]
    return L - 1 - attention_mask.ne(0).flip(-1).to(torch.uint8).argmax(-1)
