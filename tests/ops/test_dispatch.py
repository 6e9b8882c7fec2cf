"""Dispatch as data: every public op takes ``backend=``, the launcher mappings say what exists,
and the precedence documented in rlhf_fast/_backend.py holds."""
import importlib
import inspect

import pytest
import torch

import rlhf_fast
from rlhf_fast import _backend

# modules by path: rlhf_fast.ops.gae / .group_advantages as attributes are the functions of that name
gae_mod = importlib.import_module("rlhf_fast.ops.gae")
ga_mod = importlib.import_module("rlhf_fast.ops.group_advantages")
kl_mod = importlib.import_module("rlhf_fast.ops.kl")
full_kl_mod = importlib.import_module("rlhf_fast.ops.full_kl")
lp_mod = importlib.import_module("rlhf_fast.ops.logprobs")
wh_mod = importlib.import_module("rlhf_fast.ops.whiten")

PUBLIC_OPS = ["token_logprobs", "kl_penalty", "full_kl", "kl_shaped_rewards", "gae", "ppo_advantages",
              "masked_whiten", "group_advantages", "ppo_policy_loss", "value_loss", "reward_model_loss", "dpo_loss"]


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_every_public_op_takes_backend_and_is_typed(name):
    sig = inspect.signature(getattr(rlhf_fast.ops, name))
    p = sig.parameters["backend"]
    assert p.default is None and p.kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.return_annotation is not inspect.Signature.empty
    assert all(q.annotation is not inspect.Parameter.empty for q in sig.parameters.values()), name


def test_launcher_mappings_are_what_select_backend_reads():
    cpu = torch.device("cpu")
    assert set(lp_mod.LAUNCHERS) == {"triton", "cpu", "cuda"}
    assert set(gae_mod.GAE_LAUNCHERS) == {"triton", "cpu", "cuda"}
    assert set(gae_mod.SHAPED_LAUNCHERS) == set(full_kl_mod.FULL_KL_LAUNCHERS) == {"triton", "cpu"}
    assert set(wh_mod.LAUNCHERS) == set(ga_mod.LAUNCHERS) == set(kl_mod.KL_PENALTY_LAUNCHERS) == {"triton", "cpu"}
    assert _backend.select_backend(cpu, lp_mod.LAUNCHERS) == "cpu"
    assert _backend.select_backend(cpu, {}) == "torch"
    assert _backend.select_backend(cpu) == "cpu"  # no mapping: what an op with every backend runs
    with pytest.raises(ValueError, match="no cuda implementation"):
        _backend.select_backend(cpu, wh_mod.LAUNCHERS, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        _backend.select_backend(cpu, lp_mod.LAUNCHERS, backend="cuda")
    with pytest.raises(ValueError, match="backend='nope'"):
        _backend.select_backend(cpu, lp_mod.LAUNCHERS, backend="nope")


def test_precedence(monkeypatch):
    cpu = torch.device("cpu")
    x64 = torch.zeros(2, dtype=torch.float64)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    assert _backend.select_backend(cpu, lp_mod.LAUNCHERS) == "triton"  # env over the default
    assert _backend.select_backend(cpu, lp_mod.LAUNCHERS, backend="cpu") == "cpu"  # argument over env
    assert _backend.select_backend(cpu, lp_mod.LAUNCHERS, backend="cpu", tensors=(x64,)) == "torch"  # fp64 first
    monkeypatch.setenv("RLHF_FAST_PUREPYTHON", "1")
    assert _backend.select_backend(cpu, lp_mod.LAUNCHERS) == "torch"  # pure-Python over env
    assert _backend.select_backend(cpu, lp_mod.LAUNCHERS, backend="triton") == "triton"  # argument over all
    monkeypatch.delenv("RLHF_FAST_PUREPYTHON")
    monkeypatch.setenv("RLHF_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND='bogus'"):
        _backend.select_backend(cpu, lp_mod.LAUNCHERS)


def test_backend_argument_reaches_the_launcher(monkeypatch):
    """backend= picks the launcher in the op's mapping (spied), on every backend it has."""
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 50), torch.randint(0, 50, (3,))
    for b in ("triton", "cpu"):
        seen = []
        fwd, bwd = lp_mod.LAUNCHERS[b]
        monkeypatch.setitem(lp_mod.LAUNCHERS, b, (lambda *a, f=fwd, b=b: seen.append(b) or f(*a), bwd))
        out = rlhf_fast.token_logprobs(logits, targets, backend=b)
        assert seen == [b]
        torch.testing.assert_close(out, rlhf_fast.token_logprobs_ref(logits, targets), atol=1e-5, rtol=1e-5)
    ref = rlhf_fast.token_logprobs(logits, targets, backend="torch")
    assert ref.grad_fn is None or "Logprobs" not in type(ref.grad_fn).__name__


def test_plain_torch_ops_accept_only_torch():
    v = torch.randn(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    rlhf_fast.value_loss(v, None, v, m, backend="torch")
    with pytest.raises(ValueError, match="no cpu implementation"):
        rlhf_fast.value_loss(v, None, v, m, backend="cpu")
    with pytest.raises(ValueError, match="no triton implementation"):
        rlhf_fast.reward_model_loss(v[0], v[1], backend="triton")
