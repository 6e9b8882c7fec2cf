"""Masked whitening: ``masked_whiten(x, mask)`` normalises x over its valid positions (all
dimensions together) to mean 0 and unit (unbiased) variance, as TRL and verl do.

Two passes: ``_whiten_stats_kernel`` writes per-block (count, mean, M2) partial statistics;
``_whiten_apply_kernel`` merges them (Chan et al.) and normalises. ``ppo_advantages`` (ops/gae.py)
reuses ``whiten_apply`` on the per-row statistics its fused kernel writes.

Naming chain: ``_whiten_stats_kernel`` / ``_whiten_apply_kernel`` -> ``whiten_stats`` /
``whiten_apply`` -> ``masked_whiten``; ``masked_whiten_ref`` defines the semantics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast import _backend
from rlhf_fast._backend import addr, code, triton_interpreting
from rlhf_fast.ops._checks import VALUE_DTYPES, check_float, check_mask, check_nonnegative, check_same_device
from rlhf_fast.ops._common import flat_arg, mask_arg, result_dtype


def masked_whiten_ref(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) * rsqrt(var + eps) over the positions where mask != 0 (all of x's elements
    together), var unbiased; with shift_mean=False the mean is added back. Masked positions are 0.
    Fewer than 2 valid positions, or var + eps == 0 (a constant input with eps = 0): rstd := 0, so
    the output is 0 (the mean with shift_mean=False), never NaN. Statistics are two-pass in fp64
    (fp32 where the device has no fp64), so |x| ~ 1e20 does not overflow nor a large offset cancel.
    Returns fp32 (fp64 for fp64 x)."""
    dtype = result_dtype(x)
    stat = torch.float64 if x.device.type in ("cpu", "cuda") else dtype
    valid = mask != 0
    xs = torch.where(valid, x.to(stat), 0.0)
    n = valid.sum().to(stat)
    mean = xs.sum() / n.clamp(min=1)
    ss = torch.where(valid, (xs - mean) ** 2, 0.0).sum()
    var_eps = ss / (n - 1).clamp(min=1) + eps
    ok = (n >= 2) & (var_eps != 0)
    rstd = torch.where(ok, torch.rsqrt(torch.where(ok, var_eps, 1.0)), 0.0)
    out = (xs - mean) * rstd
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0).to(dtype)


# ---------------------------------------------------------------------------- triton
@triton.jit
def _whiten_stats_kernel(
    x_ptr,  # (N,) contiguous
    mask_ptr,  # (N,) contiguous, any dtype
    stats_ptr,  # (P, 3) fp64 out: count, mean, M2 of block p's valid elements
    N,
    BLOCK: tl.constexpr,
):
    """Two-pass statistics of one block in fp64: (x - mean)^2 of fp32 values neither overflows
    (|x| ~ 1e20) nor cancels (a large offset over a small spread)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(mask_ptr + offs, mask=offs < N, other=0) != 0
    x = tl.where(valid, tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32).to(tl.float64), 0.0)
    cnt = tl.sum(valid.to(tl.float64), axis=0)
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
    stats_ptr,  # (P, 3) fp64 partial (count, mean, M2), merged here (Chan et al.) by every program
    N,
    P,
    eps,
    SHIFT_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    cnt = tl.zeros((BLOCK_P,), tl.float64)
    total = tl.zeros((BLOCK_P,), tl.float64)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        c = tl.load(stats_ptr + p * 3, mask=p < P, other=0.0)
        cnt += c
        total += c * tl.load(stats_ptr + p * 3 + 1, mask=p < P, other=0.0)
    n = tl.sum(cnt, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
    m2 = tl.zeros((BLOCK_P,), tl.float64)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        c = tl.load(stats_ptr + p * 3, mask=p < P, other=0.0)
        dm = tl.load(stats_ptr + p * 3 + 1, mask=p < P, other=0.0) - mean
        m2 += tl.load(stats_ptr + p * 3 + 2, mask=p < P, other=0.0) + c * dm * dm
    var_eps = tl.sum(m2, axis=0) / tl.maximum(n - 1.0, 1.0) + eps
    # fewer than 2 valid elements, or a constant input with eps = 0: 0 (not 0 * inf)
    rstd = tl.where((n >= 2.0) & (var_eps != 0.0), 1.0 / tl.sqrt(tl.where(var_eps != 0.0, var_eps, 1.0)), 0.0)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(mask_ptr + offs, mask=offs < N, other=0) != 0
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32).to(tl.float64)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0).to(tl.float32), mask=offs < N)


# ---------------------------------------------------------------------------- launchers
CPU_CHUNK = 1 << 14  # kWhitenChunk in csrc/cpu/whiten.cpp


def _stats_triton(x, mask):
    block = 4096
    stats = torch.empty(triton.cdiv(x.numel(), block), 3, dtype=torch.float64, device=x.device)
    if x.numel():
        _whiten_stats_kernel[(stats.shape[0],)](x, mask, stats, x.numel(), BLOCK=block, num_warps=8)
    return stats


def _stats_cpu(x, mask):
    stats = torch.empty(triton.cdiv(x.numel(), CPU_CHUNK), 3, dtype=torch.float64)
    _backend.cpu_kernels().whiten_stats(addr(x), code(x), addr(mask), code(mask), x.numel(), addr(stats),
                                        _backend.num_threads())
    return stats


def _apply_triton(x, mask, stats, out, shift_mean: bool, eps: float) -> None:
    N, P = x.numel(), stats.shape[0]
    block = 4096 if triton_interpreting() else 2048
    _whiten_apply_kernel[(triton.cdiv(N, block),)](
        x, mask, out, stats, N, P, eps, SHIFT_MEAN=shift_mean, BLOCK=block,
        BLOCK_P=min(triton.next_power_of_2(max(P, 1)), 1024), num_warps=8,
    )


def _apply_cpu(x, mask, stats, out, shift_mean: bool, eps: float) -> None:
    _backend.cpu_kernels().whiten_apply(addr(x), code(x), addr(mask), code(mask), addr(out), addr(stats), x.numel(),
                                        stats.shape[0], eps, shift_mean, _backend.num_threads())


# backend -> (statistics launcher, apply launcher); read by _backend.select_backend
LAUNCHERS = {"triton": (_stats_triton, _apply_triton), "cpu": (_stats_cpu, _apply_cpu)}


def whiten_stats(backend: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Partial (count, mean, M2) of the valid elements of flat contiguous x, mask: (P, 3)."""
    return LAUNCHERS[backend][0](x, mask)


def whiten_apply(backend: str, x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, out: torch.Tensor, *,
                 shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """out = where(mask, (x - mean) * rstd (+ mean), 0) with (mean, rstd) merged from the partial
    stats (P, 3); x, mask, out flat and contiguous (out may be x)."""
    if x.numel():
        LAUNCHERS[backend][1](x, mask, stats, out, bool(shift_mean), float(eps))
    return out


# ---------------------------------------------------------------------------- public
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  backend: str | None = None) -> torch.Tensor:
    """Whitening over the valid positions of x (all dimensions together), as TRL and verl:

        mean = x[mask].mean(); var = x[mask].var(unbiased=True)
        out = torch.where(mask != 0, (x - mean) * torch.rsqrt(var + eps) (+ mean if not shift_mean), 0)

    With fewer than 2 valid positions, or var + eps == 0 (constant input, eps = 0), the output is 0
    (the mean with shift_mean=False), never NaN. Statistics in fp64 on every backend.

    Args:
        x: (...) fp32 / fp16 / bf16. mask: (...) same shape, 0/1. eps: >= 0.
        backend: None (automatic) | "triton" | "cpu" | "torch"; see rlhf_fast._backend.

    Returns:
        (...) fp32, 0 where masked; a constant (no gradient through the kernels).
    """
    check_float("x", x, VALUE_DTYPES)
    check_mask("mask", mask, x.shape)
    check_same_device(x=x, mask=mask)
    eps = check_nonnegative("eps", eps)
    backend = _backend.select_backend(x.device, LAUNCHERS, backend=backend, tensors=(x,))
    if backend == "torch":
        return masked_whiten_ref(x, mask, bool(shift_mean), eps)
    flat, m = flat_arg(x), flat_arg(mask_arg(mask))
    out = torch.empty(flat.shape, dtype=torch.float32, device=x.device)
    stats = whiten_stats(backend, flat, m)
    return whiten_apply(backend, flat, m, stats, out, shift_mean=shift_mean, eps=eps).view(x.shape)
