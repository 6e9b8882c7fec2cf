"""KL penalty estimators on per-token log-probs (``kl_penalty``): elementwise, fused forward and
backward, d = logprobs - ref_logprobs::

    k1 = d    abs = |d|    k2 = d^2 / 2    k3 = exp(-d) - 1 + d          (Schulman's estimators)

The exact full-vocabulary KL from two models' logits is ``full_kl`` (full_kl.py).

Naming chain: ``_kl_penalty_fwd_kernel`` -> ``kl_penalty_fwd`` -> ``KLPenaltyFunction`` ->
``kl_penalty``; ``kl_penalty_ref`` / ``kl_estimate_ref`` define the semantics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast import _backend
from rlhf_fast._backend import addr, code, triton_interpreting
from rlhf_fast.ops._checks import (  # noqa: F401  (KL_ESTIMATOR_NAMES, check_estimator: re-exported)
    KL_ESTIMATOR_NAMES,
    VALUE_DTYPES,
    check_estimator,
    check_float,
    check_logits,
    check_positive,
    check_same_device,
    check_shape,
)
from rlhf_fast.ops._common import first_order_only, flat_arg
from rlhf_fast.ops._triton_common import (
    KL_ESTIMATORS,
    cast_for_store,
    kl_estimate,
    kl_estimate_grad,
)

# ---------------------------------------------------------------------------- reference

def kl_penalty_ref(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate from log-probs, d = logprobs - ref_logprobs:
    k1 = d, abs = |d|, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (Schulman's unbiased, always >= 0)."""
    if estimator not in KL_ESTIMATOR_NAMES:
        raise ValueError(f"estimator must be one of {KL_ESTIMATOR_NAMES}, got {estimator!r}")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    return kl_estimate_ref(logprobs.to(dtype) - ref_logprobs.to(dtype), estimator)

def kl_estimate_ref(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """The estimators of ``kl_penalty_ref`` as functions of d = logprobs - ref_logprobs (differentiable)."""
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d * d
    return torch.expm1(-d) + d

# ---------------------------------------------------------------------------- triton

@triton.jit
def _kl_penalty_fwd_kernel(
    logp_ptr,  # (N,) contiguous, fp32 / fp16 / bf16
    ref_ptr,  # (N,) contiguous
    out_ptr,  # (N,) fp32 out
    N,
    EST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    d = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(ref_ptr + offs, mask=ok, other=0.0).to(
        tl.float32
    )
    tl.store(out_ptr + offs, kl_estimate(d, EST), mask=ok)

@triton.jit
def _kl_penalty_bwd_kernel(
    logp_ptr,  # (N,) contiguous
    ref_ptr,  # (N,) contiguous
    g_ptr,  # (N,) fp32 upstream grad
    grad_ptr,  # (N,) out, logp's dtype
    N,
    EST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    d = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(ref_ptr + offs, mask=ok, other=0.0).to(
        tl.float32
    )
    g = tl.load(g_ptr + offs, mask=ok, other=0.0) * kl_estimate_grad(d, EST)
    tl.store(grad_ptr + offs, cast_for_store(g, grad_ptr.dtype.element_ty), mask=ok)

# ---------------------------------------------------------------------------- launchers

def _elementwise_block(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 16384 if triton_interpreting() else 2048)

def _kl_penalty_fwd_triton(logprobs, ref_logprobs, out, est: int) -> None:
    n = logprobs.numel()
    block = _elementwise_block(n)
    _kl_penalty_fwd_kernel[(triton.cdiv(n, block),)](logprobs, ref_logprobs, out, n, EST=est, BLOCK=block)

def _kl_penalty_fwd_cpu(logprobs, ref_logprobs, out, est: int) -> None:
    _backend.cpu_kernels().kl_penalty_fwd(addr(logprobs), code(logprobs), addr(ref_logprobs), code(ref_logprobs),
                                          addr(out), logprobs.numel(), est, _backend.num_threads())

def _kl_penalty_bwd_triton(logprobs, ref_logprobs, g, grad, est: int) -> None:
    n = logprobs.numel()
    block = _elementwise_block(n)
    _kl_penalty_bwd_kernel[(triton.cdiv(n, block),)](logprobs, ref_logprobs, g, grad, n, EST=est, BLOCK=block)

def _kl_penalty_bwd_cpu(logprobs, ref_logprobs, g, grad, est: int) -> None:
    _backend.cpu_kernels().kl_penalty_bwd(addr(logprobs), code(logprobs), addr(ref_logprobs), code(ref_logprobs),
                                          addr(g), addr(grad), logprobs.numel(), est, _backend.num_threads())

# backend -> (forward launcher, backward launcher); read by _backend.select_backend
KL_PENALTY_LAUNCHERS = {"triton": (_kl_penalty_fwd_triton, _kl_penalty_bwd_triton),
                        "cpu": (_kl_penalty_fwd_cpu, _kl_penalty_bwd_cpu)}

def kl_penalty_fwd(logprobs, ref_logprobs, est: int, backend: str):
    """logprobs, ref_logprobs flat contiguous (N,) -> fp32 (N,)."""
    out = torch.empty(logprobs.numel(), dtype=torch.float32, device=logprobs.device)
    if out.numel():
        KL_PENALTY_LAUNCHERS[backend][0](logprobs, ref_logprobs, out, est)
    return out

def kl_penalty_bwd(logprobs, ref_logprobs, g, est: int, backend: str):
    """d kl_penalty / d logprobs . g, in logprobs' dtype, flat (N,)."""
    grad = torch.empty_like(logprobs)
    if grad.numel():
        KL_PENALTY_LAUNCHERS[backend][1](logprobs, ref_logprobs, g, grad, est)
    return grad

# ---------------------------------------------------------------------------- autograd

class KLPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, est, backend):
        a, b = flat_arg(logprobs), flat_arg(ref_logprobs)
        ctx.save_for_backward(a, b)
        ctx.est, ctx.backend, ctx.shape = est, backend, logprobs.shape
        ctx.ref_dtype = ref_logprobs.dtype
        return kl_penalty_fwd(a, b, est, backend).view(logprobs.shape)

    @staticmethod
    @first_order_only("kl_penalty")
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        grad = kl_penalty_bwd(a, b, flat_arg(g.float()), ctx.est, ctx.backend)
        grad_ref = None
        if ctx.needs_input_grad[1]:  # d/d ref_logprobs = -d/d logprobs
            grad_ref = (-grad.float()).to(ctx.ref_dtype).view(ctx.shape)
        return grad.view(ctx.shape), grad_ref, None, None

# ---------------------------------------------------------------------------- public

def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", *,
               backend: str | None = None) -> torch.Tensor:
    """Per-token KL estimate, elementwise: with ``d = logprobs.float() - ref_logprobs.float()``,

        k1 = d,   abs = d.abs(),   k2 = d ** 2 / 2,   k3 = torch.expm1(-d) + d   (k3 >= 0)

    Args:
        logprobs: (...) fp32 / fp16 / bf16 (fp64 runs the reference in fp64).
        ref_logprobs: (...) same shape as logprobs, any of those dtypes.
        estimator: "k1" | "abs" | "k2" | "k3".
        backend: None (automatic) | "triton" | "cpu" | "torch"; see rlhf_fast._backend.

    Returns:
        (...) fp32, differentiable w.r.t. logprobs (and ref_logprobs).
    """
    check_float("logprobs", logprobs, VALUE_DTYPES)
    check_float("ref_logprobs", ref_logprobs, VALUE_DTYPES)
    check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs' shape")
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_estimator(estimator)
    backend = _backend.select_backend(logprobs.device, KL_PENALTY_LAUNCHERS, backend=backend,
                                      tensors=(logprobs, ref_logprobs))
    if backend == "torch":
        return kl_penalty_ref(logprobs, ref_logprobs, estimator)
    return KLPenaltyFunction.apply(logprobs, ref_logprobs, KL_ESTIMATORS[estimator], backend)
