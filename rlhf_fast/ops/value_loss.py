"""The clipped value loss of PPO: ``value_loss(values, old_values, returns, mask)``.

O(B * T) elementwise work, plain torch (it is its own reference; autograd differentiates it).
Stats are 0-d tensors: nothing synchronises with the host except the CPU-only check for
non-finite inputs.
"""
from __future__ import annotations

import torch

from rlhf_fast import _backend
from rlhf_fast.ops._checks import (
    VALUE_DTYPES,
    check_finite_inputs,
    check_float,
    check_loss_agg,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
)
from rlhf_fast.ops._common import masked_mean
from rlhf_fast.ops.policy_loss import aggregation_weights

LAUNCHERS: dict = {}  # no kernels: plain torch (the "torch" backend) is the implementation


def value_loss(values: torch.Tensor, old_values: torch.Tensor | None, returns: torch.Tensor, mask: torch.Tensor, *,
               clip_eps: float | None = None, loss_agg: str = "token-mean",
               backend: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, per valid token (mask != 0)::

        l = 0.5 * max((v - R) ** 2, (old + (v - old).clamp(-clip_eps, clip_eps) - R) ** 2)   # clip_eps given
        l = 0.5 * (v - R) ** 2                                                               # clip_eps=None
        loss = (aggregation_weights(mask != 0, loss_agg) * l).sum()

    Args:
        values: (B, T) current value predictions (differentiable).
        old_values: (B, T) values at rollout time (used only when clipping; may be None then).
        returns: (B, T) targets R.
        mask: (B, T) bool / int / float; positions with mask != 0 count.
        clip_eps: > 0 or None. loss_agg: as in ``ppo_policy_loss`` ("-norm" uses T).
        backend: None | "torch" (plain torch is this op's only implementation).

    Returns:
        loss 0-d (fp32 or the promoted input dtype), stats: clip_frac (valid tokens whose clipped
        term is the larger), explained_variance (1 - Var[R - v] / Var[R] over valid tokens; 1 when
        both are 0, 0 when only Var[R] is), value_mean, nonfinite_inputs.
    Non-finite old_values / returns at valid tokens raise ValueError for CPU tensors.
    """
    check_float("values", values, VALUE_DTYPES)
    if values.dim() != 2:
        raise ValueError(f"values must have shape (B, T), got {tuple(values.shape)}")
    shape = values.shape
    check_float("returns", returns, VALUE_DTYPES)
    check_shape("returns", returns, shape, "the values' shape")
    if clip_eps is not None:
        clip_eps = check_positive("clip_eps", clip_eps)
        if old_values is None:
            raise ValueError("old_values is required when clip_eps is set")
    if old_values is not None:
        check_float("old_values", old_values, VALUE_DTYPES)
        check_shape("old_values", old_values, shape, "the values' shape")
    check_tensor("mask", mask)
    check_shape("mask", mask, shape, "the values' shape")
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    check_loss_agg(loss_agg)
    if backend is not None:  # RLHF_FAST_BACKEND does not apply: there is nothing to choose
        _backend.select_backend(values.device, LAUNCHERS, backend=backend)
    valid = mask != 0
    check_finite_inputs(valid, old_values=old_values if clip_eps is not None else None, returns=returns)

    dtype = torch.promote_types(values.dtype, torch.float32)
    zero = torch.zeros(shape, dtype=dtype, device=values.device)
    v = torch.where(valid, values.to(dtype), zero)
    ret = returns.to(dtype)
    nonfinite = (~torch.isfinite(ret) & valid).sum()
    ret = torch.where(valid, ret, zero)
    err = (v - ret) ** 2
    clip_frac = zero.sum()
    if clip_eps is not None:
        old = old_values.to(dtype)
        nonfinite = nonfinite + (~torch.isfinite(old) & valid).sum()
        old = torch.where(valid, old, zero)
        err_clipped = (old + (v - old).clamp(-clip_eps, clip_eps) - ret) ** 2
        # clipped: the clamp bites and its error wins (not a rounding tie of an unclamped value)
        clipped = ((v - old).abs() > clip_eps) & (err_clipped > err)
        clip_frac = masked_mean(clipped.to(dtype), valid)
        err = torch.maximum(err, err_clipped)
    w = aggregation_weights(valid, loss_agg, None, dtype)
    loss = (w * 0.5 * err).sum()
    with torch.no_grad():
        vd = v.detach()
        n = valid.sum().clamp(min=1)
        var_r = _masked_var(ret, valid, n)
        var_res = _masked_var(ret - vd, valid, n)
        ev = torch.where(var_r > 0, 1 - var_res / var_r.clamp(min=torch.finfo(torch.float64).tiny),
                         (var_res == 0).double()).to(dtype)
        stats = {"clip_frac": clip_frac.detach(), "explained_variance": ev, "value_mean": vd.sum() / n,
                 "nonfinite_inputs": nonfinite}
    return loss, stats


def _masked_var(x: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Population variance of ``x`` over ``valid`` in float64, shifted by the first valid element
    (equal elements give exactly 0, large offsets keep their spread), then two-pass."""
    x = x.double()
    first = x.reshape(-1)[valid.reshape(-1).to(torch.uint8).argmax()]
    d = torch.where(valid, x - first, 0.0)
    mean = d.sum() / n
    return torch.where(valid, (d - mean) ** 2, 0.0).sum() / n
