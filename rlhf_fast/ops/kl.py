"""KL estimators and exact full-vocabulary KL."""
import torch

KL_ESTIMATOR_NAMES = ("k1", "abs", "k2", "k3")


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
