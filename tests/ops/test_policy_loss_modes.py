"""The policy-loss family (issue 15): GSPO / GSPO-token, CISPO, SAPO, rollout-mismatch correction
(tis / mis / icepop), the low_var_kl / k3+ / full KL, each fused == float64 ``ppo_policy_loss_ref``
on every kernel backend; and == TRL 1.16's ``GRPOTrainer._compute_loss`` formulas and verl's
``core_algos.py`` formulas (written out below) on the same batch."""
import pytest
import torch
from helpers import assert_close_to_ref

from rlhf_fast import ppo_policy_loss, ppo_policy_loss_ref
from rlhf_fast.ops.full_kl import full_kl_ref

LOSS_ATOL, GRAD_ATOL, STAT_ATOL = 4e-6, 2e-6, 2e-5


def _inputs(B=3, T=7, V=67, *, per_seq=False, seed=0, drift=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    lp = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    old = (lp + drift * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    sampler = (old.double() + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B if per_seq else (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, :] = False  # a row without valid tokens
    mask[-1, 0] = True
    nan = torch.full_like(old, float("nan"))
    old, sampler = torch.where(mask, old, nan), torch.where(mask, sampler, nan)
    ref = torch.where(mask, ref, torch.full_like(ref, float("inf")))
    return dict(logits=logits, targets=targets, old=old, adv=adv, mask=mask, ref=ref, sampler=sampler)


def _d64(t):
    return None if t is None else t.double()


def _check(x, name, **kw):
    """Fused loss, grad_logits (grad_output 1.7) and stats vs float64 ref; fp32 ref as yardstick."""
    logits = x["logits"]
    a = logits.detach().clone().requires_grad_()
    a64 = logits.detach().double().requires_grad_()
    at = logits.detach().clone().requires_grad_()
    ref_logits = kw.pop("ref_logits", None)
    args = (x["targets"], x["old"], x["adv"], x["mask"])
    loss, stats = ppo_policy_loss(a, *args, ref_logprobs=x["ref"], ref_logits=ref_logits, **kw)
    loss64, stats64 = ppo_policy_loss_ref(a64, x["targets"], *map(_d64, (x["old"], x["adv"])), x["mask"],
                                          ref_logprobs=_d64(x["ref"]), ref_logits=_d64(ref_logits),
                                          **{k: _d64(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    loss_t, _ = ppo_policy_loss_ref(at, *args, ref_logprobs=x["ref"], ref_logits=ref_logits, **kw)
    assert torch.isfinite(loss), f"{name}: loss {loss}"
    scale = max(1.0, abs(float(loss64.detach())))
    assert_close_to_ref(loss, loss64, loss_t, atol=LOSS_ATOL * scale, name=f"{name} loss")
    (loss * 1.7).backward()
    (loss64 * 1.7).backward()
    (loss_t * 1.7).backward()
    scale = max(1.0, float(a64.grad.abs().max()))
    assert float(a64.grad.abs().max()) > 0, f"{name}: the reference gradient is 0 (a test that cannot fail)"
    assert_close_to_ref(a.grad, a64.grad, at.grad, atol=GRAD_ATOL * scale, name=f"{name} grad_logits")
    assert (a.grad[~x["mask"]] == 0).all(), f"{name}: masked rows got a gradient"
    assert set(stats) == set(stats64), f"{name}: stats {set(stats)} != {set(stats64)}"
    for k, v in stats.items():
        tol = STAT_ATOL * max(1.0, abs(float(stats64[k])))
        if k in ("clip_frac", "dual_clip_frac", "is_masked_frac"):  # a boundary token may flip
            tol = 1.0 / int(x["mask"].sum()) + 1e-6
        assert abs(float(v) - float(stats64[k])) <= tol, f"{name}: stats[{k!r}] {float(v)} vs {float(stats64[k])}"
    return loss64, a64.grad, stats64


MODES = {
    "gspo": dict(ratio_level="sequence", per_seq=True, loss_agg="seq-mean-token-mean", clip_eps=3e-4,
                 clip_eps_high=4e-4),
    "gspo-wide": dict(ratio_level="sequence", per_seq=True, loss_agg="seq-mean-token-mean", clip_eps=0.2),
    "gspo-token": dict(ratio_level="sequence_token", loss_agg="seq-mean-token-mean", clip_eps=0.2),
    "gspo-dual": dict(ratio_level="sequence", dual_clip=2.0, clip_eps=0.05),
    "cispo": dict(loss_type="cispo", clip_eps=1.0, clip_eps_high=0.2),
    "cispo-seq": dict(loss_type="cispo", ratio_level="sequence", clip_eps=0.1, loss_agg="seq-mean-token-sum"),
    "sapo": dict(loss_type="sapo", per_seq=True, loss_agg="seq-mean-token-mean"),
    "sapo-tau": dict(loss_type="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5, loss_agg="seq-mean-token-sum-norm"),
    "tis-token": dict(correction="tis", correction_high=1.5),
    "tis-seq": dict(correction="tis", correction_level="sequence", correction_high=3.0, correction_low=0.2),
    "mis-token": dict(correction="mis", correction_low=0.7, correction_high=1.4, dual_clip=3.0),
    "mis-seq": dict(correction="mis", correction_level="sequence", correction_low=0.3, correction_high=4.0),
    "icepop": dict(correction="icepop", loss_type="sapo"),
    "sampler-stats-only": dict(kl_coef=0.1),
    "low-var-kl": dict(kl_coef=0.3, kl_estimator="low_var_kl", entropy_coef=0.01),
    "k3+": dict(kl_coef=0.3, kl_estimator="k3+", clip_eps_high=0.28),
    "gspo-tis-k3+-entropy": dict(ratio_level="sequence", correction="tis", kl_coef=0.1, kl_estimator="k3+",
                                 entropy_coef=0.02, loss_agg="seq-mean-token-sum"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_matches_float64_ref(mode, backend):
    kw = dict(MODES[mode])
    x = _inputs(per_seq=kw.pop("per_seq", False), seed=list(MODES).index(mode))
    if "correction" in kw or mode == "sampler-stats-only" or mode.startswith("gspo-tis"):
        kw["sampler_logprobs"] = x["sampler"]
    _, _, stats = _check(x, mode, **kw)
    if "sampler_logprobs" in kw:
        assert {"mismatch_abs_mean", "is_ratio_p50", "is_masked_frac"} <= set(stats)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_kl_matches_ref(backend, temperature):
    x = _inputs(seed=5)
    g = torch.Generator().manual_seed(9)
    ref_logits = x["logits"] + 0.5 * torch.randn(x["logits"].shape, generator=g)
    # masked rows of the reference never reach the loss (finite garbage: csrc/cpu/kl.cpp's full_kl backward
    # turns a NaN reference row into NaN even where the upstream gradient is 0, unlike the Triton kernel)
    ref_logits[~x["mask"]] = 1e4
    _check(x, "full", kl_coef=0.5, kl_estimator="full", ref_logits=ref_logits, temperature=temperature,
           inplace_backward=True)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_full_kl_gradient_joins_the_log_prob_gradient(backend, softcap):
    """The exact KL's gradient is added into the policy term's gradient buffer (accumulate) in the same
    backward: with the softcap too, the weights of seq-mean-token-sum, and NaN reference rows where the
    mask is off (those rows are never read, so they cannot poison the gradient)."""
    x = _inputs(seed=7)
    g = torch.Generator().manual_seed(10)
    ref_logits = x["logits"] + 0.5 * torch.randn(x["logits"].shape, generator=g)
    ref_logits[~x["mask"]] = float("nan")
    _check(x, "full", kl_coef=0.3, kl_estimator="full", ref_logits=ref_logits, softcap=softcap,
           loss_agg="seq-mean-token-sum", entropy_coef=0.01)


def test_full_kl_is_the_exact_kl():
    x = _inputs(seed=6)
    ref_logits = x["logits"] + torch.randn(x["logits"].shape)
    m = x["mask"]
    with torch.no_grad():
        _, stats = ppo_policy_loss(x["logits"], x["targets"], x["old"], x["adv"], m, kl_coef=1.0,
                                   kl_estimator="full", ref_logits=ref_logits)
        kl = full_kl_ref(x["logits"].double(), ref_logits.double())
    assert abs(float(stats["kl"]) - float(kl[m].mean())) < 1e-5


# ---------------------------------------------------------------------------- GSPO mean, not sum
def test_gspo_sequence_ratio_is_a_mean_not_a_sum():
    """Per-token log ratios of -0.01 over 56 tokens: exp(mean) = 0.990; a sum (the field bug) gives 0.57."""
    T = 56
    logits = torch.zeros(1, T, 11)
    targets = torch.zeros(1, T, dtype=torch.long)
    lp = torch.log_softmax(logits, -1)[..., 0]
    old = lp + 0.01
    _, stats = ppo_policy_loss(logits, targets, old, torch.ones(1), torch.ones(1, T, dtype=torch.bool),
                               ratio_level="sequence")
    assert abs(float(stats["ratio_mean"]) - 0.99005) < 1e-4
    assert float(stats["ratio_mean"]) > 0.9  # exp(-0.56) = 0.57 would be the sum


# ---------------------------------------------------------------------------- TRL 1.16 formulas
def _trl_loss(lp, old, adv, mask, ref, sampler, *, loss_type, level="token", eps_low=0.2, eps_high=0.2,
              delta=None, beta=0.0, tau_pos=1.0, tau_neg=1.05, is_mode=None, is_min=None, is_max=3.0):
    """trl/trainer/grpo_trainer.py (1.16) GRPOTrainer._compute_loss and the vLLM IS ratio of
    _generate_and_score_completions, on (B, T) log-probs; advantages (B,); mask float."""
    adv = adv.unsqueeze(1)
    is_ratio = None
    if is_mode is not None:  # vllm_importance_sampling_mode
        diff = torch.nan_to_num((old - sampler) * mask, nan=0.0)
        if is_mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        is_ratio = torch.exp(diff)
        if is_mode.endswith("truncate"):
            is_ratio = torch.clamp(is_ratio, min=is_min, max=is_max)
        else:
            lo = is_min if is_min is not None else -float("inf")
            hi = is_max if is_max is not None else float("inf")
            is_ratio = is_ratio.masked_fill((is_ratio < lo) | (is_ratio > hi), 0.0)
    log_ratio = lp - old
    if level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * lp
    elif loss_type == "sapo":
        temps = torch.where(adv > 0, tau_pos, tau_neg)
        per_token_loss = -(torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps) * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if is_ratio is not None:
        per_token_loss = per_token_loss * is_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # bnpo / dapo / cispo over one batch


TRL_CASES = {
    # name: (our kwargs, TRL kwargs); GRPO's seq-mean counts every row, so these batches have no empty row
    "gspo": (dict(ratio_level="sequence", loss_agg="seq-mean-token-mean", clip_eps=0.003, clip_eps_high=0.004),
             dict(loss_type="grpo", level="sequence", eps_low=0.003, eps_high=0.004)),
    "cispo": (dict(loss_type="cispo", clip_eps=1.0, clip_eps_high=0.25),
              dict(loss_type="cispo", eps_high=1.25)),
    "sapo": (dict(loss_type="sapo", loss_agg="seq-mean-token-mean"), dict(loss_type="sapo")),
    "sapo-seq": (dict(loss_type="sapo", ratio_level="sequence", loss_agg="seq-mean-token-mean",
                      sapo_tau_pos=3.0, sapo_tau_neg=2.0),
                 dict(loss_type="sapo", level="sequence", tau_pos=3.0, tau_neg=2.0)),
    "two-sided-beta": (dict(dual_clip=1.3, kl_coef=0.04, kl_estimator="k3", loss_agg="seq-mean-token-mean"),
                       dict(loss_type="grpo", delta=1.3, beta=0.04)),
    "token_truncate": (dict(correction="tis", correction_high=3.0, loss_agg="token-mean"),
                       dict(loss_type="bnpo", is_mode="token_truncate", is_max=3.0)),
    "token_mask": (dict(correction="mis", correction_low=0.5, correction_high=1.5),
                   dict(loss_type="bnpo", is_mode="token_mask", is_min=0.5, is_max=1.5)),
    "sequence_truncate": (dict(correction="tis", correction_level="sequence", correction_high=2.0),
                          dict(loss_type="bnpo", is_mode="sequence_truncate", is_max=2.0)),
    "sequence_mask": (dict(correction="mis", correction_level="sequence", correction_high=1.0),
                      dict(loss_type="bnpo", is_mode="sequence_mask", is_max=1.0)),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_matches_trl_formulas(case):
    ours, trl = TRL_CASES[case]
    x = _inputs(B=4, T=9, V=53, per_seq=True, seed=11, drift=0.05)
    x["mask"][0, :3] = True  # every row has tokens
    m = x["mask"]
    old = torch.where(m, x["old"].nan_to_num(-2.0), torch.zeros_like(x["old"]))
    sampler = torch.where(m, x["sampler"].nan_to_num(-2.1), torch.zeros_like(x["sampler"]))
    ref = torch.where(m, x["ref"].nan_to_num(-2.2, posinf=-2.2), torch.zeros_like(x["ref"]))
    a = x["logits"].double().requires_grad_()
    loss, _ = ppo_policy_loss(a.float(), x["targets"], old, x["adv"], m, ref_logprobs=ref,
                              sampler_logprobs=sampler if "correction" in ours else None, **ours)
    g_ours, = torch.autograd.grad(loss, a)
    b = x["logits"].double().requires_grad_()
    lp = torch.log_softmax(b, -1).gather(-1, x["targets"][..., None])[..., 0]
    ref_loss = _trl_loss(lp, old.double(), x["adv"].double(), m.double(), ref.double(), sampler.double(), **trl)
    g_trl, = torch.autograd.grad(ref_loss, b)
    loss, ref_loss = loss.detach(), ref_loss.detach()
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * max(1.0, abs(float(ref_loss))), (float(loss), float(ref_loss))
    assert float(g_trl.abs().max()) > 0
    assert torch.allclose(g_ours, g_trl, atol=2e-6 * max(1.0, float(g_trl.abs().max())), rtol=0), \
        float((g_ours - g_trl).abs().max())


# ---------------------------------------------------------------------------- verl formulas
def _verl_agg(loss_mat, mask, mode):
    """verl/trainer/ppo/core_algos.py agg_loss (token-mean / seq-mean-token-mean)."""
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    return ((loss_mat * mask).sum(-1) / mask.sum(-1)).mean()


def _verl_kl(lp, ref, name):
    """verl core_algos.kl_penalty: low_var_kl / k3, and the straight-through "+" suffix (k2's gradient)."""
    kl = torch.clamp(ref - lp, min=-20, max=20)
    fwd = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not name.endswith("+"):
        return fwd
    back = 0.5 * (lp - ref).square()
    return back - back.detach() + fwd.detach()


def _verl_loss(lp, old, adv, mask, ref, *, policy, clip_low=0.2, clip_high=0.2, clip_c=3.0, kl=None, kl_coef=0.0,
               agg="token-mean"):
    """verl core_algos compute_policy_loss_vanilla (dual clip c) / compute_policy_loss_gspo, + kl_loss_coef * KL."""
    nkl = lp - old
    if policy == "gspo":
        seq = (nkl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        ratio = torch.exp(torch.clamp(lp - lp.detach() + seq.detach().unsqueeze(-1), max=10.0))
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
        agg = "seq-mean-token-mean"
    else:
        ratio = torch.exp(torch.clamp(nkl, -20.0, 20.0))
        pg1 = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
        pg = torch.where(adv < 0, torch.min(-adv * clip_c, pg1), pg1)
    loss = _verl_agg(pg, mask, agg)
    if kl is not None:
        loss = loss + kl_coef * _verl_agg(_verl_kl(lp, ref, kl), mask, agg)
    return loss


VERL_CASES = {
    "gspo": (dict(ratio_level="sequence_token", loss_agg="seq-mean-token-mean", clip_eps=3e-4, clip_eps_high=4e-4),
             dict(policy="gspo", clip_low=3e-4, clip_high=4e-4)),
    "vanilla-dual-clip": (dict(dual_clip=3.0, clip_eps_high=0.28), dict(policy="vanilla", clip_high=0.28)),
    "low_var_kl": (dict(dual_clip=3.0, kl_coef=0.1, kl_estimator="low_var_kl", loss_agg="seq-mean-token-mean"),
                   dict(policy="vanilla", kl="low_var_kl", kl_coef=0.1, agg="seq-mean-token-mean")),
    "k3+": (dict(dual_clip=3.0, kl_coef=0.1, kl_estimator="k3+"), dict(policy="vanilla", kl="k3+", kl_coef=0.1)),
}


@pytest.mark.parametrize("case", list(VERL_CASES))
def test_matches_verl_formulas(case):
    ours, verl = VERL_CASES[case]
    x = _inputs(B=4, T=9, V=53, seed=12, drift=0.4)
    x["mask"][0, :3] = True  # verl's seq-mean divides by each row's count: no empty row
    m = x["mask"]
    old = torch.where(m, x["old"].nan_to_num(-2.0), torch.zeros_like(x["old"]))
    ref = torch.where(m, (x["ref"] - 3 * x["adv"]).nan_to_num(-2.2, posinf=-2.2), torch.zeros_like(x["ref"]))
    adv = torch.where(m, x["adv"], torch.zeros_like(x["adv"]))
    a = x["logits"].double().requires_grad_()
    loss, _ = ppo_policy_loss(a.float(), x["targets"], old, adv, m, ref_logprobs=ref, **ours)
    g_ours, = torch.autograd.grad(loss, a)
    b = x["logits"].double().requires_grad_()
    lp = torch.log_softmax(b, -1).gather(-1, x["targets"][..., None])[..., 0]
    ref_loss = _verl_loss(lp, old.double(), adv.double(), m.double(), ref.double(), **verl)
    g_verl, = torch.autograd.grad(ref_loss, b)
    loss, ref_loss = loss.detach(), ref_loss.detach()
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * max(1.0, abs(float(ref_loss))), (float(loss), float(ref_loss))
    assert float(g_verl.abs().max()) > 0
    assert torch.allclose(g_ours, g_verl, atol=2e-6 * max(1.0, float(g_verl.abs().max())), rtol=0), \
        float((g_ours - g_verl).abs().max())


# ---------------------------------------------------------------------------- TRL's own _compute_loss
@pytest.mark.parametrize("loss_type,level,is_mode", [
    ("cispo", "token", None), ("sapo", "token", None), ("grpo", "sequence", None), ("sapo", "sequence", None),
    ("bnpo", "token", "token_truncate"), ("grpo", "token", "sequence_mask"),
])
def test_grpo_loss_matches_trl_compute_loss(loss_type, level, is_mode):
    """rlhf_fast.GRPOLoss == TRL 1.16 GRPOTrainer._compute_loss run unmodified (tests/ops/test_trl_compat.py's
    harness), with importance_sampling_level, sapo temperatures and the vLLM IS ratio (its formula from
    _generate_and_score_completions, as _trl_loss above) fed in."""
    pytest.importorskip("trl")
    from test_trl_compat import TRLLossOnly, _batch

    import rlhf_fast

    logits, inputs = _batch(seed=3)
    eps_high = 4.0 if loss_type == "cispo" else 0.28
    opts = dict(epsilon=0.2, epsilon_high=eps_high, beta=0.04, temperature=0.9, max_completion_length=12, delta=None)
    g = torch.Generator().manual_seed(4)
    sampler = inputs["old_per_token_logps"] + 0.2 * torch.randn(inputs["old_per_token_logps"].shape, generator=g)
    mask = inputs["completion_mask"]

    def trl_loss():
        x = logits.detach().double().requires_grad_()
        trainer = TRLLossOnly(x, loss_type=loss_type, **opts)
        trainer.importance_sampling_level = level
        trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg = 1.0, 1.05
        cast = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
        if is_mode is not None:
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
            diff = (cast["old_per_token_logps"] - sampler.double()) * mask
            if is_mode.startswith("sequence"):
                diff = diff.sum(-1, keepdim=True)
            r = torch.exp(diff)
            r = r.clamp(max=3.0) if is_mode.endswith("truncate") else r.masked_fill(r > 3.0, 0.0)
            cast["importance_sampling_ratio"] = r
        loss = trainer._compute_loss(trainer.model, cast)
        loss.backward()
        return loss.detach(), x.grad

    loss64, grad64 = trl_loss()
    mode_kw = {} if is_mode is None else dict(vllm_importance_sampling_mode=is_mode)
    ours = rlhf_fast.GRPOLoss(loss_type, importance_sampling_level=level, **opts, **mode_kw)
    x = logits.detach().clone().requires_grad_()
    loss, _ = ours(x, inputs["completion_ids"], inputs["old_per_token_logps"], inputs["advantages"], mask,
                   inputs["ref_per_token_logps"], sampler_logprobs=sampler if is_mode else None)
    loss.backward()
    loss = loss.detach()
    assert abs(float(loss) - float(loss64)) <= 4e-6 * max(1.0, abs(float(loss64))), (float(loss), float(loss64))
    scale = float(grad64.abs().max())
    assert scale > 0 and float((x.grad.double() - grad64).abs().max()) <= 4e-6 * scale


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(ratio_level="seq"), "ratio_level"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(loss_type="sapo", dual_clip=3.0), "dual_clip"),
    (dict(loss_type="sapo", sapo_tau_neg=0.0), "sapo_tau_neg"),
    (dict(correction="is"), "correction"),
    (dict(correction="tis"), "sampler_logprobs"),
    (dict(correction="icepop", correction_level="sequence"), "correction_level"),
    (dict(correction="mis", correction_low=3.0, correction_high=2.0), "correction_low"),
    (dict(correction="tis", correction_high=-1.0), "correction_high"),
    (dict(kl_estimator="k4", kl_coef=0.1), "kl_estimator"),
    (dict(kl_estimator="full", kl_coef=0.1), "ref_logits"),
    (dict(kl_estimator="full", kl_coef=0.1, ref_logits=torch.zeros(3, 7, 5)), "ref_logits"),
    (dict(sampler_logprobs=torch.zeros(3, 6)), "sampler_logprobs"),
])
def test_bad_options_name_the_argument(kw, match):
    x = _inputs()
    with pytest.raises(ValueError, match=match):
        ppo_policy_loss(x["logits"], x["targets"], x["old"], x["adv"], x["mask"], **kw)


def test_nonfinite_sampler_logprobs_at_valid_tokens_raise_on_cpu():
    x = _inputs()
    s = x["sampler"].clone()
    s[x["mask"]] = s[x["mask"]].index_fill(0, torch.tensor([2]), float("nan"))
    with pytest.raises(ValueError, match="sampler_logprobs"):
        ppo_policy_loss(x["logits"], x["targets"], x["old"], x["adv"], x["mask"], sampler_logprobs=s,
                        correction="tis")


def test_default_options_keep_the_closed_form_path_and_match_the_autograd_path():
    """The clipped token-level default runs the closed-form coefficients; forcing the autograd path
    (a metrics-only sampler) gives the same loss and gradient to rounding."""
    x = _inputs(seed=21)
    kw = dict(clip_eps_high=0.28, dual_clip=2.0, kl_coef=0.1, entropy_coef=0.01)
    a, b = (x["logits"].clone().requires_grad_() for _ in range(2))
    la, _ = ppo_policy_loss(a, x["targets"], x["old"], x["adv"], x["mask"], ref_logprobs=x["ref"], **kw)
    lb, sb = ppo_policy_loss(b, x["targets"], x["old"], x["adv"], x["mask"], ref_logprobs=x["ref"],
                             sampler_logprobs=x["sampler"], **kw)
    assert "mismatch_abs_mean" in sb
    la.backward()
    lb.backward()
    assert abs(float(la.detach()) - float(lb.detach())) < 1e-6
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)
