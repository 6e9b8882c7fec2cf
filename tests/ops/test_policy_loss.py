"""ppo_policy_loss (fused) against the float64 ppo_policy_loss_ref, on every backend."""
import math

import pytest
import torch
from helpers import assert_close_to_ref

import rlhf_fast
from rlhf_fast import ppo_policy_loss, ppo_policy_loss_ref
from rlhf_fast.ops import policy_loss as pl_mod

# atol relative to the largest |reference|. The kernels keep lse = m + log(s) in fp32, so logp = z_t - lse
# and p = exp(z - lse) carry up to ~ulp(lse) ~ 1e-6 relative error for |lse| ~ 10 (torch's log_softmax,
# (z - m) - log(s), is a little tighter): ~16 fp32 ulps of the largest value. A 1e-4 relative error fails.
LOSS_ATOL = {torch.float32: 4e-6, torch.float16: 4e-6, torch.bfloat16: 4e-6}
GRAD_ATOL = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
STAT_ATOL = 2e-5


def _inputs(B, T, V, dtype, device, *, per_seq=False, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * scale).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    true_lp = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    # ratios around 1, some of them clipped
    old = (true_lp + 0.3 * torch.randn(B, T, generator=g).to(device, torch.float64)).float()
    ref = (true_lp + 0.2 * torch.randn(B, T, generator=g).to(device, torch.float64)).float()
    adv = torch.randn(B if per_seq else (B, T), generator=g).to(device)
    if not per_seq:
        adv = adv.reshape(B, T)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(device)
    mask[0, :] = False  # a row without valid tokens
    mask[-1, 0] = True
    # masked positions hold garbage the loss must ignore
    old = torch.where(mask, old, torch.full_like(old, float("nan")))
    ref = torch.where(mask, ref, torch.full_like(ref, float("inf")))
    if not per_seq:
        adv = torch.where(mask, adv, torch.full_like(adv, float("nan")))
    return logits, targets, old, adv, mask, ref


def _check(logits, targets, old, adv, mask, ref, name="", **kw):
    """Loss, grad_logits (grad_output != 1) and stats vs float64; same-dtype torch as yardstick."""
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    xt = logits.detach().clone().requires_grad_()
    d64 = (lambda t: None if t is None else t.double())
    loss, stats = ppo_policy_loss(x, targets, old, adv, mask, ref_logprobs=ref, **kw)
    loss64, stats64 = ppo_policy_loss_ref(x64, targets, d64(old), d64(adv), mask, ref_logprobs=d64(ref), **kw)
    loss_t, _ = ppo_policy_loss_ref(xt, targets, old, adv, mask, ref_logprobs=ref, **kw)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.isfinite(loss), f"{name}: loss is {loss}"
    scale = max(1.0, abs(float(loss64.detach())))
    assert_close_to_ref(loss, loss64, loss_t, atol=LOSS_ATOL[dtype] * scale, name=f"{name} loss")
    (loss * 1.7).backward()
    (loss64 * 1.7).backward()
    (loss_t * 1.7).backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    scale = max(1.0, float(x64.grad.abs().max()))
    assert_close_to_ref(x.grad, x64.grad, xt.grad, atol=GRAD_ATOL[dtype] * scale, name=f"{name} grad_logits")
    assert (x.grad[~mask.bool()] == 0).all(), f"{name}: masked rows got a gradient"
    assert set(stats) == set(stats64), f"{name}: stats keys {set(stats)} != {set(stats64)}"
    for k, v in stats.items():
        assert v.dim() == 0, f"{name}: stats[{k!r}] is not 0-d"
        tol = STAT_ATOL * max(1.0, abs(float(stats64[k])))
        if k in ("clip_frac", "dual_clip_frac"):  # a token at a clip boundary may flip between precisions
            tol = 1.0 / max(int(mask.sum()), 1) + 1e-6
        assert abs(float(v) - float(stats64[k])) <= tol, f"{name}: stats[{k!r}] {float(v)} vs {float(stats64[k])}"
    return x


CONFIGS = {
    "ppo-defaults": dict(),
    "grpo-seq-adv": dict(per_seq=True, loss_agg="seq-mean-token-mean"),
    "clip-higher": dict(clip_eps=0.2, clip_eps_high=0.28),
    "dual-clip": dict(dual_clip=1.5, clip_eps=0.1),
    "kl-k1": dict(kl_coef=0.05, kl_estimator="k1"),
    "kl-abs": dict(kl_coef=0.05, kl_estimator="abs"),
    "kl-k2": dict(kl_coef=0.05, kl_estimator="k2"),
    "kl-k3": dict(kl_coef=0.05, kl_estimator="k3", loss_agg="seq-mean-token-sum"),
    "kl-stat-only": dict(kl_coef=0.0),
    "entropy": dict(entropy_coef=0.01, loss_agg="seq-mean-token-sum"),
    "entropy-stat-only": dict(compute_entropy=True),
    "temperature-norm": dict(temperature=0.7, loss_agg="seq-mean-token-sum-norm", max_tokens=13),
    "everything": dict(per_seq=True, clip_eps_high=0.3, dual_clip=2.0, kl_coef=0.1, entropy_coef=0.02,
                       temperature=1.3, loss_agg="seq-mean-token-sum-norm"),
    "on-policy": dict(on_policy=True, kl_coef=0.03, loss_agg="seq-mean-token-mean"),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_options_match_float64(backend, device, config):
    kw = dict(CONFIGS[config])
    per_seq, on_policy = kw.pop("per_seq", False), kw.pop("on_policy", False)
    seed = hash(config) % 2**31
    logits, targets, old, adv, mask, ref = _inputs(3, 7, 1271, torch.float32, device, per_seq=per_seq, seed=seed)
    _check(logits, targets, None if on_policy else old, adv, mask, ref, name=f"{config} seed={seed}", **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", ["ppo-defaults", "everything"])
def test_dtypes_match_float64(backend, device, dtype, config):
    kw = dict(CONFIGS[config])
    per_seq = kw.pop("per_seq", False)
    seed = hash((config, str(dtype))) % 2**31
    logits, targets, old, adv, mask, ref = _inputs(4, 5, 3001, dtype, device, per_seq=per_seq, seed=seed)
    _check(logits, targets, old, adv, mask, ref, name=f"{config} {dtype} seed={seed}", **kw)


def test_extreme_logits(backend, device):
    """Large magnitudes and -inf entries (a banned token) keep everything finite."""
    logits, targets, old, adv, mask, ref = _inputs(2, 6, 517, torch.float32, device, seed=11, scale=40.0)
    logits[..., 5] = float("-inf")
    targets[targets == 5] = 6
    _check(logits, targets, old, adv, mask, ref, name="extreme", entropy_coef=0.01, kl_coef=0.1)


def test_sliced_logits_and_inplace_backward(backend, device):
    """logits[:, :-1] is read in place; inplace_backward writes grad_logits into its storage."""
    full, targets, old, adv, mask, ref = _inputs(3, 9, 640, torch.float32, device, seed=5)
    sliced = full[:, :-1]
    targets, old, adv, mask, ref = (t[:, :-1] for t in (targets, old, adv, mask, ref))
    _check(sliced, targets, old, adv, mask, ref, name="sliced", entropy_coef=0.01)

    base = full.detach().clone().requires_grad_()
    work = base * 1.0  # the storage backward may overwrite
    seen = {}
    view = work[:, :-1]
    view.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    loss, _ = ppo_policy_loss(view, targets, old, adv, mask, inplace_backward=True, entropy_coef=0.01)
    loss.backward()
    assert seen["ptr"] == view.data_ptr(), "inplace_backward allocated a new grad_logits"
    x64 = full.detach().double().requires_grad_()
    loss64, _ = ppo_policy_loss_ref(x64[:, :-1], targets, old.double(), adv.double(), mask, entropy_coef=0.01)
    loss64.backward()
    assert_close_to_ref(base.grad, x64.grad, atol=1e-6, name="inplace grad_logits")


def test_entropy_work_skipped_unless_needed(backend, device, monkeypatch):
    calls = []
    real = pl_mod.logprobs_fwd
    monkeypatch.setattr(pl_mod, "logprobs_fwd", lambda *a: calls.append(a[3]) or real(*a))
    logits, targets, old, adv, mask, _ = _inputs(2, 3, 100, torch.float32, device, seed=3)
    _, stats = ppo_policy_loss(logits, targets, old, adv, mask)
    assert calls == [False] and "entropy" not in stats
    _, stats = ppo_policy_loss(logits, targets, old, adv, mask, compute_entropy=True)
    assert calls[-1] is True and "entropy" in stats
    ppo_policy_loss(logits, targets, old, adv, mask, entropy_coef=0.1)
    assert calls[-1] is True


def test_reference_semantics_by_hand():
    """ppo_policy_loss_ref against the issue's formulas written out token by token."""
    torch.manual_seed(0)
    B, T, V = 2, 4, 5
    logits = torch.randn(B, T, V, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    logp = torch.log_softmax(logits / 0.8, -1).gather(-1, targets[..., None])[..., 0]
    old = logp + torch.tensor([[0.5, -0.5, 0.05, 1.0], [-1.0, 0.1, 0.0, -0.3]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.5, -1.0], [2.0, -0.5, 1.0, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]])
    ref = logp - 0.2
    p = torch.softmax(logits / 0.8, -1)
    ent = -(p * p.log()).sum(-1)
    eps, eps_hi, c, kc, ec = 0.2, 0.3, 1.5, 0.1, 0.01
    per_tok = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            r = math.exp(logp[b, t] - old[b, t])
            a = float(adv[b, t])
            pg = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps_hi))
            if a < 0:
                pg = min(pg, -a * c)
            d = float(logp[b, t] - ref[b, t])
            per_tok[b, t] = pg + kc * (math.exp(-d) + d - 1) - ec * float(ent[b, t])
    m = mask.double()
    expected = {
        "token-mean": (per_tok * m).sum() / m.sum(),
        "seq-mean-token-mean": ((per_tok * m).sum(1) / m.sum(1)).mean(),
        "seq-mean-token-sum": (per_tok * m).sum(1).mean(),
        "seq-mean-token-sum-norm": (per_tok * m).sum() / (B * 6),
    }
    for agg, want in expected.items():
        loss, _ = ppo_policy_loss_ref(logits, targets, old, adv, mask, clip_eps=eps, clip_eps_high=eps_hi,
                                      dual_clip=c, temperature=0.8, ref_logprobs=ref, kl_coef=kc, entropy_coef=ec,
                                      loss_agg=agg, max_tokens=6)
        assert abs(float(loss) - float(want)) < 1e-12, agg


def test_torch_backend_is_the_reference(device, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_PUREPYTHON", "1")
    logits, targets, old, adv, mask, ref = _inputs(2, 3, 50, torch.float32, device, seed=8)
    loss, stats = ppo_policy_loss(logits, targets, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    loss_r, _ = ppo_policy_loss_ref(logits, targets, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    assert loss.item() == loss_r.item() and "kl" in stats


def _base_args(device):
    logits, targets, old, adv, mask, ref = _inputs(2, 3, 20, torch.float32, device, seed=1)
    return dict(logits=logits, targets=targets, old_logprobs=old, advantages=adv, mask=mask), ref


@pytest.mark.parametrize("change,err,match", [
    (dict(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, "targets"),
    (dict(old_logprobs=torch.zeros(2, 4)), ValueError, "old_logprobs"),
    (dict(mask=torch.ones(3, 3)), ValueError, "mask"),
    (dict(advantages=torch.zeros(3)), ValueError, "advantages"),
    (dict(advantages=torch.zeros(2, 3, 1)), ValueError, "advantages"),
    (dict(logits=torch.zeros(6, 20)), ValueError, "logits"),
    (dict(ref_logprobs=torch.zeros(3, 2), kl_coef=0.1), ValueError, "ref_logprobs"),
    (dict(kl_coef=0.1), ValueError, "ref_logprobs"),
    (dict(clip_eps=0.0), ValueError, "clip_eps"),
    (dict(clip_eps=-0.1), ValueError, "clip_eps"),
    (dict(clip_eps_high=0.0), ValueError, "clip_eps_high"),
    (dict(dual_clip=1.0), ValueError, "dual_clip"),
    (dict(dual_clip=0.5), ValueError, "dual_clip"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(loss_agg="mean"), ValueError, "loss_agg"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(targets=torch.full((2, 3), 20)), IndexError, "targets"),
])
def test_bad_input(device, change, err, match):
    args, _ = _base_args(device)
    args.update(change)
    with pytest.raises(err, match=match):
        ppo_policy_loss(**args)


@pytest.mark.parametrize("name", ["old_logprobs", "advantages", "ref_logprobs"])
def test_nonfinite_inputs_reported(backend, device, name, monkeypatch):
    args, ref = _base_args(device)
    args["ref_logprobs"] = torch.where(args["mask"], ref, torch.zeros_like(ref))
    args["advantages"] = torch.where(args["mask"], args["advantages"], torch.zeros_like(ref))
    i = args["mask"].nonzero()[0].tolist()
    args[name] = args[name].clone()
    args[name][tuple(i)] = float("nan")
    with pytest.raises(ValueError, match=name):
        ppo_policy_loss(**args, kl_coef=0.1)
    monkeypatch.setenv("RLHF_FAST_CHECKS", "0")  # the GPU behaviour: counted in stats, never synchronised
    loss, stats = ppo_policy_loss(**args, kl_coef=0.1)
    assert int(stats["nonfinite_inputs"]) == 1 and not torch.isfinite(loss)


def test_all_masked_gives_zero(backend, device):
    logits, targets, old, adv, mask, ref = _inputs(2, 3, 64, torch.float32, device, seed=4)
    x = logits.clone().requires_grad_()
    for agg in pl_mod.LOSS_AGGS:
        loss, stats = ppo_policy_loss(x, targets, old, adv, torch.zeros_like(mask), loss_agg=agg)
        loss.backward()
        assert float(loss.detach()) == 0.0 and (x.grad == 0).all() and float(stats["ratio_mean"]) == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["triton", "cuda"])
def test_gpu_large_vocab(dtype, kind, monkeypatch):
    if kind == "cuda" and rlhf_fast._backend.cuda_library() is None:
        pytest.skip("csrc CUDA kernels not built (RLHF_FAST_BUILD_CUDA=1)")
    monkeypatch.setenv("RLHF_FAST_BACKEND", kind)
    kw = dict(CONFIGS["everything"])
    kw.pop("per_seq")
    logits, targets, old, adv, mask, ref = _inputs(4, 64, 151936, dtype, "cuda", per_seq=True, seed=2)
    _check(logits, targets, old, adv, mask, ref, name=f"gpu {kind} {dtype}", **kw)


@pytest.mark.parametrize("kind", ["triton", "cpu", "torch"])
def test_empty_batch_gives_zero_loss(kind):
    """B = 0 (e.g. every completion filtered out): loss 0, stats 0, an empty gradient; no error."""
    x = torch.randn(0, 3, 10, requires_grad=True)
    loss, stats = ppo_policy_loss(x, torch.zeros(0, 3, dtype=torch.long), None, torch.zeros(0, 3),
                                  torch.zeros(0, 3), compute_entropy=True, backend=kind)
    loss.backward()
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in stats.values()) and x.grad.shape == x.shape
