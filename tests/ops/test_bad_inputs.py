"""Bad input to every op family: each case asserts the exact error class and that the message
names the argument. ``CASES`` is the table (op family, call, error class, name in the message);
``test_bad_input_names_the_argument`` is the advantage-side test moved from tests/test_advantages.py."""
import os
import subprocess
import sys

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import gae, group_advantages, kl_shaped_rewards, masked_whiten, ppo_advantages


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



# ---------------------------------------------------------------------------- the table
B, T, V = 2, 3, 11
X = torch.randn(B, T, V)
TG = torch.randint(0, V, (B, T))
LP = -torch.rand(B, T)
M = torch.ones(B, T, dtype=torch.bool)
S = torch.randn(B)
NAN = float("nan")


def _nan_at_valid(x):
    x = x.clone()
    x[0, 0] = NAN
    return x


def _policy(**kw):
    args = dict(logits=X, targets=TG, old_logprobs=LP, advantages=torch.randn(B, T), mask=M)
    args.update(kw)
    return lambda: rf.ppo_policy_loss(**{k: args[k] for k in ("logits", "targets", "old_logprobs", "advantages",
                                                               "mask")},
                                      **{k: v for k, v in args.items() if k not in ("logits", "targets",
                                                                                    "old_logprobs", "advantages",
                                                                                    "mask")})


CASES = [
    # token_logprobs
    ("logprobs", lambda: rf.token_logprobs([[1.0]], TG), TypeError, "logits"),
    ("logprobs", lambda: rf.token_logprobs(X.long(), TG), TypeError, "logits"),
    ("logprobs", lambda: rf.token_logprobs(torch.tensor(1.0), TG), ValueError, "logits"),
    ("logprobs", lambda: rf.token_logprobs(torch.randn(B, T, 0), TG), ValueError, "logits"),
    ("logprobs", lambda: rf.token_logprobs(X, TG.float()), TypeError, "targets"),
    ("logprobs", lambda: rf.token_logprobs(X, TG.tolist()), TypeError, "targets"),
    ("logprobs", lambda: rf.token_logprobs(X, TG[:, :2]), ValueError, "targets"),
    ("logprobs", lambda: rf.token_logprobs(X, TG + V), IndexError, "targets"),
    ("logprobs", lambda: rf.token_logprobs(X, TG - V), IndexError, "targets"),
    ("logprobs", lambda: rf.token_logprobs(X, TG, temperature=0.0), ValueError, "temperature"),
    ("logprobs", lambda: rf.token_logprobs(X, TG, temperature=-1.0), ValueError, "temperature"),
    ("logprobs", lambda: rf.token_logprobs(X, TG, temperature=NAN), ValueError, "temperature"),
    ("logprobs", lambda: rf.token_logprobs(X, TG, temperature="1"), TypeError, "temperature"),
    ("logprobs", lambda: rf.token_logprobs(X, TG, backend="gpu"), ValueError, "backend"),
    ("logprobs", lambda: rf.token_logprobs(X, TG, backend="cuda"), RuntimeError, "backend"),
    # kl_penalty, full_kl
    ("kl", lambda: rf.kl_penalty(LP.tolist(), LP), TypeError, "logprobs"),
    ("kl", lambda: rf.kl_penalty(LP, LP.long()), TypeError, "ref_logprobs"),
    ("kl", lambda: rf.kl_penalty(LP, LP[:, :1]), ValueError, "ref_logprobs"),
    ("kl", lambda: rf.kl_penalty(LP, LP, "k4"), ValueError, "estimator"),
    ("kl", lambda: rf.kl_penalty(LP, LP, None), ValueError, "estimator"),
    ("kl", lambda: rf.kl_penalty(LP, LP, backend="cuda"), ValueError, "backend"),
    ("kl", lambda: rf.full_kl(X, X[..., :5]), ValueError, "ref_logits"),
    ("kl", lambda: rf.full_kl(X, X.int()), TypeError, "ref_logits"),
    ("kl", lambda: rf.full_kl(X.int(), X), TypeError, "logits"),
    ("kl", lambda: rf.full_kl(X, X, temperature=0), ValueError, "temperature"),
    ("kl", lambda: rf.full_kl(X, X, temperature=True), TypeError, "temperature"),
    # kl_shaped_rewards, gae, ppo_advantages
    ("gae", lambda: rf.kl_shaped_rewards(S, LP, LP, M, kl_coef="0.1"), TypeError, "kl_coef"),
    ("gae", lambda: rf.kl_shaped_rewards(S[:1], LP, LP, M, kl_coef=0.1), ValueError, "scores"),
    ("gae", lambda: rf.kl_shaped_rewards(S.long(), LP, LP, M, kl_coef=0.1), TypeError, "scores"),
    ("gae", lambda: rf.kl_shaped_rewards(S, LP[0], LP, M, kl_coef=0.1), ValueError, "logprobs"),
    ("gae", lambda: rf.kl_shaped_rewards(S, LP, LP, M.tolist(), kl_coef=0.1), TypeError, "mask"),
    ("gae", lambda: rf.kl_shaped_rewards(S, LP, LP, M.to(torch.complex64), kl_coef=0.1), TypeError, "mask"),
    ("gae", lambda: rf.gae(LP, LP, M, gamma=None), TypeError, "gamma"),
    ("gae", lambda: rf.gae(LP, LP, M, lam=2), ValueError, "lam"),
    ("gae", lambda: rf.gae(LP.int(), LP, M), TypeError, "rewards"),
    ("gae", lambda: rf.gae(LP, LP.int(), M), TypeError, "values"),
    ("gae", lambda: rf.ppo_advantages(S, LP, LP, LP, M, kl_coef=0.1, lam=NAN), ValueError, "lam"),
    ("gae", lambda: rf.ppo_advantages(S, LP, LP, LP, M, kl_coef=0.1, estimator="kl"), ValueError, "estimator"),
    ("gae", lambda: rf.ppo_advantages(S, LP, LP, LP.T, M, kl_coef=0.1), ValueError, "values"),
    ("gae", lambda: rf.ppo_advantages(S, LP, LP, LP, M, kl_coef=0.1, backend="cuda"), ValueError, "backend"),
    # masked_whiten
    ("whiten", lambda: rf.masked_whiten(LP.tolist(), M), TypeError, "x"),
    ("whiten", lambda: rf.masked_whiten(LP.long(), M), TypeError, "x"),
    ("whiten", lambda: rf.masked_whiten(LP, M.T), ValueError, "mask"),
    ("whiten", lambda: rf.masked_whiten(LP, M, eps=NAN), ValueError, "eps"),
    ("whiten", lambda: rf.masked_whiten(LP, M, eps="0"), TypeError, "eps"),
    # group_advantages
    ("group", lambda: rf.group_advantages(torch.randn(6), 2.0), ValueError, "group_size"),
    ("group", lambda: rf.group_advantages(torch.randn(6), True), ValueError, "group_size"),
    ("group", lambda: rf.group_advantages(torch.randn(6), 0), ValueError, "group_size"),
    ("group", lambda: rf.group_advantages(torch.randn(6).long(), 2), TypeError, "scores"),
    ("group", lambda: rf.group_advantages(torch.randn(6), 2, eps=-1e-6), ValueError, "eps"),
    ("group", lambda: rf.group_advantages(torch.randn(6), 2, baseline=None), ValueError, "baseline"),
    # ppo_policy_loss
    ("policy", _policy(logits=X[0]), ValueError, "logits"),
    ("policy", _policy(logits=X.long()), TypeError, "logits"),
    ("policy", _policy(targets=TG[:1]), ValueError, "targets"),
    ("policy", _policy(targets=TG + V), IndexError, "targets"),
    ("policy", _policy(old_logprobs=LP[:, :1]), ValueError, "old_logprobs"),
    ("policy", _policy(old_logprobs=LP.long()), TypeError, "old_logprobs"),
    ("policy", _policy(old_logprobs=_nan_at_valid(LP)), ValueError, "old_logprobs"),
    ("policy", _policy(advantages=torch.randn(B, T, 1)), ValueError, "advantages"),
    ("policy", _policy(advantages=_nan_at_valid(torch.randn(B, T))), ValueError, "advantages"),
    ("policy", _policy(advantages=[1.0, 2.0]), TypeError, "advantages"),
    ("policy", _policy(mask=M.tolist()), TypeError, "mask"),
    ("policy", _policy(mask=M[:, :1]), ValueError, "mask"),
    ("policy", _policy(kl_coef=0.1), ValueError, "ref_logprobs"),
    ("policy", _policy(ref_logprobs=LP[:1]), ValueError, "ref_logprobs"),
    ("policy", _policy(ref_logprobs=_nan_at_valid(LP)), ValueError, "ref_logprobs"),
    ("policy", _policy(clip_eps=0.0), ValueError, "clip_eps"),
    ("policy", _policy(clip_eps_high=-0.1), ValueError, "clip_eps_high"),
    ("policy", _policy(dual_clip=0.5), ValueError, "dual_clip"),
    ("policy", _policy(temperature=NAN), ValueError, "temperature"),
    ("policy", _policy(kl_coef=NAN, ref_logprobs=LP), ValueError, "kl_coef"),
    ("policy", _policy(entropy_coef=float("inf")), ValueError, "entropy_coef"),
    ("policy", _policy(kl_estimator="k5"), ValueError, "kl_estimator"),
    ("policy", _policy(loss_agg="mean"), ValueError, "loss_agg"),
    ("policy", _policy(max_tokens=0), ValueError, "max_tokens"),
    ("policy", _policy(max_tokens=2.5), ValueError, "max_tokens"),
    ("policy", _policy(backend="cpp"), ValueError, "backend"),
    # value_loss
    ("value", lambda: rf.value_loss(LP[0], None, LP[0], M[0]), ValueError, "values"),
    ("value", lambda: rf.value_loss(LP.long(), None, LP, M), TypeError, "values"),
    ("value", lambda: rf.value_loss(LP, None, LP[:1], M), ValueError, "returns"),
    ("value", lambda: rf.value_loss(LP, None, LP, M, clip_eps=0.2), ValueError, "old_values"),
    ("value", lambda: rf.value_loss(LP, LP[:1], LP, M, clip_eps=0.2), ValueError, "old_values"),
    ("value", lambda: rf.value_loss(LP, LP, LP, M, clip_eps=-1), ValueError, "clip_eps"),
    ("value", lambda: rf.value_loss(LP, None, _nan_at_valid(LP), M), ValueError, "returns"),
    ("value", lambda: rf.value_loss(LP, None, LP, M.tolist()), TypeError, "mask"),
    ("value", lambda: rf.value_loss(LP, None, LP, M, loss_agg="sum"), ValueError, "loss_agg"),
    ("value", lambda: rf.value_loss(LP, None, LP, M, backend="triton"), ValueError, "backend"),
    # reward_model_loss, dpo_loss
    ("preference", lambda: rf.reward_model_loss(S, S[:1]), ValueError, "rejected_rewards"),
    ("preference", lambda: rf.reward_model_loss(S[:0], S[:0]), ValueError, "chosen_rewards"),
    ("preference", lambda: rf.reward_model_loss(S.long(), S), TypeError, "chosen_rewards"),
    ("preference", lambda: rf.reward_model_loss(S, S, margin=torch.ones(3)), ValueError, "margin"),
    ("preference", lambda: rf.reward_model_loss(S, S, margin="1"), TypeError, "margin"),
    ("preference", lambda: rf.dpo_loss(S, S, S, S[:1]), ValueError, "ref_rejected_logps"),
    ("preference", lambda: rf.dpo_loss(S, S.long(), S, S), TypeError, "policy_rejected_logps"),
    ("preference", lambda: rf.dpo_loss(S, S, S, S, beta=0), ValueError, "beta"),
    ("preference", lambda: rf.dpo_loss(S, S, S, S, loss_type="hinge"), ValueError, "loss_type"),
    ("preference", lambda: rf.dpo_loss(S, S, S, S, label_smoothing=0.5), ValueError, "label_smoothing"),
    ("preference", lambda: rf.dpo_loss(S, S, S, S, label_smoothing="a"), TypeError, "label_smoothing"),
    # the modules validate at construction
    ("modules", lambda: rf.PPOLoss(clip_eps=-1), ValueError, "clip_eps"),
    ("modules", lambda: rf.GRPOLoss("ppo"), ValueError, "loss_type"),
    ("modules", lambda: rf.ValueLoss(loss_agg="x"), ValueError, "loss_agg"),
]


@pytest.mark.parametrize("family,call,error,name", CASES,
                         ids=[f"{c[0]}-{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_bad_input_table(family, call, error, name):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error, f"{family}: got {type(info.value).__name__}, expected {error.__name__}"
    assert name in str(info.value), f"{family}: message does not name {name!r}: {info.value}"


def test_count_of_bad_inputs():
    """The report quotes this count; keep it honest (the moved advantage-side test adds 22 more)."""
    assert len(CASES) >= 100


@pytest.mark.parametrize("op", ["token_logprobs", "ppo_policy_loss"])
def test_checks_off_keeps_the_cpu_bounds_check(op):
    """RLHF_FAST_CHECKS=0 skips CUDA host syncs only: an out-of-range target on CPU still raises
    IndexError (it used to read out of bounds in the C++ kernel and segfault)."""
    code = f"""
import torch, rlhf_fast as rf
x = torch.randn(2, 3, 50)
t = torch.full((2, 3), 10**9)
try:
    if "{op}" == "token_logprobs":
        rf.token_logprobs(x, t, backend="cpu")
    else:
        rf.ppo_policy_loss(x, t, None, torch.randn(2, 3), torch.ones(2, 3), backend="cpu")
except IndexError as e:
    print("IndexError:", e)
"""
    env = {**os.environ, "RLHF_FAST_CHECKS": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert "IndexError: targets must lie in [0, V=50)" in out.stdout, out.stdout
