"""Clipped PPO / GRPO policy loss straight from logits.

``ppo_policy_loss(logits, targets, old_logprobs, advantages, mask)`` computes what
``ppo_policy_loss_ref`` computes (log_softmax + gather + clipped surrogate + optional KL
penalty and entropy bonus, aggregated over valid tokens) without anything of size N * V
except grad_logits (and not even that with ``inplace_backward=True``).

How it is fused (N = B * T rows, V = vocabulary):
  forward   one streaming pass over each row of logits: the shared log-prob kernel
            (``rlhf_fast.ops.logprobs.logprobs_fwd``: online log-sum-exp, entropy only when
            needed) -> logp, lse, entropy, each (N,). Then O(N) scalar math on (B, T) tensors
            (ratio, clipping, dual clip, KL estimator, entropy bonus, aggregation weights),
            which also gives the closed-form per-token coefficients dL/dlogp and dL/dH.
  backward  one streaming pass writing grad_logits: the shared log-prob backward kernel
            (``logprobs_bwd``) with g_logp = grad_loss * dL/dlogp, g_ent = grad_loss * dL/dH:
            grad_z = g_logp * (onehot - p) - g_ent * p * (log p + H), times dz/dx of the fused
            logit transform (1 / temperature without logit_scale / softcap).
  The logits are read twice and grad_logits written once: the bandwidth floor.

The scalar part is plain torch on (B, T) tensors (a few dozen elementwise ops, no vocabulary
work and no host synchronisation); the per-token derivative is written out by hand instead of
taped, so backward is a single kernel. Gradients flow to ``logits`` only; old_logprobs,
advantages and ref_logprobs are treated as constants.

Naming chain: ``logprobs_fwd`` / ``logprobs_bwd`` (shared kernels) -> ``PolicyLossFunction`` ->
``ppo_policy_loss``; ``ppo_policy_loss_ref`` defines the semantics and is the fallback.
"""
from __future__ import annotations

import torch

from rlhf_fast import _backend
from rlhf_fast.ops._checks import (  # noqa: F401  (LOSS_AGGS, check_finite_inputs, check_loss_agg: re-exported)
    LOSS_AGGS,
    VALUE_DTYPES,
    check_estimator,
    check_finite_inputs,
    check_float,
    check_logits,
    check_loss_agg,
    check_number,
    check_positive,
    check_same_device,
    check_shape,
    check_targets,
)
from rlhf_fast.ops._common import Rows, as_rows, first_order_only
from rlhf_fast.ops.full_kl import full_kl_bwd, full_kl_fwd, full_kl_ref
from rlhf_fast.ops.kl import kl_penalty_ref
from rlhf_fast.ops.logprobs import (
    LAUNCHERS,
    can_write_inplace,
    check_first_inplace_backward,
    check_transform,
    finish_inplace,
    grad_rows,
    logit_coefs,
    logit_transform_ref,
    logprobs_bwd,
    logprobs_fwd,
)
from rlhf_fast.ops.policy_objectives import (  # noqa: F401  (aggregation_weights, policy_stats: re-exported)
    POLICY_KL_ESTIMATORS,
    aggregation_weights,
    check_objective_options,
    count_nonfinite,
    is_extended,
    objective_coefficients,
    policy_objective,
    policy_stats,
)


# ---------------------------------------------------------------------------- reference
def ppo_policy_loss_ref(logits, targets, old_logprobs, advantages, mask, *, clip_eps=0.2, clip_eps_high=None,
                        dual_clip=None, temperature=1.0, logit_scale=1.0, softcap=None, ref_logprobs=None,
                        kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0, loss_agg="token-mean", max_tokens=None,
                        compute_entropy=False, inplace_backward=False, ratio_level="token", loss_type="clip",
                        sapo_tau_pos=1.0, sapo_tau_neg=1.05, sampler_logprobs=None, correction=None,
                        correction_level="token", correction_low=None, correction_high=None, ref_logits=None):
    """Pure PyTorch definition (no input checks). Computes in fp32 (fp64 for fp64 logits).
    See ``ppo_policy_loss`` for the arguments; ``inplace_backward`` is accepted and ignored.
    The extended modes (policy_objectives.py) run ``policy_objective`` on the gathered log-probs."""
    del inplace_backward
    dtype = torch.promote_types(logits.dtype, torch.float32)
    valid = mask != 0
    # a masked row may hold anything (NaN, inf): it must not reach the loss or its gradient
    # (autograd of log_softmax would give 0 * NaN there), so it is replaced by zeros first
    z = torch.where(valid.unsqueeze(-1), logits.to(dtype), torch.zeros((), dtype=dtype, device=logits.device))
    z = logit_transform_ref(z, logit_scale, softcap)
    if temperature != 1.0:
        z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    ent = None
    if entropy_coef != 0 or compute_entropy:
        p = logp_all.exp()
        ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    o = dict(lo=1 - clip_eps, hi=1 + (clip_eps if clip_eps_high is None else clip_eps_high), dual_clip=dual_clip,
             kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg,
             max_tokens=max_tokens)
    o.update(check_objective_options(ratio_level, loss_type, dual_clip, sapo_tau_pos, sapo_tau_neg, correction,
                                     correction_level, correction_low, correction_high, kl_estimator))
    if is_extended(o, sampler_logprobs):
        kl_full = None
        if kl_estimator == "full" and ref_logits is not None:
            zr = torch.where(valid.unsqueeze(-1), ref_logits.to(dtype), torch.zeros((), dtype=dtype, device=z.device))
            zr = logit_transform_ref(zr, logit_scale, softcap)  # z is transformed already (above)
            kl_full = full_kl_ref(z, zr / temperature if temperature != 1.0 else zr)
        return policy_objective(logp, ent, old_logprobs, advantages, ref_logprobs, sampler_logprobs, kl_full, valid, o)

    zero = torch.zeros_like(logp)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(dtype)
    adv = advantages.to(dtype)
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv
    nonfinite = count_nonfinite(valid, old, adv, ref_logprobs)
    # Masked positions may hold anything (pad targets, NaN old log-probs): zero them before the math.
    logp_v = torch.where(valid, logp, zero)
    old = torch.where(valid, old, zero)
    adv = torch.where(valid, adv, zero)

    ratio = torch.exp(logp_v - old)
    hi = 1 + (clip_eps if clip_eps_high is None else clip_eps_high)
    lo = 1 - clip_eps
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, lo, hi))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    per_token = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty_ref(logp_v, torch.where(valid, ref_logprobs.to(dtype), zero), kl_estimator)
        if kl_coef != 0:
            per_token = per_token + kl_coef * kl
    if entropy_coef != 0:
        per_token = per_token - entropy_coef * torch.where(valid, ent, zero)

    w = aggregation_weights(valid, loss_agg, max_tokens, dtype)
    loss = (w * per_token).sum()
    stats = policy_stats(logp_v.detach(), old, adv, ratio.detach(), None if ent is None else ent.detach(),
                          None if kl is None else kl.detach(), (w * pg).sum(), valid, lo, hi, dual_clip, nonfinite)
    return loss, stats


# ---------------------------------------------------------------------------- fused path
def _kl_grad(d, estimator):
    """d(kl_penalty)/d(logp) for d = logp - ref_logp (matches torch autograd of kl_penalty_ref)."""
    if estimator == "k1":
        return torch.ones_like(d)
    if estimator == "abs":
        return torch.sign(d)
    if estimator == "k2":
        return d
    return -torch.expm1(-d)


def policy_terms(logp, ent, old, adv, ref, valid, o: dict):
    """The scalar (O(B * T), vocabulary-free) part of the fused policy loss on fp32 (B, T) tensors.

    logp, ent: (B, T) fp32 from the log-prob kernel (ent may be None); old, ref: (B, T) or None;
    adv: (B, T) or (B,); valid: (B, T) bool; o: the options dict ``ppo_policy_loss`` builds
    (lo, hi, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg, max_tokens; optionally the
    extended modes' keys, o["sampler"] (B, T) sampler log-probs and o["kl_full"] (B, T) exact KL).
    Returns (loss, c_lp, c_ent, stats) with c_lp = dloss/dlogp (B, T), c_ent = dloss/dH (B, T) or
    None, stats as ``policy_stats``. Reused by every op that feeds logp from its own kernel.
    The clipped token-level modes use the closed form below; the extended ones (``is_extended``)
    take the coefficients from autograd on ``policy_objective`` (policy_objectives.py)."""
    sampler, kl_full = o.get("sampler"), o.get("kl_full")
    if is_extended(o, sampler):
        return objective_coefficients(logp, ent, old, adv, ref, sampler, kl_full, valid, o)
    zero = torch.zeros_like(logp)
    old = logp if old is None else old.float()
    adv = adv.float()
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv
    nonfinite = count_nonfinite(valid, old, adv, ref)
    logp = torch.where(valid, logp, zero)
    old = torch.where(valid, old, zero)
    adv = torch.where(valid, adv, zero)

    ratio = torch.exp(logp - old)
    lo, hi = o["lo"], o["hi"]
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(lo, hi)
    pg = torch.maximum(pg1, pg2)
    # d pg / d ratio: -A where the unclipped branch wins or the ratio is inside the clip range
    g_ratio = torch.where((pg1 > pg2) | ((ratio >= lo) & (ratio <= hi)), -adv, zero)
    if o["dual_clip"] is not None:
        cap = -adv * o["dual_clip"]
        dual = (adv < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
        g_ratio = torch.where(dual, zero, g_ratio)
    per_token = pg
    c_tok = torch.where(g_ratio == 0, zero, g_ratio * ratio)  # d ratio / d logp = ratio; 0 * inf := 0
    kl = None
    if ref is not None:
        d = logp - torch.where(valid, ref.float(), zero)
        kl = kl_penalty_ref(d, zero, o["kl_estimator"])
        if o["kl_coef"] != 0:
            per_token = per_token + o["kl_coef"] * kl
            c_tok = c_tok + o["kl_coef"] * _kl_grad(d, o["kl_estimator"])
    ent_v = None
    if ent is not None:
        ent_v = torch.where(valid, ent, zero)
        if o["entropy_coef"] != 0:
            per_token = per_token - o["entropy_coef"] * ent_v

    w = aggregation_weights(valid, o["loss_agg"], o["max_tokens"])
    loss = (w * per_token).sum()
    c_lp = w * c_tok
    c_ent = -o["entropy_coef"] * w if o["entropy_coef"] != 0 else None
    stats = policy_stats(logp, old, adv, ratio, ent_v, kl, (w * pg).sum(), valid, lo, hi, o["dual_clip"], nonfinite)
    return loss, c_lp, c_ent, stats


class PolicyLossFunction(torch.autograd.Function):
    """Returns (loss, *stat values); only loss is differentiable, w.r.t. logits only."""

    @staticmethod
    def forward(ctx, logits, targets, old, adv, mask, ref, opts, backend):
        rows = as_rows(logits)
        flat_targets = targets.reshape(-1).contiguous()
        coefs = logit_coefs(opts["temperature"], opts["logit_scale"], opts["softcap"])
        with_entropy = opts["entropy_coef"] != 0 or opts["compute_entropy"]
        logp, lse, ent = logprobs_fwd(rows, flat_targets, coefs[0], with_entropy, backend, coefs[1])
        shape = logits.shape[:-1]
        loss, c_lp, c_ent, stats = policy_terms(
            logp.view(shape), None if ent is None else ent.view(shape), old, adv, ref, mask != 0, opts)
        c_lp = c_lp.reshape(-1).contiguous()
        c_ent = None if c_ent is None else c_ent.reshape(-1).contiguous()
        ctx.save_for_backward(rows.data, flat_targets, lse, ent if c_ent is not None else None, c_lp, c_ent)
        ctx.full_kl = opts.get("full_kl_grad")  # (ref rows, kl, stats, per-token weight): kl_estimator="full"
        ctx.layout = (rows.n, rows.v, *rows.layout())
        ctx.shape, ctx.coefs, ctx.backend = logits.shape, coefs, backend
        ctx.inplace = can_write_inplace(rows, opts["inplace_backward"])
        opts["stat_names"][:] = list(stats)  # hands the (static) key order back to ppo_policy_loss
        values = tuple(stats.values())
        ctx.mark_non_differentiable(*values)
        return (loss, *values)

    @staticmethod
    @first_order_only("ppo_policy_loss")
    def backward(ctx, g_loss, *unused):
        check_first_inplace_backward(ctx)
        data, targets, lse, ent, c_lp, c_ent = ctx.saved_tensors
        rows = Rows(data, *ctx.layout)
        g_loss = g_loss.float()
        g_lp = c_lp * g_loss
        g_ent = None if c_ent is None else c_ent * g_loss
        grad, g_rows = grad_rows(rows, ctx.shape, ctx.inplace)
        logprobs_bwd(rows, g_rows, targets, lse, ent, g_lp, g_ent, ctx.coefs[0], ctx.backend, ctx.coefs[1])
        if ctx.full_kl is not None:  # the exact KL's gradient, added to the same buffer in one more pass
            ref_rows, kl, stats, w_kl = ctx.full_kl
            full_kl_bwd(rows, ref_rows, g_rows, kl, stats, w_kl * g_loss, ctx.coefs[0], ctx.backend, ctx.coefs[1],
                        accumulate=True)
        if ctx.inplace:
            finish_inplace(ctx, rows)
            if grad.shape != ctx.shape:
                grad = grad.view(ctx.shape)
        return grad, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------- public
def check_policy_options(clip_eps, clip_eps_high, dual_clip, temperature, kl_coef, kl_estimator, entropy_coef,
                         loss_agg, max_tokens):
    """Validates ppo_policy_loss's options (errors name the argument); returns them normalised."""
    clip_eps = check_positive("clip_eps", clip_eps)
    if clip_eps_high is not None:
        clip_eps_high = check_positive("clip_eps_high", clip_eps_high)
    if dual_clip is not None:
        dual_clip = check_number("dual_clip", dual_clip, low=1.0)
    temperature = check_positive("temperature", temperature)
    kl_coef = check_number("kl_coef", kl_coef)
    entropy_coef = check_number("entropy_coef", entropy_coef)
    if kl_estimator not in POLICY_KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {POLICY_KL_ESTIMATORS}, got {kl_estimator!r}")
    check_loss_agg(loss_agg)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    return clip_eps, clip_eps_high, dual_clip, temperature, kl_coef, kl_estimator, entropy_coef, loss_agg, max_tokens


def ppo_policy_loss(logits: torch.Tensor, targets: torch.Tensor, old_logprobs: torch.Tensor | None,
                    advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None, dual_clip: float | None = None, temperature: float = 1.0,
                    logit_scale: float = 1.0, softcap: float | None = None,
                    ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                    entropy_coef: float = 0.0, loss_agg: str = "token-mean", max_tokens: int | None = None,
                    compute_entropy: bool = False, inplace_backward: bool = False, ratio_level: str = "token",
                    loss_type: str = "clip", sapo_tau_pos: float = 1.0, sapo_tau_neg: float = 1.05,
                    sampler_logprobs: torch.Tensor | None = None, correction: str | None = None,
                    correction_level: str = "token", correction_low: float | None = None,
                    correction_high: float | None = None, ref_logits: torch.Tensor | None = None,
                    backend: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO / GRPO policy loss from logits, fused (see the module docstring).

    Per valid token (mask != 0), in fp32, with ``A`` the advantage::

        z     = logit_transform_ref(logits.float(), logit_scale, softcap)       # scale, then softcap
        logp  = log_softmax(z / temperature, -1).gather(-1, targets[..., None])[..., 0]
        ratio = exp(logp - old_logprobs)
        pg    = max(-A * ratio, -A * ratio.clamp(1 - clip_eps, 1 + (clip_eps_high or clip_eps)))
        pg    = where(A < 0, min(pg, -A * dual_clip), pg)                      # with dual_clip
        l     = pg + kl_coef * kl_penalty(logp, ref_logprobs, kl_estimator) - entropy_coef * entropy
        loss  = (aggregation_weights(mask != 0, loss_agg, max_tokens) * l).sum()

    The other objectives (GSPO's sequence ratio, CISPO, SAPO, rollout-mismatch correction, the
    low_var_kl / k3+ / full KL) replace ratio / pg / kl as ``rlhf_fast.ops.policy_objectives`` states.

    Args:
        logits: (B, T, V) fp32 / fp16 / bf16; slices such as ``logits[:, :-1]`` are read in place.
        targets: (B, T) int32 / int64 in [0, V), also at masked positions (which are ignored).
        old_logprobs: (B, T) log-probs of the sampling policy, or None for on-policy (ratio = 1).
        advantages: (B, T) per token (PPO / GAE) or (B,) per sequence (GRPO).
        mask: (B, T) bool / int / float; tokens with mask != 0 count, the others give 0 loss and 0 grad.
        clip_eps: > 0, lower clip (and upper unless clip_eps_high). clip_eps_high: > 0, DAPO clip-higher.
        dual_clip: > 1 or None; caps the loss of negative-advantage tokens at -A * dual_clip.
        temperature: > 0, the sampler's temperature.
        logit_scale: > 0; softcap: > 0 or None: the model's final-logit transform, fused into the
            kernels as in ``token_logprobs``.
        ref_logprobs: (B, T) reference-policy log-probs; required when kl_coef != 0.
        kl_coef: weight of the per-token KL penalty; kl_estimator: "k1" | "abs" | "k2" | "k3" |
            "low_var_kl" | "k3+" (verl) | "full" (exact KL over the vocabulary from ``ref_logits``).
        entropy_coef: weight of the entropy bonus (subtracted).
        loss_agg: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm".
        max_tokens: the "-norm" aggregation's constant (default T).
        compute_entropy: also compute the entropy (for stats) when entropy_coef == 0. Otherwise
            no entropy work is done at all.
        inplace_backward: write grad_logits into the logits' storage (logits unusable afterwards);
            as in ``token_logprobs``: ignored for overlapping logits, one backward only.
        ratio_level: "token" | "sequence" (GSPO) | "sequence_token" (GSPO-token).
        loss_type: "clip" | "cispo" (IS weight clamp(ratio, 1 - clip_eps, 1 + clip_eps_high) stop-gradient
            times logp) | "sapo" (soft gate, temperatures sapo_tau_pos / sapo_tau_neg > 0).
        sampler_logprobs: (B, T) the sampler's own log-probs of the targets; alone it adds the mismatch
            stats, with ``correction`` it reweights the policy term.
        correction: None | "tis" | "mis" | "icepop"; correction_level: "token" | "sequence" (the
            sequence weight multiplies the token ratios); correction_low / correction_high: the bounds
            (defaults: tis / mis (None, 2.0), icepop (0.5, 5.0)).
        ref_logits: (B, T, V) the reference's logits, for kl_estimator="full" (inplace_backward is then
            ignored: two backward passes read the logits).
        backend: None (automatic) | "triton" | "cpu" | "cuda" | "torch"; see rlhf_fast._backend.

    Returns:
        loss: 0-d fp32 (fp64 for fp64 logits on the torch path), differentiable w.r.t. logits.
        stats: dict of 0-d tensors over valid tokens, never synchronised: pg_loss (the aggregated
            clipped term alone), clip_frac, dual_clip_frac, approx_kl (k3 of old vs current policy),
            ratio_mean, ratio_max, nonfinite_inputs (valid tokens with non-finite old_logprobs /
            advantages / ref_logprobs), plus entropy (mean) when computed and kl (mean penalty)
            when ref_logprobs is given; with sampler_logprobs also mismatch_abs_mean, mismatch_abs_max,
            is_ratio_p05 / p50 / p95, is_masked_frac (``policy_objectives.mismatch_stats``).
    Non-finite old_logprobs / advantages / ref_logprobs at valid tokens raise ValueError for CPU
    tensors; on GPU they are counted in ``stats["nonfinite_inputs"]`` (no host sync) and the loss is NaN.
    """
    V = check_logits("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(logits.shape)}")
    B, T = logits.shape[:2]
    check_targets("targets", targets, (B, T), V, logits.device)
    if old_logprobs is not None:
        check_float("old_logprobs", old_logprobs, VALUE_DTYPES)
        check_shape("old_logprobs", old_logprobs, (B, T), "the logits' (B, T)")
    check_float("advantages", advantages, VALUE_DTYPES)
    if tuple(advantages.shape) not in ((B, T), (B,)):
        raise ValueError(f"advantages must have shape ({B}, {T}) (per token) or ({B},) (per sequence), "
                         f"got {tuple(advantages.shape)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    check_shape("mask", mask, (B, T), "the logits' (B, T)")
    if ref_logprobs is not None:
        check_float("ref_logprobs", ref_logprobs, VALUE_DTYPES)
        check_shape("ref_logprobs", ref_logprobs, (B, T), "the logits' (B, T)")
    if sampler_logprobs is not None:
        check_float("sampler_logprobs", sampler_logprobs, VALUE_DTYPES)
        check_shape("sampler_logprobs", sampler_logprobs, (B, T), "the logits' (B, T)")
    if ref_logits is not None:
        check_logits("ref_logits", ref_logits)
        check_shape("ref_logits", ref_logits, tuple(logits.shape), "the logits' shape")
    check_same_device(logits=logits, targets=targets, old_logprobs=old_logprobs, advantages=advantages,
                      mask=mask, ref_logprobs=ref_logprobs, sampler_logprobs=sampler_logprobs, ref_logits=ref_logits)
    (clip_eps, clip_eps_high, dual_clip, temperature, kl_coef, kl_estimator, entropy_coef, loss_agg,
     max_tokens) = check_policy_options(clip_eps, clip_eps_high, dual_clip, temperature, kl_coef, kl_estimator,
                                        entropy_coef, loss_agg, max_tokens)
    logit_scale, softcap = check_transform(logit_scale, softcap)
    ext = check_objective_options(ratio_level, loss_type, dual_clip, sapo_tau_pos, sapo_tau_neg, correction,
                                  correction_level, correction_low, correction_high, kl_estimator)
    if kl_estimator == "full":
        if kl_coef != 0 and ref_logits is None:
            raise ValueError("ref_logits is required when kl_estimator='full' and kl_coef != 0")
    elif kl_coef != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef != 0")
    if correction is not None and sampler_logprobs is None:
        raise ValueError(f"sampler_logprobs is required when correction={correction!r}")
    check_finite_inputs(mask != 0, old_logprobs=old_logprobs, advantages=advantages, ref_logprobs=ref_logprobs,
                        sampler_logprobs=sampler_logprobs)

    opts = dict(lo=1 - clip_eps, hi=1 + (clip_eps if clip_eps_high is None else clip_eps_high), dual_clip=dual_clip,
                temperature=temperature, logit_scale=logit_scale, softcap=softcap, kl_coef=kl_coef,
                kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                loss_agg=loss_agg, max_tokens=max_tokens, compute_entropy=bool(compute_entropy),
                inplace_backward=bool(inplace_backward) and kl_estimator != "full", **ext)
    backend = _backend.select_backend(logits.device, LAUNCHERS, backend=backend)
    if backend == "torch":
        return ppo_policy_loss_ref(
            logits, targets, old_logprobs, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
            dual_clip=dual_clip, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
            ref_logprobs=ref_logprobs, kl_coef=kl_coef,
            kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg, max_tokens=max_tokens,
            compute_entropy=compute_entropy, sampler_logprobs=sampler_logprobs, ref_logits=ref_logits, **ext)
    opts["stat_names"] = []
    detach = (lambda t: None if t is None else t.detach())
    opts["sampler"] = detach(sampler_logprobs)
    if kl_estimator == "full" and ref_logits is not None:
        # the exact KL per token (full_kl's kernels): the objective sees its value; its gradient, kl_coef x the
        # aggregation weight per token, is added by PolicyLossFunction's backward into the log-prob term's
        # gradient buffer (one (N, V) buffer, not two plus their sum)
        x, y = as_rows(logits), as_rows(ref_logits.detach())
        inv_temp, cap_pre = logit_coefs(temperature, logit_scale, softcap)
        kl_tok, stats = full_kl_fwd(x, y, inv_temp, backend, cap_pre)
        opts["kl_full"] = kl_tok.view(logits.shape[:-1])
        if kl_coef != 0:
            valid = mask != 0
            w = torch.where(valid, kl_coef * aggregation_weights(valid, loss_agg, max_tokens), 0.0)
            opts["full_kl_grad"] = (y, kl_tok, stats, w.reshape(-1).contiguous())
    loss, *values = PolicyLossFunction.apply(logits, targets, detach(old_logprobs), advantages.detach(), mask,
                                             detach(ref_logprobs), opts, backend)
    return loss, dict(zip(opts["stat_names"], values))

