"""The LM head's three fp32 GEMMs on CPU, into buffers the caller owns.

``mm_into(out, a, b, beta=0.0, bias=None)`` writes ``out = beta * out + a @ b (+ bias)`` for
2-D fp32 CPU tensors of any strides (``out`` with unit column stride). The from-hidden ops
(linear_logprobs.py, linear_policy_loss.py) use it for z = h_c @ W.T (+ b) into the reused logits
tile, grad_h_c = g @ W, and grad_W += g.T @ h_c (accumulated in place).

Where the C++ extension is built and the CPU has AVX-512, this is csrc/cpu/linear.cpp's GEMM
(packed, 8 x 32 micro-kernel, independent per-thread pieces); else torch.mm / addmm with out=.
RLHF_FAST_HEAD_GEMM=torch forces the torch path. Why not torch.mm everywhere: on the AMD Zen
CPUs this project benchmarks on, torch's MKL sgemm runs an AVX2 path (measured 1.5-1.9x slower
than this kernel and than oneDNN at the head's shapes, benchmarks/results/linear_logprobs_cpu*.json);
oneDNN itself is reachable from Python only through ops that allocate their output each call.
"""
from __future__ import annotations

import functools
import os

import torch

from rlhf_fast import _backend


@functools.cache
def _native_available() -> bool:
    kernels = _backend.cpu_kernels()
    return kernels is not None and hasattr(kernels, "gemm_f32") and bool(kernels.gemm_available())


def native_gemm(device: torch.device) -> bool:
    """Whether mm_into uses the C++ GEMM for tensors on ``device``."""
    if torch.device(device).type != "cpu" or os.environ.get("RLHF_FAST_HEAD_GEMM", "auto") == "torch":
        return False
    return _native_available()


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 0.0,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, N) = beta * out + a (M, K) @ b (K, N) (+ bias (N,)); returns out. beta is 0 or 1
    (with 0, out is never read)."""
    if a.dtype == torch.float32 and native_gemm(out.device) and out.stride(1) == 1 and (
            bias is None or bias.is_contiguous()):
        M, K = a.shape
        N = b.shape[1]
        _backend.cpu_kernels().gemm_f32(
            M, N, K, a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
            out.data_ptr(), out.stride(0), float(beta), 0 if bias is None else bias.data_ptr(),
            _backend.num_threads())
        return out
    if beta == 0.0:
        if bias is None:
            return torch.mm(a, b, out=out)
        return torch.addmm(bias, a, b, out=out)
    out.addmm_(a, b)
    if bias is not None:
        out.add_(bias)
    return out
