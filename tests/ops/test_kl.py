"""kl_penalty and full_kl against float64 references, on every backend."""
import math

import pytest
import torch
from helpers import assert_close_to_ref

from rlhf_fast import full_kl, full_kl_ref, kl_penalty, kl_penalty_ref

ESTIMATORS = ["k1", "abs", "k2", "k3"]
ATOL = 2e-6  # fp32 math inside; inputs are exact in every dtype
GRAD_ATOL = 1e-6


def needs(backend, *has):
    if backend not in has:
        pytest.skip(f"no {backend} implementation of this op")


# ---------------------------------------------------------------------------- kl_penalty
def loop_kl(d, est):
    return {"k1": d, "abs": abs(d), "k2": 0.5 * d * d, "k3": math.expm1(-d) + d}[est]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kl_penalty_matches_float64(backend, device, estimator, dtype):
    needs(backend, "triton", "cpu")
    torch.manual_seed(ESTIMATORS.index(estimator))
    shape = (3, 41)
    lp = (torch.randn(shape) * 2).to(device=device, dtype=dtype).requires_grad_()
    rp = (torch.randn(shape) * 2).to(device=device, dtype=dtype).requires_grad_()
    out = kl_penalty(lp, rp, estimator)
    assert out.dtype == torch.float32 and out.shape == shape
    lp64, rp64 = lp.detach().cpu().double(), rp.detach().cpu().double()
    ref = torch.tensor([loop_kl(a - b, estimator) for a, b in zip(lp64.view(-1).tolist(), rp64.view(-1).tolist())],
                       dtype=torch.float64).view(shape)
    lpt, rpt = lp.detach().clone().requires_grad_(), rp.detach().clone().requires_grad_()
    t = kl_penalty_ref(lpt, rpt, estimator)  # plain torch in the input dtype (upcast to fp32)
    # + 1 fp32 ulp of the largest value: for |d| >= 1/2 the kernels form k3 as (exp(-d) - 1) + d,
    # rounding twice where torch's expm1(-d) + d rounds once (small |d| use a series: see below)
    assert_close_to_ref(out.cpu(), ref, t.cpu(), atol=ATOL + 1.2e-7 * ref.abs().max().item(), name="kl")
    go = torch.randn(shape, dtype=torch.float64)  # grad_output != 1
    (out * go.to(device).float()).sum().backward()
    (t * go.to(device).float()).sum().backward()
    lpr, rpr = lp64.clone().requires_grad_(), rp64.clone().requires_grad_()
    (kl_penalty_ref(lpr, rpr, estimator) * go).sum().backward()
    assert lp.grad.dtype == dtype and rp.grad.dtype == dtype
    assert_close_to_ref(lp.grad.cpu(), lpr.grad, lpt.grad.cpu(), atol=GRAD_ATOL, name="grad_logprobs")
    assert_close_to_ref(rp.grad.cpu(), rpr.grad, rpt.grad.cpu(), atol=GRAD_ATOL, name="grad_ref_logprobs")


def test_kl_penalty_k3_tiny_differences_keep_relative_precision(backend, device):
    needs(backend, "triton", "cpu")
    d = torch.tensor([1e-6, -1e-6, 3e-4, -3e-4, 0.01, -0.2, 0.49, -0.51, 2.0, -5.0], dtype=torch.float64)
    base = torch.full_like(d, -3.0)
    out = kl_penalty((base + d).float().to(device), base.float().to(device), "k3").cpu().double()
    d32 = (base + d).float().double() - base.float().double()  # the difference the kernel actually sees
    ref = torch.expm1(-d32) + d32
    assert ((out - ref).abs() <= 1e-6 * ref.abs() + 1e-30).all(), (out, ref)


def test_kl_penalty_k3_nonnegative_and_mixed_dtypes(backend, device):
    needs(backend, "triton", "cpu")
    lp = torch.randn(1000, device=device) * 5
    rp = (torch.randn(1000) * 5).to(device=device, dtype=torch.bfloat16)
    out = kl_penalty(lp, rp, "k3")
    assert (out >= 0).all()
    ref = kl_penalty_ref(lp.double(), rp.double(), "k3")
    assert_close_to_ref(out.cpu(), ref.cpu(), kl_penalty_ref(lp, rp, "k3").cpu(),
                        atol=ATOL + 1.2e-7 * ref.abs().max().item(), name="k3")


# ---------------------------------------------------------------------------- full_kl
def _check_full_kl(logits, ref_logits, temperature):
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_()
    xt = logits.detach().clone().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    out = full_kl(x, ref_logits, temperature=temperature)
    ref = full_kl_ref(x64, ref_logits.double(), temperature)
    t = full_kl_ref(xt, ref_logits, temperature)  # plain torch, same inputs, fp32 math
    assert out.dtype == torch.float32 and out.shape == logits.shape[:-1]
    assert_close_to_ref(out, ref, t, atol=ATOL, name="kl")
    go = torch.randn(ref.shape, dtype=torch.float64, device=ref.device)
    (out * go.float()).sum().backward()
    (ref * go).sum().backward()
    (t * go.float()).sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    assert_close_to_ref(x.grad, x64.grad, xt.grad, atol=GRAD_ATOL, name="grad_logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,V", [((3, 37), 1271), ((5,), 300), ((2, 1, 3), 17)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_kl_matches_float64(backend, device, dtype, shape, V, temperature):
    needs(backend, "triton", "cpu")
    torch.manual_seed(V + int(10 * temperature))
    logits = (torch.randn(*shape, V) * 3).to(device=device, dtype=dtype)
    ref_logits = (logits.float().cpu() + torch.randn(*shape, V)).to(device=device, dtype=dtype)
    _check_full_kl(logits, ref_logits, temperature)


def test_full_kl_sliced_and_noncontiguous(backend, device):
    needs(backend, "triton", "cpu")
    logits = torch.randn(3, 9, 513, device=device) * 2
    ref_logits = torch.randn(3, 9, 513, device=device) * 2
    _check_full_kl(logits[:, :-1], ref_logits[:, 1:], 1.0)  # row views without a copy
    _check_full_kl(logits.transpose(0, 1), ref_logits.transpose(0, 1), 1.3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter's numpy on -inf data
def test_full_kl_extreme_logits(backend, device):
    needs(backend, "triton", "cpu")
    V = 700
    logits = torch.randn(4, V, device=device) * 30
    ref_logits = torch.randn(4, V, device=device) * 30
    logits[0, :350] = float("-inf")  # policy puts no mass there: nothing is added
    ref_logits[0, :350] = float("-inf")
    ref_logits[1, 5] = float("-inf")  # the ref rules out a token the policy might pick
    logits[1, 5] = -1e4  # ... which the policy gives vanishing mass
    logits[2] = ref_logits[2]  # identical distributions: KL = 0
    logits[3] += 1e4  # large magnitudes
    ref_logits[3] -= 1e4
    _check_full_kl(logits, ref_logits, 1.0)
    out = full_kl(logits, ref_logits)
    assert torch.isfinite(out).all() and out[2].abs() < 1e-6


def test_full_kl_identical_is_zero_and_grad_to_logits_only(backend, device):
    needs(backend, "triton", "cpu")
    logits = torch.randn(5, 333, device=device).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    out = full_kl(logits, ref_logits)
    assert out.abs().max() < 1e-6
    out.sum().backward()
    assert ref_logits.grad is None and logits.grad.abs().max() < 1e-6


def _big_allocations(fn, threshold_bytes):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= threshold_bytes]


@pytest.mark.parametrize("kernel_backend", ["cpu", "triton"])
def test_full_kl_no_vocabulary_sized_temporaries(monkeypatch, kernel_backend):
    if torch.cuda.is_available():
        pytest.skip("CPU allocations only")
    monkeypatch.setenv("RLHF_FAST_BACKEND", kernel_backend)
    N, V = 32, 4096
    x = torch.randn(N, V).requires_grad_()
    y = torch.randn(N, V)
    nv_bytes = N * V * 4
    assert _big_allocations(lambda: full_kl(x, y), nv_bytes // 4) == []
    assert _big_allocations(lambda: torch.autograd.grad(full_kl(x, y).sum(), x), nv_bytes // 4) == [nv_bytes]
    assert len(_big_allocations(lambda: full_kl_ref(x, y), nv_bytes // 4)) >= 2  # the yardstick sees them


# ---------------------------------------------------------------------------- errors, fallback
def test_bad_input_names_the_argument():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_penalty(x, x[:, :-1])
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(x, x, "k5")
    with pytest.raises(TypeError, match="logprobs"):
        kl_penalty(x.long(), x)
    with pytest.raises(ValueError, match="ref_logits"):
        full_kl(x, torch.randn(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        full_kl(x, x, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        full_kl(x, x, temperature=float("nan"))
    with pytest.raises(TypeError, match="ref_logits"):
        full_kl(x, x.tolist())
    with pytest.raises(ValueError, match="logits"):
        full_kl(torch.randn(3, 0), torch.randn(3, 0))


def test_torch_fallback_matches(monkeypatch):
    x, y = torch.randn(3, 4, 101), torch.randn(3, 4, 101)
    a, b = torch.randn(50), torch.randn(50)
    kern = (full_kl(x, y, temperature=0.9), kl_penalty(a, b, "k3"))
    monkeypatch.setenv("RLHF_FAST_PUREPYTHON", "1")
    fall = (full_kl(x, y, temperature=0.9), kl_penalty(a, b, "k3"))
    for k, f in zip(kern, fall):
        torch.testing.assert_close(k, f, atol=1e-5, rtol=1e-5)


def test_empty(backend, device):
    needs(backend, "triton", "cpu")
    x = torch.randn(0, 7, 11, device=device, requires_grad=True)
    out = full_kl(x, x.detach())
    assert out.shape == (0, 7)
    out.sum().backward()
    assert kl_penalty(torch.empty(0, device=device), torch.empty(0, device=device)).shape == (0,)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_full_kl_large_vocab(monkeypatch, dtype):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    torch.manual_seed(11)
    logits = (torch.randn(64, 151936, device="cuda") * 4).to(dtype)
    ref_logits = (logits.float() + torch.randn_like(logits, dtype=torch.float32)).to(dtype)
    _check_full_kl(logits, ref_logits, 0.8)
    _check_full_kl(logits[:, :-1], ref_logits[:, :-1], 1.0)
