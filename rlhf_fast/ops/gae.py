"""PPO's advantage side: KL-shaped rewards, GAE, and both fused with masked whitening.

Masks are (B, T) bool / integer / floating 0-1 tensors; a position is valid where mask != 0.
Masks may have holes and left or right padding: GAE links each valid position to the next
VALID one, skipping the holes.

``_advantages_fwd_kernel`` is one per-row pass: KL shaping -> GAE -> per-row whitening statistics.

``_advantages_fwd_kernel`` is one per-row pass: KL shaping -> GAE -> per-row whitening statistics.
GAE is a first-order linear recurrence over the valid positions, run backwards in time. With the
state x = (A, V) = (advantage, value) of the next valid position, a valid position t maps

    A' = gamma * lam * A + gamma * V + (r_t - v_t),    V' = v_t

and a masked one is the identity. Maps compose as P = [[a, b], [0, d]], q = (e, f):
    x -> (a * A + b * V + e, d * V + f)
so each block of positions is a parallel scan (tl.associative_scan) of these 5-tuples. Time runs
backwards, so a block is loaded at reversed offsets and scanned forward (Triton's reverse=True scan
is unreliable on GPU for non-commutative combines); blocks go from the end, carrying (A, V).

Naming chain: ``_advantages_fwd_kernel`` -> ``advantages_fwd`` -> ``kl_shaped_rewards`` / ``gae`` /
``ppo_advantages`` (no autograd: rewards and advantages are constants to PPO); the ``*_ref``
beside them define the semantics. The whitening finalize is ``whiten_apply`` from ops/whiten.py.
"""
from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

from rlhf_fast import _backend
from rlhf_fast._backend import addr, code, ptr, triton_interpreting
from rlhf_fast.ops._checks import (
    VALUE_DTYPES,
    check_bt,
    check_estimator,
    check_finite,
    check_float,
    check_mask,
    check_same_device,
    check_shape,
    check_unit,
)
from rlhf_fast.ops._common import flat_arg, mask_arg, result_dtype, rows_arg
from rlhf_fast.ops._triton_common import KL_ESTIMATORS, kl_estimate
from rlhf_fast.ops.kl import kl_penalty_ref
from rlhf_fast.ops.whiten import masked_whiten_ref, whiten_apply


# ---------------------------------------------------------------------------- references
def kl_shaped_rewards_ref(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                          kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """rewards = where(mask, -kl_coef * kl_penalty(logprobs, ref_logprobs), 0), plus scores[b] at
    the last valid position of row b (rows without one stay 0). fp32 (fp64 for fp64 inputs)."""
    dtype = result_dtype(scores, logprobs, ref_logprobs)
    valid = mask != 0
    kl = kl_penalty_ref(logprobs.to(dtype), ref_logprobs.to(dtype), estimator)
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros((), dtype=dtype, device=kl.device))
    T = valid.shape[-1]
    last = T - 1 - valid.flip(-1).to(torch.uint8).argmax(-1)  # last valid index (T-1 on empty rows)
    add = torch.where(valid.any(-1), scores.to(dtype), torch.zeros((), dtype=dtype, device=kl.device))
    return rewards.scatter_add(-1, last[:, None], add[:, None])


def gae_ref(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
            lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the valid positions of each row, in order t_1 < ... < t_k, going backwards:
    delta_i = r[t_i] + gamma * v[t_{i+1}] - v[t_i] (v[t_{k+1}] = 0), A[t_i] = delta_i + gamma * lam * A[t_{i+1}]
    (A[t_{k+1}] = 0), R[t_i] = A[t_i] + v[t_i]; A = R = 0 at masked positions.
    A loop over T, vectorized over B. Returns (advantages, returns), fp32 (fp64 for fp64 inputs)."""
    dtype = result_dtype(rewards, values)
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


def ppo_advantages_ref(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float, gamma: float = 1.0, lam: float = 0.95, estimator: str = "k1",
                       whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards = kl_shaped_rewards_ref(...); advantages, returns = gae_ref(rewards, values, mask);
    advantages = masked_whiten_ref(advantages, mask) when whiten. Returns (advantages, returns, rewards)."""
    rewards = kl_shaped_rewards_ref(scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
    adv, returns = gae_ref(rewards, values, mask, gamma, lam)
    if whiten:
        adv = masked_whiten_ref(adv, mask)
    return adv, returns, rewards


# ---------------------------------------------------------------------------- triton
@triton.jit
def _affine2_combine(a1, b1, d1, e1, f1, a2, b2, d2, e2, f2):
    """Map 1 (later in time, applied first) followed by map 2."""
    return a2 * a1, a2 * b1 + b2 * d1, d2 * d1, a2 * e1 + b2 * f1 + e2, d2 * f1 + f2


@triton.jit
def _advantages_fwd_kernel(
    scores_ptr,  # (B,) read when SHAPE
    logp_ptr,  # (B, T) rows at row * s_logp, read when SHAPE
    ref_ptr,  # (B, T) rows at row * s_ref, read when SHAPE
    rew_ptr,  # (B, T) rows at row * s_rew, read when not SHAPE
    val_ptr,  # (B, T) rows at row * s_val, read when GAE
    mask_ptr,  # (B, T) rows at row * s_mask, any dtype, valid where != 0
    rew_out_ptr,  # (B, T) fp32 contiguous out, written when SHAPE
    adv_ptr,  # (B, T) fp32 contiguous out, written when GAE
    ret_ptr,  # (B, T) fp32 contiguous out, written when GAE
    stats_ptr,  # (B, 3) fp64 out (count, mean, M2 of the advantages over valid positions), when STATS
    B,
    T,
    s_logp,
    s_ref,
    s_rew,
    s_val,
    s_mask,
    kl_coef,
    gamma,
    gl,  # gamma * lam
    EST: tl.constexpr,
    SHAPE: tl.constexpr,
    GAE: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    jj = tl.arange(0, BLOCK_T)
    zero = tl.zeros((BLOCK_B,), tl.float32)
    score = zero
    if SHAPE:
        score = tl.load(scores_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    seen = zero  # 1 once the row's last valid position was given its score
    carry_a = zero
    carry_v = zero
    zero64 = tl.zeros((BLOCK_B,), tl.float64)  # whitening statistics in fp64: no overflow, no cancellation
    n = zero64
    mean = zero64
    m2 = zero64
    for k in range(0, tl.cdiv(T, BLOCK_T)):
        t = T - 1 - k * BLOCK_T - jj  # reversed: scan index j runs backwards in time
        io = row_ok[:, None] & (t >= 0)[None, :]
        t2 = t[None, :]
        valid = tl.load(mask_ptr + rows[:, None] * s_mask + t2, mask=io, other=0) != 0
        if SHAPE:
            lp = tl.load(logp_ptr + rows[:, None] * s_logp + t2, mask=io, other=0.0).to(tl.float32)
            lq = tl.load(ref_ptr + rows[:, None] * s_ref + t2, mask=io, other=0.0).to(tl.float32)
            first = tl.min(tl.where(valid, jj[None, :], BLOCK_T), axis=1)  # the block's last valid t
            is_last = (jj[None, :] == first[:, None]) & (seen[:, None] == 0.0)
            r = tl.where(valid, -kl_coef * kl_estimate(lp - lq, EST), 0.0)
            r += tl.where(is_last, score[:, None], 0.0)
            seen = tl.where(first < BLOCK_T, 1.0, seen)
            tl.store(rew_out_ptr + rows[:, None] * T + t2, r, mask=io)
        else:
            r = tl.load(rew_ptr + rows[:, None] * s_rew + t2, mask=io, other=0.0).to(tl.float32)
        if GAE:
            v = tl.load(val_ptr + rows[:, None] * s_val + t2, mask=io, other=0.0).to(tl.float32)
            one = tl.full((BLOCK_B, BLOCK_T), 1.0, tl.float32)
            nil = tl.zeros((BLOCK_B, BLOCK_T), tl.float32)
            a = tl.where(valid, gl, one)
            b = tl.where(valid, gamma, nil)
            d = tl.where(valid, nil, one)
            e = tl.where(valid, r - v, nil)
            f = tl.where(valid, v, nil)
            a, b, d, e, f = tl.associative_scan((a, b, d, e, f), 1, _affine2_combine)
            adv_full = a * carry_a[:, None] + b * carry_v[:, None] + e
            val_full = d * carry_v[:, None] + f
            last = jj[None, :] == BLOCK_T - 1
            carry_a = tl.sum(tl.where(last, adv_full, 0.0), axis=1)
            carry_v = tl.sum(tl.where(last, val_full, 0.0), axis=1)
            adv = tl.where(valid, adv_full, 0.0)
            tl.store(adv_ptr + rows[:, None] * T + t2, adv, mask=io)
            tl.store(ret_ptr + rows[:, None] * T + t2, tl.where(valid, adv + v, 0.0), mask=io)
            if STATS:  # Chan et al.: merge the block's (count, mean, M2) into the row's
                adv64 = adv.to(tl.float64)
                cnt = tl.sum(valid.to(tl.float64), axis=1)
                bmean = tl.sum(adv64, axis=1) / tl.maximum(cnt, 1.0)
                bm2 = tl.sum(tl.where(valid, (adv64 - bmean[:, None]) * (adv64 - bmean[:, None]), 0.0), axis=1)
                tot = n + cnt
                delta = bmean - mean
                mean += delta * cnt / tl.maximum(tot, 1.0)
                m2 += bm2 + delta * delta * n * cnt / tl.maximum(tot, 1.0)
                n = tot
    if STATS:
        tl.store(stats_ptr + rows * 3, n, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 1, mean, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 2, m2, mask=row_ok)



# ---------------------------------------------------------------------------- launchers
def _rowstride(x):
    return x.stride(0) if x is not None else 0


def _block_sizes(B: int, T: int):
    cap = 4096 if triton_interpreting() else 2048
    block_t = min(triton.next_power_of_2(max(T, 1)), cap)
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), cap // block_t))
    return block_b, block_t


def _fwd_triton(B, T, ins, outs, kl_coef, gamma, lam, est) -> None:
    scores, logprobs, ref_logprobs, rewards, values, mask = ins
    rew_out, adv, ret, st = outs
    shape, with_gae, stats = scores is not None, values is not None, st is not None
    block_b, block_t = _block_sizes(B, T)
    d = mask  # a dummy for the pointers a variant does not read
    _advantages_fwd_kernel[(triton.cdiv(B, block_b),)](
        scores if shape else d, logprobs if shape else d, ref_logprobs if shape else d,
        d if shape else rewards, values if with_gae else d, mask,
        rew_out if shape else d, adv if with_gae else d, ret if with_gae else d, st if stats else d, B, T,
        _rowstride(logprobs), _rowstride(ref_logprobs), _rowstride(rewards), _rowstride(values), mask.stride(0),
        kl_coef, gamma, gamma * lam,
        EST=est, SHAPE=shape, GAE=with_gae, STATS=stats, BLOCK_B=block_b, BLOCK_T=block_t,
        num_warps=8 if block_b * block_t >= 2048 else 4,
    )


def _fwd_cpu(B, T, ins, outs, kl_coef, gamma, lam, est) -> None:
    _backend.cpu_kernels().advantages_fwd(
        *(x for t in ins for x in (addr(t), code(t), _rowstride(t))),
        B, T, kl_coef, gamma, lam, est, *(addr(t) for t in outs), _backend.num_threads(),
    )


def _gae_cuda(B, T, ins, outs, kl_coef, gamma, lam, est) -> None:
    """The csrc CUDA library implements GAE alone (rewards given, no whitening statistics)."""
    scores, _, _, rewards, values, mask = ins
    _, adv, ret, st = outs
    if scores is not None or st is not None or values is None:
        raise ValueError("advantages_fwd: the CUDA backend implements gae only")
    i64 = ctypes.c_int64
    _backend.cuda_call(
        "rlhf_gae", mask.device, ptr(rewards), ctypes.c_int(code(rewards)), i64(rewards.stride(0)),
        ptr(values), ctypes.c_int(code(values)), i64(values.stride(0)), ptr(mask), ctypes.c_int(code(mask)),
        i64(mask.stride(0)), i64(B), i64(T), ctypes.c_float(gamma), ctypes.c_float(lam), ptr(adv), ptr(ret),
    )


# backend -> launcher, read by _backend.select_backend: gae has a csrc CUDA kernel, the shaping ops not
GAE_LAUNCHERS = {"triton": _fwd_triton, "cpu": _fwd_cpu, "cuda": _gae_cuda}
SHAPED_LAUNCHERS = {"triton": _fwd_triton, "cpu": _fwd_cpu}


def advantages_fwd(backend: str, mask: torch.Tensor, *, scores=None, logprobs=None, ref_logprobs=None, rewards=None,
                   values=None, kl_coef: float = 0.0, gamma: float = 1.0, lam: float = 1.0, estimator: str = "k1",
                   stats: bool = False):
    """One pass per row. With scores/logprobs/ref_logprobs: KL-shaped rewards (else ``rewards`` is read);
    with values: GAE; with stats: per-row (count, mean, M2) of the advantages.
    Inputs of any layout (each goes through its layout adapter once).
    Returns (rewards-or-None, advantages-or-None, returns-or-None, stats-or-None), fp32."""
    shape = scores is not None
    with_gae = values is not None
    B, T = mask.shape
    dev = mask.device
    scores = flat_arg(scores)
    logprobs, ref_logprobs, rewards, values = map(rows_arg, (logprobs, ref_logprobs, rewards, values))
    mask = rows_arg(mask_arg(mask))
    # every backend writes every position (0 where masked)
    rew_out = torch.empty(B, T, dtype=torch.float32, device=dev) if shape else None
    adv = torch.empty(B, T, dtype=torch.float32, device=dev) if with_gae else None
    ret = torch.empty_like(adv) if with_gae else None
    st = None
    if stats:
        st = torch.empty(B, 3, dtype=torch.float64, device=dev)
    if B * T == 0:
        if st is not None:
            st.zero_()
        return rew_out, adv, ret, st
    GAE_LAUNCHERS[backend](B, T, (scores, logprobs, ref_logprobs, rewards, values, mask), (rew_out, adv, ret, st),
                           float(kl_coef), float(gamma), float(lam), KL_ESTIMATORS[estimator])
    return rew_out, adv, ret, st


# ---------------------------------------------------------------------------- public
def check_per_token(scores, logprobs, ref_logprobs, mask, values=None):
    check_bt("logprobs", logprobs)
    shape = logprobs.shape
    check_bt("ref_logprobs", ref_logprobs, shape)
    if values is not None:
        check_bt("values", values, shape)
    check_mask("mask", mask, shape)
    check_float("scores", scores, VALUE_DTYPES)
    check_shape("scores", scores, shape[:1], "one score per row of logprobs")
    check_same_device(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask, values=values)


def kl_shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
                      kl_coef: float, estimator: str = "k1", backend: str | None = None) -> torch.Tensor:
    """Per-token rewards for PPO:

        rewards = torch.where(mask != 0, -kl_coef * kl_penalty(logprobs, ref_logprobs, estimator), 0)
        rewards[b, last valid t of row b] += scores[b]      (rows without a valid position stay 0)

    Args:
        scores: (B,) sequence-level rewards. logprobs, ref_logprobs: (B, T). mask: (B, T) 0/1.
        kl_coef: finite float. estimator: "k1" | "abs" | "k2" | "k3".
        backend: None (automatic) | "triton" | "cpu" | "torch"; see rlhf_fast._backend.

    Returns:
        rewards (B, T) fp32 (no gradient through the kernels: rewards are constants to PPO).
    """
    check_per_token(scores, logprobs, ref_logprobs, mask)
    kl_coef = check_finite("kl_coef", kl_coef)
    check_estimator(estimator)
    backend = _backend.select_backend(logprobs.device, SHAPED_LAUNCHERS, backend=backend,
                                      tensors=(scores, logprobs, ref_logprobs))
    if backend == "torch":
        return kl_shaped_rewards_ref(scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
    rewards, _, _, _ = advantages_fwd(backend, mask, scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs,
                                      kl_coef=kl_coef, estimator=estimator)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95,
        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the valid positions of each row (see ``gae_ref``):

        delta_i = r[t_i] + gamma * v[t_{i+1}] - v[t_i],  A[t_i] = delta_i + gamma * lam * A[t_{i+1}],
        R[t_i] = A[t_i] + v[t_i]   (t_1 < ... < t_k the valid positions; v, A past t_k are 0)

    Args:
        rewards, values: (B, T) fp32 / fp16 / bf16. mask: (B, T) 0/1 (holes and padding allowed).
        gamma, lam: in [0, 1].
        backend: None (automatic) | "triton" | "cpu" | "cuda" | "torch"; see rlhf_fast._backend.

    Returns:
        (advantages, returns), each (B, T) fp32, 0 at masked positions; constants (no gradient
        through the kernels). fp64 inputs run ``gae_ref`` in fp64.
    """
    check_bt("rewards", rewards)
    check_bt("values", values, rewards.shape)
    check_mask("mask", mask, rewards.shape)
    check_same_device(rewards=rewards, values=values, mask=mask)
    gamma, lam = check_unit("gamma", gamma), check_unit("lam", lam)
    backend = _backend.select_backend(rewards.device, GAE_LAUNCHERS, backend=backend, tensors=(rewards, values))
    if backend == "torch":
        return gae_ref(rewards, values, mask, gamma, lam)
    _, adv, ret, _ = advantages_fwd(backend, mask, rewards=rewards, values=values, gamma=gamma, lam=lam)
    return adv, ret


def ppo_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor, *, kl_coef: float, gamma: float = 1.0, lam: float = 0.95, estimator: str = "k1",
                   whiten: bool = True, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL shaping, GAE and masked whitening fused, equal to

        rewards = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
        if whiten: advantages = masked_whiten(advantages, mask)      # over the whole batch

    Args:
        scores: (B,). logprobs, ref_logprobs, values: (B, T). mask: (B, T) 0/1.
        backend: None (automatic) | "triton" | "cpu" | "torch"; see rlhf_fast._backend.

    Returns:
        (advantages, returns, rewards), each (B, T) fp32, 0 at masked positions (whitened
        advantages too); constants (no gradient through the kernels).
    """
    check_per_token(scores, logprobs, ref_logprobs, mask, values)
    kl_coef = check_finite("kl_coef", kl_coef)
    gamma, lam = check_unit("gamma", gamma), check_unit("lam", lam)
    check_estimator(estimator)
    backend = _backend.select_backend(logprobs.device, SHAPED_LAUNCHERS, backend=backend,
                                      tensors=(scores, logprobs, ref_logprobs, values))
    if backend == "torch":
        return ppo_advantages_ref(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, estimator,
                                  bool(whiten))
    rewards, adv, ret, stats = advantages_fwd(
        backend, mask, scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
        kl_coef=kl_coef, gamma=gamma, lam=lam, estimator=estimator, stats=bool(whiten),
    )
    if whiten:  # the tiny finalize: merge per-row stats, normalise in place
        flat = adv.view(-1)
        whiten_apply(backend, flat, flat_arg(mask_arg(mask)), stats, flat)
    return adv, ret, rewards
