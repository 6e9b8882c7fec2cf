"""linear_full_kl (exact per-token KL from two models' hidden states) against float64."""
import pytest
import torch
from helpers import assert_close_to_ref
from test_linear_logprobs import big_allocations, leaves, make_inputs

from rlhf_fast.ops.linear_kl import linear_full_kl, linear_full_kl_ref

ATOL = 3e-5


def kl_inputs(lead, H, H_ref, V, dtype, bias, seed):
    hidden, weight, b, _ = make_inputs(lead, H, V, dtype, bias=bias, seed=seed)
    ref_hidden, ref_weight, ref_b, _ = make_inputs(lead, H_ref, V, dtype, bias=bias, seed=seed + 1)
    return hidden, weight, b, ref_hidden, ref_weight, ref_b


def check_kl(hidden, weight, b, ref_hidden, ref_weight, ref_b, *, chunk_size, **kw):
    x, x64, xt = leaves(hidden, weight, b), leaves(hidden, weight, b, dtype=torch.float64), leaves(hidden, weight, b)
    kl = linear_full_kl(x[0], x[1], ref_hidden, ref_weight, bias=x[2], ref_bias=ref_b, chunk_size=chunk_size, **kw)
    ref = linear_full_kl_ref(x64[0], x64[1], ref_hidden.double(), ref_weight.double(), bias=x64[2],
                             ref_bias=None if ref_b is None else ref_b.double(), **kw)
    tor = linear_full_kl_ref(xt[0], xt[1], ref_hidden, ref_weight, bias=xt[2], ref_bias=ref_b, **kw)
    assert kl.dtype == torch.float32 and kl.shape == hidden.shape[:-1]
    assert_close_to_ref(kl, ref, tor, atol=ATOL, name="kl")
    g = torch.randn(kl.shape, dtype=torch.float64)
    (kl * g.float()).sum().backward()
    (ref * g).sum().backward()
    (tor * g.float()).sum().backward()
    for name, a, r, t in zip(("grad_hidden", "grad_weight", "grad_bias"), x, x64, xt):
        if a is not None:
            assert a.grad.dtype == a.dtype, name
            assert_close_to_ref(a.grad, r.grad, t.grad, atol=ATOL, name=name)
    return kl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    ((3, 5), 17, 9, 301, True, 4, dict(temperature=0.8)),
    ((1,), 6, 6, 97, False, None, dict()),  # N = 1
    ((7,), 12, 20, 500, True, 3, dict(softcap=5.0, logit_scale=0.6)),
], ids=["bias-temp", "n1", "softcap"])
def test_matches_float64(backend, dtype, case):
    lead, H, H_ref, V, bias, chunk, kw = case
    check_kl(*kl_inputs(lead, H, H_ref, V, dtype, bias, seed=20 + H), chunk_size=chunk, **kw)


def test_same_model_gives_zero(backend):
    hidden, weight, b, _ = make_inputs((4, 3), 8, 123, torch.float32, bias=True, seed=30)
    kl = linear_full_kl(hidden, weight, hidden, weight, bias=b, ref_bias=b, chunk_size=5)
    assert kl.abs().max() < 1e-5


def test_reference_gets_no_grad(backend):
    hidden, weight, b, ref_hidden, ref_weight, ref_b = kl_inputs((5,), 6, 6, 77, torch.float32, False, seed=31)
    rh = ref_hidden.clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    linear_full_kl(h, weight, rh, ref_weight).sum().backward()
    assert rh.grad is None and h.grad is not None


def test_bad_arguments_name_the_argument():
    hidden, weight, b, ref_hidden, ref_weight, ref_b = kl_inputs((5,), 6, 4, 77, torch.float32, True, seed=32)
    with pytest.raises(ValueError, match="ref_weight"):
        linear_full_kl(hidden, weight, ref_hidden, ref_weight[:70])
    with pytest.raises(ValueError, match="ref_hidden"):
        linear_full_kl(hidden, weight, ref_hidden[:3], ref_weight)
    with pytest.raises(ValueError, match="temperature"):
        linear_full_kl(hidden, weight, ref_hidden, ref_weight, temperature=-1.0)


def test_no_vocabulary_sized_allocations(backend):
    N, H, V = 64, 8, 4096
    hidden, weight, b, ref_hidden, ref_weight, ref_b = kl_inputs((N,), H, H, V, torch.float32, True, seed=33)
    x = leaves(hidden, weight, b)

    def fwd_bwd():
        kl = linear_full_kl(x[0], x[1], ref_hidden, ref_weight, bias=x[2], ref_bias=ref_b, softcap=9.0, chunk_size=8)
        torch.autograd.grad(kl.sum(), x)

    assert big_allocations(fwd_bwd, N * V) == []
    assert len(big_allocations(lambda: linear_full_kl_ref(x[0], x[1], ref_hidden, ref_weight), N * V)) >= 2
