"""Drop-in RLHF losses: value loss, preference losses (reward model, DPO / IPO), and nn.Modules
holding the options of the policy and value losses.

These are O(B * T) or O(B) and run as plain torch (they are their own reference); the
vocabulary-sized policy loss is the fused ``rlhf_fast.ops.policy_loss.ppo_policy_loss``.
Every function returns its loss with stats as 0-d tensors: nothing here synchronises with the host
except the CPU-only checks for non-finite inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast.ops._common import check_positive, check_same_device, check_shape
from rlhf_fast.ops.policy_loss import (
    _masked_mean, aggregation_weights, check_finite_inputs, check_loss_agg, check_policy_options, ppo_policy_loss,
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name, x, shape=None, what=""):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if shape is not None:
        check_shape(name, x, shape, what)


# ---------------------------------------------------------------------------- value loss
def value_loss(values, old_values, returns, mask, *, clip_eps=None, loss_agg="token-mean"):
    """Clipped value loss, per valid token (mask != 0)::

        l = 0.5 * max((v - R) ** 2, (old + (v - old).clamp(-clip_eps, clip_eps) - R) ** 2)   # clip_eps given
        l = 0.5 * (v - R) ** 2                                                               # clip_eps=None
        loss = (aggregation_weights(mask != 0, loss_agg) * l).sum()

    Args:
        values: (B, T) current value predictions (differentiable).
        old_values: (B, T) values at rollout time (used only when clipping; may be None then).
        returns: (B, T) targets R.
        mask: (B, T) bool / int / float; positions with mask != 0 count.
        clip_eps: > 0 or None. loss_agg: as in ``ppo_policy_loss`` ("-norm" uses T).

    Returns:
        loss 0-d (fp32 or the promoted input dtype), stats: clip_frac (valid tokens whose clipped
        term is the larger), explained_variance (1 - Var[R - v] / Var[R] over valid tokens; 1 when
        both are 0, 0 when only Var[R] is), value_mean, nonfinite_inputs.
    Non-finite old_values / returns at valid tokens raise ValueError for CPU tensors.
    """
    _check_tensor("values", values)
    if values.dim() != 2:
        raise ValueError(f"values must have shape (B, T), got {tuple(values.shape)}")
    shape = values.shape
    _check_tensor("returns", returns, shape, "the values' shape")
    if clip_eps is not None:
        clip_eps = check_positive("clip_eps", clip_eps)
        if old_values is None:
            raise ValueError("old_values is required when clip_eps is set")
    if old_values is not None:
        _check_tensor("old_values", old_values, shape, "the values' shape")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    check_shape("mask", mask, shape, "the values' shape")
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    check_loss_agg(loss_agg)
    valid = mask != 0
    check_finite_inputs(valid, old_values=old_values if clip_eps is not None else None, returns=returns)

    dtype = torch.promote_types(values.dtype, torch.float32)
    zero = torch.zeros(shape, dtype=dtype, device=values.device)
    v = torch.where(valid, values.to(dtype), zero)
    ret = returns.to(dtype)
    nonfinite = (~torch.isfinite(ret) & valid).sum()
    ret = torch.where(valid, ret, zero)
    err = (v - ret) ** 2
    clip_frac = zero.sum()
    if clip_eps is not None:
        old = old_values.to(dtype)
        nonfinite = nonfinite + (~torch.isfinite(old) & valid).sum()
        old = torch.where(valid, old, zero)
        err_clipped = (old + (v - old).clamp(-clip_eps, clip_eps) - ret) ** 2
        # clipped: the clamp bites and its error wins (not a rounding tie of an unclamped value)
        clipped = ((v - old).abs() > clip_eps) & (err_clipped > err)
        clip_frac = _masked_mean(clipped.to(dtype), valid)
        err = torch.maximum(err, err_clipped)
    w = aggregation_weights(valid, loss_agg, None, dtype)
    loss = (w * 0.5 * err).sum()
    with torch.no_grad():
        vd = v.detach()
        n = valid.sum().clamp(min=1)
        mean_r = ret.sum() / n
        var_r = torch.where(valid, (ret - mean_r) ** 2, zero).sum() / n
        res = ret - vd
        mean_res = res.sum() / n
        var_res = torch.where(valid, (res - mean_res) ** 2, zero).sum() / n
        ev = torch.where(var_r > 0, 1 - var_res / var_r.clamp(min=torch.finfo(dtype).tiny),
                         (var_res == 0).to(dtype))
        stats = {"clip_frac": clip_frac.detach(), "explained_variance": ev, "value_mean": vd.sum() / n,
                 "nonfinite_inputs": nonfinite}
    return loss, stats


# ---------------------------------------------------------------------------- preference losses
def reward_model_loss(chosen_rewards, rejected_rewards, *, margin=None):
    """Bradley-Terry reward-model loss::

        loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()
        accuracy = (chosen_rewards > rejected_rewards).float().mean()

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards of the preferred / rejected responses.
        margin: None, a float, or a (B,) tensor (Llama-2 style preference margin).
    Returns: (loss 0-d, accuracy 0-d), both tensors.
    """
    _check_tensor("chosen_rewards", chosen_rewards)
    if chosen_rewards.dim() != 1 or chosen_rewards.numel() == 0:
        raise ValueError(f"chosen_rewards must have shape (B,) with B > 0, got {tuple(chosen_rewards.shape)}")
    _check_tensor("rejected_rewards", rejected_rewards, chosen_rewards.shape, "chosen_rewards' shape")
    check_same_device(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                      margin=margin if isinstance(margin, torch.Tensor) else None)
    dtype = torch.promote_types(chosen_rewards.dtype, torch.float32)
    diff = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            _check_tensor("margin", margin)
            if margin.dim() != 0:
                check_shape("margin", margin, chosen_rewards.shape, "one margin per pair")
            diff = diff - margin.to(dtype)
        else:
            diff = diff - float(margin)
    loss = -F.logsigmoid(diff).mean()
    accuracy = (chosen_rewards.detach() > rejected_rewards.detach()).to(dtype).mean()
    return loss, accuracy


DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0):
    """DPO (sigmoid, with conservative label smoothing) or IPO loss on sequence log-probs::

        h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
        sigmoid: loss = (-F.logsigmoid(beta * h) * (1 - label_smoothing)
                         - F.logsigmoid(-beta * h) * label_smoothing).mean()
        ipo:     loss = ((h - 1 / (2 * beta)) ** 2).mean()
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()   (rejected likewise)

    Args: four (B,) tensors of summed response log-probs; beta > 0; label_smoothing in [0, 0.5)
    (sigmoid only). Returns (loss 0-d, chosen_rewards (B,), rejected_rewards (B,)).
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_tensor(names[0], tensors[0])
    if tensors[0].dim() != 1 or tensors[0].numel() == 0:
        raise ValueError(f"policy_chosen_logps must have shape (B,) with B > 0, got {tuple(tensors[0].shape)}")
    for n, t in zip(names[1:], tensors[1:]):
        _check_tensor(n, t, tensors[0].shape, "policy_chosen_logps' shape")
    check_same_device(**dict(zip(names, tensors)))
    beta = check_positive("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0:
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    pc, pr, rc, rr = (t.to(dtype) for t in tensors)
    chosen, rejected = pc - rc, pr - rr
    h = chosen - rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-beta * h) * label_smoothing
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses.mean(), beta * chosen.detach(), beta * rejected.detach()


# ---------------------------------------------------------------------------- modules
class PPOLoss(torch.nn.Module):
    """``ppo_policy_loss`` with its options fixed at construction (validated there).

    forward(logits (B, T, V), targets (B, T), old_logprobs (B, T) | None, advantages (B, T) | (B,),
    mask (B, T), ref_logprobs (B, T) | None = None) -> (loss, stats).
    """

    def __init__(self, *, clip_eps=0.2, clip_eps_high=None, dual_clip=None, temperature=1.0, kl_coef=0.0,
                 kl_estimator="k3", entropy_coef=0.0, loss_agg="token-mean", max_tokens=None, compute_entropy=False,
                 inplace_backward=False):
        super().__init__()
        names = ("clip_eps", "clip_eps_high", "dual_clip", "temperature", "kl_coef", "kl_estimator", "entropy_coef",
                 "loss_agg", "max_tokens")
        checked = check_policy_options(clip_eps, clip_eps_high, dual_clip, temperature, kl_coef, kl_estimator,
                                       entropy_coef, loss_agg, max_tokens)
        self.options = dict(zip(names, checked), compute_entropy=bool(compute_entropy),
                            inplace_backward=bool(inplace_backward))

    def forward(self, logits, targets, old_logprobs, advantages, mask, ref_logprobs=None):
        return ppo_policy_loss(logits, targets, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                               **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


GRPO_LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
                   "dr_grpo": "seq-mean-token-sum-norm"}


class GRPOLoss(PPOLoss):
    """GRPO policy loss with per-sequence advantages, options named as in TRL's GRPOConfig.

    loss_type: "grpo" -> seq-mean-token-mean, "bnpo" / "dapo" -> token-mean (DAPO over this batch's
    tokens), "dr_grpo" -> seq-mean-token-sum-norm with max_tokens = max_completion_length (default T).
    epsilon / epsilon_high: the clip range; beta: weight of the k3 KL to the reference policy;
    delta: TRL's two-sided clipping (= dual_clip). Rows without valid tokens are left out of
    "grpo"'s mean over sequences (TRL counts them as 0).

    forward(logits (B, T, V), targets (B, T), old_logprobs (B, T) | None, advantages (B,),
    mask (B, T), ref_logprobs (B, T) | None = None) -> (loss, stats).
    """

    def __init__(self, loss_type="grpo", *, epsilon=0.2, epsilon_high=None, beta=0.0, delta=None, temperature=1.0,
                 max_completion_length=None, entropy_coef=0.0, compute_entropy=False, inplace_backward=False):
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {tuple(GRPO_LOSS_TYPES)}, got {loss_type!r}")
        super().__init__(clip_eps=epsilon, clip_eps_high=epsilon_high, dual_clip=delta, temperature=temperature,
                         kl_coef=beta, kl_estimator="k3", entropy_coef=entropy_coef,
                         loss_agg=GRPO_LOSS_TYPES[loss_type], max_tokens=max_completion_length,
                         compute_entropy=compute_entropy, inplace_backward=inplace_backward)
        self.loss_type = loss_type

    def forward(self, logits, targets, old_logprobs, advantages, mask, ref_logprobs=None):
        if isinstance(advantages, torch.Tensor) and advantages.dim() == 2 and advantages.shape[1] == 1:
            advantages = advantages[:, 0]
        if isinstance(advantages, torch.Tensor) and advantages.dim() != 1:
            raise ValueError(f"advantages must have shape (B,) (one per sequence; use PPOLoss for per-token "
                             f"advantages), got {tuple(advantages.shape)}")
        return super().forward(logits, targets, old_logprobs, advantages, mask, ref_logprobs)


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
