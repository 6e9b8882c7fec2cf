"""KL-shaped rewards, GAE, ppo_advantages, masked_whiten and group_advantages against float64
Python-loop references (written here, element by element), on every backend."""
import math

import pytest
import torch

import rlhf_fast
from rlhf_fast import (
    gae, gae_ref, group_advantages, group_advantages_ref, kl_shaped_rewards, kl_shaped_rewards_ref, masked_whiten,
    masked_whiten_ref, ppo_advantages, ppo_advantages_ref,
)
from helpers import assert_close_to_ref

ESTIMATORS = ["k1", "abs", "k2", "k3"]


def needs(backend, *has):
    """Ops without a csrc CUDA kernel run Triton on GPU: skip the 'cuda' parametrization for them."""
    if backend not in has:
        pytest.skip(f"no {backend} implementation of this op")


# ---------------------------------------------------------------------------- float64 loops
def loop_kl(d, est):
    return {"k1": d, "abs": abs(d), "k2": 0.5 * d * d, "k3": math.expm1(-d) + d}[est]


def loop_shaped(scores, lp, rp, mask, coef, est):
    B, T = lp.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t] != 0]
        for t in valid:
            out[b, t] = -coef * loop_kl(float(lp[b, t]) - float(rp[b, t]), est)
        if valid:
            out[b, valid[-1]] += float(scores[b])
    return out


def loop_gae(r, v, mask, gamma, lam):
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_a = next_v = 0.0
        for t in reversed([t for t in range(T) if mask[b, t] != 0]):
            a = float(r[b, t]) + gamma * next_v - float(v[b, t]) + gamma * lam * next_a
            adv[b, t], ret[b, t] = a, a + float(v[b, t])
            next_a, next_v = a, float(v[b, t])
    return adv, ret


def loop_whiten(x, mask, shift_mean=True, eps=1e-8):
    vals = [float(a) for a, m in zip(x.reshape(-1).tolist(), mask.reshape(-1).tolist()) if m != 0]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    rstd = 1.0 / math.sqrt(sum((a - mean) ** 2 for a in vals) / (n - 1) + eps) if n >= 2 else 0.0
    out = [((float(a) - mean) * rstd + (0.0 if shift_mean else mean)) if m != 0 else 0.0
           for a, m in zip(x.reshape(-1).tolist(), mask.reshape(-1).tolist())]
    return torch.tensor(out, dtype=torch.float64).view(x.shape)


def loop_group(scores, G, baseline, scale, eps):
    s = [float(a) for a in scores]
    out = []
    allmean = sum(s) / len(s)
    batch_std = math.sqrt(sum((a - allmean) ** 2 for a in s) / (len(s) - 1)) if len(s) > 1 else float("nan")
    for g0 in range(0, len(s), G):
        grp = s[g0:g0 + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((a - mean) ** 2 for a in grp) / (G - 1)) if G > 1 else float("nan")
        for i, a in enumerate(grp):
            base = mean if baseline == "mean" else (sum(grp) - a) / (G - 1)
            div = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            out.append((a - base) / div)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------- inputs
def make_mask(B, T, dtype=torch.bool, device="cpu", seed=0):
    """Random holes, plus special rows: all masked, one valid token, left padding, right padding."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) > 0.3
    special = [lambda r: r.zero_(), lambda r: (r.zero_(), r.__setitem__(T // 2, True)),
               lambda r: r.__setitem__(slice(0, T // 3), False), lambda r: r.__setitem__(slice(T - T // 3, T), False)]
    for i, f in enumerate(special[:B]):
        f(m[i])
    return m.to(device=device, dtype=dtype)


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)


MASK_DTYPES = [torch.bool, torch.int64, torch.float32]


# ---------------------------------------------------------------------------- gae
@pytest.mark.parametrize("B,T,dtype,gamma,lam", [
    (6, 1, torch.float32, 1.0, 0.95), (6, 1, torch.bfloat16, 0.9, 0.0),
    (7, 37, torch.float32, 1.0, 0.95), (7, 37, torch.float16, 0.9, 0.0), (7, 37, torch.bfloat16, 0.99, 1.0),
    (5, 300, torch.float32, 0.99, 0.95), (5, 300, torch.bfloat16, 1.0, 1.0),
    (19, 45, torch.float32, 0.97, 0.9),  # C++: full 8-row groups (register transposes) + a partial one
])
def test_gae_matches_loop(backend, device, B, T, dtype, gamma, lam):
    torch.manual_seed(B * 1000 + T)
    r, v = randn(B, T, dtype=dtype, device=device), randn(B, T, dtype=dtype, device=device)
    mask = make_mask(B, T, MASK_DTYPES[T % 3], device, seed=T)
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam)
    ref_a, ref_r = loop_gae(r.cpu().double(), v.cpu().double(), mask.cpu(), gamma, lam)
    t_a, t_r = gae_ref(r, v, mask, gamma, lam)  # plain torch, fp32 math
    for name, o, ref, t in (("advantages", adv, ref_a, t_a), ("returns", ret, ref_r, t_r)):
        assert o.dtype == torch.float32 and o.shape == (B, T)
        assert_close_to_ref(o.cpu(), ref, t.cpu(), atol=1e-5, name=name)
        assert (o.cpu()[mask.cpu() == 0] == 0).all()


def test_gae_long_rows_and_many_blocks(backend, device):
    """T spanning several scan blocks (and a partial one), gamma = lam = 1 (no decay)."""
    T = 9000 if backend != "triton" or device == "cuda" else 4500
    r, v = randn(2, T, device=device), randn(2, T, device=device)
    mask = make_mask(2, T, device=device, seed=1)
    mask[1, : T // 2] = True
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    ref_a, ref_r = loop_gae(r.cpu().double(), v.cpu().double(), mask.cpu(), 1.0, 1.0)
    t_a, t_r = gae_ref(r, v, mask, 1.0, 1.0)
    scale = ref_a.abs().max().item()
    assert_close_to_ref(adv.cpu(), ref_a, t_a.cpu(), atol=1e-6 * scale, name="advantages")
    assert_close_to_ref(ret.cpu(), ref_r, t_r.cpu(), atol=1e-6 * scale, name="returns")


def test_gae_t_32768_many_rows(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("too slow in the Triton interpreter; the T-blocking is covered by the test above")
    B, T = 3, 32768
    r, v = randn(B, T, device=device), randn(B, T, device=device)
    mask = make_mask(B, T, torch.uint8, device, seed=2)
    adv, ret = gae(r, v, mask, gamma=0.999, lam=0.97)
    ref_a, ref_r = gae_ref(r.double(), v.double(), mask, 0.999, 0.97)
    t_a, _ = gae_ref(r, v, mask, 0.999, 0.97)
    assert_close_to_ref(adv.cpu(), ref_a.cpu(), t_a.cpu(), atol=1e-5, name="advantages")


def test_gae_masked_garbage_does_not_leak(backend, device):
    r, v = randn(3, 50, device=device), randn(3, 50, device=device)
    mask = make_mask(3, 50, device=device, seed=3)
    r[mask == 0] = float("nan")
    v[mask == 0] = float("inf")
    adv, ret = gae(r, v, mask, gamma=0.99, lam=0.95)
    ref_a, ref_r = loop_gae(r.cpu().double(), v.cpu().double(), mask.cpu(), 0.99, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert_close_to_ref(adv.cpu(), ref_a, atol=1e-5, name="advantages")


def test_gae_sliced_inputs(backend, device):
    full_r, full_v = randn(9, 65, device=device), randn(9, 66, device=device)
    mask = make_mask(9, 64, torch.float32, device, seed=4)
    r, v = full_r[:, 1:], full_v[:, 1:-1]  # unit stride along T, row strides 65 / 66
    adv, ret = gae(r, v, mask, gamma=0.95, lam=0.9)
    ref_a, ref_r = loop_gae(r.cpu().double(), v.cpu().double(), mask.cpu(), 0.95, 0.9)
    assert_close_to_ref(adv.cpu(), ref_a, atol=1e-5, name="advantages")
    assert_close_to_ref(ret.cpu(), ref_r, atol=1e-5, name="returns")


# ---------------------------------------------------------------------------- kl_shaped_rewards
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_kl_shaped_rewards_matches_loop(backend, device, estimator, mask_dtype):
    needs(backend, "triton", "cpu")
    B, T = 6, 41
    torch.manual_seed(5)
    s, lp, rp = randn(B, device=device), randn(B, T, device=device), randn(B, T, device=device)
    mask = make_mask(B, T, mask_dtype, device, seed=5)
    out = kl_shaped_rewards(s, lp, rp, mask, kl_coef=0.05, estimator=estimator)
    ref = loop_shaped(s.cpu().double(), lp.cpu().double(), rp.cpu().double(), mask.cpu(), 0.05, estimator)
    t = kl_shaped_rewards_ref(s, lp, rp, mask, 0.05, estimator)
    assert out.dtype == torch.float32
    assert_close_to_ref(out.cpu(), ref, t.cpu(), atol=1e-6, name="rewards")
    assert (out.cpu()[0] == 0).all()  # the all-masked row


def test_kl_shaped_rewards_last_token_across_blocks(backend, device):
    """Last valid position far from the end (right padding longer than a block)."""
    needs(backend, "triton", "cpu")
    B, T = 2, 5000
    s, lp, rp = randn(B, device=device), randn(B, T, device=device), randn(B, T, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[0, 3:10] = True
    mask[1, 100:4200] = True
    out = kl_shaped_rewards(s, lp, rp, mask, kl_coef=0.1, estimator="k3")
    ref = loop_shaped(s.cpu().double(), lp.cpu().double(), rp.cpu().double(), mask.cpu(), 0.1, "k3")
    t = kl_shaped_rewards_ref(s, lp, rp, mask, 0.1, "k3")
    assert_close_to_ref(out.cpu(), ref, t.cpu(), atol=1e-6, name="rewards")


# ---------------------------------------------------------------------------- ppo_advantages
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("B,T", [(5, 1), (6, 77), (17, 33)])
def test_ppo_advantages_is_the_composition(backend, device, whiten, B, T):
    needs(backend, "triton", "cpu")
    torch.manual_seed(B + T)
    s, lp, rp, v = (randn(B, device=device), randn(B, T, device=device), randn(B, T, device=device),
                    randn(B, T, dtype=torch.bfloat16, device=device))
    mask = make_mask(B, T, torch.int32 if whiten else torch.bool, device, seed=T)
    adv, ret, rew = ppo_advantages(s, lp, rp, v, mask, kl_coef=0.2, gamma=0.97, lam=0.9, estimator="k2", whiten=whiten)
    m = mask.cpu()
    ref_rew = loop_shaped(s.cpu().double(), lp.cpu().double(), rp.cpu().double(), m, 0.2, "k2")
    ref_adv, ref_ret = loop_gae(ref_rew, v.cpu().double(), m, 0.97, 0.9)
    if whiten:
        ref_adv = loop_whiten(ref_adv, m)
    t_adv, t_ret, t_rew = ppo_advantages_ref(s, lp, rp, v, mask, 0.2, 0.97, 0.9, "k2", whiten)
    for name, o, ref, t in (("advantages", adv, ref_adv, t_adv), ("returns", ret, ref_ret, t_ret),
                            ("rewards", rew, ref_rew, t_rew)):
        assert o.dtype == torch.float32 and o.shape == (B, T)
        assert_close_to_ref(o.cpu(), ref, t.cpu(), atol=1e-5, name=name)
        assert (o.cpu()[m == 0] == 0).all()


def test_ppo_advantages_whitening_is_over_the_whole_batch(backend, device):
    needs(backend, "triton", "cpu")
    B, T = 4, 30
    s, lp, rp, v = randn(B, device=device), randn(B, T, device=device), randn(B, T, device=device), randn(
        B, T, device=device)
    mask = make_mask(B, T, device=device, seed=6)
    adv, _, _ = ppo_advantages(s, lp, rp, v, mask, kl_coef=0.1)
    a = adv.cpu().double()[mask.cpu()]
    assert abs(a.mean().item()) < 1e-5 and abs(a.std().item() - 1.0) < 1e-5


# ---------------------------------------------------------------------------- masked_whiten
@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 5), (21000,)])  # the last spans several partial-stat chunks
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(backend, device, shape, shift_mean):
    needs(backend, "triton", "cpu")
    torch.manual_seed(len(shape))
    x = randn(*shape, device=device, scale=3.0) + 2.0
    mask = (torch.rand(shape) > 0.4).to(device=device, dtype=MASK_DTYPES[len(shape) % 3])
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    ref = loop_whiten(x.cpu().double(), mask.cpu(), shift_mean)
    t = masked_whiten_ref(x, mask, shift_mean)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_close_to_ref(out.cpu(), ref, t.cpu(), atol=1e-5, name="whitened")


@pytest.mark.parametrize("n_valid", [0, 1])
def test_masked_whiten_fewer_than_two_valid_is_safe(backend, device, n_valid):
    needs(backend, "triton", "cpu")
    x = randn(3, 8, device=device)
    mask = torch.zeros(3, 8, dtype=torch.bool, device=device)
    mask.view(-1)[:n_valid] = True
    for shift_mean in (True, False):
        out = masked_whiten(x, mask, shift_mean=shift_mean)
        expect = torch.zeros(3, 8)
        if n_valid and not shift_mean:
            expect.view(-1)[0] = x.view(-1)[0].item()
        assert torch.equal(out.cpu(), expect)


def test_masked_whiten_bf16_and_garbage_in_masked(backend, device):
    needs(backend, "triton", "cpu")
    x = randn(6, 20, dtype=torch.bfloat16, device=device)
    mask = make_mask(6, 20, device=device, seed=7)
    x[mask == 0] = float("nan")
    out = masked_whiten(x, mask)
    ref = loop_whiten(torch.where(mask, x, 0).cpu().double(), mask.cpu())
    assert_close_to_ref(out.cpu(), ref, atol=1e-5, name="whitened")


# ---------------------------------------------------------------------------- group_advantages
@pytest.mark.parametrize("G", [2, 3, 8])
@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_matches_loop(backend, device, G, baseline, scale):
    needs(backend, "triton", "cpu")
    torch.manual_seed(G)
    scores = randn(G * 5, device=device, scale=2.0)
    scores[:G] = 1.5  # a group of equal scores: std 0, advantages 0 (not NaN) thanks to eps
    out = group_advantages(scores, G, baseline=baseline, scale=scale)
    ref = loop_group(scores.cpu().double(), G, baseline, scale, 1e-6)
    t = group_advantages_ref(scores, G, baseline, scale)
    assert out.dtype == torch.float32 and out.shape == scores.shape
    assert_close_to_ref(out.cpu(), ref, t.cpu(), atol=1e-5, name="advantages")


def test_group_advantages_group_size_one_and_many_groups(backend, device):
    needs(backend, "triton", "cpu")
    scores = randn(3000, dtype=torch.bfloat16, device=device)
    assert torch.equal(group_advantages(scores, 1, scale="none").cpu(), torch.zeros(3000))
    out = group_advantages(scores, 6)
    assert_close_to_ref(out.cpu(), loop_group(scores.cpu().double(), 6, "mean", "group", 1e-6), atol=1e-4)


# ---------------------------------------------------------------------------- errors, fallback
def test_bad_input_names_the_argument():
    B, T = 2, 5
    s, x, m = torch.randn(B), torch.randn(B, T), torch.ones(B, T, dtype=torch.bool)
    with pytest.raises(ValueError, match="values"):
        gae(x, torch.randn(B, T + 1), m)
    with pytest.raises(ValueError, match="mask"):
        gae(x, x, m[:, 1:])
    with pytest.raises(TypeError, match="mask"):
        gae(x, x, [[1] * T] * B)
    with pytest.raises(ValueError, match="rewards"):
        gae(torch.randn(B * T), x, m)
    for name, kw in (("gamma", {"gamma": 1.5}), ("lam", {"lam": -0.1}), ("gamma", {"gamma": float("nan")}),
                     ("lam", {"lam": float("inf")})):
        with pytest.raises(ValueError, match=name):
            gae(x, x, m, **kw)
    with pytest.raises(ValueError, match="kl_coef"):
        kl_shaped_rewards(s, x, x, m, kl_coef=float("nan"))
    with pytest.raises(ValueError, match="estimator"):
        kl_shaped_rewards(s, x, x, m, kl_coef=0.1, estimator="k4")
    with pytest.raises(ValueError, match="scores"):
        kl_shaped_rewards(torch.randn(B + 1), x, x, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_advantages(s, x, x[:, :-1], x, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="values"):
        ppo_advantages(s, x, x, x[:1], m, kl_coef=0.1)
    with pytest.raises(ValueError, match="gamma"):
        ppo_advantages(s, x, x, x, m, kl_coef=0.1, gamma=2.0)
    with pytest.raises(ValueError, match="mask"):
        masked_whiten(x, m[:1])
    with pytest.raises(ValueError, match="eps"):
        masked_whiten(x, m, eps=-1.0)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(10), 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(10), 1, scale="group")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(10), 1, baseline="leave_one_out", scale="none")
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(torch.randn(10), 2, baseline="median")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.randn(10), 2, scale="global")
    with pytest.raises(ValueError, match="scores"):
        group_advantages(torch.randn(2, 5), 5)


def test_torch_fallback_matches(monkeypatch):
    B, T = 4, 19
    s, lp, rp, v = torch.randn(B), torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    mask = make_mask(B, T, seed=8)
    kernel = ppo_advantages(s, lp, rp, v, mask, kl_coef=0.1)
    kernel_g = group_advantages(s, 2, baseline="leave_one_out")
    monkeypatch.setenv("RLHF_FAST_PUREPYTHON", "1")
    fallback = ppo_advantages(s, lp, rp, v, mask, kl_coef=0.1)
    for a, b in zip(kernel, fallback):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel_g, group_advantages(s, 2, baseline="leave_one_out"))


def test_empty_batch(backend, device):
    needs(backend, "triton", "cpu")
    x = torch.empty(0, 7, device=device)
    m = torch.empty(0, 7, dtype=torch.bool, device=device)
    adv, ret, rew = ppo_advantages(torch.empty(0, device=device), x, x, x, m, kl_coef=0.1)
    assert adv.shape == ret.shape == rew.shape == (0, 7)
    assert group_advantages(torch.empty(0, device=device), 4).shape == (0,)
    assert masked_whiten(x, m).shape == (0, 7)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("B,T", [(1000, 1), (64, 2049), (4, 32768)])
def test_gpu_gae_large(monkeypatch, gpu_backend, B, T):
    if gpu_backend == "cuda" and rlhf_fast._backend.cuda_library() is None:
        pytest.skip("CUDA kernels not built (RLHF_FAST_BUILD_CUDA=1)")
    monkeypatch.setenv("RLHF_FAST_BACKEND", gpu_backend)
    r, v = randn(B, T, device="cuda"), randn(B, T, dtype=torch.bfloat16, device="cuda")
    mask = make_mask(B, T, torch.bool, "cuda", seed=9)
    adv, ret = gae(r, v, mask, gamma=0.99, lam=0.95)
    ref_a, ref_r = gae_ref(r.double(), v.double(), mask, 0.99, 0.95)
    t_a, t_r = gae_ref(r, v, mask, 0.99, 0.95)
    assert_close_to_ref(adv, ref_a, t_a, atol=1e-5, name="advantages")
    assert_close_to_ref(ret, ref_r, t_r, atol=1e-5, name="returns")


@pytest.mark.gpu
def test_gpu_ppo_advantages_large(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    B, T = 256, 3000
    s, lp, rp, v = (randn(B, device="cuda"), randn(B, T, device="cuda"), randn(B, T, device="cuda"),
                    randn(B, T, device="cuda"))
    mask = make_mask(B, T, torch.bool, "cuda", seed=10)
    out = ppo_advantages(s, lp, rp, v, mask, kl_coef=0.05, gamma=1.0, lam=0.95, estimator="k3")
    ref = ppo_advantages_ref(s.double(), lp.double(), rp.double(), v.double(), mask, 0.05, 1.0, 0.95, "k3")
    t = ppo_advantages_ref(s, lp, rp, v, mask, 0.05, 1.0, 0.95, "k3")
    for name, o, r, tt in zip(("advantages", "returns", "rewards"), out, ref, t):
        assert_close_to_ref(o, r, tt, atol=1e-5, name=name)
