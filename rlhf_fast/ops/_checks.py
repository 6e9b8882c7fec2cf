"""Argument checks shared by every op: each error names the argument it is about.

Type errors (not a tensor, wrong dtype) raise TypeError; shape, value and option errors raise
ValueError; targets out of [0, V) raise IndexError. RLHF_FAST_CHECKS=0 skips the value checks
that read tensor contents (they need a host sync on CUDA): target ranges on CUDA, non-finite
inputs everywhere. The target range check on CPU tensors always runs: it guards memory safety
(the C++ kernels would read out of bounds) and costs no sync.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VALUE_DTYPES = FLOAT_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64) + VALUE_DTYPES
KL_ESTIMATOR_NAMES = ("k1", "abs", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float(name: str, x, dtypes=FLOAT_DTYPES) -> None:
    check_tensor(name, x)
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def check_logits(name: str, logits) -> int:
    """Validates a (..., V) logits tensor and returns V."""
    check_float(name, logits)
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape (..., V), got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")
    return logits.shape[-1]


def check_shape(name: str, x: torch.Tensor, shape, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def check_same_device(**tensors) -> None:
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devs.items()))


def checks_enabled() -> bool:
    """False with RLHF_FAST_CHECKS=0: value checks that need a host sync on CUDA can be turned off
    once a pipeline is known good (e.g. for CUDA-graph capture)."""
    return os.environ.get("RLHF_FAST_CHECKS", "1") != "0"


def check_targets(name: str, targets, shape, V: int, device) -> None:
    check_tensor(name, targets)
    if targets.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {targets.dtype}")
    check_shape(name, targets, shape, "the logits' leading dimensions")
    if targets.device != device:
        raise ValueError(f"{name} is on {targets.device} but logits are on {device}")
    # on CPU always: an out-of-range target would make the C++ kernels read out of bounds
    if targets.numel() and (targets.device.type == "cpu" or checks_enabled()):
        lo, hi = torch.aminmax(targets)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} must lie in [0, V={V}), found {bad}")


def check_number(name: str, value, *, low: float | None = None, low_inclusive: bool = False) -> float:
    """A finite real number (bool and non-numbers rejected), optionally > low (>= with low_inclusive)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and (value < low or (value == low and not low_inclusive))):
        bound = "" if low is None else f" {'>=' if low_inclusive else '>'} {low}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return value


def check_positive(name: str, value) -> float:
    value = check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_finite(name: str, value) -> float:
    return check_number(name, value)


def check_unit(name: str, value) -> float:
    value = check_number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_nonnegative(name: str, value) -> float:
    return check_number(name, value, low=0.0, low_inclusive=True)


def check_mask(name: str, mask, shape) -> None:
    check_tensor(name, mask)
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(f"{name} must be bool, integer or floating (0/1), got {mask.dtype}")
    check_shape(name, mask, shape, "the same shape as the per-token inputs")


def check_bt(name: str, x, shape=None) -> None:
    """A (B, T) floating tensor (fp64 allowed), of ``shape`` when given."""
    check_float(name, x, VALUE_DTYPES)
    if shape is None:
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (B, T), got {tuple(x.shape)}")
    else:
        check_shape(name, x, shape, "(B, T)")


def check_estimator(estimator, name: str = "estimator") -> str:
    if not isinstance(estimator, str) or estimator not in KL_ESTIMATOR_NAMES:
        raise ValueError(f"{name} must be one of {KL_ESTIMATOR_NAMES}, got {estimator!r}")
    return estimator


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_loss_agg(loss_agg) -> str:
    return check_choice("loss_agg", loss_agg, LOSS_AGGS)


def check_finite_inputs(valid: torch.Tensor, **tensors) -> None:
    """Non-finite inputs at valid tokens (``valid``: (B, T) bool; tensors (B, T) or (B,)): an error on
    CPU (cheap); on GPU, or with RLHF_FAST_CHECKS=0, no check here, to avoid a host sync (ops count
    them in their stats instead)."""
    if valid.device.type != "cpu" or not checks_enabled():
        return
    for name, t in tensors.items():
        if t is None:
            continue
        v = valid if t.dim() == valid.dim() else valid.any(-1)
        bad = int((~torch.isfinite(t) & v).sum())
        if bad:
            raise ValueError(f"{name} has {bad} non-finite value(s) at valid (mask != 0) positions")
