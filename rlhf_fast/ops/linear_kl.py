"""Exact per-token KL between two models straight from their hidden states.

``linear_full_kl(hidden, weight, ref_hidden, ref_weight)`` computes
``full_kl(transform(hidden @ weight.T + bias), transform(ref_hidden @ ref_weight.T + ref_bias))``,
i.e. ``KL(softmax(z / T) || softmax(z_ref / T))`` per token, without any (N, V) tensor: row
chunks of C tokens, two chunk GEMMs, the shared ``full_kl`` kernel (transform fused) on the (C, V)
pair. A per-token op, so backward recomputes both chunks (2 x 2NHV) and runs ``full_kl``'s backward
(through the transform) on them, then the two gradient GEMMs (grad of hidden, weight, bias; the reference
side gets none).

Naming chain: ``head_logits`` (linear_logprobs.py) + ``full_kl`` (kl.py) -> ``LinearFullKLFunction``
-> ``linear_full_kl``; ``linear_full_kl_ref`` materialises both logits.
"""
from __future__ import annotations

import torch

from rlhf_fast.ops._common import check_positive
from rlhf_fast.ops.full_kl import full_kl, full_kl_ref
from rlhf_fast.ops.linear_logprobs import Grads, check_head, head_logits, head_logits_ref, make_head


def linear_full_kl_ref(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, temperature=1.0,
                       logit_scale=1.0, softcap=None, chunk_size=None):
    """Pure PyTorch definition (materialises both logits; no input checks)."""
    del chunk_size
    z = head_logits_ref(hidden, weight, bias, logit_scale, softcap)
    zr = head_logits_ref(ref_hidden, ref_weight, ref_bias, logit_scale, softcap).to(z.dtype)
    return full_kl_ref(z, zr.detach(), temperature)


def _chunks(n, chunk):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


class LinearFullKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        r2 = ref_hidden.reshape(-1, ref_hidden.shape[-1])
        n = h2.shape[0]
        head = make_head(weight, bias, opts["logit_scale"], opts["softcap"], n, opts["chunk_size"], 3)
        ref = make_head(ref_weight, ref_bias, opts["logit_scale"], opts["softcap"], n, head.chunk, 3)
        kl = torch.empty(n, dtype=torch.float32, device=hidden.device)
        zb = torch.empty(min(head.chunk, n) * head.v, dtype=torch.float32, device=hidden.device)
        rb = torch.empty_like(zb)
        for start, stop in _chunks(n, head.chunk):
            k = (stop - start) * head.v
            z = head_logits(head, head.rows(h2, start, stop), zb[:k].view(-1, head.v))
            zr = head_logits(ref, ref.rows(r2, start, stop), rb[:k].view(-1, head.v))
            kl[start:stop] = full_kl(z, zr, temperature=opts["temperature"], logit_scale=opts["logit_scale"],
                                     softcap=opts["softcap"])
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
        ctx.opts = opts
        return kl.view(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, g):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias = ctx.saved_tensors
        o = ctx.opts
        h2 = hidden.reshape(-1, hidden.shape[-1])
        r2 = ref_hidden.reshape(-1, ref_hidden.shape[-1])
        n = h2.shape[0]
        g = g.reshape(-1).float()
        head = make_head(weight, bias, o["logit_scale"], o["softcap"], n, o["chunk_size"], 3)
        ref = make_head(ref_weight, ref_bias, o["logit_scale"], o["softcap"], n, head.chunk, 3)
        grads = Grads(h2, weight, bias, ctx.needs_input_grad[:3])
        zb = torch.empty(min(head.chunk, n) * head.v, dtype=torch.float32, device=hidden.device)
        rb = torch.empty_like(zb)
        for start, stop in _chunks(n, head.chunk):
            k = (stop - start) * head.v
            h_c = head.rows(h2, start, stop)
            z = head_logits(head, h_c, zb[:k].view(-1, head.v))
            zr = head_logits(ref, ref.rows(r2, start, stop), rb[:k].view(-1, head.v))
            with torch.enable_grad():
                zz = z.detach().requires_grad_()
                kl_c = full_kl(zz, zr, temperature=o["temperature"], logit_scale=o["logit_scale"], softcap=o["softcap"])
                (gz,) = torch.autograd.grad(kl_c, zz, g[start:stop])
            del kl_c, zz
            grads.step(head, gz.float(), h_c, start, stop)
        gh, gw, gb = grads.out(hidden.shape)
        return gh, gw, gb, None, None, None, None


def linear_full_kl(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, temperature=1.0,
                   logit_scale=1.0, softcap=None, chunk_size=None):
    """Exact per-token KL(policy || reference) from the two models' hidden states:

        z  = transform(hidden.float() @ weight.float().T + bias)
        zr = transform(ref_hidden.float() @ ref_weight.float().T + ref_bias)
        kl = full_kl(z, zr, temperature=temperature)      # sum_v p_v (log p_v - log q_v)

    with ``transform`` as in ``linear_token_logprobs`` (the same for both models), without any
    (N, V) tensor. The chunk kernel is ``full_kl``'s, dispatched as for every op.

    Args:
        hidden: (..., H) policy hidden states; weight: (V, H), hidden's dtype; bias: (V,) or None.
        ref_hidden: (..., H_ref), hidden's leading shape; ref_weight: (V, H_ref), ref_hidden's dtype;
            ref_bias: (V,) or None. The reference side gets no gradient.
        temperature, logit_scale: > 0. softcap: > 0 or None. chunk_size: tokens per chunk.

    Returns:
        (...) fp32, differentiable w.r.t. hidden, weight and bias (backward recomputes the chunks).
    """
    V, logit_scale, softcap, chunk_size, backend = check_head(hidden, weight, bias, logit_scale, softcap,
                                                              chunk_size, None)
    V_ref = check_head(ref_hidden, ref_weight, ref_bias, logit_scale, softcap, chunk_size, None)[0]
    if V_ref != V:
        raise ValueError(f"ref_weight must have the policy's vocabulary V={V}, got {V_ref}")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(ref_hidden.shape)}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    temperature = check_positive("temperature", temperature)
    if backend == "torch":
        return linear_full_kl_ref(hidden, weight, ref_hidden.detach(), ref_weight.detach(), bias=bias,
                                  ref_bias=None if ref_bias is None else ref_bias.detach(), temperature=temperature,
                                  logit_scale=logit_scale, softcap=softcap)
    opts = {"temperature": temperature, "logit_scale": logit_scale, "softcap": softcap, "chunk_size": chunk_size}
    return LinearFullKLFunction.apply(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
                                      None if ref_bias is None else ref_bias.detach(), opts)
