"""group_advantages against a float64 Python-loop reference, on every backend."""
import pytest
import torch
from adv_loops import (
    loop_group,
    needs,
    randn,
)
from helpers import assert_close_to_ref

from rlhf_fast import (
    group_advantages,
    group_advantages_ref,
)


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




ALL_BACKENDS = ["triton", "cpu", "torch"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_large_offset_small_spread(backend, baseline, scale):
    """Scores ~1e9 with spread 100: the fp32 group mean used to cancel (shifted statistics now)."""
    torch.manual_seed(0)
    scores = (1e9 + 100 * torch.randn(24, dtype=torch.float64)).float()
    out = group_advantages(scores, 4, baseline=baseline, scale=scale, backend=backend)
    want = loop_group(scores.double(), 4, baseline, scale, 1e-6)
    assert_close_to_ref(out, want, atol=1e-4 * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_cpu_parallel_path_matches_ref_and_does_not_depend_on_threads(scale):
    """B above the C++ kernel's parallel threshold (2^15): the groups and the batch statistics run on
    several threads; the result equals the one-thread run bit for bit and the float64 reference."""
    x = torch.randn(3 * 2**15 + 8, generator=torch.Generator().manual_seed(3)) * 3 + 5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = group_advantages(x, 8, scale=scale, backend="cpu")
        torch.set_num_threads(1)
        b = group_advantages(x, 8, scale=scale, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    ref = group_advantages_ref(x.double(), 8, scale=scale)
    assert float((a.double() - ref).abs().max()) < 1e-5
