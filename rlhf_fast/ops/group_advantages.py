"""Group-relative advantages (GRPO, RLOO, Dr. GRPO) of B = n_groups * group_size consecutive
completions: ``group_advantages(scores, group_size)``; ``group_advantages_ref`` defines it.

Naming chain: ``_group_advantages_kernel`` -> ``group_advantages_fwd`` -> ``group_advantages``
(no autograd: advantages are constants to the policy loss).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast import _backend
from rlhf_fast._backend import addr, code
from rlhf_fast.ops._checks import VALUE_DTYPES, check_choice, check_float, check_nonnegative
from rlhf_fast.ops._common import flat_arg, result_dtype

BASELINES = ("mean", "leave_one_out")
SCALES = ("group", "batch", "none")
SCALE_CODES = {"group": 0, "batch": 1, "none": 2}


def group_advantages_ref(scores: torch.Tensor, group_size: int, baseline: str = "mean", scale: str = "group",
                         eps: float = 1e-6) -> torch.Tensor:
    """scores (B,) as B // group_size consecutive groups. baseline "mean": s - group mean (GRPO);
    "leave_one_out": s - mean of the other members (RLOO). scale "group": / (group std + eps),
    "batch": / (std of all scores + eps), "none": as is (Dr. GRPO); stds unbiased.
    Statistics are shifted (by each group's first score) and in fp64 where the device has it, so
    scores ~1e9 with a spread of 100 do not cancel. Returns fp32 (fp64 for fp64 scores)."""
    dtype = result_dtype(scores)
    stat = torch.float64 if scores.device.type in ("cpu", "cuda") else dtype
    s = scores.to(stat).view(-1, group_size)
    c = s - s[:, :1]  # shifted: exact for nearby values, so the mean does not cancel
    d = c - c.mean(-1, keepdim=True)
    adv = d if baseline == "mean" else d * (group_size / (group_size - 1))  # s - (sum - s) / (G - 1)
    if scale == "group":
        adv = adv / (d.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / ((s - s[:1, :1]).std() + eps)
    return adv.reshape(-1).to(dtype)


# ---------------------------------------------------------------------------- triton
@triton.jit
def _group_advantages_kernel(
    scores_ptr,  # (B,) = (n_groups, G) contiguous
    out_ptr,  # (B,) fp32 out
    B,
    n_groups,
    G,
    baseline_factor,  # 1 (mean) or G / (G - 1) (leave one out)
    eps,
    SCALE: tl.constexpr,  # 0 group std, 1 batch std, 2 none
    BLOCK_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_ALL: tl.constexpr,
):
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    members = tl.arange(0, BLOCK_M)
    ok = (groups < n_groups)[:, None] & (members < G)[None, :]
    idx = groups.to(tl.int64)[:, None] * G + members[None, :]
    # fp64 and shifted by each group's first score: no cancellation for scores ~1e9 with spread 100
    s = tl.load(scores_ptr + idx, mask=ok, other=0.0).to(tl.float32).to(tl.float64)
    first = tl.load(scores_ptr + groups.to(tl.int64) * G, mask=groups < n_groups, other=0.0).to(tl.float32)
    s = tl.where(ok, s - first.to(tl.float64)[:, None], 0.0)
    c = tl.where(ok, s - (tl.sum(s, axis=1) / G)[:, None], 0.0)
    adv = c * baseline_factor
    if SCALE == 0:
        std = tl.sqrt(tl.sum(c * c, axis=1) / (G - 1))
        adv = adv / (std + eps)[:, None]
    elif SCALE == 1:  # every program reduces the whole batch: B is small (one score per completion)
        s0 = tl.load(scores_ptr).to(tl.float32).to(tl.float64)
        total = tl.zeros((BLOCK_ALL,), tl.float64)
        for i0 in range(0, B, BLOCK_ALL):
            i = i0 + tl.arange(0, BLOCK_ALL)
            total += tl.where(i < B, tl.load(scores_ptr + i, mask=i < B, other=0.0).to(tl.float32) - s0, 0.0)
        mu = tl.sum(total, axis=0) / B
        m2 = tl.zeros((BLOCK_ALL,), tl.float64)
        for i0 in range(0, B, BLOCK_ALL):
            i = i0 + tl.arange(0, BLOCK_ALL)
            dv = tl.where(i < B, (tl.load(scores_ptr + i, mask=i < B, other=0.0).to(tl.float32) - s0) - mu, 0.0)
            m2 += dv * dv
        adv = adv / (tl.sqrt(tl.sum(m2, axis=0) / (B - 1)) + eps)
    adv = adv.to(tl.float32)
    tl.store(out_ptr + idx, adv, mask=ok)



# ---------------------------------------------------------------------------- launchers
def _triton(scores, out, G: int, factor: float, eps: float, scale_code: int) -> None:
    B = scores.shape[0]
    block_m = triton.next_power_of_2(G)
    block_g = max(1, min(triton.next_power_of_2(B // G), 2048 // block_m))
    _group_advantages_kernel[(triton.cdiv(B // G, block_g),)](
        scores, out, B, B // G, G, factor, eps, SCALE=scale_code, BLOCK_G=block_g, BLOCK_M=block_m,
        BLOCK_ALL=min(triton.next_power_of_2(B), 4096),
    )


def _cpu(scores, out, G: int, factor: float, eps: float, scale_code: int) -> None:
    _backend.cpu_kernels().group_advantages(addr(scores), code(scores), addr(out), scores.shape[0], G, factor, eps,
                                            scale_code, _backend.num_threads())


# backend -> launcher; read by _backend.select_backend
LAUNCHERS = {"triton": _triton, "cpu": _cpu}


def group_advantages_fwd(backend: str, scores: torch.Tensor, group_size: int, baseline: str, scale: str,
                         eps: float) -> torch.Tensor:
    """scores (B,) any layout -> fp32 (B,) on ``backend``."""
    scores = flat_arg(scores)
    out = torch.empty(scores.shape[0], dtype=torch.float32, device=scores.device)
    if scores.shape[0]:
        G = group_size
        factor = G / (G - 1) if baseline == "leave_one_out" else 1.0
        LAUNCHERS[backend](scores, out, G, factor, float(eps), SCALE_CODES[scale])
    return out


# ---------------------------------------------------------------------------- public
def group_advantages(scores: torch.Tensor, group_size: int, *, baseline: str = "mean", scale: str = "group",
                     eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """Group-relative advantages of B = n_groups * group_size consecutive completions:

        s = scores.float().view(-1, group_size)
        adv = s - s.mean(-1, keepdim=True)                      # baseline="mean" (GRPO)
        adv = s - (s.sum(-1, keepdim=True) - s) / (G - 1)       # baseline="leave_one_out" (RLOO)
        adv /= s.std(-1, keepdim=True) + eps                    # scale="group"
        adv /= s.std() + eps                                    # scale="batch";  "none": as is (Dr. GRPO)

    Args:
        scores: (B,) fp32 / fp16 / bf16. group_size: int >= 1 dividing B (>= 2 for a std scale
            or the leave-one-out baseline). eps: >= 0.
        backend: None (automatic) | "triton" | "cpu" | "torch"; see rlhf_fast._backend.

    Returns:
        (B,) fp32.
    """
    check_float("scores", scores, VALUE_DTYPES)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (B,), got {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    check_choice("baseline", baseline, BASELINES)
    check_choice("scale", scale, SCALES)
    if scores.shape[0] % group_size:
        raise ValueError(f"scores has {scores.shape[0]} entries, not a multiple of group_size={group_size}")
    if group_size < 2 and (scale != "none" or baseline == "leave_one_out"):
        what = f"scale={scale!r}" if scale != "none" else "baseline='leave_one_out'"
        raise ValueError(f"group_size must be >= 2 with {what}, got {group_size}")
    eps = check_nonnegative("eps", eps)
    backend = _backend.select_backend(scores.device, LAUNCHERS, backend=backend, tensors=(scores,))
    if backend == "torch":
        return group_advantages_ref(scores, group_size, baseline, scale, eps)
    return group_advantages_fwd(backend, scores, group_size, baseline, scale, eps)

