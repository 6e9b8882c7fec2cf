"""The one dispatch point: which implementation runs an op, chosen per call.

Each op declares its launchers as data, one mapping per op, e.g.
``LAUNCHERS = {"triton": ..., "cpu": ..., "cuda": ...}``; ``select_backend`` reads which
backends the op has from the mapping's keys ("torch", the op's pure-PyTorch ``*_ref``, always exists).

Precedence, first match wins:

    1. fp64 inputs                                the ``*_ref`` in fp64 (no kernel has fp64 code)
    2. ``backend=`` argument of the op            that backend (an error if it cannot run the tensor)
    3. RLHF_FAST_PUREPYTHON=1                     every op runs its ``*_ref``
    4. RLHF_FAST_BACKEND=triton|cuda|cpu|torch    that backend, globally (an error if it cannot run)
    5. default                                    CUDA tensor -> Triton, CPU tensor -> the C++ kernel,
                                                  else (or when neither is available) torch

The csrc CUDA kernels (csrc/cuda, built with RLHF_FAST_BUILD_CUDA=1) are never picked by
default: no benchmark has shown them faster than Triton; select them with ``backend="cuda"``.
Triton runs CPU tensors only through its interpreter (TRITON_INTERPRET=1 set before
rlhf_fast is imported), which the test-suite uses to check every Triton kernel.
Environment variables are read at call time, never frozen at import.

The from-hidden ops (linear_token_logprobs, linear_cross_entropy, linear_ppo_policy_loss) also pick
an ``impl`` with ``select_head_impl``: "chunked" (GEMM chunks + the log-prob kernel of the backend
above; the default everywhere) or "fused" (the Triton kernels of ops/linear_triton.py, GEMM and
softmax in one kernel), by the op's ``impl=`` argument, else RLHF_FAST_HEAD_IMPL=chunked|fused.
"chunked" stays the default on CUDA until the GPU suite measures the fused kernels faster.
"""
from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterable, Mapping
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


def cpu_kernels():
    """The C++ kernels (the rlhf_fast._C extension module), or None when not built."""
    return _C


@functools.cache
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


def select_backend(device: torch.device, launchers: Mapping[str, object] | None = None, *,
                   backend: str | None = None, tensors: Iterable[torch.Tensor | None] = ()) -> str:
    """The backend that runs an op on tensors living on ``device``.

    launchers: the op's mapping backend -> launcher(s) (its keys are what the op implements;
    None: every backend, e.g. to ask what an op with all of them would run); backend: the op's
    per-call ``backend=`` argument; tensors: the op's floating inputs (fp64 among them selects
    "torch"). See the module docstring for the precedence.
    """
    has = BACKENDS if launchers is None else tuple(launchers) + ("torch",)
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return "torch"
    if backend is not None:
        return _forced(backend, has, device, "backend")
    if os.environ.get("RLHF_FAST_PUREPYTHON") == "1":
        return "torch"
    forced = os.environ.get("RLHF_FAST_BACKEND")
    if forced:
        return _forced(forced, has, device, "RLHF_FAST_BACKEND")
    order = {"cuda": ("triton",), "cpu": ("cpu",)}.get(device.type, ())
    for b in order:
        if b in has and _available(b, device) is None:
            return b
    return "torch"


def _forced(backend: str, has: tuple, device: torch.device, what: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{what}={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend not in has:
        raise ValueError(f"{what}={backend!r}: this op has no {backend} implementation (it has {', '.join(has)})")
    reason = _available(backend, device)
    if reason:
        raise RuntimeError(f"{what}={backend!r}: {reason}")
    return backend


HEAD_IMPLS = ("chunked", "fused")


def select_head_impl(device: torch.device, impl: str | None, requested: str | None, backend: str) -> str:
    """"chunked" or "fused" for a from-hidden op on ``device``.

    impl: the op's ``impl=`` argument; requested: its ``backend=`` argument as given; backend: the
    backend that argument resolved to. An explicit impl="fused" runs the Triton kernels whatever the
    default backend (an error if Triton cannot run here or backend= names another one);
    RLHF_FAST_HEAD_IMPL=fused applies only where the op would run Triton anyway. Backend "torch"
    keeps the op's reference."""
    what = "impl"
    if impl is None:
        impl, what = os.environ.get("RLHF_FAST_HEAD_IMPL") or "chunked", "RLHF_FAST_HEAD_IMPL"
    if impl not in HEAD_IMPLS:
        raise ValueError(f"{what}={impl!r}: expected one of {', '.join(HEAD_IMPLS)}")
    if impl == "chunked" or backend == "torch":
        return "chunked"
    if what == "RLHF_FAST_HEAD_IMPL":
        return "fused" if backend == "triton" else "chunked"
    if requested not in (None, "triton"):
        raise ValueError(f"impl='fused' runs Triton kernels; it cannot run with backend={requested!r}")
    reason = _available("triton", device)
    if reason:
        raise RuntimeError(f"impl='fused': {reason}")
    return "fused"


# ---------------------------------------------------------------------------- launcher helpers
def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """A tensor's data pointer for a ctypes call (NULL for None)."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def addr(t: torch.Tensor | None) -> int:
    """A tensor's data pointer as an int for a pybind11 call (0 for None)."""
    return t.data_ptr() if t is not None else 0


def code(t: torch.Tensor | None) -> int:
    """The dtype code the C++ / CUDA kernels understand (0 for None)."""
    return DTYPE_CODES[t.dtype] if t is not None else 0


def cuda_call(name: str, device: torch.device, *args) -> None:
    """Calls the csrc CUDA kernel ``name`` with ``args`` followed by the current stream and
    device index; raises on a non-zero cudaError."""
    lib = cuda_library()
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    err = getattr(lib, name)(*args, stream, ctypes.c_int(device.index or 0))
    if err != 0:
        raise RuntimeError(f"rlhf_fast CUDA kernel {name} failed with cudaError {err}")


def num_threads() -> int:
    """Threads the C++ kernels use: torch's own setting, so users tune one knob."""
    return torch.get_num_threads()
