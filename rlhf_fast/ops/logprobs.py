"""Per-token log-probabilities and entropy straight from logits.

``token_logprobs(logits, targets)`` computes
``torch.log_softmax(z / T, -1).gather(-1, targets[..., None])[..., 0]`` with
``z = logit_transform_ref(logits.float(), logit_scale, softcap)`` (``logits * logit_scale``, then
``softcap * tanh(. / softcap)`` when a softcap is given, as Gemma2/3 and Grok do), and optionally
the entropy of ``softmax(z / T)``, in one streaming pass over
the vocabulary, without allocating anything of size N * V. Backward allocates only
grad_logits (or writes it into the logits' storage with ``inplace_backward=True``).

The transform is fused: every kernel takes ``(mul, cap_pre) = logit_coefs(T, logit_scale, softcap)``
and computes ``z = x * mul`` (no softcap: the old kernels, scale folded into the temperature, so the
defaults are bit-identical) or ``z = tanh(x * cap_pre) * mul`` (``SOFTCAP`` / ``cap_pre != 0``).

Naming chain: ``_logprobs_fwd_kernel`` -> ``logprobs_fwd`` -> ``LogprobsFunction`` ->
``token_logprobs``; ``token_logprobs_ref`` defines the semantics and is the fallback.
"""
from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

from rlhf_fast import _backend
from rlhf_fast._backend import addr, code, ptr
from rlhf_fast.ops._checks import check_logits, check_positive, check_targets
from rlhf_fast.ops._common import Rows, as_rows, first_order_only, mark_modified, may_overlap
from rlhf_fast.ops._grad_pool import grad_buffer
from rlhf_fast.ops._triton_common import (
    cast_for_store,
    logit_z,
    logit_z_grad,
    num_warps_for,
    row_offset,
    row_softmax_stats,
    vocab_block,
)


def logit_transform_ref(logits: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """The final-logit transform of the fused ops: ``z = logits * logit_scale``, then with a softcap
    ``softcap * tanh(z / softcap)`` (computed as ``softcap * tanh(logits * (logit_scale / softcap))``).
    The temperature divides the result. Granite's ``logits_scaling`` divisor d is ``logit_scale = 1 / d``."""
    if softcap is not None:
        return softcap * torch.tanh(logits * (logit_scale / softcap))
    return logits * logit_scale if logit_scale != 1.0 else logits


def logit_coefs(temperature: float, logit_scale: float = 1.0, softcap: float | None = None) -> tuple[float, float]:
    """The kernels' transform coefficients (mul, cap_pre): z = x * mul when cap_pre == 0 (no softcap),
    z = tanh(x * cap_pre) * mul otherwise; dz/dx = mul (* cap_pre * (1 - tanh^2)).
    With the defaults mul = 1 / temperature exactly, as before the transform existed."""
    if softcap is None:
        return logit_scale / temperature, 0.0
    return softcap / temperature, logit_scale / softcap


def check_transform(logit_scale, softcap) -> tuple[float, float | None]:
    """Validates logit_scale (> 0) and softcap (> 0 or None); errors name the argument."""
    logit_scale = check_positive("logit_scale", logit_scale)
    if softcap is not None:
        softcap = check_positive("softcap", softcap)
    return logit_scale, softcap


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       return_entropy: bool = False, *, logit_scale: float = 1.0,
                       softcap: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch definition. Computes in fp32 (fp64 for fp64 logits)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logit_transform_ref(logits.to(dtype), logit_scale, softcap)
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # 0 * log 0 := 0 so that rows holding -inf logits keep a finite entropy
    ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, ent


# ---------------------------------------------------------------------------- triton
@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # (N, V) rows at row_offset(r, inner, s_outer, s_inner), unit stride along V
    targets_ptr,  # (N,) int32 | int64
    logp_ptr,  # (N,) fp32 out
    lse_ptr,  # (N,) fp32 out: logsumexp(logits * inv_temp), saved for backward
    ent_ptr,  # (N,) fp32 out, written when WITH_ENTROPY
    V,
    inner,
    s_outer,
    s_inner,
    inv_temp,  # mul of logit_coefs: z = x * mul, or tanh(x * cap_pre) * mul with SOFTCAP
    cap_pre,
    WITH_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row_offset(row, inner, s_outer, s_inner)
    m, log_s, ent = row_softmax_stats(row_ptr, V, inv_temp, WITH_ENTROPY, BLOCK_V, cap_pre, SOFTCAP)
    t = tl.load(targets_ptr + row).to(tl.int64)
    z_t = logit_z(tl.load(row_ptr + t).to(tl.float32), inv_temp, cap_pre, SOFTCAP)
    lp = (z_t - m) - log_s
    tl.store(logp_ptr + row, tl.where(lp > 0.0, 0.0, lp))  # not tl.minimum: NaN must stay NaN
    tl.store(lse_ptr + row, m + log_s)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, ent)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,  # (N, V) rows as in the forward
    grad_ptr,  # (N, V) out, rows at row_offset(r, g_inner, g_s_outer, g_s_inner); may alias logits
    targets_ptr,  # (N,)
    lse_ptr,  # (N,) fp32
    ent_ptr,  # (N,) fp32, read when WITH_ENTROPY
    g_logp_ptr,  # (N,) fp32 upstream grad of logp
    g_ent_ptr,  # (N,) fp32 upstream grad of entropy, read when WITH_ENTROPY
    V,
    inner,
    s_outer,
    s_inner,
    g_inner,
    g_s_outer,
    g_s_inner,
    inv_temp,  # as in the forward
    cap_pre,
    WITH_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    x_ptr = logits_ptr + row_offset(row, inner, s_outer, s_inner)
    gx_ptr = grad_ptr + row_offset(row, g_inner, g_s_outer, g_s_inner)
    lse = tl.load(lse_ptr + row)
    t = tl.load(targets_ptr + row).to(tl.int64)
    g_lp = tl.load(g_logp_ptr + row)
    zero_row = g_lp == 0.0  # no upstream gradient (e.g. a masked row): write 0, never 0 * NaN
    if WITH_ENTROPY:
        shift = tl.load(ent_ptr + row) - lse
        g_ent = tl.load(g_ent_ptr + row)
        zero_row = zero_row & (g_ent == 0.0)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        z = logit_z(x, inv_temp, cap_pre, SOFTCAP)
        p = tl.exp(z - lse)
        g = g_lp * (tl.where(offs == t, 1.0, 0.0) - p)
        if WITH_ENTROPY:
            # dH/dz_j = -p_j (log p_j + H)
            g -= g_ent * p * tl.where(p > 0, z + shift, 0.0)
        g = tl.where(zero_row, 0.0, g * logit_z_grad(z, inv_temp, cap_pre, SOFTCAP))
        tl.store(gx_ptr + offs, cast_for_store(g, grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers
def _fwd_triton(rows: Rows, targets, logp, lse, ent, inv_temp: float, cap_pre: float) -> None:
    block = vocab_block(rows.v)
    _logprobs_fwd_kernel[(rows.n,)](
        rows.data, targets, logp, lse, ent if ent is not None else logp,
        rows.v, *rows.layout(), inv_temp, cap_pre,
        WITH_ENTROPY=ent is not None, SOFTCAP=cap_pre != 0.0, BLOCK_V=block, num_warps=num_warps_for(block),
    )


def _fwd_cpu(rows: Rows, targets, logp, lse, ent, inv_temp: float, cap_pre: float) -> None:
    _backend.cpu_kernels().logprobs_fwd(
        addr(rows.data), code(rows.data), *rows.layout(), addr(targets), code(targets), rows.n, rows.v, inv_temp,
        cap_pre, addr(logp), addr(lse), addr(ent), _backend.num_threads(),
    )


def _fwd_cuda(rows: Rows, targets, logp, lse, ent, inv_temp: float, cap_pre: float) -> None:
    i64 = ctypes.c_int64
    _backend.cuda_call(
        "rlhf_logprobs_fwd", rows.data.device, ptr(rows.data), ctypes.c_int(code(rows.data)),
        *(i64(v) for v in rows.layout()), ptr(targets), ctypes.c_int(code(targets)), i64(rows.n), i64(rows.v),
        ctypes.c_float(inv_temp), ctypes.c_float(cap_pre), ptr(logp), ptr(lse), ptr(ent),
    )


def _bwd_triton(rows: Rows, grad: Rows, targets, lse, ent, g_logp, g_ent, inv_temp: float, cap_pre: float) -> None:
    block = vocab_block(rows.v)
    with_entropy = g_ent is not None
    _logprobs_bwd_kernel[(rows.n,)](
        rows.data, grad.data, targets, lse, ent if with_entropy else lse, g_logp,
        g_ent if with_entropy else g_logp, rows.v, *rows.layout(), *grad.layout(), inv_temp, cap_pre,
        WITH_ENTROPY=with_entropy, SOFTCAP=cap_pre != 0.0, BLOCK_V=block, num_warps=num_warps_for(block),
    )


def _bwd_cpu(rows: Rows, grad: Rows, targets, lse, ent, g_logp, g_ent, inv_temp: float, cap_pre: float) -> None:
    with_entropy = g_ent is not None
    _backend.cpu_kernels().logprobs_bwd(
        addr(rows.data), code(rows.data), *rows.layout(), addr(grad.data), *grad.layout(), addr(targets),
        code(targets), rows.n, rows.v, inv_temp, cap_pre, addr(lse), addr(ent if with_entropy else None),
        addr(g_logp), addr(g_ent), _backend.num_threads(),
    )


def _bwd_cuda(rows: Rows, grad: Rows, targets, lse, ent, g_logp, g_ent, inv_temp: float, cap_pre: float) -> None:
    i64 = ctypes.c_int64
    _backend.cuda_call(
        "rlhf_logprobs_bwd", rows.data.device, ptr(rows.data), ctypes.c_int(code(rows.data)),
        *(i64(v) for v in rows.layout()), ptr(grad.data), *(i64(v) for v in grad.layout()), ptr(targets),
        ctypes.c_int(code(targets)), i64(rows.n), i64(rows.v), ctypes.c_float(inv_temp), ctypes.c_float(cap_pre), ptr(lse),
        ptr(ent if g_ent is not None else None), ptr(g_logp), ptr(g_ent),
    )


# backend -> (forward launcher, backward launcher); read by _backend.select_backend
LAUNCHERS = {"triton": (_fwd_triton, _bwd_triton), "cpu": (_fwd_cpu, _bwd_cpu), "cuda": (_fwd_cuda, _bwd_cuda)}


def logprobs_fwd(rows: Rows, targets: torch.Tensor, inv_temp: float, with_entropy: bool, backend: str,
                 cap_pre: float = 0.0):
    """Launches the forward on ``backend``; returns fp32 (logp, lse, ent-or-None), each (N,).
    targets: flat contiguous (N,); (inv_temp, cap_pre): ``logit_coefs`` (lse is that of z)."""
    if backend not in LAUNCHERS:
        raise ValueError(f"logprobs_fwd: unknown backend {backend!r}")
    dev = rows.data.device
    logp = torch.empty(rows.n, dtype=torch.float32, device=dev)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else None
    if rows.n:
        LAUNCHERS[backend][0](rows, targets, logp, lse, ent, inv_temp, cap_pre)
    return logp, lse, ent


def logprobs_bwd(rows: Rows, grad: Rows, targets, lse, ent, g_logp, g_ent, inv_temp: float, backend: str,
                 cap_pre: float = 0.0) -> None:
    """Writes d(logp, ent)/d(logits) . (g_logp, g_ent) into ``grad`` (which may alias ``rows``),
    through the transform (inv_temp, cap_pre) of the forward."""
    if backend not in LAUNCHERS:
        raise ValueError(f"logprobs_bwd: unknown backend {backend!r}")
    if rows.n:
        LAUNCHERS[backend][1](rows, grad, targets, lse, ent, g_logp, g_ent, inv_temp, cap_pre)


def can_write_inplace(rows: Rows, inplace_backward: bool) -> bool:
    """inplace_backward=True is honoured only where the logits' elements do not share memory
    (an expanded / broadcast view would sum the gradients of the rows that share storage):
    there the gradient silently falls back to a new tensor."""
    return bool(inplace_backward) and not may_overlap(rows.data)


def check_first_inplace_backward(ctx) -> None:
    """A second backward through a graph whose first backward wrote grad_logits into the logits'
    storage would read the gradient as logits: refuse it."""
    if getattr(ctx, "inplace_done", False):
        raise RuntimeError("inplace_backward=True: the first backward overwrote the logits with their gradient, so "
                           "this graph cannot be backpropagated again (retain_graph=True); use inplace_backward=False")


def grad_rows(rows: Rows, shape, inplace: bool):
    """Where backward writes grad_logits: the logits' own storage, or a new contiguous tensor.
    Returns (grad tensor, its Rows view)."""
    if inplace:
        return rows.data, rows
    grad = grad_buffer(shape, rows.data.dtype, rows.data.device)
    return grad, Rows(grad, rows.n, rows.v, max(rows.n, 1), 0, rows.v)


def finish_inplace(ctx, rows: Rows) -> None:
    """After an in-place backward: remember it (a second backward raises) and bump the logits'
    version counter, so autograd nodes that saved the logits raise instead of reading the gradient."""
    ctx.inplace_done = True
    mark_modified(rows.data)


class LogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, coefs, with_entropy, inplace_backward, backend):
        rows = as_rows(logits)
        targets = targets.reshape(-1).contiguous()
        inv_temp, cap_pre = coefs
        logp, lse, ent = logprobs_fwd(rows, targets, inv_temp, with_entropy, backend, cap_pre)
        ctx.save_for_backward(rows.data, targets, lse, ent)
        ctx.rows = Rows(None, rows.n, rows.v, *rows.layout())
        ctx.shape, ctx.coefs, ctx.backend = logits.shape, coefs, backend
        ctx.inplace = can_write_inplace(rows, inplace_backward)
        shape = logits.shape[:-1]
        if with_entropy:
            return logp.view(shape), ent.view(shape)
        return logp.view(shape)

    @staticmethod
    @first_order_only("token_logprobs")
    def backward(ctx, g_logp, g_ent=None):
        check_first_inplace_backward(ctx)
        data, targets, lse, ent = ctx.saved_tensors
        rows = Rows(data, *(getattr(ctx.rows, f) for f in ("n", "v", "inner", "s_outer", "s_inner")))
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.reshape(-1).float().contiguous()
        if g_ent is not None:
            g_ent = g_ent.reshape(-1).float().contiguous()
        grad, g_rows = grad_rows(rows, ctx.shape, ctx.inplace)
        logprobs_bwd(rows, g_rows, targets, lse, ent, g_logp, g_ent, ctx.coefs[0], ctx.backend, ctx.coefs[1])
        if ctx.inplace:
            finish_inplace(ctx, rows)
            if grad.shape != ctx.shape:
                grad = grad.view(ctx.shape)
        return grad, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   logit_scale: float = 1.0, softcap: float | None = None, return_entropy: bool = False,
                   inplace_backward: bool = False,
                   backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (and entropy) from logits in one streaming pass.

    Computes ``log_softmax(z / temperature, -1).gather(-1, targets[..., None])[..., 0]`` with
    ``z = logit_transform_ref(logits.float(), logit_scale, softcap)`` without allocating the (N, V)
    log-softmax (the transform is fused into the forward and backward kernels).

    Args:
        logits: (..., V) fp32 / fp16 / bf16. Any leading shape; slices such as
            ``logits[:, :-1]`` are read in place, other non-contiguous layouts are copied once.
        targets: (...) int32 / int64, values in [0, V).
        temperature: > 0; the (transformed) logits are divided by it (match the sampler's temperature).
        logit_scale: > 0, multiplies the logits first (Cohere's ``logit_scale``; Granite's divisor
            ``logits_scaling`` is ``logit_scale = 1 / logits_scaling``).
        softcap: > 0 or None; ``z -> softcap * tanh(z / softcap)`` after the scale, before the
            temperature (Gemma2/3 ``final_logit_softcapping``, Grok).
        return_entropy: also return the entropy of ``softmax(z / temperature)``.
        inplace_backward: backward writes grad_logits into the logits' storage (the logits
            must not be needed after backward). Saves one (N, V) allocation. Ignored (a new
            gradient tensor is used) for expanded / overlapping logits; a second backward through
            the same graph raises, and so does any other autograd node that saved the logits.
        backend: None (automatic) | "triton" | "cpu" | "cuda" | "torch"; see rlhf_fast._backend.

    Returns:
        logp (...) fp32, and with ``return_entropy`` also entropy (...) fp32. Both are
        differentiable w.r.t. logits; the gradient has the logits' dtype.
    """
    V = check_logits("logits", logits)
    check_targets("targets", targets, logits.shape[:-1], V, logits.device)
    temperature = check_positive("temperature", temperature)
    logit_scale, softcap = check_transform(logit_scale, softcap)
    backend = _backend.select_backend(logits.device, LAUNCHERS, backend=backend)
    if backend == "torch":
        return token_logprobs_ref(logits, targets, temperature, return_entropy, logit_scale=logit_scale,
                                  softcap=softcap)
    return LogprobsFunction.apply(logits, targets, logit_coefs(temperature, logit_scale, softcap),
                                  bool(return_entropy), bool(inplace_backward), backend)
