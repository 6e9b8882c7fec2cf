"""Fused Triton kernels for the from-hidden ops: the LM-head GEMM and the softmax statistics in one pass.

``fused_linear_logprobs(hidden, weight, targets)`` computes what ``linear_token_logprobs_ref`` does,
``token_logprobs(transform(hidden @ weight.T + bias), targets, temperature)``, but no (N, V) logits
tile ever leaves the chip (the chunked path, linear_logprobs.py, writes a (C, V) fp32 chunk per
GEMM and reads it back in the log-prob kernel).

How:
  forward   programs over (token block of BLOCK_N rows) x (vocab split). Each loops over the
            BLOCK_V-wide vocab blocks of its split: z = tl.dot(h tile, W tile^T) accumulated in fp32
            over H in BLOCK_K steps (the inputs' dtype into tl.dot, so bf16 / fp16 run on tensor
            cores), + bias, the logit transform, then online per-row max / sum-exp / sum p*z and the
            target's logit. Each split writes its partial statistics; a small merge kernel combines
            the splits into logp, lse and entropy (splits keep the GPU busy when N is small).
  backward  one program per (token block, vocab block) tile: recompute z, form g = dL/dz from
            (lse, entropy, grad_logp, grad_entropy, target) exactly as _logprobs_bwd_kernel does
            (through the transform's derivative), then grad_h[n, :] += g @ W[v, :] and
            grad_W[v, :] += g^T @ h[n, :] in BLOCK_K slices, with fp32 atomic adds (and grad_b).
            Chosen over a two-kernel scheme (one owning grad_h rows, one owning grad_W rows, no
            atomics) because that one recomputes z twice (10NHV instead of 8NHV) and its grad_h
            kernel has only N / BLOCK_N programs. H is too large for either output slice to stay in
            registers, so both schemes read-modify-write fp32 partials in global memory anyway.
            The cost of atomics: the sums are not bitwise deterministic on the GPU (fp32 add order).
            A tile whose rows all have zero upstream gradient (masked prompt tokens) is skipped.

Semantics are those of ``linear_token_logprobs_ref`` (temperature, logit_scale, softcap, bias, any
weight / hidden strides, fp32 / fp16 / bf16 with fp32 accumulation, grads in the inputs' dtypes), and
the non-finite rule of the log-prob kernels: a row with a NaN / +inf logit has NaN log-prob and
entropy and never touches another row; a row with zero upstream gradient contributes exactly 0 to
every gradient (its hidden state is not read for grad_W, so a NaN in a padding row stays there,
where the materialised reference's G^T @ h would spread 0 * NaN = NaN over grad_W).
fp32 inputs use TF32 in tl.dot only when ``torch.backends.cuda.matmul.allow_tf32`` is set (as torch's
own GEMMs). Under the Triton interpreter (TRITON_INTERPRET=1) tiles are converted to fp32 right
after loading (the interpreter's bf16 arithmetic is wrong); on the GPU bf16 goes into tl.dot.

Not the default: ``impl="fused"`` (or RLHF_FAST_HEAD_IMPL=fused) selects it until the GPU suite
shows it faster than the chunked cuBLAS path (see rlhf_fast._backend.select_head_impl).

Naming chain: ``_linear_logprobs_fwd_kernel`` + ``_merge_splits_kernel`` -> ``fused_fwd``;
``_linear_logprobs_bwd_kernel`` -> ``fused_bwd``; -> ``FusedLinearLogprobsFunction`` ->
``fused_linear_logprobs`` (reached through ``linear_token_logprobs(..., impl="fused")``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rlhf_fast._backend import triton_interpreting
from rlhf_fast.ops._common import first_order_only
from rlhf_fast.ops._triton_common import finite_or_neginf, logit_z, logit_z_grad
from rlhf_fast.ops.logprobs import logit_coefs

N_PARTIALS = 5  # per split and row: m, s, a, bad, z_target


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _z_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, H, s_hn, s_hk, s_wv, s_wk, mul, cap_pre,
            HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """The transformed logits z (BLOCK_N, BLOCK_V) fp32 of one tile; -inf past V."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < H
        h = tl.load(h_ptr + offs_n[:, None] * s_hn + k[None, :] * s_hk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * s_wv + k[None, :] * s_wk, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    z = logit_z(acc, mul, cap_pre, SOFTCAP)
    return tl.where(v_ok[None, :], z, float("-inf"))


@triton.jit
def _tile_softmax_update(m, s, a, z, WITH_A: tl.constexpr):
    """online_softmax_update (_triton_common.py) for a (rows, BLOCK_V) tile, per row: m = max z,
    s = sum exp(z - m), a = sum exp(z - m) * (z - m); z fp32, -inf where masked, never NaN / +inf."""
    m_new = tl.maximum(m, tl.max(z, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(z - m_safe[:, None])
    if WITH_A:
        shift = tl.where(s > 0, m - m_safe, 0.0) * s
        a = alpha * (a + shift) + tl.sum(e * tl.where(e > 0, z - m_safe[:, None], 0.0), 1)
    s = alpha * s + tl.sum(e, 1)
    return m_new, s, a


@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr,  # (N, H) at n * s_hn + k * s_hk
    w_ptr,  # (V, H) at v * s_wv + k * s_wk
    b_ptr,  # (V,) read when HAS_BIAS
    t_ptr,  # (N,) int32 | int64 targets in [0, V)
    part_ptr,  # (N_PARTIALS, splits, N) fp32 out: m, s, a, bad, z_target of each split
    N, H, V, s_hn, s_hk, s_wv, s_wk,
    blocks_per_split,
    mul,  # logit_coefs: z = x * mul, or tanh(x * cap_pre) * mul with SOFTCAP
    cap_pre,
    WITH_ENTROPY: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    t = tl.load(t_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    z_t = tl.zeros((BLOCK_N,), tl.float32)
    bad = tl.zeros((BLOCK_N,), tl.int32)
    vb0 = split * blocks_per_split
    vb1 = tl.minimum(vb0 + blocks_per_split, tl.cdiv(V, BLOCK_V))
    for vb in range(vb0, vb1):
        offs_v = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = offs_v < V
        z = _z_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, H, s_hn, s_hk, s_wv, s_wk, mul, cap_pre,
                    HAS_BIAS, SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        z_t += tl.sum(tl.where(offs_v[None, :] == t[:, None], z, 0.0), 1)
        bad += tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), 1)
        m, s, a = _tile_softmax_update(m, s, a, finite_or_neginf(z), WITH_ENTROPY)
    out = part_ptr + split * N + offs_n
    tl.store(out, m, mask=n_ok)
    tl.store(out + splits * N, s, mask=n_ok)
    tl.store(out + 2 * splits * N, a, mask=n_ok)
    tl.store(out + 3 * splits * N, bad.to(tl.float32), mask=n_ok)
    tl.store(out + 4 * splits * N, z_t, mask=n_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr,  # (N_PARTIALS, splits, N) fp32 from the forward kernel
    logp_ptr,  # (N,) fp32 out
    lse_ptr,  # (N,) fp32 out: logsumexp of z, saved for backward
    ent_ptr,  # (N,) fp32 out, written when WITH_ENTROPY
    N, splits,
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    stride = splits * N
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for i in range(0, splits):
        m = tl.maximum(m, tl.load(part_ptr + i * N + offs, mask=ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros((BLOCK,), tl.float32)
    a = tl.zeros((BLOCK,), tl.float32)
    bad = tl.zeros((BLOCK,), tl.float32)
    z_t = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, splits):
        p = part_ptr + i * N + offs
        m_i = tl.load(p, mask=ok, other=float("-inf"))
        s_i = tl.load(p + stride, mask=ok, other=0.0)
        alpha = tl.exp(m_i - m_safe)
        s += alpha * s_i
        if WITH_ENTROPY:  # a_i is relative to m_i: rebase it on m
            a += alpha * (tl.load(p + 2 * stride, mask=ok, other=0.0) + tl.where(s_i > 0, m_i - m_safe, 0.0) * s_i)
        bad += tl.load(p + 3 * stride, mask=ok, other=0.0)
        z_t += tl.load(p + 4 * stride, mask=ok, other=0.0)
    no_softmax = (bad > 0) | (s == 0.0)  # the rule of row_softmax_stats: NaN / +inf, or only -inf
    s_safe = tl.where(no_softmax, 1.0, s)  # no log(0) / 0 evaluated, even in lanes past N
    log_s = tl.where(no_softmax, float("nan"), tl.log(s_safe))
    lp = (z_t - m) - log_s
    tl.store(logp_ptr + offs, tl.where(lp > 0.0, 0.0, lp), mask=ok)  # not tl.minimum: NaN stays NaN
    tl.store(lse_ptr + offs, m + log_s, mask=ok)
    if WITH_ENTROPY:
        h = log_s - a / s_safe
        tl.store(ent_ptr + offs, tl.where(h < 0.0, 0.0, h), mask=ok)


@triton.jit
def _linear_logprobs_bwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr,  # as in the forward
    lse_ptr,  # (N,) fp32 from the forward
    ent_ptr,  # (N,) fp32, read when WITH_ENTROPY
    g_lp_ptr,  # (N,) fp32 upstream grad of logp
    g_ent_ptr,  # (N,) fp32 upstream grad of entropy, read when WITH_ENTROPY
    gh_ptr,  # (N, H) fp32 contiguous, accumulated (atomics) when WANT_H
    gw_ptr,  # (V, H) fp32 contiguous, accumulated when WANT_W
    gb_ptr,  # (V,) fp32, accumulated when WANT_B
    N, H, V, s_hn, s_hk, s_wv, s_wk,
    mul, cap_pre,
    WITH_ENTROPY: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WANT_H: tl.constexpr, WANT_W: tl.constexpr, WANT_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_V: tl.constexpr,
):
    # swizzle: GROUP_V vocab blocks run against one token block after another, so their W stays in L2
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_V * n_blocks
    first_v = (pid // per_group) * GROUP_V
    group = tl.minimum(v_blocks - first_v, GROUP_V)
    pid_v = first_v + (pid % per_group) % group
    pid_n = (pid % per_group) // group
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    g_lp = tl.load(g_lp_ptr + offs_n, mask=n_ok, other=0.0)
    live = g_lp != 0.0  # no upstream gradient (a masked row): exactly 0, never 0 * NaN
    if WITH_ENTROPY:
        g_ent = tl.load(g_ent_ptr + offs_n, mask=n_ok, other=0.0)
        live = live | (g_ent != 0.0)
    live = live & n_ok
    if tl.sum(live.to(tl.int32), 0) > 0:
        offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = offs_v < V
        z = _z_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, H, s_hn, s_hk, s_wv, s_wk, mul, cap_pre,
                    HAS_BIAS, SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=0.0)
        t = tl.load(t_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
        p = tl.exp(z - lse[:, None])
        g = g_lp[:, None] * (tl.where(offs_v[None, :] == t[:, None], 1.0, 0.0) - p)
        if WITH_ENTROPY:  # dH/dz_j = -p_j (log p_j + H)
            shift = tl.load(ent_ptr + offs_n, mask=n_ok, other=0.0) - lse
            g -= g_ent[:, None] * p * tl.where(p > 0, z + shift[:, None], 0.0)
        g = tl.where(live[:, None] & v_ok[None, :], g * logit_z_grad(z, mul, cap_pre, SOFTCAP), 0.0)
        if WANT_B:
            tl.atomic_add(gb_ptr + offs_v, tl.sum(g, 0), mask=v_ok, sem="relaxed")
        if not UPCAST:
            g = g.to(h_ptr.dtype.element_ty)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < H
            if WANT_H:
                w = tl.load(w_ptr + offs_v[:, None] * s_wv + k[None, :] * s_wk, mask=v_ok[:, None] & k_ok[None, :],
                            other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(g, w, input_precision=DOT_PRECISION)
                tl.atomic_add(gh_ptr + offs_n[:, None] * H + k[None, :], dh, mask=n_ok[:, None] & k_ok[None, :],
                              sem="relaxed")
            if WANT_W:
                h = tl.load(h_ptr + offs_n[:, None] * s_hn + k[None, :] * s_hk, mask=live[:, None] & k_ok[None, :],
                            other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(g), h, input_precision=DOT_PRECISION)
                tl.atomic_add(gw_ptr + offs_v[:, None] * H + k[None, :], dw, mask=v_ok[:, None] & k_ok[None, :],
                              sem="relaxed")


# ---------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch shape of the fused kernels (tl.dot needs every dimension >= 16)."""

    block_n: int
    block_v: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def pick_tiles(n: int, h: int, v: int, dtype: torch.dtype) -> Tiles:
    """Starting points (untuned: nothing has run on a GPU yet), to be tuned by the GPU suite
    (benchmarks/bench_linear_logprobs.py, providers ours_fused / ours_fused_nll). fp32 tiles take
    twice the shared memory per stage, hence 2 stages. Under the interpreter: small tiles that
    keep the tests' odd shapes cheap."""
    def fit(x, lo, hi):
        return max(lo, min(hi, triton.next_power_of_2(max(x, 1))))

    if triton_interpreting():
        return Tiles(fit(n, 16, 32), fit(v, 16, 64), fit(h, 16, 32))
    return Tiles(fit(n, 16, 128), 128, 64, num_warps=8, num_stages=2 if dtype == torch.float32 else 3)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_splits(n_blocks: int, v_blocks: int, device: torch.device) -> int:
    """Vocab splits so that the forward grid has >= ~2 programs per SM (4 under the interpreter,
    which runs programs one by one: there the splits only exercise the merge)."""
    target = 4 if device.type != "cuda" else 2 * _sm_count(device.index or 0)
    return max(1, min(v_blocks, -(-target // n_blocks)))


def _flags(h2: torch.Tensor) -> dict:
    """UPCAST under the interpreter; DOT_PRECISION matters for fp32 tiles only (fp16 / bf16 go to the
    tensor cores whatever it says): IEEE unless torch allows TF32 for its own fp32 GEMMs."""
    interp = triton_interpreting()
    if interp:
        return {"UPCAST": True, "DOT_PRECISION": "ieee"}
    tf32 = h2.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": False, "DOT_PRECISION": "tf32" if tf32 else "ieee"}


def fused_fwd(h2, weight, bias, targets, coefs, with_entropy, tiles: Tiles | None = None, splits=None):
    """logp, lse, ent-or-None (each (N,) fp32) of h2 (N, H) against weight (V, H); targets flat (N,);
    coefs = logit_coefs(T, logit_scale, softcap). ``tiles`` / ``splits`` override the heuristics."""
    (n, H), V = h2.shape, weight.shape[0]
    dev = h2.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else None
    if n == 0:
        return logp, lse, ent
    cfg = tiles or pick_tiles(n, H, V, h2.dtype)
    n_blocks, v_blocks = triton.cdiv(n, cfg.block_n), triton.cdiv(V, cfg.block_v)
    per = triton.cdiv(v_blocks, splits or pick_splits(n_blocks, v_blocks, dev))
    splits = triton.cdiv(v_blocks, per)  # every split owns >= 1 vocab block
    part = torch.empty((N_PARTIALS, splits, n), dtype=torch.float32, device=dev)
    mul, cap_pre = coefs
    _linear_logprobs_fwd_kernel[(n_blocks, splits)](
        h2, weight, bias if bias is not None else weight, targets, part, n, H, V, *h2.stride(), *weight.stride(),
        per, mul, cap_pre, WITH_ENTROPY=with_entropy, HAS_BIAS=bias is not None, SOFTCAP=cap_pre != 0.0,
        **_flags(h2), BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    block = min(1024, triton.next_power_of_2(n))
    _merge_splits_kernel[(triton.cdiv(n, block),)](part, logp, lse, ent if with_entropy else lse, n, splits,
                                                   WITH_ENTROPY=with_entropy, BLOCK=block)
    return logp, lse, ent


def fused_bwd(h2, weight, bias, targets, lse, ent, g_lp, g_ent, coefs, want, tiles: Tiles | None = None):
    """fp32 (grad_h (N, H), grad_W (V, H), grad_b (V,)), each None unless ``want`` says so; g_lp, g_ent
    (N,) fp32 contiguous (g_ent None: the entropy was not used)."""
    (n, H), V = h2.shape, weight.shape[0]
    dev = h2.device
    want_b = want[2] and bias is not None
    gh = torch.zeros((n, H), dtype=torch.float32, device=dev) if want[0] else None
    gw = torch.zeros((V, H), dtype=torch.float32, device=dev) if want[1] else None
    gb = torch.zeros(V, dtype=torch.float32, device=dev) if want_b else None
    if n == 0 or not (want[0] or want[1] or want_b):
        return gh, gw, gb
    cfg = tiles or pick_tiles(n, H, V, h2.dtype)
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(V, cfg.block_v),)
    with_ent = g_ent is not None
    mul, cap_pre = coefs
    any_ = lse  # a valid pointer for the arguments a constexpr switches off
    _linear_logprobs_bwd_kernel[grid](
        h2, weight, bias if bias is not None else weight, targets, lse, ent if with_ent else any_, g_lp,
        g_ent if with_ent else any_, gh if gh is not None else any_, gw if gw is not None else any_,
        gb if gb is not None else any_, n, H, V, *h2.stride(), *weight.stride(), mul, cap_pre,
        WITH_ENTROPY=with_ent, HAS_BIAS=bias is not None, SOFTCAP=cap_pre != 0.0, **_flags(h2),
        WANT_H=gh is not None, WANT_W=gw is not None, WANT_B=gb is not None, BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_V=8, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return gh, gw, gb


# ---------------------------------------------------------------------------- autograd
class FusedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coefs, with_entropy):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1).contiguous()
        logp, lse, ent = fused_fwd(h2, weight, bias, t, coefs, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, t, lse, ent)
        ctx.coefs = coefs
        ctx.set_materialize_grads(False)  # an entropy kept for logging only: no entropy term in backward
        shape = hidden.shape[:-1]
        if with_entropy:
            return logp.view(shape), ent.view(shape)
        return logp.view(shape)

    @staticmethod
    @first_order_only("linear_token_logprobs(impl='fused')")
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, bias, t, lse, ent = ctx.saved_tensors
        h2 = hidden.reshape(-1, hidden.shape[-1])
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.reshape(-1).float().contiguous()
        if g_ent is not None:
            g_ent = g_ent.reshape(-1).float().contiguous()
        gh, gw, gb = fused_bwd(h2, weight, bias, t, lse, ent, g_logp, g_ent, ctx.coefs, ctx.needs_input_grad[:3])

        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        gh = cast(gh, hidden)
        return (None if gh is None else gh.view(hidden.shape)), cast(gw, weight), cast(gb, bias), None, None, None


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                          return_entropy=False):
    """``linear_token_logprobs_ref`` on the fused kernels, for already-validated arguments (the public
    entry is ``linear_token_logprobs(..., impl="fused")``). Returns logp (and entropy), fp32 (...)."""
    coefs = logit_coefs(temperature, logit_scale, softcap)
    return FusedLinearLogprobsFunction.apply(hidden, weight, bias, targets, coefs, bool(return_entropy))
