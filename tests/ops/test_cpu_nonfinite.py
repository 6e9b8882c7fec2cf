"""Non-finite rule of the C++ kernels (token_logprobs, full_kl on the "cpu" backend), against torch in float64:
a row holding a NaN, a +inf, or only -inf gives NaN log-prob, NaN entropy and NaN KL; its gradient is NaN
when the row is used (upstream grad != 0) and exactly 0 when it is not (upstream grad 0, as for a masked
row). A row with some -inf logits stays finite."""
import pytest
import torch
from helpers import assert_close_to_ref

from rlhf_fast import full_kl, full_kl_ref, token_logprobs, token_logprobs_ref

BACKENDS = ["cpu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")
# row kind -> how to spoil a row of logits. The kernels stream rows in chunks (1024 for the log-prob, 512 for
# the full KL): V = 2500 resp. 1300 puts a NaN in the first and in the last chunk, the +inf in a middle one
SPOIL = {
    "nan_early": lambda r: r.index_fill_(0, torch.tensor([3]), NAN),
    "nan_late": lambda r: r.index_fill_(0, torch.tensor([r.numel() - 2]), NAN),
    "pos_inf": lambda r: r.index_fill_(0, torch.tensor([r.numel() * 3 // 5]), INF),
    "all_neg_inf": lambda r: r.fill_(-INF),
    "some_neg_inf": lambda r: r.index_fill_(0, torch.arange(0, r.numel(), 3), -INF),  # finite result
}
NONFINITE = [k for k in SPOIL if k != "some_neg_inf"]


@pytest.fixture(params=BACKENDS)
def cpu_backend(request, monkeypatch):
    pytest.importorskip("rlhf_fast._C", reason="the C++ extension is not built")
    monkeypatch.setenv("RLHF_FAST_BACKEND", request.param)
    return request.param


def _logits(n, V, dtype, kinds, seed):
    torch.manual_seed(seed)
    x = torch.randn(n, V) * 3
    for i, k in enumerate(kinds):
        SPOIL[k](x[i])
    targets = torch.randint(0, V, (n,))
    targets[list(kinds).index("some_neg_inf")] = 1  # a finite target in the partly -inf row
    return x.to(dtype), targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_nonfinite_rows(cpu_backend, dtype, temperature):
    kinds = list(SPOIL) + ["ok", "ok"]
    x, t = _logits(len(kinds), 2500, dtype, kinds[:len(SPOIL)], seed=len(kinds))
    xg = x.clone().requires_grad_()
    lp, ent = token_logprobs(xg, t, temperature=temperature, return_entropy=True)
    x64 = x.double().requires_grad_()
    lp64, ent64 = token_logprobs_ref(x64, t, temperature, True)
    bad = torch.tensor([k in NONFINITE for k in kinds])
    assert lp[bad].isnan().all() and ent[bad].isnan().all(), (lp, ent)
    assert lp64[bad].isnan().all() and ent64[bad].isnan().all()  # what torch says too
    assert_close_to_ref(lp[~bad], lp64[~bad], atol=2e-5, name="logp")
    assert_close_to_ref(ent[~bad], ent64[~bad], atol=2e-5, name="entropy")

    # upstream grad 0 on the non-finite rows (a masked row): their grad rows are exactly 0
    g_lp, g_ent = torch.randn(len(kinds)), torch.randn(len(kinds))
    g_lp[bad], g_ent[bad] = 0.0, 0.0
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp64 * g_lp.double() + ent64 * g_ent.double()).sum().backward()
    assert (xg.grad[bad] == 0).all(), "a row with upstream grad 0 must get an exact-0 gradient"
    ok = ~bad
    ok[kinds.index("some_neg_inf")] = False  # -inf logits: torch's own grad there is NaN (0 * inf)
    assert_close_to_ref(xg.grad[ok].float(), x64.grad[ok], atol=1e-5 if dtype == torch.float32 else 2e-2,
                        name="grad_logits")
    some = kinds.index("some_neg_inf")
    finite = x[some].isfinite()
    assert (xg.grad[some][~finite] == 0).all() and xg.grad[some][finite].isfinite().all()


@pytest.mark.parametrize("kind", NONFINITE)
@pytest.mark.parametrize("entropy_grad", [True, False])
def test_logprobs_used_nonfinite_row_has_nan_grad(cpu_backend, kind, entropy_grad):
    x, t = _logits(2, 2500, torch.float32, [kind, "some_neg_inf"], seed=1)
    xg = x.clone().requires_grad_()
    lp, ent = token_logprobs(xg, t, return_entropy=True)
    (lp.sum() + (ent.sum() if entropy_grad else 0.0)).backward()
    assert xg.grad[0].isnan().all()
    assert xg.grad[1].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spoil", ["policy", "reference"])
def test_full_kl_nonfinite_rows(cpu_backend, dtype, spoil):
    kinds = list(SPOIL) + ["ok"]
    x, _ = _logits(len(kinds), 1300, dtype, kinds[:len(SPOIL)], seed=7)
    torch.manual_seed(8)
    y = (torch.randn(len(kinds), 1300) * 3).to(dtype)
    if spoil == "reference":
        x, y = y, x
    xg = x.clone().requires_grad_()
    kl = full_kl(xg, y)
    x64 = x.double().requires_grad_()
    kl64 = full_kl_ref(x64, y.double())
    bad = torch.tensor([k in NONFINITE for k in kinds])
    if spoil == "reference":  # q = 0 where p > 0: KL = +inf, as torch gives
        bad_ref = torch.tensor([k == "some_neg_inf" for k in kinds])
        assert kl[bad_ref].isposinf().all() and kl64[bad_ref].isposinf().all()
    assert kl[bad].isnan().all() and kl64[bad].isnan().all(), kl
    fin = kl64.isfinite()
    assert_close_to_ref(kl[fin], kl64[fin], atol=2e-5, name="kl")
    g = torch.randn(len(kinds))
    g[~fin] = 0.0  # masked rows
    (kl * g).sum().backward()
    (kl64 * g.double()).sum().backward()
    assert (xg.grad[~fin] == 0).all(), "a row with upstream grad 0 must get an exact-0 gradient"
    assert_close_to_ref(xg.grad[fin].float(), x64.grad[fin].nan_to_num(0.0),
                        atol=1e-5 if dtype == torch.float32 else 2e-2, name="grad_logits")
