"""Fixtures of the op tests (the Triton interpreter switch lives in tests/conftest.py)."""
import pytest
import torch

# Kernel backends exercised on this machine: Triton (interpreted on CPU), the C++ kernels on
# CPU, the csrc CUDA kernels on GPU; "torch" is the *_ref fallback.
KERNEL_BACKENDS = ["triton", "cuda"] if torch.cuda.is_available() else ["triton", "cpu"]


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per kernel backend, forced through RLHF_FAST_BACKEND."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", request.param)
    return request.param
