"""Scalar losses from hidden states with the gradients computed during the forward pass.

``linear_ppo_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask)`` is
``ppo_policy_loss(transform(hidden @ weight.T + bias), ...)`` and ``linear_cross_entropy`` is the
token-mean (or sum) NLL of ``linear_token_logprobs``; neither allocates anything of size N * V.

Because the output is a scalar, each (C, V) chunk is used once, as Liger's fused linear
cross-entropy does: logits chunk (GEMM), the shared log-prob kernel (``logprobs_fwd``), the
chunk's per-token coefficients dL/dlogp and dL/dH (local: the aggregation weights come from the
mask alone, so they are known before the first chunk), the shared backward kernel
(``logprobs_bwd``) writing d L / d logits in place, and the two gradient GEMMs. 6NHV FLOPs for
forward + backward, no recompute. Backward only scales the stored gradients by grad_output,
so it can run once per forward.

The per-token coefficients come from ``policy_terms`` itself, run on each chunk as one row with
the "seq-mean-token-sum" aggregation (whose weights are then exactly the valid mask), and are
multiplied by the batch's aggregation weights: the same products the logits op forms. The loss and
stats come from one ``policy_terms`` call on the (B, T) log-probs after the last chunk.

Naming chain: ``head_logits`` / ``chunk_logprobs`` / ``chunk_grad_logits`` (linear_logprobs.py) ->
``fused_head_pass`` -> ``LinearPolicyLossFunction`` / ``LinearNLLFunction`` -> public functions;
the ``*_ref`` functions materialise the logits.
"""
from __future__ import annotations

import torch

from rlhf_fast import _backend
from rlhf_fast.ops._common import check_float, check_positive, check_same_device, check_shape, check_targets
from rlhf_fast.ops.linear_logprobs import (
    Grads,
    check_head,
    chunk_grad_logits,
    chunk_logprobs,
    head_logits,
    head_logits_ref,
    linear_token_logprobs,
    make_head,
)
from rlhf_fast.ops.policy_loss import (
    aggregation_weights,
    check_finite_inputs,
    check_policy_options,
    policy_terms,
    ppo_policy_loss_ref,
)
from rlhf_fast.ops.policy_objectives import check_objective_options, is_extended, policy_objective

FLOAT_OR_64 = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------- references
def linear_ppo_policy_loss_ref(hidden, weight, targets, old_logprobs, advantages, mask, *, bias=None,
                               logit_scale=1.0, softcap=None, chunk_size=None, backend=None, impl=None,
                               **ppo_options):
    """Pure PyTorch definition: ``ppo_policy_loss_ref`` on the materialised logits (no checks)."""
    del chunk_size, backend, impl
    z = head_logits_ref(hidden, weight, bias, logit_scale, softcap)
    return ppo_policy_loss_ref(z, targets, old_logprobs, advantages, mask, **ppo_options)


def linear_cross_entropy_ref(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
                             temperature=1.0, logit_scale=1.0, softcap=None, chunk_size=None, backend=None,
                             impl=None):
    """Pure PyTorch definition: ``F.cross_entropy`` of the materialised fp32 logits / temperature."""
    del chunk_size, backend, impl
    z = head_logits_ref(hidden, weight, bias, logit_scale, softcap) / temperature
    return torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1).long(),
                                             ignore_index=ignore_index, reduction=reduction)


# ---------------------------------------------------------------------------- the one pass
def fused_head_pass(h2, weight, bias, targets, head_opts, with_ent, coef_fn, want, backend):
    """One pass over row chunks of h2 (N, H): returns (logp (N,), ent (N,) or None, Grads or None).

    coef_fn(start, stop, logp_c, ent_c) -> (g_lp_c, g_ent_c or None): the chunk's dL/dlogp, dL/dH.
    want: (grad hidden, grad weight, grad bias); with none wanted no gradient work is done."""
    n = h2.shape[0]
    grads_on = any(want)
    head = make_head(weight, bias, head_opts["logit_scale"], head_opts["softcap"], n, head_opts["chunk_size"], 1)
    coefs = head.coefs(head_opts["temperature"])
    dev = h2.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty_like(logp) if with_ent else None
    grads = Grads(h2, weight, bias, want) if grads_on else None
    size = min(head.chunk, n) * head.v
    z_buf = torch.empty(size, dtype=torch.float32, device=dev)
    for start in range(0, n, head.chunk):
        stop = min(start + head.chunk, n)
        shape = (stop - start, head.v)
        h_c = head.rows(h2, start, stop)
        z = head_logits(head, h_c, z_buf[: shape[0] * shape[1]].view(shape))
        t_c = targets[start:stop]
        lp_c, lse_c, ent_c = chunk_logprobs(z, t_c, coefs, with_ent, backend)
        logp[start:stop] = lp_c
        if with_ent:
            ent[start:stop] = ent_c
        if grads_on:
            g_lp, g_ent = coef_fn(start, stop, lp_c, ent_c)
            g = chunk_grad_logits(z, t_c, lse_c, ent_c if g_ent is not None else None, g_lp.contiguous(),
                                  None if g_ent is None else g_ent.contiguous(), coefs, backend)
            grads.step(head, g, h_c, start, stop)
    return logp, ent, grads


def _want(hidden, weight, bias):
    if not torch.is_grad_enabled():
        return (False, False, False)
    return (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)


class _GradsInForward(torch.autograd.Function):
    """Shared backward: the gradients were computed in the forward; scale them by grad_output."""

    @staticmethod
    def backward(ctx, g_loss, *unused):
        if ctx.grads is None:
            raise RuntimeError("the fused from-hidden loss computes its gradients during the forward, so its "
                               "backward can run once per forward (do not reuse the graph with retain_graph)")
        grads, ctx.grads = ctx.grads, None
        grads.scale_(g_loss.float())
        gh, gw, gb = grads.out(ctx.hidden_shape)
        return (gh, gw, gb) + (None,) * ctx.n_other


class LinearPolicyLossFunction(_GradsInForward):
    """Returns (loss, *stat values); loss is differentiable w.r.t. hidden, weight, bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old, adv, mask, ref, opts, want):
        B, T = targets.shape
        h2 = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1).contiguous()
        valid = mask != 0
        w = aggregation_weights(valid, opts["loss_agg"], opts["max_tokens"]).reshape(-1)
        flat_valid = valid.reshape(-1)
        adv_flat = (adv.unsqueeze(-1).expand(B, T) if adv.dim() == 1 else adv).reshape(-1)
        old_flat = None if old is None else old.reshape(-1)
        ref_flat = None if ref is None else ref.reshape(-1)
        local = dict(opts, loss_agg="seq-mean-token-sum")  # one row: weights == the valid mask
        ec = opts["entropy_coef"]

        def coef_fn(start, stop, lp_c, ent_c):
            def row(x):
                return None if x is None else x[start:stop].view(1, -1)

            _, c_tok, _, _ = policy_terms(lp_c.view(1, -1), None if ent_c is None else ent_c.view(1, -1),
                                          row(old_flat), row(adv_flat), row(ref_flat), row(flat_valid), local)
            w_c = w[start:stop]
            return w_c * c_tok.view(-1), (-ec * w_c if ec != 0 else None)

        with_ent = ec != 0 or opts["compute_entropy"]
        logp, ent, grads = fused_head_pass(h2, weight, bias, t, opts, with_ent, coef_fn, want, opts["backend"])
        loss, _, _, stats = policy_terms(logp.view(B, T), None if ent is None else ent.view(B, T), old, adv, ref,
                                         valid, opts)
        ctx.grads, ctx.hidden_shape, ctx.n_other = grads, hidden.shape, 7
        opts["stat_names"][:] = list(stats)
        values = tuple(stats.values())
        ctx.mark_non_differentiable(*values)
        return (loss, *values)


class LinearNLLFunction(_GradsInForward):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts, want):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        valid = t != opts["ignore_index"]
        safe_t = torch.where(valid, t, torch.zeros_like(t)).contiguous()
        w = valid.float()
        if opts["reduction"] == "mean":
            w = w / valid.sum().clamp(min=1)

        def coef_fn(start, stop, lp_c, ent_c):
            return -w[start:stop], None

        logp, _, grads = fused_head_pass(h2, weight, bias, safe_t, opts, False, coef_fn, want, opts["backend"])
        ctx.grads, ctx.hidden_shape, ctx.n_other = grads, hidden.shape, 3
        return -(w * torch.where(valid, logp, torch.zeros_like(logp))).sum()


# ---------------------------------------------------------------------------- public
def linear_ppo_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, *, bias=None, clip_eps=0.2,
                           clip_eps_high=None, dual_clip=None, temperature=1.0, logit_scale=1.0, softcap=None,
                           ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0, loss_agg="token-mean",
                           max_tokens=None, compute_entropy=False, ratio_level="token", loss_type="clip",
                           sapo_tau_pos=1.0, sapo_tau_neg=1.05, sampler_logprobs=None, correction=None,
                           correction_level="token", correction_low=None, correction_high=None, chunk_size=None,
                           backend=None, impl=None):
    """Clipped PPO / GRPO policy loss from hidden states, gradients computed in the forward:

        loss, stats = ppo_policy_loss(transform(hidden.float() @ weight.float().T + bias), targets,
                                      old_logprobs, advantages, mask, ...)

    with ``transform`` as in ``linear_token_logprobs`` and every ``ppo_policy_loss`` option (see
    its docstring for the math, the options and the stats) but ``kl_estimator="full"`` (the exact
    KL from the reference's hidden states is ``linear_full_kl``), without any (N, V) tensor.

    The clipped token-level objective with a k1 / abs / k2 / k3 KL forms its gradients in the
    forward (6NHV FLOPs). The other objectives (GSPO's sequence ratio, CISPO, SAPO, the
    tis / mis / icepop rollout correction, low_var_kl / k3+) need every token of a sequence
    before any coefficient is known: they run ``linear_token_logprobs`` (log-prob and entropy,
    recomputed chunk by chunk in backward: 8NHV) under ``policy_objectives.policy_objective``.

    Args:
        hidden: (B, T, H) fp32 / fp16 / bf16. weight: (V, H), hidden's dtype. bias: (V,) or None.
        targets, old_logprobs, advantages ((B, T) or (B,)), mask, ref_logprobs: as ppo_policy_loss.
        logit_scale, softcap, chunk_size, backend, impl: as linear_token_logprobs (impl="fused": per-token
            logp / entropy from the fused Triton kernels, the objective in torch, 8NHV).

    Returns:
        (loss, stats): loss 0-d fp32, differentiable w.r.t. hidden, weight and bias; its backward can
        run once (the gradients were formed during the forward). stats as ppo_policy_loss's.
    """
    requested = backend
    V, logit_scale, softcap, chunk_size, backend = check_head(hidden, weight, bias, logit_scale, softcap,
                                                              chunk_size, backend)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, T, H), got {tuple(hidden.shape)}")
    B, T = hidden.shape[:2]
    check_targets("targets", targets, (B, T), V, hidden.device)
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            check_float(name, x, FLOAT_OR_64)
            check_shape(name, x, (B, T), "hidden's (B, T)")
    check_float("advantages", advantages, FLOAT_OR_64)
    if tuple(advantages.shape) not in ((B, T), (B,)):
        raise ValueError(f"advantages must have shape ({B}, {T}) (per token) or ({B},) (per sequence), "
                         f"got {tuple(advantages.shape)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    check_shape("mask", mask, (B, T), "hidden's (B, T)")
    check_same_device(hidden=hidden, targets=targets, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                      ref_logprobs=ref_logprobs)
    (clip_eps, clip_eps_high, dual_clip, temperature, kl_coef, kl_estimator, entropy_coef, loss_agg,
     max_tokens) = check_policy_options(clip_eps, clip_eps_high, dual_clip, temperature, kl_coef, kl_estimator,
                                        entropy_coef, loss_agg, max_tokens)
    if kl_estimator == "full":
        raise ValueError("kl_estimator='full' needs the reference's logits: add linear_full_kl(hidden, weight, "
                         "ref_hidden, ref_weight) to the loss for the exact KL from hidden states")
    ext = check_objective_options(ratio_level, loss_type, dual_clip, sapo_tau_pos, sapo_tau_neg, correction,
                                  correction_level, correction_low, correction_high, kl_estimator)
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef != 0")
    if sampler_logprobs is not None:
        check_float("sampler_logprobs", sampler_logprobs, FLOAT_OR_64)
        check_shape("sampler_logprobs", sampler_logprobs, (B, T), "hidden's (B, T)")
        check_same_device(hidden=hidden, sampler_logprobs=sampler_logprobs)
    if correction is not None and sampler_logprobs is None:
        raise ValueError(f"sampler_logprobs is required when correction={correction!r}")
    check_finite_inputs(mask != 0, old_logprobs=old_logprobs, advantages=advantages, ref_logprobs=ref_logprobs,
                        sampler_logprobs=sampler_logprobs)
    ppo = {"clip_eps": clip_eps, "clip_eps_high": clip_eps_high, "dual_clip": dual_clip, "temperature": temperature,
           "ref_logprobs": ref_logprobs, "kl_coef": kl_coef, "kl_estimator": kl_estimator,
           "entropy_coef": entropy_coef, "loss_agg": loss_agg, "max_tokens": max_tokens,
           "compute_entropy": compute_entropy}
    if backend == "torch":
        return linear_ppo_policy_loss_ref(hidden, weight, targets, old_logprobs, advantages, mask, bias=bias,
                                          logit_scale=logit_scale, softcap=softcap, sampler_logprobs=sampler_logprobs,
                                          **ext, **ppo)
    # a masked row may hold anything (NaN, inf): zeroed first, so it reaches neither the loss nor, through
    # grad_weight = g.T @ hidden, any gradient (its own is exactly 0)
    hidden = torch.where((mask != 0).unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    if is_extended({**ext, "kl_estimator": kl_estimator}, sampler_logprobs):
        head = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                    chunk_size=chunk_size, backend=requested, impl=impl)
        o = {"lo": 1 - clip_eps, "hi": 1 + (clip_eps if clip_eps_high is None else clip_eps_high),
             "dual_clip": dual_clip, "kl_coef": kl_coef, "kl_estimator": kl_estimator, "entropy_coef": entropy_coef,
             "loss_agg": loss_agg, "max_tokens": max_tokens, **ext}
        return extended_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, ref_logprobs,
                                    sampler_logprobs, o, bool(compute_entropy) or entropy_coef != 0, head)
    opts = {"lo": 1 - clip_eps, "hi": 1 + (clip_eps if clip_eps_high is None else clip_eps_high),
            "dual_clip": dual_clip, "temperature": temperature, "kl_coef": kl_coef, "kl_estimator": kl_estimator,
            "entropy_coef": entropy_coef, "loss_agg": loss_agg, "max_tokens": max_tokens,
            "compute_entropy": bool(compute_entropy), "logit_scale": logit_scale, "softcap": softcap,
            "chunk_size": chunk_size, "backend": backend, "stat_names": []}
    # ---- impl="fused": linear_triton_losses.py (dispatch: _backend.select_head_impl)
    if _backend.select_head_impl(hidden.device, impl, requested, backend) == "fused":
        from rlhf_fast.ops.linear_triton_losses import fused_ppo_policy_loss

        return fused_ppo_policy_loss(hidden, weight, bias, targets, old_logprobs, advantages, mask, ref_logprobs, opts)
    # ---- end of impl="fused"

    def detach(x):
        return None if x is None else x.detach()

    loss, *values = LinearPolicyLossFunction.apply(
        hidden, weight, bias, targets, detach(old_logprobs), advantages.detach(), mask, detach(ref_logprobs), opts,
        _want(hidden, weight, bias))
    return loss, dict(zip(opts["stat_names"], values))


def extended_policy_loss(hidden, weight, targets, old, adv, mask, ref, sampler, o: dict, with_entropy: bool,
                         head: dict):
    """The objectives beyond the clipped token-level one: per-token log-probs (and entropies) from
    ``linear_token_logprobs`` (autograd; its backward recomputes the logits chunk by chunk), then
    ``policy_objective`` on the (B, T) tensors, as ``ppo_policy_loss_ref`` runs it on logits.
    ``hidden``'s masked rows are zeros already (the caller's)."""
    def detach(x):
        return None if x is None else x.detach()

    valid = mask != 0
    out = linear_token_logprobs(hidden, weight, targets, return_entropy=with_entropy, **head)
    logp, ent = out if with_entropy else (out, None)
    return policy_objective(logp, ent, detach(old), adv.detach(), detach(ref), detach(sampler), None, valid, o)


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
                         temperature=1.0, logit_scale=1.0, softcap=None, chunk_size=None, backend=None, impl=None):
    """Fused SFT NLL from hidden states, gradients computed in the forward (6NHV, no (N, V) tensor):

        F.cross_entropy(transform(hidden.float() @ weight.float().T + bias).view(-1, V) / temperature,
                        targets.view(-1), ignore_index=ignore_index, reduction=reduction)

    Args:
        hidden: (..., H); weight: (V, H); targets: (...) int, in [0, V) or == ignore_index.
        reduction: "mean" (over non-ignored tokens; 0 when there are none) | "sum".
        The others as linear_token_logprobs (impl="fused": the fused Triton kernels, 8NHV).

    Returns:
        0-d fp32, differentiable w.r.t. hidden, weight and bias (backward runs once per forward).
    """
    requested = backend
    V, logit_scale, softcap, chunk_size, backend = check_head(hidden, weight, bias, logit_scale, softcap,
                                                              chunk_size, backend)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    temperature = check_positive("temperature", temperature)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    check_targets("targets", torch.where(targets == ignore_index, torch.zeros_like(targets), targets),
                  hidden.shape[:-1], V, hidden.device)
    if backend == "torch":
        return linear_cross_entropy_ref(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                        reduction=reduction, temperature=temperature, logit_scale=logit_scale,
                                        softcap=softcap)
    # ---- impl="fused": linear_triton_losses.py (dispatch: _backend.select_head_impl)
    if _backend.select_head_impl(hidden.device, impl, requested, backend) == "fused":
        from rlhf_fast.ops.linear_triton_losses import fused_cross_entropy

        return fused_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
                                   temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    # ---- end of impl="fused"
    opts = {"ignore_index": int(ignore_index), "reduction": reduction, "temperature": temperature,
            "logit_scale": logit_scale, "softcap": softcap, "chunk_size": chunk_size, "backend": backend}
    # ignored rows may hold anything (NaN padding): zeroed, so grad_weight = g.T @ hidden stays clean
    hidden = torch.where((targets != ignore_index).unsqueeze(-1), hidden,
                         torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return LinearNLLFunction.apply(hidden, weight, bias, targets, opts, _want(hidden, weight, bias))
