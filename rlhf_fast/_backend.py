"""The one dispatch point: which implementation runs an op, chosen per call.

    RLHF_FAST_PUREPYTHON=1                       every op runs its pure-PyTorch ``*_ref``
    RLHF_FAST_BACKEND=triton|cuda|cpu|torch      force one backend (an error if it cannot run the tensor)
    default                                      CUDA tensor -> Triton (or the csrc CUDA kernel for ops
                                                 registered ``cuda_first``), CPU tensor -> the C++ kernel

Triton runs CPU tensors only through its interpreter (TRITON_INTERPRET=1 set before
rlhf_fast is imported), which the test-suite uses to check every Triton kernel.
Environment variables are read at call time, never frozen at import.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

try:
    from rlhf_fast import _C
except ImportError:  # not built (RLHF_FAST_PUREPYTHON=1 at install) or a source checkout
    _C = None

try:
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency, but keep the package importable
    triton = None
    HAS_TRITON = False

BACKENDS = ("triton", "cuda", "cpu", "torch")

# dtype codes shared with csrc/cpu/common.h and csrc/cuda/common.cuh
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.bool: 5,
    torch.uint8: 6,
}


def triton_interpreting() -> bool:
    """True when Triton kernels were defined in interpreter mode (they then run on CPU tensors)."""
    if not HAS_TRITON:
        return False
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton
        return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def cuda_library():
    """The nvcc-built csrc/cuda kernels (a C-ABI shared library), or None when not built."""
    path = Path(__file__).with_name("_cuda_kernels.so")
    if not path.exists():
        return None
    return ctypes.CDLL(str(path))


def _available(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run tensors on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the C++ backend runs CPU tensors only (got a {device.type} tensor)"
        return None if _C is not None else "rlhf_fast._C is not built (reinstall without RLHF_FAST_PUREPYTHON=1)"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA backend runs CUDA tensors only (got a {device.type} tensor)"
        return None if cuda_library() is not None else "CUDA kernels not built (install with RLHF_FAST_BUILD_CUDA=1)"
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"Triton cannot run {device.type} tensors (set TRITON_INTERPRET=1 before importing rlhf_fast for CPU)"
    return f"unknown backend {backend!r}"


def select_backend(device: torch.device, *, has=BACKENDS, cuda_first: bool = False) -> str:
    """Pick the backend for an op whose tensors live on ``device``.

    has: the backends this op implements; cuda_first: on CUDA prefer the csrc kernel
    (set by ops where it measures faster than Triton).
    """
    if os.environ.get("RLHF_FAST_PUREPYTHON") == "1":
        return "torch"
    forced = os.environ.get("RLHF_FAST_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"RLHF_FAST_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced not in has:
            raise ValueError(f"RLHF_FAST_BACKEND={forced!r}: this op has no {forced} implementation")
        reason = _available(forced, device)
        if reason:
            raise RuntimeError(f"RLHF_FAST_BACKEND={forced!r}: {reason}")
        return forced
    if device.type == "cuda":
        order = ("cuda", "triton") if cuda_first else ("triton", "cuda")
    elif device.type == "cpu":
        order = ("cpu",)
    else:
        order = ()
    for b in order:
        if b in has and _available(b, device) is None:
            return b
    return "torch"


def num_threads() -> int:
    """Threads the C++ kernels use: torch's own setting, so users tune one knob."""
    return torch.get_num_threads()
