"""The scalar from-hidden losses on the fused Triton kernels (``impl="fused"``).

``linear_cross_entropy`` and ``linear_ppo_policy_loss`` with ``impl="fused"`` take per-token logp
(and entropy) from ``fused_linear_logprobs`` (linear_triton.py) and the vocabulary-free objective
from torch: the token NLL, or ``policy_terms`` (policy_loss.py, the same closed form the chunked
path uses). Their gradient reaches the kernels as per-token coefficients (dL/dlogp, dL/dH), so
backward is the fused backward kernel: 8NHV FLOPs (the forward's logits are recomputed), where the
chunked losses form the gradients in the forward (6NHV) but write (C, V) chunks to memory.
Masked tokens have zero coefficients: their (token block, vocab block) tiles are skipped in backward.
"""
from __future__ import annotations

import torch

from rlhf_fast.ops.linear_triton import fused_linear_logprobs
from rlhf_fast.ops.policy_loss import policy_terms


class _LossFromCoefs(torch.autograd.Function):
    """loss (0-d) whose gradient w.r.t. logp / ent is c_lp / c_ent times grad_output: the
    coefficients policy_terms returns, without forming c * logp (0 * NaN at a masked NaN row)."""

    @staticmethod
    def forward(ctx, loss, logp, ent, c_lp, c_ent):
        ctx.save_for_backward(c_lp, c_ent)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g):
        c_lp, c_ent = ctx.saved_tensors
        return None, c_lp * g, (None if c_ent is None else c_ent * g), None, None


def fused_cross_entropy(hidden, weight, targets, *, bias, ignore_index, reduction, temperature, logit_scale,
                        softcap):
    """``linear_cross_entropy_ref`` on the fused kernels, for validated arguments."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = fused_linear_logprobs(hidden, weight, safe, bias=bias, temperature=temperature, logit_scale=logit_scale,
                                 softcap=softcap)
    nll = -torch.where(valid, logp, torch.zeros_like(logp)).sum()
    return nll / valid.sum().clamp(min=1) if reduction == "mean" else nll


def fused_ppo_policy_loss(hidden, weight, bias, targets, old, adv, mask, ref, opts):
    """``linear_ppo_policy_loss`` on the fused kernels; ``opts`` is the options dict that function
    builds (policy_terms' keys plus the head's). Returns (loss, stats)."""
    with_ent = opts["entropy_coef"] != 0 or opts["compute_entropy"]
    out = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=opts["temperature"],
                                logit_scale=opts["logit_scale"], softcap=opts["softcap"], return_entropy=with_ent)
    logp, ent = out if with_ent else (out, None)
    valid = mask != 0
    loss, c_lp, c_ent, stats = policy_terms(logp.detach(), None if ent is None else ent.detach(), old, adv, ref,
                                            valid, opts)
    loss = _LossFromCoefs.apply(loss, logp, ent, c_lp.detach(), None if c_ent is None else c_ent.detach())
    return loss, stats
