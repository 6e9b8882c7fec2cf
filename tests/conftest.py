"""Test setup. Triton kernels run on CPU through the interpreter, which must be switched on
before any @triton.jit is defined, i.e. before rlhf_fast is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Kernel backends exercised on this machine: Triton (interpreted on CPU), the C++ kernels on
# CPU, the csrc CUDA kernels on GPU; "torch" is the *_ref fallback.
KERNEL_BACKENDS = ["triton", "cuda"] if DEVICE == "cuda" else ["triton", "cpu"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per kernel backend, forced through RLHF_FAST_BACKEND."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE
