"""KL estimators and exact full-vocabulary KL."""
from __future__ import annotations

import torch

from rlhf_fast import _backend
from rlhf_fast.ops._common import FLOAT_DTYPES, check_float, check_logits, check_positive, check_same_device, check_shape

KL_ESTIMATOR_NAMES = ("k1", "abs", "k2", "k3")


def check_estimator(estimator) -> str:
    if estimator not in KL_ESTIMATOR_NAMES:
        raise ValueError(f"estimator must be one of {KL_ESTIMATOR_NAMES}, got {estimator!r}")
    return estimator


def kl_penalty_ref(logprobs, ref_logprobs, estimator="k1"):
    """Per-token KL estimate from log-probs, d = logprobs - ref_logprobs:
    k1 = d, abs = |d|, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (Schulman's unbiased, always >= 0)."""
    if estimator not in KL_ESTIMATOR_NAMES:
        raise ValueError(f"estimator must be one of {KL_ESTIMATOR_NAMES}, got {estimator!r}")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    d = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d * d
    return torch.expm1(-d) + d


def full_kl_ref(logits, ref_logits, temperature=1.0):
    """Pure PyTorch definition of the exact per-token KL(softmax(logits / T) || softmax(ref_logits / T)).
    Computes in fp32 (fp64 for fp64 logits); 0 * log 0 := 0, so -inf logits of the policy add nothing."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits.to(dtype) / temperature, dim=-1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token KL estimate, elementwise: with ``d = logprobs.float() - ref_logprobs.float()``,

        k1 = d,   abs = d.abs(),   k2 = d ** 2 / 2,   k3 = torch.expm1(-d) + d   (k3 >= 0)

    Args:
        logprobs: (...) fp32 / fp16 / bf16 (fp64 runs the reference in fp64).
        ref_logprobs: (...) same shape as logprobs, any of those dtypes.
        estimator: "k1" | "abs" | "k2" | "k3".

    Returns:
        (...) fp32, differentiable w.r.t. logprobs (and ref_logprobs).
    """
    check_float("logprobs", logprobs, FLOAT_DTYPES + (torch.float64,))
    check_float("ref_logprobs", ref_logprobs, FLOAT_DTYPES + (torch.float64,))
    check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs' shape")
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_estimator(estimator)
    return kl_penalty_ref(logprobs, ref_logprobs, estimator)


def full_kl(logits, ref_logits, *, temperature=1.0):
    """Exact per-token KL(softmax(logits / T) || softmax(ref_logits / T)) in one streaming pass:

        logp = torch.log_softmax(logits.float() / T, -1); logq = torch.log_softmax(ref_logits.float() / T, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)

    without allocating either (N, V) softmax.

    Args:
        logits: (..., V) fp32 / fp16 / bf16, the policy's logits.
        ref_logits: (..., V) same shape, the reference model's logits (no gradient).
        temperature: > 0.

    Returns:
        (...) fp32, differentiable w.r.t. logits only.
    """
    check_logits("logits", logits)
    check_logits("ref_logits", ref_logits)
    check_shape("ref_logits", ref_logits, logits.shape, "logits' shape")
    check_same_device(logits=logits, ref_logits=ref_logits)
    temperature = check_positive("temperature", temperature)
    return full_kl_ref(logits, ref_logits.detach(), temperature)
