"""The policy-loss family beyond the clipped token-level PPO surrogate: the O(B * T) scalar math.

``policy_objective`` maps per-token log-probs (and entropies) to the loss; it is plain,
differentiable torch on (B, T) tensors. The reference (``ppo_policy_loss_ref``) runs it on
``log_softmax``-gathered log-probs; the fused op runs it on the log-prob kernel's output and
takes the per-token coefficients dL/dlogp and dL/dH that its one-pass backward kernel consumes
from ``torch.autograd.grad`` on this small graph (O(N) work, in forward). So every mode below
is defined once, and the fused gradient is the reference's by construction.

Per valid token, with ``lr = logp - old`` (0 at masked tokens) and ``A`` the advantage::

    ratio_level  "token":          r = exp(lr)
                 "sequence":       r = exp(sum_t(lr * m) / n_valid)            (GSPO, broadcast over t)
                 "sequence_token": r = exp(logp - sg(logp) + sg(sum_t(lr * m) / n_valid))  (GSPO-token)
    loss_type    "clip":   pg = max(-A r, -A clamp(r, lo, hi)); dual clip as ppo_policy_loss
                 "cispo":  pg = -sg(clamp(r, lo, hi)) * A * logp                (MiniMax-M1)
                 "sapo":   pg = -A * 4 / tau * sigmoid(tau * (r - 1)), tau = tau_pos if A > 0 else tau_neg
    correction   (with sampler_logprobs s; lw = sg(old) - s, or summed over the sequence at level "sequence")
                 "tis":    pg *= clamp(exp(lw), low, high)                       (truncated IS)
                 "mis":    pg *= where(low <= exp(lw) <= high, exp(lw), 0)       (masked IS)
                 "icepop": "mis" at token level (two-sided masking, Ring-1T defaults [0.5, 5])
    kl_estimator k1 / abs / k2 / k3 as kl_penalty; "low_var_kl": clamp(k3(clamp(d, -20, 20)), -10, 10)
                 (verl); "k3+": value of low_var_kl, gradient of k2 (verl's straight-through "+");
                 "full": the exact KL(pi || pi_ref) over the vocabulary (``full_kl``), given per token.
    l = pg + kl_coef * kl - entropy_coef * H;  loss = (aggregation_weights(m, loss_agg) * l).sum()
"""
from __future__ import annotations

import torch

from rlhf_fast.ops._checks import KL_ESTIMATOR_NAMES, check_choice, check_loss_agg, check_number, check_positive
from rlhf_fast.ops._common import masked_mean
from rlhf_fast.ops.kl import kl_estimate_ref

RATIO_LEVELS = ("token", "sequence", "sequence_token")
LOSS_TYPES = ("clip", "cispo", "sapo")
CORRECTIONS = (None, "tis", "mis", "icepop")
CORRECTION_LEVELS = ("token", "sequence")
POLICY_KL_ESTIMATORS = KL_ESTIMATOR_NAMES + ("low_var_kl", "k3+", "full")
# defaults: SAPO's temperatures (Gao et al. 2025; TRL sapo_temperature_pos / _neg), the IS caps
# (TIS / MIS: verl's rollout_is_threshold 2.0; IcePop: Ring-1T's [0.5, 5])
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05
CORRECTION_BOUNDS = {"tis": (None, 2.0), "mis": (None, 2.0), "icepop": (0.5, 5.0)}
PERCENTILES = (0.05, 0.5, 0.95)


def check_objective_options(ratio_level, loss_type, dual_clip, sapo_tau_pos, sapo_tau_neg, correction,
                            correction_level, correction_low, correction_high, kl_estimator):
    """Validates the options of the extended policy loss (errors name the argument); returns a dict
    with the correction's bounds filled in from its defaults."""
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if loss_type != "clip" and dual_clip is not None:
        raise ValueError(f"dual_clip applies to loss_type='clip' only, got loss_type={loss_type!r}")
    sapo_tau_pos = check_positive("sapo_tau_pos", sapo_tau_pos)
    sapo_tau_neg = check_positive("sapo_tau_neg", sapo_tau_neg)
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    check_choice("correction_level", correction_level, CORRECTION_LEVELS)
    if correction == "icepop" and correction_level != "token":
        raise ValueError("correction='icepop' masks tokens: correction_level must be 'token'")
    low, high = CORRECTION_BOUNDS.get(correction, (None, None))
    low = low if correction_low is None else check_number("correction_low", correction_low, low=0.0)
    high = high if correction_high is None else check_positive("correction_high", correction_high)
    if low is not None and high is not None and low > high:
        raise ValueError(f"correction_low={low} must be <= correction_high={high}")
    if kl_estimator not in POLICY_KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {POLICY_KL_ESTIMATORS}, got {kl_estimator!r}")
    return dict(ratio_level=ratio_level, loss_type=loss_type, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
                correction=correction, correction_level=correction_level, correction_low=low,
                correction_high=high)


def is_extended(o: dict, sampler) -> bool:
    """Whether the options need this module (otherwise the closed-form clipped path runs)."""
    return (o.get("ratio_level", "token") != "token" or o.get("loss_type", "clip") != "clip"
            or sampler is not None or o.get("kl_estimator") not in KL_ESTIMATOR_NAMES)


def policy_kl(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate of d = logp - ref_logp, differentiable (see the module docstring)."""
    if estimator in KL_ESTIMATOR_NAMES:
        return kl_estimate_ref(d, estimator)
    k = (-d).clamp(-20.0, 20.0)  # verl's low_var_kl on ref - logp
    low_var = (torch.exp(k) - k - 1).clamp(-10.0, 10.0)
    if estimator == "low_var_kl":
        return low_var
    if estimator == "k3+":
        k2 = 0.5 * d * d
        return k2 - k2.detach() + low_var.detach()
    raise ValueError(f"kl_estimator={estimator!r} has no per-token estimate here")


def aggregation_weights(valid: torch.Tensor, loss_agg: str = "token-mean", max_tokens: int | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) weights ``w`` with ``loss = (w * per_token_loss).sum()``, from the valid-token mask alone.

    token-mean:              valid / n_valid
    seq-mean-token-mean:     valid / n_row / n_rows_with_tokens   (mean of each row's token mean)
    seq-mean-token-sum:      valid / n_rows_with_tokens           (mean of each row's token sum)
    seq-mean-token-sum-norm: valid / (B * max_tokens)             (Dr. GRPO; max_tokens defaults to T)
    Counts are clamped to >= 1, so an all-masked batch gives weight 0, never NaN.
    """
    check_loss_agg(loss_agg)
    v = valid.to(dtype)
    if loss_agg == "token-mean":
        return v / v.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-sum-norm":
        B, T = valid.shape
        return v / (B * (T if max_tokens is None else max_tokens))
    n_row = v.sum(-1, keepdim=True)
    n_rows = (n_row > 0).sum().clamp(min=1).to(dtype)
    if loss_agg == "seq-mean-token-mean":
        return v / n_row.clamp(min=1) / n_rows
    return v / n_rows


def count_nonfinite(valid, *tensors):
    bad = torch.zeros_like(valid)
    for t in tensors:
        if t is not None:
            bad = bad | ~torch.isfinite(t)
    return (bad & valid).sum()


def policy_stats(logp, old, adv, ratio, ent, kl, pg_loss, valid, lo, hi, dual_clip, nonfinite) -> dict:
    """The stats dict of ``ppo_policy_loss`` over valid tokens (all 0-d tensors, no host sync).

    logp, old, adv, ratio: (B, T) with masked positions already zeroed; ent, kl: (B, T) or None;
    pg_loss: the aggregated clipped term; valid: (B, T) bool; lo, hi: the clip range; dual_clip:
    float or None; nonfinite: 0-d count of non-finite inputs at valid tokens."""
    with torch.no_grad():
        log_ratio = logp - old
        clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
        if dual_clip is not None:
            dual = (adv < 0) & (ratio > dual_clip)
        else:
            dual = torch.zeros_like(valid)
        stats = {
            "pg_loss": pg_loss.detach(),
            "clip_frac": masked_mean(clipped.to(ratio.dtype), valid),
            "dual_clip_frac": masked_mean(dual.to(ratio.dtype), valid),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, valid),  # k3 of pi_old || pi
            "ratio_mean": masked_mean(ratio, valid),
            # (B = 0: no element to reduce; the shape, not the data, decides: no host sync)
            "ratio_max": torch.where(valid, ratio, torch.zeros_like(ratio)).amax() if ratio.numel()
            else ratio.new_zeros(()),
            "nonfinite_inputs": nonfinite,
        }
        if ent is not None:
            stats["entropy"] = masked_mean(ent, valid)
        if kl is not None:
            stats["kl"] = masked_mean(kl, valid)
    return stats


def _row_mean(x, v, n_row):
    return (x * v).sum(-1, keepdim=True) / n_row


def policy_objective(logp, ent, old, adv, ref, sampler, kl_full, valid, o: dict):
    """The loss and stats of the extended policy loss from (B, T) tensors (module docstring).

    logp: (B, T) log-probs (differentiable); ent: (B, T) entropies or None; old, ref, sampler:
    (B, T) or None (old None: on-policy, old = sg(logp)); adv: (B, T) or (B,); kl_full: (B, T)
    exact per-token KL (kl_estimator "full") or None; valid: (B, T) bool; o: the options dict of
    ``ppo_policy_loss`` (lo, hi, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg, max_tokens,
    and the keys ``check_objective_options`` returns). Masked positions may hold anything.
    Returns (loss, stats)."""
    zero = torch.zeros_like(logp)
    adv = adv.to(logp.dtype)
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv
    nonfinite = count_nonfinite(valid, old, adv, ref, sampler)
    logp = torch.where(valid, logp, zero)
    old = logp.detach() if old is None else torch.where(valid, old.to(logp.dtype), zero)
    adv = torch.where(valid, adv, zero)
    v = valid.to(logp.dtype)
    n_row = v.sum(-1, keepdim=True).clamp(min=1)

    lr = logp - old
    level = o.get("ratio_level", "token")
    if level == "token":
        log_r = lr
    elif level == "sequence":
        log_r = _row_mean(lr, v, n_row).expand_as(lr)
    else:
        log_r = logp - logp.detach() + _row_mean(lr, v, n_row).detach()
    ratio = torch.where(valid, torch.exp(log_r), zero + 1)
    lo, hi = o["lo"], o["hi"]
    kind = o.get("loss_type", "clip")
    if kind == "clip":
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(lo, hi))
        if o["dual_clip"] is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * o["dual_clip"]), pg)
    elif kind == "cispo":
        pg = -ratio.clamp(lo, hi).detach() * adv * logp
    else:
        tau = torch.where(adv > 0, o["sapo_tau_pos"], o["sapo_tau_neg"]).to(logp.dtype)
        pg = -adv * torch.sigmoid(tau * (ratio - 1)) * (4 / tau)

    is_w = None
    if sampler is not None:
        lw = torch.where(valid, old.detach() - sampler.to(logp.dtype), zero)
        if o.get("correction_level", "token") == "sequence":
            lw = lw.sum(-1, keepdim=True).expand_as(lw)
        raw_w = torch.exp(lw)
        low, high = o.get("correction_low"), o.get("correction_high")
        corr = o.get("correction")
        if corr == "tis":
            is_w = raw_w.clamp(low, high)
        elif corr in ("mis", "icepop"):
            keep = torch.ones_like(valid)
            if low is not None:
                keep = keep & (raw_w >= low)
            if high is not None:
                keep = keep & (raw_w <= high)
            is_w = torch.where(keep, raw_w, zero)
        if is_w is not None:
            pg = pg * is_w
    per_token = pg
    kl = None
    est = o["kl_estimator"]
    if est == "full" and kl_full is not None:
        kl = torch.where(valid, kl_full.to(logp.dtype), zero)
    elif ref is not None and est != "full":
        kl = policy_kl(logp - torch.where(valid, ref.to(logp.dtype), zero), est)
    if kl is not None and o["kl_coef"] != 0:
        per_token = per_token + o["kl_coef"] * kl
    ent_v = None
    if ent is not None:
        ent_v = torch.where(valid, ent, zero)
        if o["entropy_coef"] != 0:
            per_token = per_token - o["entropy_coef"] * ent_v

    w = aggregation_weights(valid, o["loss_agg"], o["max_tokens"], logp.dtype)
    loss = (w * per_token).sum()
    stats = policy_stats(logp.detach(), old.detach(), adv, ratio.detach(), None if ent_v is None else ent_v.detach(),
                         None if kl is None else kl.detach(), (w * pg).sum(), valid, lo, hi, o["dual_clip"],
                         nonfinite)
    if sampler is not None:
        stats.update(mismatch_stats(old.detach(), sampler.to(logp.dtype), valid, raw_w, is_w))
    return loss, stats


def mismatch_stats(trainer_logp, sampler_logp, valid, raw_w, is_w) -> dict:
    """Train-vs-sampler mismatch metrics over valid tokens (0-d tensors, no host sync):
    mismatch_abs_mean / _max = |logp_train - logp_sampler|; is_ratio_p05 / p50 / p95 the
    percentiles of the raw IS weight exp(logp_train - logp_sampler) (at the correction's level);
    is_masked_frac the fraction of tokens whose weight the correction zeroed (mis / icepop) or
    truncated (tis)."""
    with torch.no_grad():
        diff = torch.where(valid, (trainer_logp - sampler_logp).abs(), torch.zeros_like(trainer_logp))
        out = {"mismatch_abs_mean": masked_mean(diff, valid),
               "mismatch_abs_max": diff.amax() if diff.numel() else diff.new_zeros(())}
        flat = torch.where(valid, raw_w, torch.full_like(raw_w, float("nan"))).reshape(-1)
        q = torch.tensor(PERCENTILES, dtype=flat.dtype, device=flat.device)
        pct = torch.nanquantile(flat, q) if flat.numel() else flat.new_zeros(len(PERCENTILES))
        pct = torch.nan_to_num(pct, nan=1.0)  # no valid token: ratio 1
        for name, p in zip(("is_ratio_p05", "is_ratio_p50", "is_ratio_p95"), pct.unbind()):
            out[name] = p
        changed = torch.zeros_like(valid) if is_w is None else (is_w != raw_w)
        out["is_masked_frac"] = masked_mean(changed.to(raw_w.dtype), valid)
    return out


def objective_coefficients(logp, ent, old, adv, ref, sampler, kl_full, valid, o: dict):
    """The fused path: (loss, c_lp, c_ent, stats) with c_lp = dloss/dlogp and c_ent = dloss/dH
    (None without an entropy bonus) from autograd on ``policy_objective``'s (B, T) graph."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        en = None
        if ent is not None:
            en = ent.detach().requires_grad_(o["entropy_coef"] != 0)
        loss, stats = policy_objective(lp, en, old, adv, ref, sampler, kl_full, valid, o)
        wrt = [lp] + ([en] if en is not None and en.requires_grad else [])
        grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    c_lp = torch.zeros_like(logp) if grads[0] is None else grads[0]
    c_ent = grads[1] if len(grads) > 1 else None
    return loss.detach(), c_lp, c_ent, stats
