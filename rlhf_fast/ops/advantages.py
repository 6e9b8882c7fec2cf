"""The advantage side of PPO / GRPO: KL-shaped rewards, GAE, masked whitening, group advantages.

Masks are (B, T) bool / integer / floating 0-1 tensors; a position is valid where mask != 0.
Masks may have holes and left or right padding: GAE links each valid position to the next
VALID one, skipping the holes.
"""
from __future__ import annotations

import math

import torch

from rlhf_fast import _backend
from rlhf_fast.ops._common import FLOAT_DTYPES, check_float, check_same_device, check_shape
from rlhf_fast.ops.advantages_kernels import _mask_arg, advantages_fwd, group_advantages_fwd, masked_whiten_fwd, whiten_apply
from rlhf_fast.ops.kl import check_estimator, kl_penalty_ref

MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64) + FLOAT_DTYPES + (torch.float64,)
VALUE_DTYPES = FLOAT_DTYPES + (torch.float64,)
BASELINES = ("mean", "leave_one_out")
SCALES = ("group", "batch", "none")


# ---------------------------------------------------------------------------- checks
def check_finite(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_unit(name: str, value) -> float:
    value = check_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_mask(name: str, mask, shape) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(f"{name} must be bool, integer or floating (0/1), got {mask.dtype}")
    check_shape(name, mask, shape, "the same shape as the per-token inputs")


def check_bt(name: str, x, shape=None) -> None:
    check_float(name, x, VALUE_DTYPES)
    if shape is None:
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (B, T), got {tuple(x.shape)}")
    else:
        check_shape(name, x, shape, "(B, T)")


def _select(device, *tensors, has=("triton", "cpu", "torch")) -> str:
    """The backend for these tensors; fp64 inputs always run the (fp64) reference."""
    if any(t.dtype == torch.float64 for t in tensors):
        return "torch"
    return _backend.select_backend(device, has=has)


def _dtype(*xs):
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


# ---------------------------------------------------------------------------- references
def kl_shaped_rewards_ref(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    """rewards = where(mask, -kl_coef * kl_penalty(logprobs, ref_logprobs), 0), plus scores[b] at
    the last valid position of row b (rows without one stay 0). fp32 (fp64 for fp64 inputs)."""
    dtype = _dtype(scores, logprobs, ref_logprobs)
    valid = mask != 0
    kl = kl_penalty_ref(logprobs.to(dtype), ref_logprobs.to(dtype), estimator)
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros((), dtype=dtype, device=kl.device))
    T = valid.shape[-1]
    last = T - 1 - valid.flip(-1).to(torch.uint8).argmax(-1)  # last valid index (T-1 on empty rows)
    add = torch.where(valid.any(-1), scores.to(dtype), torch.zeros((), dtype=dtype, device=kl.device))
    return rewards.scatter_add(-1, last[:, None], add[:, None])


def gae_ref(rewards, values, mask, gamma=1.0, lam=0.95):
    """GAE over the valid positions of each row, in order t_1 < ... < t_k, going backwards:
    delta_i = r[t_i] + gamma * v[t_{i+1}] - v[t_i] (v[t_{k+1}] = 0), A[t_i] = delta_i + gamma * lam * A[t_{i+1}]
    (A[t_{k+1}] = 0), R[t_i] = A[t_i] + v[t_i]; A = R = 0 at masked positions.
    A loop over T, vectorized over B. Returns (advantages, returns), fp32 (fp64 for fp64 inputs)."""
    dtype = _dtype(rewards, values)
    r, v, valid = rewards.to(dtype), values.to(dtype), mask != 0
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=dtype, device=r.device)
    next_a = torch.zeros(B, dtype=dtype, device=r.device)
    next_v = torch.zeros_like(next_a)
    for t in range(T - 1, -1, -1):
        ok = valid[:, t]
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        adv[:, t] = torch.where(ok, a, 0.0)
        next_a = torch.where(ok, a, next_a)
        next_v = torch.where(ok, v[:, t], next_v)
    returns = torch.where(valid, adv + v, 0.0)
    return adv, returns


def masked_whiten_ref(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) * rsqrt(var + eps) over the positions where mask != 0 (all of x's elements
    together), var unbiased; with shift_mean=False the mean is added back. Masked positions are 0.
    Fewer than 2 valid positions: var := 0 (so the output is 0, or x with shift_mean=False)."""
    dtype = _dtype(x)
    valid = mask != 0
    x = torch.where(valid, x.to(dtype), 0.0)
    n = valid.sum().to(dtype)
    mean = x.sum() / n.clamp(min=1)
    ss = torch.where(valid, (x - mean) ** 2, 0.0).sum()
    rstd = torch.where(n >= 2, torch.rsqrt(ss / (n - 1).clamp(min=1) + eps), 0.0)
    out = (x - mean) * rstd
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0)


def ppo_advantages_ref(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma=1.0, lam=0.95,
                       estimator="k1", whiten=True):
    """rewards = kl_shaped_rewards_ref(...); advantages, returns = gae_ref(rewards, values, mask);
    advantages = masked_whiten_ref(advantages, mask) when whiten. Returns (advantages, returns, rewards)."""
    rewards = kl_shaped_rewards_ref(scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
    adv, returns = gae_ref(rewards, values, mask, gamma, lam)
    if whiten:
        adv = masked_whiten_ref(adv, mask)
    return adv, returns, rewards


def group_advantages_ref(scores, group_size, baseline="mean", scale="group", eps=1e-6):
    """scores (B,) as B // group_size consecutive groups. baseline "mean": s - group mean (GRPO);
    "leave_one_out": s - mean of the other members (RLOO). scale "group": / (group std + eps),
    "batch": / (std of all scores + eps), "none": as is (Dr. GRPO); stds unbiased."""
    dtype = _dtype(scores)
    s = scores.to(dtype).view(-1, group_size)
    mean = s.mean(-1, keepdim=True)
    if baseline == "mean":
        adv = s - mean
    else:
        adv = (s - mean) * (group_size / (group_size - 1))  # s - (sum - s) / (G - 1)
    if scale == "group":
        adv = adv / (s.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (s.std() + eps)
    return adv.reshape(-1)


# ---------------------------------------------------------------------------- public
def _check_per_token(scores, logprobs, ref_logprobs, mask, values=None):
    check_bt("logprobs", logprobs)
    shape = logprobs.shape
    check_bt("ref_logprobs", ref_logprobs, shape)
    if values is not None:
        check_bt("values", values, shape)
    check_mask("mask", mask, shape)
    check_float("scores", scores, VALUE_DTYPES)
    check_shape("scores", scores, shape[:1], "one score per row of logprobs")
    check_same_device(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask, values=values)


def kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1"):
    """Per-token rewards for PPO:

        rewards = torch.where(mask != 0, -kl_coef * kl_penalty(logprobs, ref_logprobs, estimator), 0)
        rewards[b, last valid t of row b] += scores[b]      (rows without a valid position stay 0)

    Args:
        scores: (B,) sequence-level rewards. logprobs, ref_logprobs: (B, T). mask: (B, T) 0/1.
        kl_coef: finite float. estimator: "k1" | "abs" | "k2" | "k3".

    Returns:
        rewards (B, T) fp32 (no gradient through the kernels: rewards are constants to PPO).
    """
    _check_per_token(scores, logprobs, ref_logprobs, mask)
    kl_coef = check_finite("kl_coef", kl_coef)
    check_estimator(estimator)
    backend = _select(logprobs.device, scores, logprobs, ref_logprobs)
    if backend == "torch":
        return kl_shaped_rewards_ref(scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
    rewards, _, _, _ = advantages_fwd(backend, mask, scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs,
                                      kl_coef=kl_coef, estimator=estimator)
    return rewards


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalized advantage estimation over the valid positions of each row (see ``gae_ref``):

        delta_i = r[t_i] + gamma * v[t_{i+1}] - v[t_i],  A[t_i] = delta_i + gamma * lam * A[t_{i+1}],
        R[t_i] = A[t_i] + v[t_i]   (t_1 < ... < t_k the valid positions; v, A past t_k are 0)

    Args:
        rewards, values: (B, T) fp32 / fp16 / bf16. mask: (B, T) 0/1 (holes and padding allowed).
        gamma, lam: in [0, 1].

    Returns:
        (advantages, returns), each (B, T) fp32, 0 at masked positions; constants (no gradient
        through the kernels). fp64 inputs run ``gae_ref`` in fp64.
    """
    check_bt("rewards", rewards)
    check_bt("values", values, rewards.shape)
    check_mask("mask", mask, rewards.shape)
    check_same_device(rewards=rewards, values=values, mask=mask)
    gamma, lam = check_unit("gamma", gamma), check_unit("lam", lam)
    backend = _select(rewards.device, rewards, values, has=_backend.BACKENDS)
    if backend == "torch":
        return gae_ref(rewards, values, mask, gamma, lam)
    _, adv, ret, _ = advantages_fwd(backend, mask, rewards=rewards, values=values, gamma=gamma, lam=lam)
    return adv, ret


def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    """Whitening over the valid positions of x (all dimensions together), as TRL and verl:

        mean = x[mask].mean(); var = x[mask].var(unbiased=True)
        out = torch.where(mask != 0, (x - mean) * torch.rsqrt(var + eps) (+ mean if not shift_mean), 0)

    With fewer than 2 valid positions var is taken as 0 (no NaN): the output is then 0 (x itself
    with shift_mean=False).

    Args:
        x: (...) fp32 / fp16 / bf16. mask: (...) same shape, 0/1. eps: >= 0.

    Returns:
        (...) fp32, 0 where masked; a constant (no gradient through the kernels).
    """
    check_float("x", x, VALUE_DTYPES)
    check_mask("mask", mask, x.shape)
    check_same_device(x=x, mask=mask)
    eps = check_finite("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    backend = _select(x.device, x)
    if backend == "torch":
        return masked_whiten_ref(x, mask, bool(shift_mean), eps)
    return masked_whiten_fwd(backend, x, mask, shift_mean=bool(shift_mean), eps=eps)


def ppo_advantages(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, gamma=1.0, lam=0.95,
                   estimator="k1", whiten=True):
    """KL shaping, GAE and masked whitening fused, equal to

        rewards = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
        if whiten: advantages = masked_whiten(advantages, mask)      # over the whole batch

    Args:
        scores: (B,). logprobs, ref_logprobs, values: (B, T). mask: (B, T) 0/1.

    Returns:
        (advantages, returns, rewards), each (B, T) fp32, 0 at masked positions (whitened
        advantages too); constants (no gradient through the kernels).
    """
    _check_per_token(scores, logprobs, ref_logprobs, mask, values)
    kl_coef = check_finite("kl_coef", kl_coef)
    gamma, lam = check_unit("gamma", gamma), check_unit("lam", lam)
    check_estimator(estimator)
    backend = _select(logprobs.device, scores, logprobs, ref_logprobs, values)
    if backend == "torch":
        return ppo_advantages_ref(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, estimator,
                                  bool(whiten))
    rewards, adv, ret, stats = advantages_fwd(
        backend, mask, scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
        kl_coef=kl_coef, gamma=gamma, lam=lam, estimator=estimator, stats=bool(whiten),
    )
    if whiten:  # the tiny finalize: merge per-row stats, normalise in place
        flat = adv.view(-1)
        whiten_apply(backend, flat, _mask_arg(mask).reshape(-1).contiguous(), stats, flat)
    return adv, ret, rewards


def group_advantages(scores, group_size, *, baseline="mean", scale="group", eps=1e-6):
    """Group-relative advantages of B = n_groups * group_size consecutive completions:

        s = scores.float().view(-1, group_size)
        adv = s - s.mean(-1, keepdim=True)                      # baseline="mean" (GRPO)
        adv = s - (s.sum(-1, keepdim=True) - s) / (G - 1)       # baseline="leave_one_out" (RLOO)
        adv /= s.std(-1, keepdim=True) + eps                    # scale="group"
        adv /= s.std() + eps                                    # scale="batch";  "none": as is (Dr. GRPO)

    Args:
        scores: (B,) fp32 / fp16 / bf16. group_size: int >= 1 dividing B (>= 2 for a std scale
            or the leave-one-out baseline). eps: >= 0.

    Returns:
        (B,) fp32.
    """
    check_float("scores", scores, VALUE_DTYPES)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (B,), got {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scores.shape[0] % group_size:
        raise ValueError(f"scores has {scores.shape[0]} entries, not a multiple of group_size={group_size}")
    if group_size < 2 and (scale != "none" or baseline == "leave_one_out"):
        what = f"scale={scale!r}" if scale != "none" else "baseline='leave_one_out'"
        raise ValueError(f"group_size must be >= 2 with {what}, got {group_size}")
    eps = check_finite("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    backend = _select(scores.device, scores)
    if backend == "torch":
        return group_advantages_ref(scores, group_size, baseline, scale, eps)
    return group_advantages_fwd(backend, scores, group_size, baseline, scale, eps)
