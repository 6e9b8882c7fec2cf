"""Helpers shared by the ops: input checks with errors that name the argument, and
the row view that lets kernels read a (..., V) tensor without copying it."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_float(name: str, x, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
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
    """Value checks that need a host sync on CUDA (e.g. target ranges) can be turned off with
    RLHF_FAST_CHECKS=0 once a pipeline is known good (e.g. for CUDA-graph capture)."""
    return os.environ.get("RLHF_FAST_CHECKS", "1") != "0"


def check_targets(name: str, targets, shape, V: int, device) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {targets.dtype}")
    check_shape(name, targets, shape, "the logits' leading dimensions")
    if targets.device != device:
        raise ValueError(f"{name} is on {targets.device} but logits are on {device}")
    if targets.numel() and checks_enabled():
        lo, hi = torch.aminmax(targets)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} must lie in [0, V={V}), found {bad}")


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


@dataclass
class Rows:
    """A (..., V) tensor seen as n rows of V contiguous elements, row r starting at
    element (r // inner) * s_outer + (r % inner) * s_inner of ``data``. Covers contiguous
    tensors and slices such as ``logits[:, :-1]`` without a copy."""

    data: torch.Tensor
    n: int
    v: int
    inner: int
    s_outer: int
    s_inner: int

    def layout(self):
        return self.inner, self.s_outer, self.s_inner


def as_rows(x: torch.Tensor) -> Rows:
    V = x.shape[-1]
    if x.stride(-1) != 1 and V > 1:
        x = x.contiguous()
    dims = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    merged: list[list[int]] = []
    for size, stride in dims:  # merge dims that are contiguous with each other
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        x = x.contiguous()
        merged = [[x.numel() // V, V]]
    n = x.numel() // V if V else 0
    if not merged:
        return Rows(x, n, V, 1, 0, 0)
    if len(merged) == 1:
        return Rows(x, n, V, merged[0][0], 0, merged[0][1])
    return Rows(x, n, V, merged[1][0], merged[0][1], merged[1][1])
