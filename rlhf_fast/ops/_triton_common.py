"""Triton building blocks shared by the vocabulary-sized ops (log-probs, full KL, PPO loss)
and the KL estimators shared by the elementwise ones. Reuse these; do not re-derive them.

Numerics: every load is converted to fp32 at once (also required by Triton's interpreter,
whose fp16/bf16 arithmetic is wrong); -inf logits contribute nothing and never make NaN; a row
with a NaN or +inf logit, or only -inf ones, gives NaN (as torch does), see row_softmax_stats.
"""
import triton
import triton.language as tl

from rlhf_fast._backend import triton_interpreting

# KL estimator codes (d = logp - ref_logp), shared with csrc/cpu/common.h kl_estimate().
KL_ESTIMATORS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}


@triton.jit
def kl_estimate(d, EST: tl.constexpr):
    """k1 = d, abs = |d|, k2 = d^2 / 2, k3 = exp(-d) + d - 1."""
    if EST == 0:
        out = d
    elif EST == 1:
        out = tl.abs(d)
    elif EST == 2:
        out = 0.5 * d * d
    else:
        out = tl.where(tl.abs(d) < 0.5, _k3_series(d), (tl.exp(-d) - 1.0) + d)
    return out


@triton.jit
def _k3_series(d):
    """expm1(-d) + d for |d| < 1/2: Taylor terms to d^10 (relative error < 1e-9), where
    exp(-d) + d - 1 would cancel (same polynomial as kl_k3 in csrc/cpu/kl_estimators.h)."""
    p = 1.0 / 3628800.0
    p = p * d - 1.0 / 362880.0
    p = p * d + 1.0 / 40320.0
    p = p * d - 1.0 / 5040.0
    p = p * d + 1.0 / 720.0
    p = p * d - 1.0 / 120.0
    p = p * d + 1.0 / 24.0
    p = p * d - 1.0 / 6.0
    p = p * d + 0.5
    return p * d * d


@triton.jit
def kl_estimate_grad(d, EST: tl.constexpr):
    """d(kl_estimate)/dd."""
    if EST == 0:
        out = tl.full(d.shape, 1.0, tl.float32)
    elif EST == 1:
        out = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif EST == 2:
        out = d
    else:
        out = 1.0 - tl.exp(-d)
    return out


@triton.jit
def online_softmax_update(m, s, a, z, WITH_A: tl.constexpr):
    """Folds a block z (fp32, -inf where masked) into running statistics of a row:
    m = max z, s = sum exp(z - m), a = sum exp(z - m) * (z - m). Returns (m, s, a)."""
    m_new = tl.maximum(m, tl.max(z, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(z - m_safe)
    if WITH_A:
        shift = tl.where(s > 0, m - m_safe, 0.0) * s
        a = alpha * (a + shift) + tl.sum(e * tl.where(e > 0, z - m_safe, 0.0), 0)
    s = alpha * s + tl.sum(e, 0)
    return m_new, s, a


@triton.jit
def nonfinite_count(z):
    """How many of the block z (fp32, -inf where masked) are NaN or +inf: such a row has no
    softmax; counted explicitly because tl.max ignores NaN on the GPU (fmax) but not in the interpreter."""
    return tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), 0)


@triton.jit
def finite_or_neginf(z):
    """z with NaN and +inf replaced by -inf: keeps the running statistics finite (the row is
    marked by nonfinite_count and made NaN at the end)."""
    return tl.where((z != z) | (z == float("inf")), float("-inf"), z)


@triton.jit
def tanh_approx(u):
    """tanh(u) in fp32 with the formula of fast_tanh in csrc/cpu/common.h (tl has no tanh the
    interpreter runs): the odd Taylor polynomial to u^15 for |u| < 0.4, else (1 - e) / (1 + e),
    e = exp(-2|u|), sign copied back. A few ulp; +-1 at +-inf, NaN for NaN."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a = tl.minimum(a, 0.4)  # the polynomial's own range: no inf - inf where it is not selected
    u2 = a * a
    p = -1.45583438705131827e-3
    p = p * u2 + 3.59212803657248102e-3
    p = p * u2 - 8.86323552990219656e-3
    p = p * u2 + 2.18694885361552028e-2
    p = p * u2 - 5.39682539682539683e-2
    p = p * u2 + 1.33333333333333333e-1
    p = p * u2 - 3.33333333333333333e-1
    t = tl.where(tl.abs(u) < 0.4, a + a * u2 * p, big)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def logit_z(x, mul, cap_pre, SOFTCAP: tl.constexpr):
    """The fused logit transform (rlhf_fast.ops.logprobs.logit_coefs): x fp32 -> z = x * mul, or
    with SOFTCAP z = tanh(x * cap_pre) * mul (mul = softcap / T, cap_pre = logit_scale / softcap)."""
    if SOFTCAP:
        z = tanh_approx(x * cap_pre) * mul
    else:
        z = x * mul
    return z


@triton.jit
def logit_z_grad(z, mul, cap_pre, SOFTCAP: tl.constexpr):
    """dz/dx of logit_z, from z itself: mul, or with SOFTCAP mul * cap_pre * (1 - (z / mul)^2)."""
    if SOFTCAP:
        th = z / mul
        out = (mul * cap_pre) * (1.0 - th * th)
    else:
        out = mul
    return out


@triton.jit
def row_softmax_stats(row_ptr, V, inv_temp, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, cap_pre,
                      SOFTCAP: tl.constexpr):
    """One streaming pass over a row of V logits at row_ptr (unit stride).
    Returns (m, log_s, entropy) of softmax(z), z = logit_z(row, inv_temp, cap_pre, SOFTCAP)
    (softmax(row * inv_temp) without SOFTCAP): lse = m + log_s, and a log-prob is
    best formed as (z - m) - log_s (exact subtraction first, as torch's log_softmax does);
    entropy is 0 unless WITH_ENTROPY.

    Non-finite rule (as torch): a row holding a NaN or +inf, or only -inf, has no softmax: log_s
    and entropy are NaN, so every log-prob and the lse formed from them are NaN."""
    m = float("-inf")
    s = 0.0
    a = 0.0
    bad = 0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = logit_z(tl.load(row_ptr + offs, mask=ok, other=float("-inf")).to(tl.float32), inv_temp, cap_pre, SOFTCAP)
        if SOFTCAP:
            z = tl.where(ok, z, float("-inf"))  # tanh(-inf) is -1: lanes past V must stay -inf
        bad += nonfinite_count(z)
        m, s, a = online_softmax_update(m, s, a, finite_or_neginf(z), WITH_ENTROPY)
    no_softmax = (bad > 0) | (s == 0.0)
    log_s = tl.where(no_softmax, float("nan"), tl.log(s))
    ent = 0.0
    if WITH_ENTROPY:
        h = log_s - a / s
        ent = tl.where(h < 0.0, 0.0, h)  # not tl.maximum: NaN must stay NaN
    return m, log_s, ent


@triton.jit
def row_offset(row, inner, s_outer, s_inner):
    """Element offset of row ``row`` of a Rows view (see rlhf_fast/ops/_common.py)."""
    row = row.to(tl.int64)
    return (row // inner) * s_outer + (row % inner) * s_inner


@triton.jit
def cast_for_store(x, dtype: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even. bf16 is rounded by hand: Triton's interpreter
    truncates on fp32 -> bf16 casts, the GPU rounds; this makes both give the same bits."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def vocab_block(V: int) -> int:
    """Block over the vocabulary: large blocks amortise the interpreter's per-op cost;
    on GPU 4096 keeps registers in check with 8 warps."""
    cap = 16384 if triton_interpreting() else 4096
    return min(triton.next_power_of_2(V), cap)


def num_warps_for(block: int) -> int:
    return 8 if block >= 2048 else 4
