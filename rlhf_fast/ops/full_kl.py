"""Exact full-vocabulary KL per token (``full_kl``): KL(softmax(z) || softmax(z')),
z = t(logits) / T, z' = t(ref_logits) / T with the logit transform t = ``logit_transform_ref``
(scale, then softcap; fused like in logprobs.py), in one streaming pass over both rows with online
statistics and no vocabulary-sized temporary:

    KL = E_p[z - z'] - (lse(z) - lse(z')) = w / s - (log s - log s')
    m = max z, s = sum exp(z - m), m' = max z', s' = sum exp(z' - m'),
    w = sum exp(z - m) ((z - m) - (z' - m'))          (each side from its own max: no cancellation)
    dKL/dz_j = p_j (log p_j - log q_j - KL)

The per-token estimators on log-probs are ``kl_penalty`` (kl.py).

Naming chain: ``_full_kl_fwd_kernel`` -> ``full_kl_fwd`` -> ``FullKLFunction`` -> ``full_kl``;
``full_kl_ref`` defines the semantics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast import _backend
from rlhf_fast._backend import addr, code
from rlhf_fast.ops._checks import (
    check_logits,
    check_positive,
    check_same_device,
    check_shape,
)
from rlhf_fast.ops._common import Rows, as_rows, first_order_only, flat_arg
from rlhf_fast.ops._grad_pool import grad_buffer
from rlhf_fast.ops._triton_common import (
    cast_for_store,
    logit_z,
    logit_z_grad,
    nonfinite_count,
    num_warps_for,
    online_softmax_update,
    row_offset,
    vocab_block,
)
from rlhf_fast.ops.logprobs import check_transform, logit_coefs, logit_transform_ref

# ---------------------------------------------------------------------------- reference

def full_kl_ref(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0, *,
                logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Pure PyTorch definition of the exact per-token KL(softmax(t(logits) / T) || softmax(t(ref_logits) / T)),
    t = logit_transform_ref(., logit_scale, softcap) on both sides.
    Computes in fp32 (fp64 for fp64 logits); 0 * log 0 := 0, so -inf logits of the policy add nothing."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logit_transform_ref(logits.to(dtype), logit_scale, softcap) / temperature, dim=-1)
    logq = torch.log_softmax(logit_transform_ref(ref_logits.to(dtype), logit_scale, softcap) / temperature, dim=-1)
    p = logp.exp()
    # the where sits inside the product so that -inf - -inf never reaches autograd either
    return (p * torch.where(p > 0, logp - logq, torch.zeros_like(p))).sum(-1)

# ---------------------------------------------------------------------------- triton

@triton.jit
def _online_kl_update(m, s, w, mq, z, q, q_for_max):
    """Folds a block of z (-inf where masked) and z' = q into the running m = max z,
    s = sum exp(z - m) and w = sum exp(z - m) ((z - m) - (z' - m')), m' = max z' (the caller keeps
    m', from q_for_max = q with -inf where masked). Measuring z and z' from their own maxima keeps
    w free of cancellation when the logits are large. Returns (m, s, w)."""
    m_new = tl.maximum(m, tl.max(z, 0))
    mq_new = tl.maximum(mq, tl.max(q_for_max, 0))
    ms_old = tl.where(m == float("-inf"), 0.0, m)
    ms = tl.where(m_new == float("-inf"), 0.0, m_new)
    mqs_old = tl.where(mq == float("-inf"), 0.0, mq)
    mqs = tl.where(mq_new == float("-inf"), 0.0, mq_new)
    alpha = tl.exp(m - ms)
    e = tl.exp(z - ms)
    w = alpha * (w + s * ((ms_old - ms) - (mqs_old - mqs)))
    w += tl.sum(e * tl.where(e > 0, (z - ms) - (q - mqs), 0.0), 0)
    s = alpha * s + tl.sum(e, 0)
    return m_new, s, w

@triton.jit
def _full_kl_fwd_kernel(
    x_ptr,  # (N, V) logits, rows at row_offset(r, x_inner, x_s_outer, x_s_inner), unit stride along V
    y_ptr,  # (N, V) ref_logits, rows at row_offset(r, y_inner, y_s_outer, y_s_inner)
    kl_ptr,  # (N,) fp32 out
    stats_ptr,  # (N, 4) fp32 out, saved for backward: m = max z, log s, m' = max z', log s'
    V,
    x_inner,
    x_s_outer,
    x_s_inner,
    y_inner,
    y_s_outer,
    y_s_inner,
    inv_temp,  # mul of logit_coefs: z = x * mul, or tanh(x * cap_pre) * mul with SOFTCAP
    cap_pre,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    xp = x_ptr + row_offset(row, x_inner, x_s_outer, x_s_inner)
    yp = y_ptr + row_offset(row, y_inner, y_s_outer, y_s_inner)
    m = float("-inf")
    s = 0.0
    w = 0.0
    mq = float("-inf")
    sq = 0.0
    unused = 0.0
    bad = 0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = logit_z(tl.load(xp + offs, mask=ok, other=float("-inf")).to(tl.float32), inv_temp, cap_pre, SOFTCAP)
        if SOFTCAP:
            z = tl.where(ok, z, float("-inf"))  # tanh(-inf) is -1: lanes past V must stay -inf
        q = logit_z(tl.load(yp + offs, mask=ok, other=0.0).to(tl.float32), inv_temp, cap_pre, SOFTCAP)
        q_for_max = tl.where(ok, q, float("-inf"))
        bad += nonfinite_count(z) + nonfinite_count(q_for_max)
        m, s, w = _online_kl_update(m, s, w, mq, z, q, q_for_max)
        mq, sq, unused = online_softmax_update(mq, sq, unused, q_for_max, False)
    log_s = tl.log(s)
    log_sq = tl.log(sq)
    # KL = E_p[(z - m) - (z' - m')] - (log s - log s'); NaN for a row with a NaN / +inf logit on either
    # side (explicit: tl.max ignores NaN on the GPU), and (0 / 0) for a row of only -inf logits
    tl.store(kl_ptr + row, tl.where(bad > 0, float("nan"), w / s - (log_s - log_sq)))
    tl.store(stats_ptr + row * 4, m)
    tl.store(stats_ptr + row * 4 + 1, log_s)
    tl.store(stats_ptr + row * 4 + 2, mq)
    tl.store(stats_ptr + row * 4 + 3, log_sq)

@triton.jit
def _full_kl_bwd_kernel(
    x_ptr,  # (N, V) logits, rows as in the forward
    y_ptr,  # (N, V) ref_logits, rows as in the forward
    grad_ptr,  # (N, V) out, logits' dtype, rows at row_offset(r, g_inner, g_s_outer, g_s_inner)
    kl_ptr,  # (N,) fp32, the forward's output
    stats_ptr,  # (N, 4) fp32 from the forward
    g_ptr,  # (N,) fp32 upstream grad
    V,
    x_inner,
    x_s_outer,
    x_s_inner,
    y_inner,
    y_s_outer,
    y_s_inner,
    g_inner,
    g_s_outer,
    g_s_inner,
    inv_temp,  # as in the forward
    cap_pre,
    SOFTCAP: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add to grad's values (the fused policy loss's "full" KL term)
    BLOCK_V: tl.constexpr,
):
    """grad_j = g * dz_j/dx_j * p_j (log p_j - log q_j - KL), dz/dx = 1 / T without softcap."""
    row = tl.program_id(0)
    xp = x_ptr + row_offset(row, x_inner, x_s_outer, x_s_inner)
    yp = y_ptr + row_offset(row, y_inner, y_s_outer, y_s_inner)
    gp = grad_ptr + row_offset(row, g_inner, g_s_outer, g_s_inner)
    kl = tl.load(kl_ptr + row)
    m = tl.load(stats_ptr + row * 4)
    log_s = tl.load(stats_ptr + row * 4 + 1)
    mq = tl.load(stats_ptr + row * 4 + 2)
    log_sq = tl.load(stats_ptr + row * 4 + 3)
    g_row = tl.load(g_ptr + row)
    scale = g_row * inv_temp
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = logit_z(tl.load(xp + offs, mask=ok, other=float("-inf")).to(tl.float32), inv_temp, cap_pre, SOFTCAP)
        q = logit_z(tl.load(yp + offs, mask=ok, other=0.0).to(tl.float32), inv_temp, cap_pre, SOFTCAP)
        logp = (z - m) - log_s
        p = tl.exp(logp)
        if SOFTCAP:
            g = (g_row * logit_z_grad(z, inv_temp, cap_pre, SOFTCAP)) * p * tl.where(
                p > 0, logp - ((q - mq) - log_sq) - kl, 0.0)
        else:
            g = scale * p * tl.where(p > 0, logp - ((q - mq) - log_sq) - kl, 0.0)
        g = tl.where(g_row == 0.0, 0.0, g)  # no upstream gradient (a masked row): 0, never 0 * NaN
        if ACCUMULATE:
            g = g + tl.load(gp + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(gp + offs, cast_for_store(g, grad_ptr.dtype.element_ty), mask=ok)

# ---------------------------------------------------------------------------- launchers

def _full_kl_fwd_triton(x: Rows, y: Rows, kl, stats, inv_temp: float, cap_pre: float) -> None:
    block = vocab_block(x.v)
    _full_kl_fwd_kernel[(x.n,)](
        x.data, y.data, kl, stats, x.v, *x.layout(), *y.layout(), inv_temp, cap_pre, SOFTCAP=cap_pre != 0.0,
        BLOCK_V=block, num_warps=num_warps_for(block),
    )

def _full_kl_fwd_cpu(x: Rows, y: Rows, kl, stats, inv_temp: float, cap_pre: float) -> None:
    _backend.cpu_kernels().full_kl_fwd(
        addr(x.data), code(x.data), *x.layout(), addr(y.data), code(y.data), *y.layout(),
        x.n, x.v, inv_temp, cap_pre, addr(kl), addr(stats), _backend.num_threads(),
    )

def _full_kl_bwd_triton(x: Rows, y: Rows, grad: Rows, kl, stats, g, inv_temp: float, cap_pre: float,
                        accumulate: bool) -> None:
    block = vocab_block(x.v)
    _full_kl_bwd_kernel[(x.n,)](
        x.data, y.data, grad.data, kl, stats, g, x.v, *x.layout(), *y.layout(), *grad.layout(), inv_temp,
        cap_pre, SOFTCAP=cap_pre != 0.0, ACCUMULATE=accumulate, BLOCK_V=block, num_warps=num_warps_for(block),
    )

def _full_kl_bwd_cpu(x: Rows, y: Rows, grad: Rows, kl, stats, g, inv_temp: float, cap_pre: float,
                     accumulate: bool) -> None:
    _backend.cpu_kernels().full_kl_bwd(
        addr(x.data), code(x.data), *x.layout(), addr(y.data), code(y.data), *y.layout(),
        addr(grad.data), *grad.layout(), x.n, x.v, inv_temp, cap_pre, addr(kl), addr(stats), addr(g),
        accumulate, _backend.num_threads(),
    )

FULL_KL_LAUNCHERS = {"triton": (_full_kl_fwd_triton, _full_kl_bwd_triton), "cpu": (_full_kl_fwd_cpu, _full_kl_bwd_cpu)}

def full_kl_fwd(x: Rows, y: Rows, inv_temp: float, backend: str, cap_pre: float = 0.0):
    """Returns fp32 kl (N,) and the row statistics (N, 4) backward needs; (inv_temp, cap_pre): logit_coefs."""
    dev = x.data.device
    kl = torch.empty(x.n, dtype=torch.float32, device=dev)
    stats = torch.empty(x.n, 4, dtype=torch.float32, device=dev)
    if x.n:
        FULL_KL_LAUNCHERS[backend][0](x, y, kl, stats, inv_temp, cap_pre)
    return kl, stats

def full_kl_bwd(x: Rows, y: Rows, grad: Rows, kl, stats, g, inv_temp: float, backend: str,
                cap_pre: float = 0.0, accumulate: bool = False) -> None:
    """Writes d kl / d logits . g into ``grad`` (the only (N, V) tensor backward touches); with
    ``accumulate``, adds it to grad's values (rows with g = 0 are left as they are)."""
    if x.n:
        FULL_KL_LAUNCHERS[backend][1](x, y, grad, kl, stats, g, inv_temp, cap_pre, accumulate)

# ---------------------------------------------------------------------------- autograd

class FullKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, coefs, backend):
        x, y = as_rows(logits), as_rows(ref_logits)
        inv_temp, cap_pre = coefs
        kl, stats = full_kl_fwd(x, y, inv_temp, backend, cap_pre)
        ctx.save_for_backward(x.data, y.data, kl, stats)
        ctx.x = Rows(None, x.n, x.v, *x.layout())
        ctx.y = Rows(None, y.n, y.v, *y.layout())
        ctx.shape, ctx.coefs, ctx.backend = logits.shape, coefs, backend
        return kl.view(logits.shape[:-1])

    @staticmethod
    @first_order_only("full_kl")
    def backward(ctx, g):
        xd, yd, kl, stats = ctx.saved_tensors
        x = Rows(xd, ctx.x.n, ctx.x.v, *ctx.x.layout())
        y = Rows(yd, ctx.y.n, ctx.y.v, *ctx.y.layout())
        grad = grad_buffer(ctx.shape, xd.dtype, xd.device)
        grad_rows = Rows(grad, x.n, x.v, max(x.n, 1), 0, x.v)
        full_kl_bwd(x, y, grad_rows, kl, stats, flat_arg(g.float()), ctx.coefs[0], ctx.backend, ctx.coefs[1])
        return grad, None, None, None

# ---------------------------------------------------------------------------- public

def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0,
            logit_scale: float = 1.0, softcap: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Exact per-token KL(softmax(t(logits) / T) || softmax(t(ref_logits) / T)) in one streaming pass:

        t = lambda x: logit_transform_ref(x.float(), logit_scale, softcap)   # scale, then softcap
        logp = torch.log_softmax(t(logits) / T, -1); logq = torch.log_softmax(t(ref_logits) / T, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)

    without allocating either (N, V) softmax (the transform is fused into the kernels).

    Args:
        logits: (..., V) fp32 / fp16 / bf16, the policy's logits.
        ref_logits: (..., V) same shape, the reference model's logits (no gradient).
        temperature: > 0.
        logit_scale: > 0; softcap: > 0 or None: the transform of both sides, as in ``token_logprobs``.
        backend: None (automatic) | "triton" | "cpu" | "torch"; see rlhf_fast._backend.

    Returns:
        (...) fp32, differentiable w.r.t. logits only.
    """
    check_logits("logits", logits)
    check_logits("ref_logits", ref_logits)
    check_shape("ref_logits", ref_logits, logits.shape, "logits' shape")
    check_same_device(logits=logits, ref_logits=ref_logits)
    temperature = check_positive("temperature", temperature)
    logit_scale, softcap = check_transform(logit_scale, softcap)
    backend = _backend.select_backend(logits.device, FULL_KL_LAUNCHERS, backend=backend)
    if backend == "torch":
        return full_kl_ref(logits, ref_logits.detach(), temperature, logit_scale=logit_scale, softcap=softcap)
    return FullKLFunction.apply(logits, ref_logits.detach(), logit_coefs(temperature, logit_scale, softcap), backend)
