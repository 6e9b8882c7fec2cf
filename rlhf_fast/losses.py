"""Drop-in RLHF loss modules: nn.Modules holding the options of the policy and value losses.

The functional losses are ops (rlhf_fast/ops/): ``ppo_policy_loss`` (policy_loss.py, fused from
logits), ``value_loss`` (value_loss.py), ``reward_model_loss`` and ``dpo_loss``
(preference_losses.py); they are re-exported here so ``from rlhf_fast.losses import value_loss``
keeps working.
"""
from __future__ import annotations

import torch

from rlhf_fast.ops._checks import check_loss_agg, check_positive
from rlhf_fast.ops.logprobs import check_transform
from rlhf_fast.ops.policy_loss import check_policy_options, ppo_policy_loss
from rlhf_fast.ops.policy_objectives import check_objective_options
from rlhf_fast.ops.preference_losses import DPO_LOSS_TYPES, dpo_loss, reward_model_loss  # noqa: F401
from rlhf_fast.ops.value_loss import value_loss

__all__ = ["PPOLoss", "GRPOLoss", "ValueLoss", "GRPO_LOSS_TYPES", "value_loss", "reward_model_loss", "dpo_loss"]


# ---------------------------------------------------------------------------- modules
class PPOLoss(torch.nn.Module):
    """``ppo_policy_loss`` with its options fixed at construction (validated there).

    forward(logits (B, T, V), targets (B, T), old_logprobs (B, T) | None, advantages (B, T) | (B,),
    mask (B, T), ref_logprobs (B, T) | None = None, sampler_logprobs (B, T) | None = None,
    ref_logits (B, T, V) | None = None) -> (loss, stats).
    The objective options (ratio_level, loss_type, sapo_tau_*, correction*) are ppo_policy_loss's.
    """

    def __init__(self, *, clip_eps=0.2, clip_eps_high=None, dual_clip=None, temperature=1.0, logit_scale=1.0,
                 softcap=None, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0, loss_agg="token-mean", max_tokens=None,
                 compute_entropy=False, inplace_backward=False, ratio_level="token", loss_type="clip",
                 sapo_tau_pos=1.0, sapo_tau_neg=1.05, correction=None, correction_level="token", correction_low=None,
                 correction_high=None):
        super().__init__()
        names = ("clip_eps", "clip_eps_high", "dual_clip", "temperature", "kl_coef", "kl_estimator", "entropy_coef",
                 "loss_agg", "max_tokens")
        checked = check_policy_options(clip_eps, clip_eps_high, dual_clip, temperature, kl_coef, kl_estimator,
                                       entropy_coef, loss_agg, max_tokens)
        logit_scale, softcap = check_transform(logit_scale, softcap)
        ext = check_objective_options(ratio_level, loss_type, dual_clip, sapo_tau_pos, sapo_tau_neg, correction,
                                      correction_level, correction_low, correction_high, kl_estimator)
        self.options = dict(zip(names, checked), compute_entropy=bool(compute_entropy),
                            inplace_backward=bool(inplace_backward), **ext)
        if logit_scale != 1.0 or softcap is not None:  # only when set: the defaults' repr stays as it was
            self.options.update(logit_scale=logit_scale, softcap=softcap)

    def forward(self, logits, targets, old_logprobs, advantages, mask, ref_logprobs=None, sampler_logprobs=None,
                ref_logits=None):
        return ppo_policy_loss(logits, targets, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                               sampler_logprobs=sampler_logprobs, ref_logits=ref_logits, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


GRPO_LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
                   "dr_grpo": "seq-mean-token-sum-norm", "cispo": "token-mean", "sapo": "seq-mean-token-mean"}
# TRL's vllm_importance_sampling_mode -> (correction, correction_level)
TRL_IS_MODES = {"token_truncate": ("tis", "token"), "token_mask": ("mis", "token"),
                "sequence_truncate": ("tis", "sequence"), "sequence_mask": ("mis", "sequence")}
CISPO_EPSILON_HIGH = 5.0  # TRL's recommended epsilon_high for loss_type="cispo" (ScaleRL's eps_max)


class GRPOLoss(PPOLoss):
    """GRPO policy loss with per-sequence advantages, options named as in TRL's GRPOConfig.

    loss_type: "grpo" -> seq-mean-token-mean, "bnpo" / "dapo" -> token-mean (DAPO over this batch's
    tokens), "dr_grpo" -> seq-mean-token-sum-norm with max_tokens = max_completion_length (default T).
    epsilon / epsilon_high: the clip range; beta: weight of the k3 KL to the reference policy;
    delta: TRL's two-sided clipping (= dual_clip); logit_scale / softcap: the model's final-logit
    transform (as ``ppo_policy_loss``). Rows without valid tokens are left out of
    "grpo"'s mean over sequences (TRL counts them as 0).
    "cispo": TRL's CISPO, IS weight sg(min(ratio, epsilon_high)) with epsilon_high an absolute cap
    (default 5.0, TRL's recommendation), token-mean; "sapo": soft gate with sapo_temperature_pos /
    _neg (1.0 / 1.05, the paper's and TRL's defaults), seq-mean-token-mean.
    importance_sampling_level: "token" | "sequence" (GSPO). vllm_importance_sampling_mode:
    None | "token_truncate" | "token_mask" | "sequence_truncate" | "sequence_mask" with
    vllm_importance_sampling_clip_min / _max (TRL's names; pass sampler_logprobs to forward).

    forward(logits (B, T, V), targets (B, T), old_logprobs (B, T) | None, advantages (B,),
    mask (B, T), ref_logprobs (B, T) | None = None, sampler_logprobs (B, T) | None = None) -> (loss, stats).
    """

    def __init__(self, loss_type="grpo", *, epsilon=0.2, epsilon_high=None, beta=0.0, delta=None, temperature=1.0,
                 logit_scale=1.0, softcap=None, max_completion_length=None, entropy_coef=0.0, compute_entropy=False,
                 inplace_backward=False,
                 importance_sampling_level="token", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                 vllm_importance_sampling_mode=None, vllm_importance_sampling_clip_min=None,
                 vllm_importance_sampling_clip_max=3.0):
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {tuple(GRPO_LOSS_TYPES)}, got {loss_type!r}")
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                             f"{importance_sampling_level!r}")
        if vllm_importance_sampling_mode is not None and vllm_importance_sampling_mode not in TRL_IS_MODES:
            raise ValueError(f"vllm_importance_sampling_mode must be None or one of {tuple(TRL_IS_MODES)}, got "
                             f"{vllm_importance_sampling_mode!r}")
        correction, level = TRL_IS_MODES.get(vllm_importance_sampling_mode, (None, "token"))
        clip_eps, clip_eps_high = epsilon, epsilon_high
        if loss_type == "cispo":  # TRL: clamp(ratio, max=epsilon_high), no lower bound
            cap = CISPO_EPSILON_HIGH if epsilon_high is None else check_positive("epsilon_high", epsilon_high)
            clip_eps, clip_eps_high = 1.0, cap - 1.0
            if clip_eps_high <= 0:
                raise ValueError(f"epsilon_high must be > 1 for loss_type='cispo' (an absolute cap), got {cap}")
        super().__init__(clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=delta, temperature=temperature,
                         logit_scale=logit_scale, softcap=softcap, kl_coef=beta, kl_estimator="k3",
                         entropy_coef=entropy_coef,
                         loss_agg=GRPO_LOSS_TYPES[loss_type], max_tokens=max_completion_length,
                         compute_entropy=compute_entropy, inplace_backward=inplace_backward,
                         ratio_level=importance_sampling_level,
                         loss_type=loss_type if loss_type in ("cispo", "sapo") else "clip",
                         sapo_tau_pos=sapo_temperature_pos, sapo_tau_neg=sapo_temperature_neg, correction=correction,
                         correction_level=level, correction_low=vllm_importance_sampling_clip_min,
                         correction_high=vllm_importance_sampling_clip_max if correction else None)
        self.loss_type = loss_type

    def forward(self, logits, targets, old_logprobs, advantages, mask, ref_logprobs=None, sampler_logprobs=None):
        if isinstance(advantages, torch.Tensor) and advantages.dim() == 2 and advantages.shape[1] == 1:
            advantages = advantages[:, 0]
        if isinstance(advantages, torch.Tensor) and advantages.dim() != 1:
            raise ValueError(f"advantages must have shape (B,) (one per sequence; use PPOLoss for per-token "
                             f"advantages), got {tuple(advantages.shape)}")
        return super().forward(logits, targets, old_logprobs, advantages, mask, ref_logprobs, sampler_logprobs)


class ValueLoss(torch.nn.Module):
    """``value_loss`` with its options fixed: forward(values, old_values, returns, mask) -> (loss, stats)."""

    def __init__(self, *, clip_eps=None, loss_agg="token-mean"):
        super().__init__()
        self.clip_eps = None if clip_eps is None else check_positive("clip_eps", clip_eps)
        self.loss_agg = check_loss_agg(loss_agg)

    def forward(self, values, old_values, returns, mask):
        return value_loss(values, old_values, returns, mask, clip_eps=self.clip_eps, loss_agg=self.loss_agg)

    def extra_repr(self):
        return f"clip_eps={self.clip_eps!r}, loss_agg={self.loss_agg!r}"
