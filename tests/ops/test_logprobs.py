"""token_logprobs against a float64 reference, on every backend."""
import pytest
import torch
from helpers import assert_close_to_ref

import rlhf_fast
from rlhf_fast import token_logprobs, token_logprobs_ref

# dtype -> atol for log-probs/entropy (fp32 math inside; inputs are exact in every dtype)
ATOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRAD_ATOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def _inputs(shape, V, dtype, device, scale=3.0, target_dtype=torch.int64):
    logits = (torch.randn(*shape, V, device=device) * scale).to(dtype)
    targets = torch.randint(0, V, shape, device=device, dtype=target_dtype)
    return logits, targets


def _check_against_ref(logits, targets, temperature, with_entropy=True, inplace=False):
    """Value and grad of the kernel vs float64, with the same-dtype torch error as the yardstick."""
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    xt = logits.detach().clone().requires_grad_()  # plain torch in the input dtype
    out = token_logprobs(x, targets, temperature=temperature, return_entropy=with_entropy, inplace_backward=inplace)
    ref = token_logprobs_ref(x64, targets, temperature, with_entropy)
    tl = torch.log_softmax(xt / temperature, -1)  # torch in the input dtype (no upcast)
    t_lp = tl.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    t_ent = -(tl.exp() * tl).sum(-1)
    outs = out if with_entropy else (out,)
    refs = ref if with_entropy else (ref,)
    touts = (t_lp, t_ent) if with_entropy else (t_lp,)
    for name, o, r, t in zip(("logp", "entropy"), outs, refs, touts):
        assert o.dtype == torch.float32 and o.shape == targets.shape
        assert_close_to_ref(o, r, t, atol=ATOL[dtype], name=name)
    gos = [torch.randn_like(r) for r in refs]  # grad_output != 1
    sum(o * g.float() for o, g in zip(outs, gos)).sum().backward()
    sum(r * g for r, g in zip(refs, gos)).sum().backward()
    sum(t * g.to(dtype) for t, g in zip(touts, gos)).sum().backward()
    grad = x.grad
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close_to_ref(grad, x64.grad, xt.grad, atol=GRAD_ATOL[dtype], name="grad_logits")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,V", [((3, 37), 1271), ((5,), 300), ((2, 1, 3), 17)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64(backend, device, dtype, shape, V, temperature):
    torch.manual_seed(hash((str(dtype), shape, V, temperature)) % 2**31)
    logits, targets = _inputs(shape, V, dtype, device)
    _check_against_ref(logits, targets, temperature, with_entropy=True)


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64])
def test_logprobs_only_and_int32_targets(backend, device, target_dtype):
    logits, targets = _inputs((4, 9), 513, torch.float32, device, target_dtype=target_dtype)
    _check_against_ref(logits, targets, 1.3, with_entropy=False)


def test_realistic_shape(backend, device):
    torch.manual_seed(0)
    logits, targets = _inputs((2, 128), 32000, torch.bfloat16, device, scale=4.0)
    _check_against_ref(logits, targets, 1.0, with_entropy=True)


def test_sliced_and_transposed_logits(backend, device):
    torch.manual_seed(1)
    full = torch.randn(3, 11, 700, device=device)
    sliced = full[:, :-1]  # read in place through the row layout
    targets = torch.randint(0, 700, (3, 10), device=device)
    _check_against_ref(sliced, targets, 0.9)
    transposed = torch.randn(700, 6, device=device).t()  # vocabulary not unit-stride: copied once
    _check_against_ref(transposed, torch.randint(0, 700, (6,), device=device), 1.0)


def test_inplace_backward_writes_grad_into_logits(backend, device):
    torch.manual_seed(2)
    logits = torch.randn(4, 5, 333, device=device)
    targets = torch.randint(0, 333, (4, 5), device=device)
    x_ref = logits.clone().requires_grad_()
    token_logprobs(x_ref, targets, return_entropy=True)[1].sum().backward()
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, targets, return_entropy=True, inplace_backward=True)
    (grad,) = torch.autograd.grad((0 * lp + ent).sum(), x)
    torch.testing.assert_close(grad, x_ref.grad)
    assert grad.data_ptr() == x.data_ptr()  # written into the logits' storage
    torch.testing.assert_close(x.detach(), x_ref.grad)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_large_default_backward(monkeypatch, with_entropy):
    """The C++ default backward of a gradient past the last-level cache (>= 16M fp32 elements), against
    float64 on rows sampled from a 513 x 32771 gradient (odd V: unaligned row starts, a partial last
    chunk), rows with both upstream grads 0 (a zero row), and equal to the in-place backward."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cpu")
    torch.manual_seed(7)
    N, V = 513, 32771
    logits = torch.randn(N, V) * 3
    targets = torch.randint(0, V, (N,))
    targets[:3] = torch.tensor([0, V - 1, 1024])  # first / last element and a chunk boundary
    g_lp = torch.randn(N)
    g_lp[5::7] = 0.0
    g_ent = torch.randn(N) if with_entropy else None
    if g_ent is not None:
        g_ent[5::14] = 0.0  # rows 5, 19, ...: both 0 (a zero row); rows 12, 26, ...: entropy term only

    def grad(inplace):
        x = logits.clone().requires_grad_()
        out = token_logprobs(x, targets, return_entropy=with_entropy, inplace_backward=inplace)
        loss = (out[0] * g_lp).sum() + (out[1] * g_ent).sum() if with_entropy else (out * g_lp).sum()
        (gx,) = torch.autograd.grad(loss, x)
        return gx

    default, inplace = grad(False), grad(True)
    torch.testing.assert_close(default, inplace, rtol=1e-6, atol=1e-9)
    rows = torch.tensor([0, 1, 2, 5, 12, 19, 200, N - 1])
    x64 = logits[rows].double().requires_grad_()
    ref = token_logprobs_ref(x64, targets[rows], 1.0, with_entropy)
    loss = (ref[0] * g_lp[rows]).sum() + (ref[1] * g_ent[rows]).sum() if with_entropy else (ref * g_lp[rows]).sum()
    loss.backward()
    torch.testing.assert_close(default[rows].double(), x64.grad, rtol=1e-4, atol=1e-7)
    assert default[5].eq(0).all() and (not with_entropy or default[19].eq(0).all())


def test_extreme_logits_and_neg_inf(backend, device):
    V = 1000
    logits = torch.randn(6, V, device=device)
    logits[0] = 1e4
    logits[0, 3] = -1e4
    logits[1, ::2] = -1e4
    logits[1, 1] = 1e4
    logits[2, :500] = float("-inf")
    logits[3, 5:] = float("-inf")  # only 5 live entries
    logits[4] = torch.linspace(-1e4, 1e4, V)
    targets = torch.tensor([3, 1, 700, 2, 10, 999], device=device)
    for temperature in (1.0, 0.05, 20.0):
        x = logits.clone().requires_grad_()
        lp, ent = token_logprobs(x, targets, temperature=temperature, return_entropy=True)
        ref_lp, ref_ent = token_logprobs_ref(logits.double(), targets, temperature, True)
        t_lp, t_ent = token_logprobs_ref(logits, targets, temperature, True)  # torch fp32
        assert not torch.isnan(lp).any() and not torch.isnan(ent).any()
        assert (lp <= 0).all() and (ent >= 0).all()
        assert_close_to_ref(lp, ref_lp, t_lp, atol=1e-4, name="logp")
        assert_close_to_ref(ent, ref_ent, t_ent, atol=1e-4, name="entropy")
        (lp.sum() + ent.sum()).backward()
        assert torch.isfinite(x.grad).all()
    # a target on a -inf logit has log-prob -inf, not NaN
    lp = token_logprobs(logits, torch.tensor([0, 0, 0, 100, 0, 0], device=device))
    assert lp[3] == float("-inf") and not torch.isnan(lp).any()


def test_empty_batch(backend, device):
    logits = torch.randn(0, 7, 50, device=device, requires_grad=True)
    targets = torch.zeros(0, 7, dtype=torch.long, device=device)
    lp, ent = token_logprobs(logits, targets, return_entropy=True)
    assert lp.shape == (0, 7) and ent.shape == (0, 7)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == logits.shape


def test_bad_input_names_the_argument(device):
    logits = torch.randn(2, 3, 10, device=device)
    targets = torch.zeros(2, 3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, targets[:, :2])
    with pytest.raises(TypeError, match="targets"):
        token_logprobs(logits, targets.float())
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(logits.double(), targets)
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(logits.long(), targets)
    with pytest.raises(IndexError, match=r"targets must lie in \[0, V=10\), found 10"):
        token_logprobs(logits, targets + 10)
    with pytest.raises(IndexError, match="targets"):
        token_logprobs(logits, targets - 1)
    for bad_t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(logits, targets, temperature=bad_t)
    with pytest.raises(ValueError, match="V = 0"):
        token_logprobs(torch.randn(2, 0, device=device), torch.zeros(2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(torch.tensor(1.0, device=device), torch.tensor(0, device=device))


def _big_allocations(fn, threshold_bytes):
    """Sizes of CPU allocations >= threshold made while fn runs (torch profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = []
    for evt in prof.events():
        nbytes = evt.self_cpu_memory_usage  # > 0: allocated in this op itself (not in a child)
        if nbytes >= threshold_bytes:
            sizes.append(nbytes)
    return sizes


@pytest.mark.parametrize("kernel_backend", ["cpu", "triton"])
def test_no_vocabulary_sized_temporaries(monkeypatch, kernel_backend):
    if not torch.cuda.is_available() or kernel_backend == "cpu":
        monkeypatch.setenv("RLHF_FAST_BACKEND", kernel_backend)
    N, V = 64, 4096
    logits = torch.randn(N, V)
    targets = torch.randint(0, V, (N,))
    nv_bytes = N * V * 4

    x = logits.clone().requires_grad_()
    assert _big_allocations(lambda: token_logprobs(x, targets, return_entropy=True), nv_bytes // 4) == []

    def fwd_bwd(x, inplace):
        lp, ent = token_logprobs(x, targets, return_entropy=True, inplace_backward=inplace)
        torch.autograd.grad((lp + ent).sum(), x)  # no accumulation copy into x.grad

    x = logits.clone().requires_grad_()
    assert _big_allocations(lambda: fwd_bwd(x, False), nv_bytes // 4) == [nv_bytes]  # grad_logits only
    assert _big_allocations(lambda: fwd_bwd(x, True), nv_bytes // 4) == []
    # the yardstick really sees the reference's vocabulary-sized temporaries
    assert len(_big_allocations(lambda: token_logprobs_ref(x, targets, 1.0, True), nv_bytes // 4)) >= 2


def test_torch_fallback_matches(monkeypatch, device):
    torch.manual_seed(3)
    logits, targets = _inputs((3, 4), 257, torch.float32, device)
    kernel = token_logprobs(logits, targets, return_entropy=True)
    monkeypatch.setenv("RLHF_FAST_PUREPYTHON", "1")
    fallback = token_logprobs(logits, targets, return_entropy=True)
    for a, b in zip(kernel, fallback):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_forced_backend_errors(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "quantum")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    if not torch.cuda.is_available():
        monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_vocab(monkeypatch, gpu_backend, dtype):
    if gpu_backend == "cuda" and rlhf_fast._backend.cuda_library() is None:
        pytest.skip("CUDA kernels not built (RLHF_FAST_BUILD_CUDA=1)")
    monkeypatch.setenv("RLHF_FAST_BACKEND", gpu_backend)
    torch.manual_seed(4)
    logits, targets = _inputs((4, 300), 151936, dtype, "cuda", scale=4.0)
    _check_against_ref(logits, targets, 0.8, with_entropy=True)
    _check_against_ref(logits[:, :-1], targets[:, :-1], 1.0, with_entropy=True, inplace=True)


def test_fp16_f16c_and_portable_conversions_agree():
    """fp16 logits: the F16C chunk conversions (csrc/cpu/f16c.cpp, where the CPU has them) and the portable
    bit conversions give the same log-probs, entropy and gradient, bit for bit, with non-finite values,
    a row length that is not a multiple of the vector width, and the gradient written in place."""
    C = pytest.importorskip("rlhf_fast._C", reason="the C++ extension is not built")
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 2053, generator=gen) * 4).half()
    x[1, 7], x[2, 100], x[3, 2052] = float("-inf"), float("nan"), float("inf")
    x[4, :5] = torch.tensor([6e-8, -6e-8, 1e-5, 65504.0, -65504.0]).half()  # subnormal and extreme halves
    t = torch.randint(0, 2053, (6,), generator=gen)
    g_lp, g_ent = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    g_ent[0] = 0.0

    def run(inplace):
        xx = x.clone().requires_grad_()
        lp, ent = token_logprobs(xx, t, return_entropy=True, temperature=0.7, inplace_backward=inplace,
                                 backend="cpu")
        torch.autograd.backward((lp, ent), (g_lp, g_ent))
        return lp.detach(), ent.detach(), xx.grad

    prev = C.use_f16c(False)
    try:
        portable = [run(False), run(True)]
    finally:
        C.use_f16c(prev)
    for got, want in zip([run(False), run(True)], portable):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
