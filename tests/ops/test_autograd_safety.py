"""Autograd misuse never gives a silent wrong number (issue 11, items 3 and 4):
inplace_backward=True on overlapping logits falls back to a new gradient tensor; a second backward
after an in-place one, or any other node that saved the logits, raises; double backward through
the kernel ops raises "not twice differentiable" (backend='torch' supports it)."""
import pytest
import torch
from helpers import assert_close_to_ref

import rlhf_fast as rf

V = 41
KERNEL_BACKENDS = ["triton", "cpu"]


def _policy(x, t, backend, inplace):
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(t.shape, generator=g)
    adv = torch.randn(t.shape, generator=g)
    mask = torch.rand(t.shape, generator=g) > 0.2
    loss, _ = rf.ppo_policy_loss(x, t, old, adv, mask, entropy_coef=0.01, inplace_backward=inplace, backend=backend)
    return loss


def _logprobs(x, t, backend, inplace):
    logp, ent = rf.token_logprobs(x, t, return_entropy=True, inplace_backward=inplace, backend=backend)
    return (logp * 1.3).sum() + (ent * 0.7).sum()


OPS = {"token_logprobs": _logprobs, "ppo_policy_loss": _policy}


def _expanded(kind, leaf):
    if kind == "expanded":  # every row of the batch is the same storage
        return leaf.expand(3, 5, V)
    if kind == "broadcast_rows":  # stride 0 in the time dim
        return leaf[:, :1].expand(3, 5, V)
    return leaf.as_strided((3, 5, V), (V, V, 1))  # overlapping rows that are not a plain expand


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("kind", ["expanded", "broadcast_rows", "as_strided"])
def test_inplace_backward_on_overlapping_logits_is_correct(backend, op, kind):
    shape = {"expanded": (1, 5, V), "broadcast_rows": (3, 5, V), "as_strided": (3 * 5 * V,)}[kind]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g) * 2
    t = torch.randint(0, V, (3, 5), generator=g)
    leaf = base.clone().requires_grad_()
    x = _expanded(kind, leaf)
    OPS[op](x, t, backend, True).backward()
    leaf64 = base.double().requires_grad_()
    x64 = _expanded(kind, leaf64)
    if op == "ppo_policy_loss":
        gg = torch.Generator().manual_seed(3)
        old, adv = -torch.rand(t.shape, generator=gg), torch.randn(t.shape, generator=gg)
        mask = torch.rand(t.shape, generator=gg) > 0.2
        want, _ = rf.ppo_policy_loss_ref(x64, t, old.double(), adv.double(), mask, entropy_coef=0.01)
    else:
        lp, ent = rf.token_logprobs_ref(x64, t, return_entropy=True)
        want = (lp * 1.3).sum() + (ent * 0.7).sum()
    want.backward()
    assert_close_to_ref(leaf.grad, leaf64.grad, atol=1e-5 * max(1.0, float(leaf64.grad.abs().max())),
                        name=f"{op} grad through {kind} logits")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_second_backward_after_inplace_raises(backend, op):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, V, generator=g)).requires_grad_()
    t = torch.randint(0, V, (3, 5), generator=g)
    y = x * 1.0  # a non-leaf the op may overwrite
    out = OPS[op](y, t, backend, True)
    out.backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="inplace_backward=True"):
        out.backward()
    # the first gradient was right
    xt = x.detach().clone().requires_grad_()
    OPS[op](xt * 1.0, t, "torch", False).backward()
    assert_close_to_ref(first, xt.grad, atol=1e-5, name="first in-place backward")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_other_nodes_that_saved_the_logits_raise(backend):
    """exp() saves its output; the in-place gradient overwrites it: autograd must refuse, not use it."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, V, generator=g).requires_grad_()
    t = torch.randint(0, V, (3, 5), generator=g)
    x = z.exp()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _logprobs(x, t, backend, True).backward()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "full_kl", "ppo_policy_loss", "kl_penalty"])
def test_double_backward_raises(backend, op):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, V, generator=g).requires_grad_()
    t = torch.randint(0, V, (2, 3), generator=g)
    if op == "token_logprobs":
        out = rf.token_logprobs(x, t, backend=backend).sum()
    elif op == "full_kl":
        out = rf.full_kl(x, torch.randn(2, 3, V, generator=g), backend=backend).sum()
    elif op == "kl_penalty":
        x = x[..., 0]
        out = rf.kl_penalty(x, torch.randn(2, 3, generator=g), "k3", backend=backend).sum()
    else:
        out = _policy(x, t, backend, False)
    with pytest.raises(RuntimeError, match=f"{op} is not twice differentiable"):
        torch.autograd.grad(out, x, create_graph=True)
    # a plain backward still works
    (grad,) = torch.autograd.grad(out, x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("op", ["token_logprobs", "ppo_policy_loss"])
def test_double_backward_on_the_torch_backend_is_exact(op):
    """backend='torch' (the *_ref) supports Hessian-vector products: fp32 HVP vs the float64 one."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, V, generator=g)
    t = torch.randint(0, V, (2, 3), generator=g)
    v = torch.randn(2, 3, V, generator=g)
    old, adv, mask = torch.full((2, 3), -3.0), torch.randn(2, 3, generator=g), torch.ones(2, 3)

    def hvp(z, f):
        z = z.requires_grad_()
        (grad,) = torch.autograd.grad(f(z), z, create_graph=True)
        return torch.autograd.grad((grad * v.to(z.dtype)).sum(), z)[0]

    if op == "token_logprobs":
        got = hvp(x.clone(), lambda z: rf.token_logprobs(z, t, backend="torch").sum())
        want = hvp(x.double(), lambda z: rf.token_logprobs_ref(z, t).sum())
    else:
        got = hvp(x.clone(), lambda z: rf.ppo_policy_loss(z, t, old, adv, mask, entropy_coef=0.1, backend="torch")[0])
        want = hvp(x.double(), lambda z: rf.ppo_policy_loss_ref(z, t, old.double(), adv.double(), mask,
                                                               entropy_coef=0.1)[0])
    assert_close_to_ref(got, want, atol=1e-5 * max(1.0, float(want.abs().max())), name=f"{op} HVP")
