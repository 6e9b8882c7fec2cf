"""Helpers shared by the ops: the row view that lets kernels read a (..., V) tensor without
copying it, and the layout adapters every launcher passes its tensors through.

Kernels index their tensor arguments in one of three ways; a launcher hands each tensor to the
adapter for its way, so no kernel ever reads a strided view as if it were contiguous:

    as_rows(x)     (..., V) rows of unit stride, any row layout Rows can describe (else one copy)
    rows_arg(x)    (B, T) with unit stride along T and any row stride (else one copy)
    flat_arg(x)    (N,) contiguous (a copy unless already contiguous)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rlhf_fast import _backend

# the checks live in _checks.py; re-exported here for code written against the old layout
from rlhf_fast.ops._checks import (  # noqa: F401
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_float,
    check_logits,
    check_positive,
    check_same_device,
    check_shape,
    check_targets,
    checks_enabled,
)


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


def flat_arg(x: torch.Tensor | None) -> torch.Tensor | None:
    """x as a flat contiguous (N,) tensor, for kernels that read element i at offset i."""
    return None if x is None else x.reshape(-1).contiguous()


def rows_arg(x: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, T) tensor whose element (b, t) sits at b * x.stride(0) + t, for kernels that take a row
    stride: unit stride along T (any row stride, 0 for an expanded row included), else a copy."""
    if x is None:
        return None
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x


def mask_arg(mask: torch.Tensor) -> torch.Tensor:
    """A mask the kernels read with its own dtype (valid where != 0): bool / int8 are read as bytes,
    dtypes the kernels have no code for (fp64) become a bool mask first. Keeps the layout."""
    if mask.dtype in (torch.bool, torch.int8):
        return mask.view(torch.uint8)
    return mask if mask.dtype in _backend.DTYPE_CODES else (mask != 0).view(torch.uint8)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where ``valid`` (bool) is True; 0 when none is (0-d, no host sync)."""
    return torch.where(valid, x, torch.zeros_like(x)).sum() / valid.sum().clamp(min=1)


def result_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The dtype a reference computes in: fp32, or fp64 when an input is fp64."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def may_overlap(x: torch.Tensor) -> bool:
    """False only when x's elements provably sit at distinct memory locations (stride analysis:
    dims by increasing stride, each stride past the extent of the smaller ones). True for expanded /
    broadcast views (stride 0) and for layouts too tangled to prove, so a caller that then avoids
    writing into x is always safe."""
    extent = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz > 1):
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def mark_modified(x: torch.Tensor) -> None:
    """Bumps the autograd version counter of x (and of every view of its storage) without touching
    its data: after a kernel wrote into x through a raw pointer, any autograd node that saved x
    then raises "modified by an inplace operation" instead of computing with the new contents."""
    x.as_strided((0,), (1,)).zero_()


def first_order_only(op: str):
    """Decorates an autograd Function's backward whose kernels are not themselves differentiable:
    a backward with create_graph=True (the first step of a double backward / Hessian-vector
    product) raises instead of returning a gradient that silently lacks the op's second derivative."""
    def decorate(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():  # autograd runs backward with grad mode on only for create_graph=True
                raise RuntimeError(f"{op} is not twice differentiable on its kernel backends (backward with "
                                   f"create_graph=True); pass backend='torch' for higher-order gradients")
            return backward(ctx, *grads)
        return checked
    return decorate
