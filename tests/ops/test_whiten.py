"""masked_whiten against a float64 Python-loop reference, on every backend."""
import pytest
import torch
from adv_loops import (
    MASK_DTYPES,
    loop_whiten,
    make_mask,
    needs,
    randn,
)
from helpers import assert_close_to_ref

from rlhf_fast import (
    masked_whiten,
    masked_whiten_ref,
)


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




# ---------------------------------------------------------------------------- fp32 cancellation / overflow
ALL_BACKENDS = ["triton", "cpu", "torch"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale,offset", [(1e20, 0.0), (1e30, 1e30), (1.0, 1e7), (1e-30, 0.0)])
def test_masked_whiten_extreme_magnitudes(backend, scale, offset):
    """Values ~1e20 used to overflow the fp32 variance (output all zeros); a large offset over a
    small spread used to cancel. Statistics are now two-pass in float64."""
    torch.manual_seed(0)
    x = (torch.randn(6, 50, dtype=torch.float64) * scale + offset).float()
    mask = make_mask(6, 50, seed=3)
    out = masked_whiten(x, mask, backend=backend)
    want = loop_whiten(x.double(), mask)
    if scale >= 1:  # (var ~ 1e-60 << eps: the right answer is ~0 there)
        assert out.abs().max() > 0.5, "whitened output collapsed to 0"
    assert_close_to_ref(out, want, atol=1e-4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_eps0_constant_input_is_zero_not_nan(backend, shift_mean):
    x = torch.full((3, 7), 2.5)
    mask = make_mask(3, 7, seed=4)
    out = masked_whiten(x, mask, eps=0.0, shift_mean=shift_mean, backend=backend)
    want = torch.where(mask, torch.tensor(0.0 if shift_mean else 2.5), torch.tensor(0.0))
    assert torch.equal(out, want), out
