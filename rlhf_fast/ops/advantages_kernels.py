"""Kernels and per-backend launchers behind rlhf_fast/ops/advantages.py (whose ``*_ref`` define them).

``_advantages_fwd_kernel`` is one per-row pass: KL shaping -> GAE -> per-row whitening statistics.
GAE is a first-order linear recurrence over the valid positions, run backwards in time. With the
state x = (A, V) = (advantage, value) of the next valid position, a valid position t maps

    A' = gamma * lam * A + gamma * V + (r_t - v_t),    V' = v_t

and a masked one is the identity. Maps compose as P = [[a, b], [0, d]], q = (e, f):
    x -> (a * A + b * V + e, d * V + f)
so each block of positions is a parallel scan (tl.associative_scan) of these 5-tuples. Time runs
backwards, so a block is loaded at reversed offsets and scanned forward (Triton's reverse=True scan
is unreliable on GPU for non-commutative combines); blocks go from the end, carrying (A, V).
"""
from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

from rlhf_fast import _backend
from rlhf_fast._backend import triton_interpreting
from rlhf_fast.ops._triton_common import KL_ESTIMATORS, kl_estimate


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
    stats_ptr,  # (B, 3) fp32 out (count, mean, M2 of the advantages over valid positions), when STATS
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
    n = zero
    mean = zero
    m2 = zero
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
                cnt = tl.sum(valid.to(tl.float32), axis=1)
                bmean = tl.sum(adv, axis=1) / tl.maximum(cnt, 1.0)
                bm2 = tl.sum(tl.where(valid, (adv - bmean[:, None]) * (adv - bmean[:, None]), 0.0), axis=1)
                tot = n + cnt
                delta = bmean - mean
                mean += delta * cnt / tl.maximum(tot, 1.0)
                m2 += bm2 + delta * delta * n * cnt / tl.maximum(tot, 1.0)
                n = tot
    if STATS:
        tl.store(stats_ptr + rows * 3, n, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 1, mean, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 2, m2, mask=row_ok)


@triton.jit
def _whiten_stats_kernel(
    x_ptr,  # (N,) contiguous
    mask_ptr,  # (N,) contiguous, any dtype
    stats_ptr,  # (P, 3) fp32 out: count, mean, M2 of block p's valid elements
    N,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(mask_ptr + offs, mask=offs < N, other=0) != 0
    x = tl.where(valid, tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32), 0.0)
    cnt = tl.sum(valid.to(tl.float32), axis=0)
    mean = tl.sum(x, axis=0) / tl.maximum(cnt, 1.0)
    m2 = tl.sum(tl.where(valid, (x - mean) * (x - mean), 0.0), axis=0)
    tl.store(stats_ptr + pid * 3, cnt)
    tl.store(stats_ptr + pid * 3 + 1, mean)
    tl.store(stats_ptr + pid * 3 + 2, m2)


@triton.jit
def _whiten_apply_kernel(
    x_ptr,  # (N,) contiguous; may alias out_ptr
    mask_ptr,  # (N,) contiguous, any dtype
    out_ptr,  # (N,) fp32 out
    stats_ptr,  # (P, 3) fp32 partial (count, mean, M2), merged here by every program
    N,
    P,
    eps,
    SHIFT_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    cnt = 0.0
    total = 0.0
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        c = tl.load(stats_ptr + p * 3, mask=p < P, other=0.0)
        cnt += tl.sum(c, axis=0)
        total += tl.sum(c * tl.load(stats_ptr + p * 3 + 1, mask=p < P, other=0.0), axis=0)
    mean = total / tl.maximum(cnt, 1.0)
    m2 = 0.0
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        c = tl.load(stats_ptr + p * 3, mask=p < P, other=0.0)
        dm = tl.load(stats_ptr + p * 3 + 1, mask=p < P, other=0.0) - mean
        m2 += tl.sum(tl.load(stats_ptr + p * 3 + 2, mask=p < P, other=0.0) + c * dm * dm, axis=0)
    var = m2 / tl.maximum(cnt - 1.0, 1.0)
    rstd = tl.where(cnt >= 2.0, 1.0 / tl.sqrt(var + eps), 0.0)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(mask_ptr + offs, mask=offs < N, other=0) != 0
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0), mask=offs < N)


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
    s = tl.load(scores_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    c = tl.where(ok, s - (tl.sum(s, axis=1) / G)[:, None], 0.0)
    adv = c * baseline_factor
    if SCALE == 0:
        std = tl.sqrt(tl.sum(c * c, axis=1) / (G - 1))
        adv = adv / (std + eps)[:, None]
    elif SCALE == 1:  # every program reduces the whole batch: B is small (one score per completion)
        total = 0.0
        for i0 in range(0, B, BLOCK_ALL):
            i = i0 + tl.arange(0, BLOCK_ALL)
            total += tl.sum(tl.load(scores_ptr + i, mask=i < B, other=0.0).to(tl.float32), axis=0)
        mu = total / B
        m2 = 0.0
        for i0 in range(0, B, BLOCK_ALL):
            i = i0 + tl.arange(0, BLOCK_ALL)
            dv = tl.where(i < B, tl.load(scores_ptr + i, mask=i < B, other=0.0).to(tl.float32) - mu, 0.0)
            m2 += tl.sum(dv * dv, axis=0)
        adv = adv / (tl.sqrt(m2 / (B - 1)) + eps)
    tl.store(out_ptr + idx, adv, mask=ok)


# ---------------------------------------------------------------------------- launchers
def _rowstride(x):
    return x.stride(0) if x is not None else 0


def _mask_arg(mask):
    """A mask the kernels read with its own dtype (valid where != 0): bool / int8 are read as bytes,
    dtypes the kernels have no code for (fp64) become a bool mask first."""
    if mask.dtype in (torch.bool, torch.int8):
        return mask.view(torch.uint8)
    return mask if mask.dtype in _backend.DTYPE_CODES else (mask != 0).view(torch.uint8)


def _unit_stride(x):
    return x if x is None or x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _block_sizes(B: int, T: int):
    cap = 4096 if triton_interpreting() else 2048
    block_t = min(triton.next_power_of_2(max(T, 1)), cap)
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), cap // block_t))
    return block_b, block_t


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _code(t):
    return _backend.DTYPE_CODES[t.dtype] if t is not None else 0


def advantages_fwd(backend, mask, *, scores=None, logprobs=None, ref_logprobs=None, rewards=None, values=None,
                   kl_coef=0.0, gamma=1.0, lam=1.0, estimator="k1", stats=False):
    """One pass per row. With scores/logprobs/ref_logprobs: KL-shaped rewards (else ``rewards`` is read);
    with values: GAE; with stats: per-row (count, mean, M2) of the advantages.
    Returns (rewards-or-None, advantages-or-None, returns-or-None, stats-or-None), fp32."""
    shape = scores is not None
    with_gae = values is not None
    B, T = mask.shape
    dev = mask.device
    logprobs, ref_logprobs, rewards, values = map(_unit_stride, (logprobs, ref_logprobs, rewards, values))
    mask = _unit_stride(_mask_arg(mask))
    # every backend writes every position (0 where masked)
    rew_out = torch.empty(B, T, dtype=torch.float32, device=dev) if shape else None
    adv = torch.empty(B, T, dtype=torch.float32, device=dev) if with_gae else None
    ret = torch.empty_like(adv) if with_gae else None
    st = None
    if stats:
        st = torch.empty(B, 3, dtype=torch.float64 if backend == "cpu" else torch.float32, device=dev)
    if B * T == 0:
        if st is not None:
            st.zero_()
        return rew_out, adv, ret, st
    est = KL_ESTIMATORS[estimator]
    if backend == "triton":
        block_b, block_t = _block_sizes(B, T)
        dummy = mask
        _advantages_fwd_kernel[(triton.cdiv(B, block_b),)](
            scores if shape else dummy, logprobs if shape else dummy, ref_logprobs if shape else dummy,
            dummy if shape else rewards, values if with_gae else dummy, mask,
            rew_out if shape else dummy, adv if with_gae else dummy, ret if with_gae else dummy,
            st if stats else dummy, B, T,
            _rowstride(logprobs), _rowstride(ref_logprobs), _rowstride(rewards), _rowstride(values), mask.stride(0),
            float(kl_coef), float(gamma), float(gamma * lam),
            EST=est, SHAPE=shape, GAE=with_gae, STATS=stats, BLOCK_B=block_b, BLOCK_T=block_t,
            num_warps=8 if block_b * block_t >= 2048 else 4,
        )
    elif backend == "cpu":
        _backend._C.advantages_fwd(
            *(x for t in (scores, logprobs, ref_logprobs, rewards, values, mask)
              for x in (t.data_ptr() if t is not None else 0, _code(t), _rowstride(t))),
            B, T, float(kl_coef), float(gamma), float(lam), est,
            *(t.data_ptr() if t is not None else 0 for t in (rew_out, adv, ret, st)), _backend.num_threads(),
        )
    elif backend == "cuda":  # the csrc CUDA library implements GAE alone (rewards given)
        if shape or stats or not with_gae:
            raise ValueError("advantages_fwd: the CUDA backend implements gae only")
        err = _backend.cuda_library().rlhf_gae(
            _ptr(rewards), ctypes.c_int(_code(rewards)), ctypes.c_int64(rewards.stride(0)),
            _ptr(values), ctypes.c_int(_code(values)), ctypes.c_int64(values.stride(0)),
            _ptr(mask), ctypes.c_int(_code(mask)), ctypes.c_int64(mask.stride(0)),
            ctypes.c_int64(B), ctypes.c_int64(T), ctypes.c_float(gamma), ctypes.c_float(lam),
            _ptr(adv), _ptr(ret), ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream),
            ctypes.c_int(dev.index or 0),
        )
        if err != 0:
            raise RuntimeError(f"rlhf_fast CUDA kernel rlhf_gae failed with cudaError {err}")
    else:
        raise ValueError(f"advantages_fwd: unknown backend {backend!r}")
    return rew_out, adv, ret, st


def whiten_apply(backend, x, mask, stats, out, *, shift_mean=True, eps=1e-8):
    """out = where(mask, (x - mean) * rstd (+ mean), 0) with (mean, rstd) merged from the partial
    stats (P, 3); x, mask, out flat and contiguous (out may be x)."""
    N, P = x.numel(), stats.shape[0]
    if N == 0:
        return out
    if backend == "triton":
        block = 4096 if triton_interpreting() else 2048
        _whiten_apply_kernel[(triton.cdiv(N, block),)](
            x, mask, out, stats, N, P, float(eps), SHIFT_MEAN=bool(shift_mean), BLOCK=block,
            BLOCK_P=min(triton.next_power_of_2(max(P, 1)), 1024), num_warps=8,
        )
    else:
        _backend._C.whiten_apply(x.data_ptr(), _code(x), mask.data_ptr(), _code(mask), out.data_ptr(),
                                 stats.data_ptr(), N, P, float(eps), bool(shift_mean), _backend.num_threads())
    return out


def masked_whiten_fwd(backend, x, mask, *, shift_mean=True, eps=1e-8):
    """Two passes: partial (count, mean, M2) per block, then merge + normalise. Returns fp32, x's shape."""
    shape = x.shape
    x, mask = x.reshape(-1).contiguous(), _mask_arg(mask).reshape(-1).contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    N = x.numel()
    if backend == "triton":
        block = 4096
        stats = torch.empty(triton.cdiv(N, block), 3, dtype=torch.float32, device=x.device)
        if N:
            _whiten_stats_kernel[(stats.shape[0],)](x, mask, stats, N, BLOCK=block, num_warps=8)
    elif backend == "cpu":
        stats = torch.empty(triton.cdiv(N, 1 << 14), 3, dtype=torch.float64)  # kWhitenChunk in advantages.cpp
        _backend._C.whiten_stats(x.data_ptr(), _code(x), mask.data_ptr(), _code(mask), N, stats.data_ptr(),
                                 _backend.num_threads())
    else:
        raise ValueError(f"masked_whiten_fwd: unknown backend {backend!r}")
    return whiten_apply(backend, x, mask, stats, out, shift_mean=shift_mean, eps=eps).view(shape)


def group_advantages_fwd(backend, scores, group_size, baseline, scale, eps):
    scores = scores.contiguous()
    B = scores.shape[0]
    out = torch.empty(B, dtype=torch.float32, device=scores.device)
    if B == 0:
        return out
    G = group_size
    factor = G / (G - 1) if baseline == "leave_one_out" else 1.0
    scale_code = {"group": 0, "batch": 1, "none": 2}[scale]
    if backend == "triton":
        block_m = triton.next_power_of_2(G)
        block_g = max(1, min(triton.next_power_of_2(B // G), 2048 // block_m))
        _group_advantages_kernel[(triton.cdiv(B // G, block_g),)](
            scores, out, B, B // G, G, factor, float(eps), SCALE=scale_code, BLOCK_G=block_g, BLOCK_M=block_m,
            BLOCK_ALL=min(triton.next_power_of_2(B), 4096),
        )
    elif backend == "cpu":
        _backend._C.group_advantages(scores.data_ptr(), _code(scores), out.data_ptr(), B, G, factor, float(eps),
                                     scale_code)
    else:
        raise ValueError(f"group_advantages_fwd: unknown backend {backend!r}")
    return out
