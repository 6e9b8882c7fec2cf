"""linear_token_logprobs (the LM head fused into the log-prob kernels) against float64, on every backend."""
import pytest
import torch
from helpers import assert_close_to_ref

from rlhf_fast import token_logprobs
from rlhf_fast.ops.linear_logprobs import (
    head_logits_ref,
    linear_token_logprobs,
    linear_token_logprobs_ref,
    pick_chunk,
)

ATOL = {torch.float32: 3e-5, torch.bfloat16: 3e-5}
GRAD_ATOL = {torch.float32: 3e-5, torch.bfloat16: 3e-5}


def make_inputs(lead, H, V, dtype, *, bias=False, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, H, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, lead, generator=g)
    return hidden, weight, b, targets


def leaves(*xs, dtype=None):
    return [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]


def torch_same_dtype(hidden, weight, bias, targets, temperature, logit_scale, softcap, logits_op=False):
    """Plain torch in the inputs' dtype (no upcast): how much error that dtype costs anyway. With
    logits_op: our token_logprobs on the materialised fp32 logits (the chunk kernel's own error)."""
    if logits_op:
        z = head_logits_ref(hidden, weight, bias, logit_scale, softcap)
        return token_logprobs(z, targets, temperature=temperature, return_entropy=True)
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = softcap * torch.tanh(z * (logit_scale / softcap)) if softcap else z * logit_scale
    logp_all = torch.log_softmax(z / temperature, -1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def check_against_ref(hidden, weight, bias, targets, *, temperature=1.0, logit_scale=1.0, softcap=None,
                      chunk_size=None, return_entropy=True, logits_op_yardstick=False):
    dtype = hidden.dtype
    opts = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    x = leaves(hidden, weight, bias)
    x64 = leaves(hidden, weight, bias, dtype=torch.float64)
    xt = leaves(hidden, weight, bias)
    out = linear_token_logprobs(x[0], x[1], targets, bias=x[2], return_entropy=return_entropy,
                                chunk_size=chunk_size, **opts)
    ref = linear_token_logprobs_ref(x64[0], x64[1], targets, bias=x64[2], return_entropy=True, **opts)
    tor = torch_same_dtype(xt[0], xt[1], xt[2], targets, **opts, logits_op=logits_op_yardstick)
    outs = out if return_entropy else (out,)
    for name, o, r, t in zip(("logp", "entropy"), outs, ref, tor):
        assert o.dtype == torch.float32 and o.shape == targets.shape
        assert_close_to_ref(o, r, t, atol=ATOL[dtype], name=name)
    gos = [torch.randn(targets.shape, dtype=torch.float64) for _ in outs]  # grad_output != 1
    sum((o * g.float()).sum() for o, g in zip(outs, gos)).backward()
    sum((r * g).sum() for r, g in zip(ref, gos)).backward()
    sum((t.float() * g.float()).sum() for t, g in zip(tor, gos)).backward()
    for name, a, r, t in zip(("grad_hidden", "grad_weight", "grad_bias"), x, x64, xt):
        if a is None:
            continue
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        assert_close_to_ref(a.grad, r.grad, t.grad, atol=GRAD_ATOL[dtype], name=name)
    return out


CASES = [  # lead shape, H, V, chunk_size, bias, temperature, logit_scale, softcap
    ((3, 7), 19, 301, 4, False, 1.0, 1.0, None),
    ((1,), 5, 97, None, True, 0.7, 1.0, None),  # N = 1
    ((2, 1, 5), 33, 1000, 3, True, 1.0, 0.6, None),
    ((4, 6), 24, 513, 5, True, 1.3, 1.0, 8.0),  # chunk does not divide N = 24? (24 = 4 * 6, 5 does not)
    ((9,), 17, 257, 2, False, 0.9, 2.0, 3.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_float64(backend, dtype, case):
    lead, H, V, chunk, bias, temp, scale, cap = case
    hidden, weight, b, targets = make_inputs(lead, H, V, dtype, bias=bias, seed=hash(case) % 2**31)
    check_against_ref(hidden, weight, b, targets, temperature=temp, logit_scale=scale, softcap=cap, chunk_size=chunk)


def test_logprobs_only_int32_targets(backend):
    hidden, weight, b, targets = make_inputs((5, 3), 12, 400, torch.float32, bias=True, seed=3)
    out = check_against_ref(hidden, weight, b, targets.int(), chunk_size=4, return_entropy=False)
    assert isinstance(out, torch.Tensor)


def test_strided_hidden(backend):
    g = torch.Generator().manual_seed(4)
    full = torch.randn(3, 9, 20, generator=g)
    weight = torch.randn(300, 16, generator=g) * 0.3
    sliced = full[:, :-1, 2:18]  # (3, 8, 16), neither unit-stride rows nor contiguous
    targets = torch.randint(0, 300, (3, 8), generator=g)
    check_against_ref(sliced, weight, None, targets, chunk_size=5)
    transposed = torch.randn(16, 7, generator=g).t()  # H not unit-stride
    check_against_ref(transposed, weight, None, torch.randint(0, 300, (7,), generator=g), chunk_size=3)


def test_expanded_weight_view(backend):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 8, generator=g)
    base = torch.randn(8, 200, generator=g) * 0.4
    check_against_ref(hidden, base.t(), None, torch.randint(0, 200, (6,), generator=g), chunk_size=4)


def test_tied_weights_accumulate(backend):
    """Embedding and LM head share one parameter: its grad is the sum of both uses."""
    torch.manual_seed(6)
    V, H = 211, 13
    emb = torch.randn(V, H, dtype=torch.float64) * 0.5
    ids = torch.randint(0, V, (3, 6))
    targets = torch.randint(0, V, (3, 6))

    def run(weight, fused):
        hidden = torch.tanh(weight[ids] * 1.5)  # a tiny "trunk" reading the embedding
        if fused:
            lp, ent = linear_token_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=4)
        else:
            lp, ent = linear_token_logprobs_ref(hidden, weight, targets, return_entropy=True)
        (lp.sum() * 0.3 + ent.sum()).backward()
        return weight.grad

    got = run(emb.float().requires_grad_(), True)
    ref = run(emb.clone().requires_grad_(), False)
    assert_close_to_ref(got, ref, atol=5e-5, name="tied grad")


def test_extreme_hidden_values(backend):
    """|logits| ~ 3e3: the fp32 lse the chunk kernel saves costs ~1e-4 absolute in the gradient (plain
    torch keeps ~1e-8 here), so the yardstick is the logits op on the materialised logits."""
    hidden, weight, b, targets = make_inputs((2, 5), 16, 300, torch.float32, bias=True, scale=300.0, seed=7)
    out = check_against_ref(hidden, weight, b, targets, chunk_size=3, logits_op_yardstick=True)
    assert all(torch.isfinite(o).all() for o in out)
    # softcap keeps the same huge hidden states finite and smooth
    check_against_ref(hidden, weight, b, targets, softcap=30.0, chunk_size=3)


def test_nonfinite_hidden_row_stays_in_its_row(backend):
    hidden, weight, _, targets = make_inputs((6,), 10, 150, torch.float32, seed=8)
    hidden[2, 3] = float("nan")
    lp, ent = linear_token_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=4)
    ref, ref_ent = linear_token_logprobs_ref(hidden.double(), weight.double(), targets, return_entropy=True)
    # (what row 2 itself reads is the logits kernel's business: NaN on cpu, the Triton kernel's
    # min(logp, 0) turns it into 0; the point here is that it does not leak into other rows or chunks)
    keep = torch.arange(6) != 2
    assert_close_to_ref(lp[keep], ref[keep], atol=2e-5, name="finite rows")
    assert_close_to_ref(ent[keep], ref_ent[keep], atol=2e-5, name="finite rows entropy")


def test_chunk_size_changes_nothing_but_memory(backend, monkeypatch):
    hidden, weight, b, targets = make_inputs((11,), 9, 333, torch.float32, bias=True, seed=9)
    outs = [linear_token_logprobs(hidden, weight, targets, bias=b, chunk_size=c) for c in (1, 4, 11, 100)]
    for o in outs[1:]:
        assert_close_to_ref(o, outs[0], atol=1e-6, name="chunked")
    monkeypatch.setenv("RLHF_FAST_HEAD_CHUNK_BYTES", str(3 * 333 * 4))
    assert pick_chunk(11, 333, None, 1) == 3
    assert pick_chunk(11, 333, None, 3) == 1
    assert pick_chunk(11, 333, 50, 1) == 11
    monkeypatch.setenv("RLHF_FAST_HEAD_CHUNK_BYTES", "lots")
    with pytest.raises(ValueError, match="RLHF_FAST_HEAD_CHUNK_BYTES"):
        pick_chunk(11, 333, None, 1)
    monkeypatch.delenv("RLHF_FAST_HEAD_CHUNK_BYTES")
    assert pick_chunk(100_000, 32_000, None, 1) == (64 << 20) // (4 * 32_000)
    assert pick_chunk(100_000, 151_936, None, 1) == 256  # the grad_weight GEMM's K stays >= 256
    assert pick_chunk(100, 151_936, None, 2) == 100


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    hidden, weight, b, targets = make_inputs((4,), 8, 50, torch.float32, bias=True, seed=10)
    got = linear_token_logprobs(hidden, weight, targets, bias=b, softcap=5.0)
    ref = linear_token_logprobs_ref(hidden, weight, targets, bias=b, softcap=5.0)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("kernel", ["cpu", "triton", "torch"])
def test_backend_argument_overrides_dispatch(monkeypatch, kernel):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cpu" if kernel == "triton" else "triton")
    hidden, weight, b, targets = make_inputs((6,), 8, 90, torch.float32, bias=True, seed=15)
    got = linear_token_logprobs(hidden, weight, targets, bias=b, backend=kernel, chunk_size=4)
    ref = linear_token_logprobs_ref(hidden.double(), weight.double(), targets, bias=b.double())
    assert_close_to_ref(got, ref, atol=2e-5, name=f"backend={kernel}")


def test_head_logits_ref_is_the_definition():
    hidden, weight, b, _ = make_inputs((3,), 6, 20, torch.float64, bias=True, seed=11)
    z = head_logits_ref(hidden, weight, b, 0.5, 2.0)
    assert torch.allclose(z, 2.0 * torch.tanh((hidden @ weight.T + b) * 0.5 / 2.0))
    assert torch.equal(head_logits_ref(hidden, weight, None, 1.0, None), hidden @ weight.T)


def test_bad_arguments_name_the_argument():
    hidden, weight, b, targets = make_inputs((4,), 8, 50, torch.float32, bias=True)
    cases = [
        (dict(weight=weight[:, :5]), "weight"),
        (dict(weight=weight.double()), "weight"),
        (dict(bias=b[:7]), "bias"),
        (dict(targets=targets + 50), "targets"),
        (dict(targets=targets[:2]), "targets"),
        (dict(hidden=hidden.long()), "hidden"),
        (dict(temperature=0.0), "temperature"),
        (dict(logit_scale=-1.0), "logit_scale"),
        (dict(softcap=0.0), "softcap"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(backend="tpu"), "backend"),
        (dict(backend="cuda"), "backend"),  # CPU tensors
    ]
    for kw, name in cases:
        args = dict(hidden=hidden, weight=weight, targets=targets, bias=b)
        args.update(kw)
        with pytest.raises((ValueError, TypeError, IndexError), match=name):
            linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


# ---------------------------------------------------------------------------- memory
def big_allocations(fn, threshold_bytes):
    """Sizes of CPU allocations >= threshold made while fn runs (torch profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= threshold_bytes]


NV = dict(N=64, H=8, V=4096)  # N * V fp32 = 1 MiB; grad_weight (V, H) = 128 KiB stays under N * V / 4


def test_no_vocabulary_sized_allocations(backend):
    N, H, V = NV["N"], NV["H"], NV["V"]
    hidden, weight, b, targets = make_inputs((N,), H, V, torch.float32, bias=True, seed=12)
    limit = N * V * 4 // 4
    for softcap in (None, 10.0):
        x = leaves(hidden, weight, b)

        def fwd(x=x, softcap=softcap):
            return linear_token_logprobs(x[0], x[1], targets, bias=x[2], softcap=softcap, return_entropy=True,
                                         chunk_size=8)

        assert big_allocations(fwd, limit) == []

        def fwd_bwd(x=x, softcap=softcap):
            lp, ent = fwd(x, softcap)
            torch.autograd.grad((lp + ent).sum(), x)

        assert big_allocations(fwd_bwd, limit) == []
    x = leaves(hidden, weight, b)
    # the yardstick sees the materialised reference's (N, V) tensors
    assert len(big_allocations(lambda: linear_token_logprobs_ref(x[0], x[1], targets, bias=x[2],
                                                                 return_entropy=True), limit)) >= 2
