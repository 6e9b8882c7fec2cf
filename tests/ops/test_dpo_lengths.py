"""dpo_loss's length-normalised variant (chosen_lengths / rejected_lengths) against float64."""
import pytest
import torch
from helpers import assert_close_to_ref

from rlhf_fast.ops import dpo_loss


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_length_normalised_dpo(loss_type):
    torch.manual_seed(3)
    pc, pr, rc, rr = (torch.randn(7) * 4 - 15 for _ in range(4))
    lc, lr = torch.randint(1, 9, (7,)), torch.randint(1, 9, (7,))
    beta = 0.2
    pcg, prg = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    loss, cr, _ = dpo_loss(pcg, prg, rc, rr, beta=beta, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    pc64, pr64 = pc.double().requires_grad_(), pr.double().requires_grad_()
    h = (pc64 - rc.double()) / lc.double() - (pr64 - rr.double()) / lr.double()
    want = (-torch.nn.functional.logsigmoid(beta * h)).mean() if loss_type == "sigmoid" else \
        ((h - 1 / (2 * beta)) ** 2).mean()
    (loss * 1.7).backward()
    (want * 1.7).backward()
    assert abs(float(loss) - float(want)) < 1e-5 * max(1.0, abs(float(want)))
    assert_close_to_ref(pcg.grad, pc64.grad, atol=1e-6, name="chosen grad")
    assert_close_to_ref(prg.grad, pr64.grad, atol=1e-6, name="rejected grad")
    assert torch.allclose(cr.double(), beta * (pc.double() - rc.double()), atol=1e-5)  # rewards unnormalised
    # equal lengths of 1 are the plain loss
    ones = torch.ones(7)
    a = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, chosen_lengths=ones, rejected_lengths=ones)[0]
    assert float(a) == float(dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)[0])


def test_length_bad_input():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="together"):
        dpo_loss(x, x, x, x, chosen_lengths=torch.ones(4))
    with pytest.raises(ValueError, match="rejected_lengths"):
        dpo_loss(x, x, x, x, chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(3))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, chosen_lengths=torch.zeros(4), rejected_lengths=torch.ones(4))
    with pytest.raises(TypeError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, chosen_lengths=[1, 1, 1, 1], rejected_lengths=torch.ones(4))
