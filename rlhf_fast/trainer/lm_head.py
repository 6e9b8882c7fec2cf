"""The LM head of a causal LM as the fused ops see it: ``lm_head(hidden)`` followed by the logit
transform its config declares (Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma2's
``final_logit_softcapping``), in one of two forms:

    logits = transform_logits(lm_head(h), logit_scale, softcap)            # lm_head="materialize"
    HeadInputs(h, lm_head.weight, lm_head.bias, logit_scale, softcap)      # lm_head="fused": for
        linear_token_logprobs(h, weight, targets, **inputs.op_kwargs())    # the from-hidden ops
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import nn

from rlhf_fast.ops import linear_ppo_policy_loss, ppo_policy_loss
from rlhf_fast.trainer.hf_io import unwrap_peft

# The config fields that change a causal LM's logits after ``lm_head(hidden)``, as
# (logit_scale, softcap) of ``softcap * tanh(logit_scale * z / softcap)``; each maps its value v to:
LOGIT_FIELDS = {
    "logits_scaling": lambda v: (1.0 / v, None),  # Granite: z / logits_scaling
    "logit_scale": lambda v: (v, None),  # Cohere: z * logit_scale
    "final_logit_softcapping": lambda v: (1.0, v),  # Gemma2 / Gemma3: c * tanh(z / c)
}
# fields whose names look like a head transform but act inside the trunk or not at all
TRUNK_LOGIT_FIELDS = {
    "attn_logit_softcapping", "output_router_logits", "num_logits_to_keep", "moe_router_logit_softcapping",
    "mlp_up_softcap", "mlp_gate_softcap", "attention_logit_cap", "conf_attention_logit_cap",
    "attention_invalid_logits_value", "output_auxiliary_logits", "router_logit_softcapping",
}
_HEAD_LIKE = re.compile(r"logit|lm_head_mult|output_mult|softcap|soft_cap")


def logit_transform(config) -> tuple[float, float | None]:
    """(logit_scale, softcap) such that the model's logits are ``transform_logits(lm_head(h),
    logit_scale, softcap)``, read from ``config`` by the table ``LOGIT_FIELDS``. A config with
    another field that looks like a head transform (``logit``, ``softcap``, ``lm_head_multiplier``,
    ...) set is refused with a ``NotImplementedError`` naming the field: never trained silently."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale, cap = 1.0, None
    for name, value in sorted(text.to_dict().items()):
        if name in LOGIT_FIELDS:
            if value is None or (name == "final_logit_softcapping" and not value):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{type(text).__name__}.{name}={value!r}: expected a finite number > 0")
            s, c = LOGIT_FIELDS[name](float(value))
            scale, cap = scale * s, c if c is not None else cap
        elif _HEAD_LIKE.search(name) and name not in TRUNK_LOGIT_FIELDS and value not in (None, False, 0):
            if value in (1, 1.0) and re.search(r"mult|scal", name):
                continue  # an identity multiplier
            raise NotImplementedError(
                f"{type(text).__name__}.{name}={value!r}: this head transform is not supported (known fields: "
                f"{', '.join(LOGIT_FIELDS)}); its logits would differ from lm_head(hidden)")
    return scale, cap


def transform_logits(logits: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``softcap * tanh(logit_scale * logits / softcap)`` (no cap when ``softcap`` is None), computed
    in fp32 when it does anything: the head transform of ``lm_head="materialize"`` and of the
    paths that need logits (the judge); ``lm_head="fused"`` passes ``logit_scale`` / ``softcap``
    to the from-hidden ops, which apply it inside their kernels."""
    if logit_scale == 1.0 and softcap is None:
        return logits
    z = logits.float() * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def check_plain_lm_head(causal_lm: nn.Module) -> None:
    """Refuses a model whose logits are not ``transform_logits(lm_head(hidden), *logit_transform(config))``
    (an unknown head transform, named)."""
    logit_transform(unwrap_peft(causal_lm).config)


def head_logits(causal_lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from trunk states ``hidden``: its LM head, then its logit transform."""
    causal_lm = unwrap_peft(causal_lm)
    return transform_logits(causal_lm.get_output_embeddings()(hidden), *logit_transform(causal_lm.config))


class HeadInputs(NamedTuple):
    """What the LM head would read, for the from-hidden ops: ``hidden`` (..., H), ``weight`` (V, H),
    ``bias`` (V,) or None, in one dtype, and the head's logit transform."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None

    def op_kwargs(self) -> dict:
        """``bias`` / ``logit_scale`` / ``softcap`` keyword arguments of the ``linear_*`` ops."""
        return {"bias": self.bias, "logit_scale": self.logit_scale, "softcap": self.softcap}


def head_operands(hidden: torch.Tensor, head: nn.Module, logit_scale: float = 1.0,
                  softcap: float | None = None) -> HeadInputs:
    """``HeadInputs`` of ``head(hidden)``, in one dtype: autocast's when it is on for hidden's device
    (as ``head(hidden)`` would compute), else the weight's. ``head`` must be an ``nn.Linear`` (a
    tied embedding's weight is shared as usual). The weight is returned as a view: FSDP2 hooks a
    forward's grad-requiring outputs, and a hook on the parameter itself would stay registered
    for every later step."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"lm_head='fused' needs an nn.Linear LM head, got {type(head).__name__}; "
                        "use lm_head='materialize'")
    weight, bias = head.weight.view_as(head.weight), head.bias
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    bias = None if bias is None else bias.view_as(bias).to(dtype)
    return HeadInputs(hidden.to(dtype), weight.to(dtype), bias, logit_scale, softcap)


def causal_lm_head_operands(causal_lm: nn.Module, hidden: torch.Tensor) -> HeadInputs:
    """``head_operands`` of a causal LM's own head and transform (``head_logits`` without the logits)."""
    lm = unwrap_peft(causal_lm)
    return head_operands(hidden, lm.get_output_embeddings(), *logit_transform(lm.config))


def head_policy_loss(out, responses, old_logprobs, advantages, mask, **options):
    """The PPO / GRPO policy loss of a micro-batch from what the policy's forward returned:
    ``linear_ppo_policy_loss`` on ``HeadInputs`` (``lm_head="fused"``), else ``ppo_policy_loss`` on
    the response logits (``lm_head="materialize"``, backward in place); ``options`` go to either."""
    if isinstance(out, HeadInputs):
        return linear_ppo_policy_loss(out.hidden, out.weight, responses, old_logprobs, advantages, mask,
                                      **out.op_kwargs(), **options)
    return ppo_policy_loss(out, responses, old_logprobs, advantages, mask, inplace_backward=True, **options)
