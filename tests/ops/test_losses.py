"""value_loss, reward_model_loss, dpo_loss and the drop-in modules, against formulas in float64."""
import pytest
import torch
from helpers import assert_close_to_ref

from rlhf_fast import (
    GRPOLoss,
    PPOLoss,
    ValueLoss,
    dpo_loss,
    ppo_policy_loss,
    ppo_policy_loss_ref,
    reward_model_loss,
    value_loss,
)

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _aggregate(per_tok, mask, agg):
    m = mask.double()
    rows = m.sum(1) > 0
    if agg == "token-mean":
        return (per_tok * m).sum() / m.sum()
    if agg == "seq-mean-token-mean":
        return ((per_tok * m).sum(1)[rows] / m.sum(1)[rows]).mean()
    if agg == "seq-mean-token-sum":
        return (per_tok * m).sum(1)[rows].mean()
    return (per_tok * m).sum() / m.numel()


def _value_inputs(B=4, T=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g).to(dtype)
    old = (values.double() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    returns = torch.randn(B, T, generator=g).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False
    mask[0, 0] = True
    return values, old, returns, mask


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_loss_matches_formula(agg, clip_eps, dtype):
    values, old, returns, mask = _value_inputs(seed=hash((agg, clip_eps)) % 2**31, dtype=dtype)
    old = torch.where(mask, old, torch.full_like(old, float("nan")))  # garbage where masked
    v = values.clone().requires_grad_()
    loss, stats = value_loss(v, old, returns, mask, clip_eps=clip_eps, loss_agg=agg)
    v64 = values.double().requires_grad_()
    o64, r64 = old.double().nan_to_num(0.0), returns.double()
    err = (v64 - r64) ** 2
    if clip_eps is not None:
        err_c = (o64 + (v64 - o64).clamp(-clip_eps, clip_eps) - r64) ** 2
        err = torch.maximum(err, err_c)
    want = _aggregate(0.5 * err, mask, agg)
    (loss * 1.3).backward()
    (want * 1.3).backward()
    # fp32 math on inputs exact in every dtype; only the bf16 gradient is rounded (2^-8 relative)
    assert_close_to_ref(loss.detach(), want, atol=1e-6 * max(1.0, float(want.abs())), name="value loss")
    grad_tol = 1e-6 if dtype == torch.float32 else 2.0**-8 * float(v64.grad.abs().max())
    assert_close_to_ref(v.grad, v64.grad, atol=grad_tol, name="value grad")
    assert (v.grad[~mask] == 0).all()
    if clip_eps is not None:
        frac = (((v64 - o64).abs() > clip_eps) & (err_c > (v64 - r64) ** 2))[mask].double().mean()
        assert abs(float(stats["clip_frac"]) - float(frac)) < 1e-6
    res, ret = (r64 - v64.detach())[mask], r64[mask]
    ev = 1 - res.var(unbiased=False) / ret.var(unbiased=False)
    assert abs(float(stats["explained_variance"]) - float(ev)) < 1e-5
    assert all(t.dim() == 0 for t in stats.values())


def test_explained_variance_edge_cases():
    r = torch.ones(2, 3)
    _, s = value_loss(torch.ones(2, 3), None, r, torch.ones(2, 3))
    assert float(s["explained_variance"]) == 1.0  # perfect prediction of constant returns
    _, s = value_loss(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]), None, r, torch.ones(2, 3))
    assert float(s["explained_variance"]) == 0.0  # residuals vary, returns do not


def test_value_loss_bad_input():
    values, old, returns, mask = _value_inputs()
    with pytest.raises(ValueError, match="returns"):
        value_loss(values, old, returns[:, :-1], mask)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, old[:-1], returns, mask, clip_eps=0.2)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, None, returns, mask, clip_eps=0.2)
    with pytest.raises(ValueError, match="mask"):
        value_loss(values, old, returns, mask[:, :-1])
    with pytest.raises(ValueError, match="clip_eps"):
        value_loss(values, old, returns, mask, clip_eps=0.0)
    with pytest.raises(ValueError, match="loss_agg"):
        value_loss(values, old, returns, mask, loss_agg="sum")
    with pytest.raises(ValueError, match="values"):
        value_loss(values[0], old[0], returns[0], mask[0])
    bad = returns.clone()
    bad[mask] = float("inf")
    with pytest.raises(ValueError, match="returns"):
        value_loss(values, old, bad, mask)


@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
def test_reward_model_loss(margin):
    torch.manual_seed(1)
    c, r = torch.randn(16) * 3, torch.randn(16) * 3
    m = torch.rand(16) if margin == "tensor" else margin
    cg = c.clone().requires_grad_()
    loss, acc = reward_model_loss(cg, r, margin=m)
    c64 = c.double().requires_grad_()
    mm = 0.0 if m is None else (m.double() if isinstance(m, torch.Tensor) else m)
    want = torch.log1p(torch.exp(-(c64 - r.double() - mm))).mean()
    loss.backward()
    want.backward()
    assert abs(float(loss) - float(want)) < 1e-6
    assert_close_to_ref(cg.grad, c64.grad, atol=1e-7, name="reward grad")
    assert float(acc) == float((c > r).double().mean())
    # extreme rewards stay finite
    loss, _ = reward_model_loss(torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0]))
    assert abs(float(loss) - 100.0) < 1e-3


def test_reward_model_loss_bad_input():
    with pytest.raises(ValueError, match="rejected_rewards"):
        reward_model_loss(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="chosen_rewards"):
        reward_model_loss(torch.randn(3, 1), torch.randn(3, 1))
    with pytest.raises(ValueError, match="margin"):
        reward_model_loss(torch.randn(3), torch.randn(3), margin=torch.zeros(4))


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_loss(loss_type, ls):
    torch.manual_seed(2)
    pc, pr, rc, rr = (torch.randn(8) * 5 - 20 for _ in range(4))
    beta = 0.3
    pcg = pc.clone().requires_grad_()
    loss, cr, rjr = dpo_loss(pcg, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
    pc64 = pc.double().requires_grad_()
    h = (pc64 - rc.double()) - (pr.double() - rr.double())
    if loss_type == "sigmoid":
        want = (-(1 - ls) * torch.log(torch.sigmoid(beta * h)) - ls * torch.log(torch.sigmoid(-beta * h))).mean()
    else:
        want = ((h - 1 / (2 * beta)) ** 2).mean()
    loss.backward()
    want.backward()
    assert abs(float(loss) - float(want)) < 1e-5 * max(1.0, abs(float(want)))
    assert_close_to_ref(pcg.grad, pc64.grad, atol=1e-5 * max(1.0, float(pc64.grad.abs().max())), name="dpo grad")
    assert torch.allclose(cr.double(), beta * (pc.double() - rc.double()), atol=1e-5)
    assert torch.allclose(rjr.double(), beta * (pr.double() - rr.double()), atol=1e-5)
    assert not cr.requires_grad


def test_dpo_bad_input():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(x, x, x, torch.randn(5))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="hinge2")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)


def _policy_inputs(B=3, T=5, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] + 0.2 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    return logits, targets, old, torch.randn(B, generator=g), mask


def test_ppo_loss_module_is_the_function():
    logits, targets, old, adv, mask = _policy_inputs()
    mod = PPOLoss(clip_eps=0.1, dual_clip=3.0, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    loss, stats = mod(logits, targets, old, adv, mask)
    loss2, _ = ppo_policy_loss(logits, targets, old, adv, mask, clip_eps=0.1, dual_clip=3.0, entropy_coef=0.01,
                               loss_agg="seq-mean-token-mean")
    assert float(loss) == float(loss2) and "entropy" in stats
    with pytest.raises(ValueError, match="dual_clip"):
        PPOLoss(dual_clip=0.9)
    with pytest.raises(ValueError, match="loss_agg"):
        PPOLoss(loss_agg="nope")


@pytest.mark.parametrize("loss_type,agg", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                           ("dapo", "token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")])
def test_grpo_loss_maps_trl_loss_types(loss_type, agg):
    logits, targets, old, adv, mask = _policy_inputs(seed=3)
    ref = old - 0.1
    mod = GRPOLoss(loss_type, epsilon=0.2, epsilon_high=0.28, beta=0.04, max_completion_length=8)
    loss, _ = mod(logits, targets, old, adv, mask, ref)
    want, _ = ppo_policy_loss_ref(logits.double(), targets, old.double(), adv.double(), mask, clip_eps=0.2,
                                  clip_eps_high=0.28, kl_coef=0.04, kl_estimator="k3", ref_logprobs=ref.double(),
                                  loss_agg=agg, max_tokens=8)
    assert abs(float(loss) - float(want)) < 1e-6
    loss2, _ = mod(logits, targets, old, adv[:, None], mask, ref)  # TRL's (B, 1) also accepted
    assert float(loss2) == float(loss)
    with pytest.raises(ValueError, match="advantages"):
        mod(logits, targets, old, adv[:, None].expand(-1, 5).contiguous(), mask, ref)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLoss("vespo")


def test_value_loss_module():
    values, old, returns, mask = _value_inputs()
    mod = ValueLoss(clip_eps=0.2, loss_agg="seq-mean-token-mean")
    assert float(mod(values, old, returns, mask)[0]) == float(
        value_loss(values, old, returns, mask, clip_eps=0.2, loss_agg="seq-mean-token-mean")[0])
    with pytest.raises(ValueError, match="clip_eps"):
        ValueLoss(clip_eps=-1)
