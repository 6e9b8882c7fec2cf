"""KL-shaped rewards, GAE and ppo_advantages against float64 Python-loop references, on every backend."""
import pytest
import torch
from adv_loops import (
    ESTIMATORS,
    MASK_DTYPES,
    loop_gae,
    loop_shaped,
    loop_whiten,
    make_mask,
    needs,
    randn,
)
from helpers import assert_close_to_ref

import rlhf_fast
from rlhf_fast import (
    gae,
    gae_ref,
    group_advantages,
    kl_shaped_rewards,
    kl_shaped_rewards_ref,
    masked_whiten,
    ppo_advantages,
    ppo_advantages_ref,
)


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


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_ppo_advantages_whitening_of_huge_advantages(backend):
    """Scores ~1e20 give advantages ~1e20: the whitening statistics must not overflow fp32."""
    torch.manual_seed(0)
    B, T = 5, 33
    s, lp, rp, v = torch.randn(B) * 1e20, torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    mask = make_mask(B, T, seed=11)
    adv, _, _ = ppo_advantages(s, lp, rp, v, mask, kl_coef=0.1, backend=backend)
    want, _, _ = ppo_advantages_ref(s.double(), lp.double(), rp.double(), v.double(), mask, 0.1)
    assert adv.abs().max() > 0.5
    assert_close_to_ref(adv, want, atol=1e-4)
