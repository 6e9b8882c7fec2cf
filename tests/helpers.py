"""Assertions shared by the op tests (the torchrun launcher of the trainer tests: tests/trainer/launch.py)."""
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def describe_mismatch(out, ref, tol, name):
    out64, ref64 = out.detach().double(), ref.detach().double()
    err = (out64 - ref64).abs()
    err = torch.where(torch.isnan(out64) & torch.isnan(ref64), torch.zeros_like(err), err)
    bad = (err > tol) | (torch.isnan(err))
    idx = bad.nonzero()[:5].tolist()
    lines = [f"{name}: max err {err.nan_to_num(float('inf')).max().item():.3e} > tol {tol:.3e}"]
    for i in idx:
        i = tuple(i)
        lines.append(f"  at {i}: got {out64[i].item()!r}, expected {ref64[i].item()!r}")
    n_nan, n_inf = torch.isnan(out64).sum().item(), torch.isinf(out64).sum().item()
    if n_nan or n_inf:
        lines.append(f"  output has {n_nan} NaN and {n_inf} Inf")
    return "\n".join(lines)


def assert_close_to_ref(out, ref, torch_out=None, *, atol=1e-6, rtol_factor=2.0, name="output"):
    """flash-attn style check: |out - ref| <= rtol_factor * |torch_out - ref| + atol, elementwise max.

    ref is the float64 reference; torch_out the plain-torch result in the same input dtype
    (how much error that dtype costs anyway). Without torch_out the bound is atol alone.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    base = 0.0
    if torch_out is not None:
        base = (torch_out.detach().double() - ref.detach().double()).abs().nan_to_num(0.0).max().item()
    tol = rtol_factor * base + atol
    err = (out.detach().double() - ref.detach().double()).abs()
    both_nan = torch.isnan(out.detach().double()) & torch.isnan(ref.detach().double())
    same_inf = torch.isinf(ref.detach().double()) & (out.detach().double() == ref.detach().double())
    err = torch.where(both_nan | same_inf, torch.zeros_like(err), err)
    if not (err.nan_to_num(float("inf")) <= tol).all():
        raise AssertionError(describe_mismatch(out, ref, tol, name))
