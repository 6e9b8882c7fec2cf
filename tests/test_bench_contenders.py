"""Benchmark contenders that reformulate a reference must compute the same thing: bench_gae.py's
associative-scan GAE (what torch.compile can compile at T = 1024) against gae_ref in float64."""
import importlib.util
from pathlib import Path

import pytest
import torch

from rlhf_fast import gae_ref, ppo_advantages_ref

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_gae():
    spec = importlib.util.spec_from_file_location("bench_gae_under_test", ROOT / "benchmarks" / "bench_gae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def holed_mask(B, T, seed):
    """Right padding, a row with holes, an empty row and a row with one valid position."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    mask[0] &= torch.rand(T, generator=g) > 0.3
    mask[1] = False
    mask[2] = False
    mask[2, T // 2] = True
    return mask


@pytest.mark.parametrize("B,T,gamma,lam", [(5, 1, 1.0, 0.95), (6, 37, 0.99, 0.95), (4, 64, 1.0, 1.0),
                                           (5, 50, 0.9, 0.0)])
def test_gae_scan_is_gae_ref(bench_gae, B, T, gamma, lam):
    torch.manual_seed(T)
    r, v = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    mask = holed_mask(B, T, seed=T) if B >= 3 else torch.rand(B, T) > 0.3
    adv, ret = bench_gae.gae_scan(r, v, mask, gamma, lam)
    ref_a, ref_r = gae_ref(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, ref_r, rtol=1e-12, atol=1e-12)


def test_ppo_advantages_scan_is_the_ref(bench_gae):
    B, T = 6, 40
    g = torch.Generator().manual_seed(3)
    x = lambda: torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    s, lp, rp, v = torch.randn(B, generator=g, dtype=torch.float64), x(), x(), x()
    mask = holed_mask(B, T, seed=4)
    got = bench_gae.ppo_advantages_scan(s, lp, rp, v, mask, 0.05, 1.0, 0.95)
    want = ppo_advantages_ref(s, lp, rp, v, mask, 0.05, 1.0, 0.95)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_check_close_rejects_a_wrong_contender(bench_gae):
    a = torch.zeros(3, 4)
    bench_gae.check_close("same", (a,), (a.clone(),))
    with pytest.raises(AssertionError, match="wrong: output 0 differs"):
        bench_gae.check_close("wrong", (a + 1,), (a,))
