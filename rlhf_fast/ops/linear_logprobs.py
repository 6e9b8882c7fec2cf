"""Per-token log-probabilities and entropy straight from hidden states: the LM head fused in.

``linear_token_logprobs(hidden, weight, targets)`` computes
``token_logprobs(transform(hidden @ weight.T + bias), targets)`` with
``transform(z) = softcap * tanh(z * logit_scale / softcap)`` (or ``z * logit_scale`` without
softcap), without any tensor of size N * V (N tokens, V vocabulary).

How (the "chunked GEMM + our logits kernel" path, one of the from-hidden family):
  forward   rows of C tokens at a time: z = h_c @ W.T + b into one reused (C, V) fp32 buffer
            (BLAS / cuBLAS), then the shared log-prob kernel with the transform fused
            (``rlhf_fast.ops.logprobs.logprobs_fwd``) -> logp, lse, entropy of the chunk. Only the
            per-row lse (and entropy) are saved: O(N).
  backward  per chunk: recompute z, write d(logp, H)/dz in place with ``logprobs_bwd`` (through
            the fused transform), then grad_h_c = g @ W, grad_W += g.T @ h_c,
            grad_b += g.sum(0): 2NHV forward + 6NHV backward FLOPs (8NHV with the recompute).
  C is chosen so the chunk buffers fit ``RLHF_FAST_HEAD_CHUNK_BYTES`` (default 64 MiB, but at
  least 256 rows: ~155 MiB per buffer at V = 151936) or set with ``chunk_size``. Gradients are accumulated in fp32 and returned in the inputs' dtypes.
  The scalar losses built on these pieces (linear_policy_loss.py) compute their gradients during
  the forward instead (6NHV, no recompute).

On CPU the GEMMs run in fp32 (fp16 / bf16 inputs are upcast chunk by chunk, the weight once
per call) through ``head_gemm.mm_into`` (the C++ AVX-512 GEMM into the reused tile / the grad
accumulators, else torch.mm); on CUDA they run in the inputs' dtype with fp32 accumulation.

Naming chain: ``logprobs_fwd`` / ``logprobs_bwd`` (shared kernels) -> ``head_logits`` /
``head_grad_step`` (chunk pieces) -> ``LinearLogprobsFunction`` -> ``linear_token_logprobs``;
``linear_token_logprobs_ref`` is the materialised definition and the fallback.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rlhf_fast import _backend
from rlhf_fast.ops._common import (
    as_rows,
    check_float,
    check_positive,
    check_same_device,
    check_shape,
    check_targets,
)
from rlhf_fast.ops.head_gemm import mm_into
from rlhf_fast.ops.logprobs import logit_coefs, logprobs_bwd, logprobs_fwd, token_logprobs_ref

DEFAULT_CHUNK_BYTES = 64 << 20
MIN_CHUNK_ROWS = 256


# ---------------------------------------------------------------------------- reference
def head_transform_ref(z, logit_scale=1.0, softcap=None):
    """``softcap * tanh(z * logit_scale / softcap)`` if softcap else ``z * logit_scale``."""
    if softcap is not None:
        return softcap * torch.tanh(z * (logit_scale / softcap))
    return z * logit_scale if logit_scale != 1.0 else z


def head_logits_ref(hidden, weight, bias=None, logit_scale=1.0, softcap=None):
    """The materialised (..., V) logits in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    return head_transform_ref(z, logit_scale, softcap)


def linear_token_logprobs_ref(hidden, weight, targets, *, bias=None, temperature=1.0, logit_scale=1.0,
                              softcap=None, return_entropy=False, chunk_size=None, backend=None, impl=None):
    """Pure PyTorch definition (materialises the logits; no input checks). ``chunk_size``,
    ``backend`` and ``impl`` are accepted and ignored."""
    del chunk_size, backend, impl
    z = head_logits_ref(hidden, weight, bias, logit_scale, softcap)
    return token_logprobs_ref(z, targets, temperature, return_entropy)


# ---------------------------------------------------------------------------- chunk pieces
@dataclass
class Head:
    """The LM head of one call: the weight as the GEMMs read it, the transform, and the chunking."""

    weight: torch.Tensor  # (V, H) in the GEMM dtype
    bias: torch.Tensor | None  # (V,) in the GEMM dtype
    logit_scale: float
    softcap: float | None
    chunk: int
    gemm_dtype: torch.dtype

    @property
    def v(self) -> int:
        return self.weight.shape[0]

    def coefs(self, temperature: float) -> tuple[float, float]:
        """The kernels' transform coefficients (see rlhf_fast.ops.logprobs.logit_coefs)."""
        return logit_coefs(temperature, self.logit_scale, self.softcap)

    def rows(self, hidden2d, start, stop):
        """hidden rows [start, stop) in the GEMM dtype."""
        return hidden2d[start:stop].to(self.gemm_dtype)


def gemm_dtype_for(device, dtype) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "cpu" else dtype


def pick_chunk(n: int, v: int, chunk_size, buffers: int) -> int:
    """Tokens per chunk: ``chunk_size`` if given, else as many as keep ``buffers`` (C, V) fp32
    buffers within RLHF_FAST_HEAD_CHUNK_BYTES when that is set; by default within 64 MiB but at
    least MIN_CHUNK_ROWS (C is the K of the grad_weight GEMM: K = 110 ran 1.3x slower than K = 1024
    at V = 151936, H = 1024 on the CPU). Always at least 1, at most n."""
    if chunk_size is None:
        raw = os.environ.get("RLHF_FAST_HEAD_CHUNK_BYTES")
        try:
            budget = DEFAULT_CHUNK_BYTES if raw is None else int(raw)
        except ValueError:
            raise ValueError(f"RLHF_FAST_HEAD_CHUNK_BYTES must be an integer number of bytes, got {raw!r}") from None
        chunk_size = budget // (4 * v * buffers)
        if raw is None:
            chunk_size = max(chunk_size, MIN_CHUNK_ROWS)
    return max(1, min(int(chunk_size), max(n, 1)))


def make_head(weight, bias, logit_scale, softcap, n, chunk_size, buffers) -> Head:
    gdt = gemm_dtype_for(weight.device, weight.dtype)
    w = weight.detach().to(gdt)
    b = None if bias is None else bias.detach().to(gdt)
    chunk = pick_chunk(n, weight.shape[0], chunk_size, buffers)
    return Head(w, b, logit_scale, softcap, chunk, gdt)


def head_logits(head: Head, h_c, out):
    """Writes h_c @ W.T + b as fp32 into ``out`` (C, V) and returns it (the raw logits: the
    kernels apply the transform)."""
    if head.gemm_dtype == torch.float32:
        return mm_into(out, h_c, head.weight.T, bias=head.bias)
    z = torch.mm(h_c, head.weight.T) if head.bias is None else torch.addmm(head.bias, h_c, head.weight.T)
    out.copy_(z)
    del z
    return out


def chunk_logprobs(z, targets_c, coefs, with_entropy, backend):
    """The shared log-prob kernel on one (C, V) chunk of raw logits, ``coefs`` = Head.coefs(T):
    fp32 (logp, lse, ent-or-None)."""
    return logprobs_fwd(as_rows(z), targets_c, coefs[0], with_entropy, backend, coefs[1])


def chunk_grad_logits(z, targets_c, lse, ent, g_lp, g_ent, coefs, backend):
    """d(loss)/d(h W^T + b) of one chunk from the per-token coefficients g_lp, g_ent, written over
    the chunk's raw logits ``z`` (the kernel chains through the transform). Returns z."""
    rows = as_rows(z)
    logprobs_bwd(rows, rows, targets_c, lse, ent, g_lp, g_ent, coefs[0], backend, coefs[1])
    return z


class Grads:
    """fp32 accumulators for grad_hidden (N, H), grad_weight (V, H), grad_bias (V,); each only
    when wanted. With fp32 inputs they are the returned tensors themselves."""

    def __init__(self, hidden2d, weight, bias, want):
        def buf(like, shape, wanted):
            return torch.zeros(shape, dtype=torch.float32, device=like.device) if wanted else None

        self.h = torch.empty(hidden2d.shape, dtype=torch.float32, device=hidden2d.device) if want[0] else None
        self.w = buf(weight, weight.shape, want[1])
        self.b = buf(weight, weight.shape[:1], want[2] and bias is not None)
        self.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)

    def step(self, head: Head, g, h_c, start, stop):
        """grad_h[start:stop] = g @ W, grad_W += g.T @ h_c, grad_b += g.sum(0) (g fp32 (C, V))."""
        gg = g if head.gemm_dtype == torch.float32 else g.to(head.gemm_dtype)
        if self.h is not None:
            if gg.dtype == torch.float32:
                mm_into(self.h[start:stop], gg, head.weight)
            else:
                self.h[start:stop] = torch.mm(gg, head.weight)
        if self.w is not None:
            if gg.dtype == torch.float32:
                mm_into(self.w, gg.T, h_c, beta=1.0)
            else:
                self.w += torch.mm(gg.T, h_c)
        if self.b is not None:
            self.b += g.sum(0)

    def scale_(self, g):
        for t in (self.h, self.w, self.b):
            if t is not None:
                t.mul_(g)

    def out(self, hidden_shape):
        def cast(t, dtype):
            return None if t is None else t.to(dtype)

        gh = cast(self.h, self.dtypes[0])
        return (None if gh is None else gh.view(hidden_shape)), cast(self.w, self.dtypes[1]), cast(self.b, self.dtypes[2])


# ---------------------------------------------------------------------------- autograd
class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts):
        H = hidden.shape[-1]
        h2 = hidden.reshape(-1, H)
        n = h2.shape[0]
        t = targets.reshape(-1).contiguous()
        head = make_head(weight, bias, opts["logit_scale"], opts["softcap"], n, opts["chunk_size"], 1)
        coefs = head.coefs(opts["temperature"])
        with_ent = opts["return_entropy"]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_ent else None
        z_buf = torch.empty(min(head.chunk, n) * head.v, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, head.chunk):
            stop = min(start + head.chunk, n)
            z = head_logits(head, head.rows(h2, start, stop), z_buf[: (stop - start) * head.v].view(-1, head.v))
            lp_c, lse_c, ent_c = chunk_logprobs(z, t[start:stop], coefs, with_ent, opts["backend"])
            logp[start:stop], lse[start:stop] = lp_c, lse_c
            if with_ent:
                ent[start:stop] = ent_c
        ctx.save_for_backward(hidden, weight, bias, t, lse, ent)
        ctx.opts, ctx.coefs = opts, coefs
        shape = hidden.shape[:-1]
        if with_ent:
            return logp.view(shape), ent.view(shape)
        return logp.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, bias, t, lse, ent = ctx.saved_tensors
        o = ctx.opts
        H = hidden.shape[-1]
        h2 = hidden.reshape(-1, H)
        n = h2.shape[0]
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.reshape(-1).float().contiguous()
        if g_ent is not None:
            g_ent = g_ent.reshape(-1).float().contiguous()
        head = make_head(weight, bias, o["logit_scale"], o["softcap"], n, o["chunk_size"], 1)
        grads = Grads(h2, weight, bias, ctx.needs_input_grad[:3])
        size = min(head.chunk, n) * head.v
        z_buf = torch.empty(size, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, head.chunk):
            stop = min(start + head.chunk, n)
            shape = (stop - start, head.v)
            h_c = head.rows(h2, start, stop)
            z = head_logits(head, h_c, z_buf[: shape[0] * shape[1]].view(shape))
            g = chunk_grad_logits(z, t[start:stop], lse[start:stop], None if g_ent is None else ent[start:stop],
                                  g_logp[start:stop], None if g_ent is None else g_ent[start:stop], ctx.coefs,
                                  o["backend"])
            grads.step(head, g, h_c, start, stop)
        gh, gw, gb = grads.out(hidden.shape)
        return gh, gw, gb, None, None


# ---------------------------------------------------------------------------- public
def check_head(hidden, weight, bias, logit_scale, softcap, chunk_size, backend):
    """Validates the LM-head arguments shared by every from-hidden op; returns
    (V, logit_scale, softcap, chunk_size, backend) normalised (backend resolved)."""
    check_float("hidden", hidden)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape (..., H) with H > 0, got {tuple(hidden.shape)}")
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, H={hidden.shape[-1]}) with V > 0, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, weight.shape[:1], "the weight's V")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    logit_scale = check_positive("logit_scale", logit_scale)
    if softcap is not None:
        softcap = check_positive("softcap", softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if backend is None:
        backend = _backend.select_backend(hidden.device)
    elif backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS} or None, got {backend!r}")
    elif backend in ("cpu", "cuda") and hidden.device.type != backend:
        raise ValueError(f"backend={backend!r} cannot run {hidden.device.type} tensors")
    return weight.shape[0], logit_scale, softcap, chunk_size, backend


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                          return_entropy=False, chunk_size=None, backend=None, impl=None):
    """Per-token log-probs (and entropy) from hidden states, the LM head fused in.

    Computes ``token_logprobs(transform(hidden.float() @ weight.float().T + bias), targets,
    temperature=temperature)`` with ``transform(z) = softcap * tanh(z * logit_scale / softcap)``
    (``z * logit_scale`` when softcap is None), without allocating any (N, V) tensor.

    Args:
        hidden: (..., H) fp32 / fp16 / bf16; any leading shape and strides.
        weight: (V, H), hidden's dtype (e.g. the tied embedding; its grad accumulates as usual).
        targets: (...) int32 / int64 in [0, V), hidden's leading shape.
        bias: (V,) or None. temperature, logit_scale: > 0. softcap: > 0 or None.
        return_entropy: also return the entropy of ``softmax(transform(z) / temperature)``.
        chunk_size: tokens per (C, V) chunk; default from RLHF_FAST_HEAD_CHUNK_BYTES (64 MiB and
            at least 256 rows when unset).
        backend: the log-prob kernel ("triton" | "cuda" | "cpu" | "torch"); default as for every op.
            "torch" runs the materialised reference.
        impl: "chunked" (default: the chunks above) | "fused" (Triton kernels keeping the logits on
            chip, rlhf_fast/ops/linear_triton.py; not the default until the GPU suite measures it
            faster); None reads RLHF_FAST_HEAD_IMPL. See rlhf_fast._backend.select_head_impl.

    Returns:
        logp (...) fp32 (and entropy (...) fp32), differentiable w.r.t. hidden, weight and bias;
        backward recomputes the logits chunk by chunk (8NHV FLOPs for forward + backward).
    """
    requested = backend
    V, logit_scale, softcap, chunk_size, backend = check_head(hidden, weight, bias, logit_scale, softcap,
                                                              chunk_size, backend)
    check_targets("targets", targets, hidden.shape[:-1], V, hidden.device)
    temperature = check_positive("temperature", temperature)
    if backend == "torch":
        return linear_token_logprobs_ref(hidden, weight, targets, bias=bias, temperature=temperature,
                                         logit_scale=logit_scale, softcap=softcap, return_entropy=return_entropy)
    # ---- impl="fused": the Triton kernels of linear_triton.py (dispatch: _backend.select_head_impl)
    if _backend.select_head_impl(hidden.device, impl, requested, backend) == "fused":
        from rlhf_fast.ops.linear_triton import fused_linear_logprobs

        return fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                     logit_scale=logit_scale, softcap=softcap, return_entropy=return_entropy)
    # ---- end of impl="fused"
    opts = {"temperature": temperature, "logit_scale": logit_scale, "softcap": softcap,
            "return_entropy": bool(return_entropy), "chunk_size": chunk_size, "backend": backend}
    return LinearLogprobsFunction.apply(hidden, weight, bias, targets, opts)

