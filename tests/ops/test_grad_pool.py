"""The recycled CPU gradient buffer (rlhf_fast.ops._grad_pool.grad_buffer): the default backward reuses the
memory of an earlier gradient only once no tensor uses it, so held gradients are never overwritten."""
import pytest
import torch

from rlhf_fast import full_kl, token_logprobs

N, V = 520, 8192  # 17 MiB of fp32: above the pool's 16 MiB threshold


@pytest.fixture
def cpu_backend(monkeypatch):
    pytest.importorskip("rlhf_fast._C", reason="the C++ extension is not built")
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cpu")
    monkeypatch.delenv("RLHF_FAST_GRAD_POOL", raising=False)


def _grad(x, t, g):
    x = x.detach().requires_grad_()
    return torch.autograd.grad((token_logprobs(x, t) * g).sum(), x)[0]


def test_held_gradient_is_not_overwritten_and_released_memory_is_reused(cpu_backend):
    torch.manual_seed(0)
    x, t, g = torch.randn(N, V), torch.randint(0, V, (N,)), torch.randn(N)
    x2 = torch.randn(N, V)
    x64 = x.double().requires_grad_()
    (torch.log_softmax(x64, -1)[torch.arange(N), t] * g.double()).sum().backward()
    g1 = _grad(x, t, g)
    keep = g1.clone()
    g2 = _grad(x2, t, g)  # g1 still alive: must get other memory
    assert g2.data_ptr() != g1.data_ptr()
    assert torch.equal(g1, keep)
    assert (g1.double() - x64.grad).abs().max() < 1e-5
    p2 = g2.data_ptr()
    del g2, g1
    g3 = _grad(x, t, g)  # released: the same memory again, with the right values
    assert g3.data_ptr() == p2 and torch.equal(g3, keep)
    view = g3[5:]
    del g3
    g4 = _grad(x2, t, g)  # a view keeps the memory busy
    assert g4.data_ptr() != view.data_ptr() - 5 * V * 4 and torch.equal(view, keep[5:])


def test_pool_off_and_full_kl(cpu_backend, monkeypatch):
    torch.manual_seed(1)
    x, y, g = torch.randn(N, V), torch.randn(N, V), torch.randn(N)
    xg = x.clone().requires_grad_()
    a = torch.autograd.grad((full_kl(xg, y) * g).sum(), xg)[0]
    monkeypatch.setenv("RLHF_FAST_GRAD_POOL", "0")
    b = torch.autograd.grad((full_kl(xg, y) * g).sum(), xg)[0]
    assert torch.equal(a, b)
