"""Collectives every rank calls, each the identity on a single process: all-reduced sums,
broadcast objects, gathered rows, and global moments (float64, two passes, no cancellation).

The trainers take every global statistic through these (whitening inputs, batch std, loss
normalisers, metrics), so the algorithm code reads the same on one rank and on many.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rlhf_fast.trainer.process_group import is_distributed, world_size


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of ``x`` over all ranks ("sum" | "max" | "min"); ``x`` itself when not
    distributed. Tensors must live on this rank's device (CUDA under NCCL)."""
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def global_moments(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True):
    """(count, mean, var) of the elements of ``x`` (any shape) where ``mask != 0``, over all
    ranks, in float64, shifted by the global maximum first (so equal elements give var exactly 0,
    and 1e9 + small spread keeps its digits), then two passes (count and sum, then the sum of
    squared deviations from the global mean): three all-reduces. var is 0 below 2 (unbiased) or
    1 element."""
    x = x.detach().double()
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
    top = all_reduce(torch.where(valid, x, -math.inf).amax() if x.numel() else x.new_tensor(-math.inf), "max")
    shift = torch.where(torch.isfinite(top), top, 0.0)
    d = torch.where(valid, x - shift, 0.0)
    n, s = all_reduce(torch.stack([valid.sum().double(), d.sum()])).unbind()
    mean_d = s / n.clamp(min=1)
    ss = all_reduce(torch.where(valid, (d - mean_d) ** 2, 0.0).sum())
    dof = n - 1 if unbiased else n
    var = torch.where(dof >= 1, ss / dof.clamp(min=1), torch.zeros_like(ss))
    return n, shift + mean_d, var


def gather_rows(x: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Every rank's ``x`` (equally many rows on each) concatenated along dim 0 in rank order;
    ``x`` itself on a single process. ``width``: dim 1 is zero-padded to it first (ranks whose
    sequences differ in length), so the result has ``width`` columns."""
    if width is not None and x.dim() >= 2 and x.shape[1] < width:
        pad = x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))
        x = torch.cat([x, pad], 1)
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def global_max(n: int) -> int:
    """The largest ``n`` over all ranks (``n`` itself on a single process)."""
    if not is_distributed():
        return n
    return int(all_reduce(torch.tensor(n, dtype=torch.int64, device=_device()), "max"))


def _device() -> torch.device:
    """Where collectives' tensors live: this rank's CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
