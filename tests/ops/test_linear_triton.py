"""The fused Triton from-hidden kernels (ops/linear_triton.py, impl="fused") against float64.

Without a GPU they run through the Triton interpreter (tests/conftest.py) at tiny sizes; the
gpu-marked tests at the end run real sizes on CUDA."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, assert_close_to_ref
from test_linear_logprobs import make_inputs as linear_inputs

from rlhf_fast.ops.linear_logprobs import linear_token_logprobs, linear_token_logprobs_ref
from rlhf_fast.ops.linear_policy_loss import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
    linear_ppo_policy_loss,
    linear_ppo_policy_loss_ref,
)
from rlhf_fast.ops.linear_triton import Tiles, fused_fwd
from rlhf_fast.ops.logprobs import logit_coefs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 3e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}


def make_inputs(lead, H, V, dtype, *, bias=False, scale=1.0, seed=0):
    """test_linear_logprobs' inputs, on DEV."""
    return [None if x is None else x.to(DEV)
            for x in linear_inputs(lead, H, V, dtype, bias=bias, scale=scale, seed=seed)]


def leaves(*xs, dtype=None):
    return [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]


def plain_torch(hidden, weight, bias, targets, temperature, logit_scale, softcap):
    """Torch in the inputs' own dtype: the error that dtype costs anyway (the yardstick)."""
    z = hidden @ weight.T + (0 if bias is None else bias)
    z = softcap * torch.tanh(z * (logit_scale / softcap)) if softcap else z * logit_scale
    logp_all = torch.log_softmax(z / temperature, -1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def check(hidden, weight, bias, targets, *, temperature=1.0, logit_scale=1.0, softcap=None, entropy=True):
    """Values and all three gradients (grad_output != 1) of impl="fused" against float64."""
    opts = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    x, x64, xt = leaves(hidden, weight, bias), leaves(hidden, weight, bias, dtype=torch.float64), \
        leaves(hidden, weight, bias)
    out = linear_token_logprobs(x[0], x[1], targets, bias=x[2], return_entropy=entropy, impl="fused", **opts)
    outs = out if entropy else (out,)
    ref = linear_token_logprobs_ref(x64[0], x64[1], targets, bias=x64[2], return_entropy=True, **opts)
    tor = plain_torch(xt[0], xt[1], xt[2], targets, **opts)
    for name, o, r, t in zip(("logp", "entropy"), outs, ref, tor):
        assert o.dtype == torch.float32 and o.shape == targets.shape
        assert_close_to_ref(o, r, t, atol=ATOL[hidden.dtype], name=name)
    gos = [torch.randn(targets.shape, dtype=torch.float64, device=DEV) for _ in outs]
    sum((o * g.float()).sum() for o, g in zip(outs, gos)).backward()
    sum((r * g).sum() for r, g in zip(ref, gos)).backward()
    sum((t.float() * g.float()).sum() for t, g in zip(tor, gos)).backward()
    for name, a, r, t in zip(("grad_hidden", "grad_weight", "grad_bias"), x, x64, xt):
        if a is not None:
            assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
            assert_close_to_ref(a.grad, r.grad, t.grad, atol=ATOL[hidden.dtype], name=name)
    return out


CASES = [  # lead, H, V, bias, temperature, logit_scale, softcap
    ((37,), 40, 301, True, 1.0, 1.0, None),  # nothing a multiple of a block
    ((1,), 5, 97, False, 0.7, 1.0, None),  # N = 1, H < BLOCK_K
    ((2, 9), 24, 130, True, 1.3, 0.6, None),
    ((3, 5), 33, 200, True, 0.9, 2.0, 3.0),  # softcap
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_float64(dtype, case):
    lead, H, V, bias, temp, scale, cap = case
    hidden, weight, b, targets = make_inputs(lead, H, V, dtype, bias=bias, seed=len(lead) * 100 + V)
    check(hidden, weight, b, targets, temperature=temp, logit_scale=scale, softcap=cap)


def test_fp16_and_logprobs_only_int32_targets():
    hidden, weight, b, targets = make_inputs((6, 3), 20, 150, torch.float16, bias=True, seed=3)
    out = check(hidden, weight, b, targets.int(), softcap=5.0, entropy=False)
    assert isinstance(out, torch.Tensor)


def test_vocab_splits_and_tiles_change_nothing():
    """The split merge: any number of splits and any tiles give the same statistics."""
    hidden, weight, b, targets = make_inputs((20,), 18, 290, torch.float32, bias=True, seed=4)
    coefs = logit_coefs(0.8, 1.0, 4.0)
    base = fused_fwd(hidden, weight, b, targets, coefs, True, Tiles(16, 16, 16), splits=1)
    for tiles, splits in ((Tiles(16, 16, 16), 3), (Tiles(16, 16, 16), 19), (Tiles(32, 64, 32), 2)):
        got = fused_fwd(hidden, weight, b, targets, coefs, True, tiles, splits=splits)
        for name, g, r in zip(("logp", "lse", "entropy"), got, base):
            assert_close_to_ref(g, r, atol=2e-6, name=f"{name} {tiles} splits={splits}")


def test_strided_hidden_and_weight_views():
    g = torch.Generator().manual_seed(5)
    full = torch.randn(3, 9, 20, generator=g).to(DEV)
    weight = (torch.randn(300, 16, generator=g) * 0.3).to(DEV)
    targets = torch.randint(0, 300, (3, 8), generator=g).to(DEV)
    check(full[:, :-1, 2:18], weight, None, targets)  # neither unit-stride rows nor contiguous
    hidden_t = torch.randn(16, 7, generator=g).to(DEV).t()  # H not unit-stride
    check(hidden_t, torch.randn(16, 300, generator=g).to(DEV).t() * 0.3, None, targets[0, :7])  # nor W's H


def test_tied_weights_accumulate():
    """Embedding and LM head share one parameter: its grad is the sum of both uses."""
    torch.manual_seed(6)
    V, H = 211, 13
    emb = torch.randn(V, H, dtype=torch.float64, device=DEV) * 0.5
    ids, targets = torch.randint(0, V, (3, 6), device=DEV), torch.randint(0, V, (3, 6), device=DEV)

    def run(weight, fused):
        hidden = torch.tanh(weight[ids] * 1.5)
        fn = linear_token_logprobs if fused else linear_token_logprobs_ref
        lp, ent = fn(hidden, weight, targets, return_entropy=True, **({"impl": "fused"} if fused else {}))
        (lp.sum() * 0.3 + ent.sum()).backward()
        return weight.grad

    assert_close_to_ref(run(emb.float().requires_grad_(), True), run(emb.clone().requires_grad_(), False),
                        atol=5e-5, name="tied grad")


def test_nonfinite_rows_stay_in_their_row():
    hidden, weight, b, targets = make_inputs((7,), 10, 150, torch.float32, bias=True, seed=8)
    hidden[2, 3] = float("nan")
    hidden[5, 0] = float("inf")
    bad = torch.zeros(7, dtype=torch.bool, device=DEV)
    bad[[2, 5]] = True
    x = leaves(hidden, weight, b)
    lp, ent = linear_token_logprobs(x[0], x[1], targets, bias=x[2], return_entropy=True, impl="fused")
    ref, ref_ent = linear_token_logprobs_ref(hidden.double(), weight.double(), targets, bias=b.double(),
                                             return_entropy=True)
    assert torch.isnan(lp[bad]).all() and torch.isnan(ent[bad]).all() and torch.isnan(ref[bad]).all()
    assert_close_to_ref(lp[~bad], ref[~bad], atol=2e-5, name="finite rows")
    assert_close_to_ref(ent[~bad], ref_ent[~bad], atol=2e-5, name="finite rows entropy")
    # zero upstream gradient on the bad rows (e.g. padding): every gradient exact and finite, as if
    # those rows were absent (the materialised reference's G^T h would read 0 * NaN)
    ((lp * 0.7 + ent * 0.2) * ~bad).sum().backward()
    keep = leaves(hidden[~bad], weight, b, dtype=torch.float64)
    r, r_ent = linear_token_logprobs_ref(keep[0], keep[1], targets[~bad], bias=keep[2], return_entropy=True)
    (r * 0.7 + r_ent * 0.2).sum().backward()
    assert torch.equal(x[0].grad[bad], torch.zeros_like(x[0].grad[bad]))
    assert_close_to_ref(x[0].grad[~bad], keep[0].grad, atol=2e-5, name="grad_hidden")
    assert_close_to_ref(x[1].grad, keep[1].grad, atol=2e-5, name="grad_weight")
    assert_close_to_ref(x[2].grad, keep[2].grad, atol=2e-5, name="grad_bias")
    # a bad row that does receive a gradient poisons grad_weight, as in the reference
    x = leaves(hidden, weight, b)
    linear_token_logprobs(x[0], x[1], targets, bias=x[2], impl="fused").sum().backward()
    assert torch.isnan(x[0].grad[2]).all() and torch.isfinite(x[0].grad[~bad]).all() and x[1].grad.isnan().any()


def test_minus_inf_bias_entries_are_excluded():
    hidden, weight, b, targets = make_inputs((6,), 12, 90, torch.float32, bias=True, seed=9)
    b[::7] = float("-inf")
    targets[0] = 7  # a target at -inf: logp -inf, the rest finite
    lp, ent = linear_token_logprobs(hidden, weight, targets, bias=b, return_entropy=True, impl="fused")
    ref, ref_ent = linear_token_logprobs_ref(hidden.double(), weight.double(), targets, bias=b.double(),
                                             return_entropy=True)
    assert lp[0] == float("-inf")
    assert_close_to_ref(lp, ref, atol=2e-5, name="logp")
    assert_close_to_ref(ent, ref_ent, atol=2e-5, name="entropy")


def test_dispatch(monkeypatch):
    hidden, weight, b, targets = make_inputs((4,), 8, 50, torch.float32, bias=True, seed=10)
    h = hidden.requires_grad_()

    def node(**kw):
        return type(linear_token_logprobs(h, weight, targets, bias=b, **kw).grad_fn).__name__

    assert node(impl="fused").startswith("FusedLinearLogprobs")
    assert node(impl="chunked").startswith("LinearLogprobs")
    if DEV == "cpu":
        assert node().startswith("LinearLogprobs")  # the default stays the chunked path
        with pytest.raises(ValueError, match="impl='fused'.*backend='cpu'"):
            node(impl="fused", backend="cpu")
        monkeypatch.setenv("RLHF_FAST_HEAD_IMPL", "fused")
        assert node().startswith("LinearLogprobs")  # the env applies where Triton runs anyway
        monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
        assert node().startswith("FusedLinearLogprobs")
    with pytest.raises(ValueError, match="impl='flash'"):
        node(impl="flash")
    monkeypatch.setenv("RLHF_FAST_HEAD_IMPL", "flash")
    with pytest.raises(ValueError, match="RLHF_FAST_HEAD_IMPL='flash'"):
        node()
    monkeypatch.delenv("RLHF_FAST_HEAD_IMPL")
    got = linear_token_logprobs(hidden, weight, targets, bias=b, impl="fused", backend="torch")  # torch: the ref
    assert torch.equal(got, linear_token_logprobs_ref(hidden, weight, targets, bias=b))


def test_entropy_returned_but_unused():
    """Only logp reaches the loss: backward skips the entropy term and matches d logp alone."""
    hidden, weight, b, targets = make_inputs((9,), 14, 77, torch.float32, bias=True, seed=16)
    x, x64 = leaves(hidden, weight, b), leaves(hidden, weight, b, dtype=torch.float64)
    lp, _ = linear_token_logprobs(x[0], x[1], targets, bias=x[2], return_entropy=True, impl="fused")
    (lp * 1.3).sum().backward()
    (linear_token_logprobs_ref(x64[0], x64[1], targets, bias=x64[2]) * 1.3).sum().backward()
    for name, a, r in zip(("grad_hidden", "grad_weight", "grad_bias"), x, x64):
        assert_close_to_ref(a.grad, r.grad, atol=2e-5, name=name)


def test_double_backward_refuses():
    hidden, weight, _, targets = make_inputs((4,), 8, 50, torch.float32, seed=11)
    h = hidden.requires_grad_()
    lp = linear_token_logprobs(h, weight, targets, impl="fused")
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(lp.sum(), h, create_graph=True)


def test_cross_entropy_fused():
    hidden, weight, b, targets = make_inputs((3, 7), 16, 120, torch.float32, bias=True, seed=12)
    targets[0, :4] = -100
    for reduction in ("mean", "sum"):
        x, x64 = leaves(hidden, weight, b), leaves(hidden, weight, b, dtype=torch.float64)
        got = linear_cross_entropy(x[0], x[1], targets, bias=x[2], reduction=reduction, temperature=0.9,
                                   softcap=6.0, impl="fused")
        ref = linear_cross_entropy_ref(x64[0], x64[1], targets, bias=x64[2], reduction=reduction, temperature=0.9,
                                       softcap=6.0)
        assert_close_to_ref(got, ref, atol=2e-5, name=f"nll {reduction}")
        (got * 1.7).backward()
        (ref * 1.7).backward()
        for name, a, r in zip(("grad_hidden", "grad_weight", "grad_bias"), x, x64):
            assert_close_to_ref(a.grad, r.grad, atol=2e-5, name=f"{name} {reduction}")


@pytest.mark.parametrize("entropy_coef", [0.01, 0.0])  # 0.0: the entropy only as a stat
def test_ppo_policy_loss_fused(entropy_coef):
    B, T, H, V = 3, 6, 12, 110
    hidden, weight, b, targets = make_inputs((B, T), H, V, torch.float32, bias=True, seed=13)
    g = torch.Generator().manual_seed(14)
    old = (torch.randn(B, T, generator=g) * 0.1 - 4.7).to(DEV)
    ref_lp = (torch.randn(B, T, generator=g) * 0.1 - 4.7).to(DEV)
    adv = torch.randn(B, generator=g).to(DEV)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(DEV)
    hidden[0, 0] = float("nan")
    mask[0, 0] = False  # a masked NaN row stays out of the loss and every gradient
    opts = dict(ref_logprobs=ref_lp, kl_coef=0.05, entropy_coef=entropy_coef, loss_agg="seq-mean-token-mean",
                logit_scale=0.8, softcap=9.0, compute_entropy=True)
    x, x64 = leaves(hidden, weight, b), leaves(hidden, weight, b, dtype=torch.float64)
    loss, stats = linear_ppo_policy_loss(x[0], x[1], targets, old, adv, mask, bias=x[2], impl="fused", **opts)
    hid64 = torch.where(mask[..., None], x64[0], torch.zeros_like(x64[0]))  # the reference cannot skip NaN
    ref, ref_stats = linear_ppo_policy_loss_ref(hid64, x64[1], targets, old.double(), adv.double(), mask,
                                                bias=x64[2], **opts)
    assert_close_to_ref(loss, ref, atol=2e-5, name="loss")
    assert stats.keys() == ref_stats.keys()
    for k in stats:
        r = ref_stats[k].double()
        assert_close_to_ref(stats[k].double(), r, atol=5e-5 * max(1.0, r.abs().item()), name=k)  # fp32 stats
    (loss * 2.0).backward()
    (ref * 2.0).backward()
    for name, a, r in zip(("grad_hidden", "grad_weight", "grad_bias"), x, x64):
        assert torch.isfinite(a.grad).all(), name
        assert_close_to_ref(a.grad, r.grad, atol=2e-5, name=name)


# ---------------------------------------------------------------------------- ready for a GPU
SMEM_SM90 = 227 * 1024  # the most shared memory one block may use on an H100 / H200


def test_kernels_compile_for_sm90_without_a_gpu():
    """Triton's real compiler (not the interpreter) on the GPU tile sizes: the kernels compile to a
    cubin, fit in shared memory, bf16 tiles use Hopper's tensor cores (wgmma), atomics are relaxed."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("linear_triton_aot.py"))], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {(r["kernel"], r["dtype"]): r for r in map(json.loads, p.stdout.split("\n")[:-1])}
    assert set(rows) == {(k, d) for k in ("fwd", "bwd") for d in ("bf16", "fp32")}
    for key, r in rows.items():
        assert r["cubin"] and 0 < r["shared"] <= SMEM_SM90, (key, r)
    assert rows["fwd", "bf16"]["wgmma"] > 0 and rows["bwd", "bf16"]["wgmma"] > 0
    assert rows["bwd", "bf16"]["atomics"] == ["red.global.gpu.relaxed.add.f32"]


# ---------------------------------------------------------------------------- GPU sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_real_size_against_float64(dtype):
    hidden, weight, b, targets = make_inputs((2048,), 1024, 32000, dtype, bias=True, seed=20)
    check(hidden, weight, b, targets, temperature=0.9)
    check(hidden[:300], weight, None, targets[:300], softcap=30.0, entropy=False)  # few rows: many splits


@pytest.mark.gpu
def test_gpu_matches_chunked_path_at_qwen_vocab():
    hidden, weight, _, targets = make_inputs((4096,), 2048, 151936, torch.bfloat16, seed=21)
    x, y = leaves(hidden, weight), leaves(hidden, weight)
    a = linear_token_logprobs(x[0], x[1], targets, return_entropy=True, impl="fused")
    c = linear_token_logprobs(y[0], y[1], targets, return_entropy=True, impl="chunked")
    for o, r in zip(a, c):
        assert_close_to_ref(o, r, atol=2e-2, name="fused vs chunked")
    go = torch.randn_like(a[0])
    (a[0] * go + a[1]).sum().backward()
    (c[0] * go + c[1]).sum().backward()
    for p, q, name in ((x[0], y[0], "grad_hidden"), (x[1], y[1], "grad_weight")):
        scale = q.grad.float().abs().max().item()
        assert_close_to_ref(p.grad.float(), q.grad.float(), atol=2e-2 * scale, name=name)
