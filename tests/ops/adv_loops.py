"""Float64 Python-loop references (written element by element) and input makers shared by the
advantage-side op tests (test_gae.py, test_whiten.py, test_group_advantages.py)."""
import math

import pytest
import torch

ESTIMATORS = ["k1", "abs", "k2", "k3"]


def needs(backend, *has):
    """Ops without a csrc CUDA kernel run Triton on GPU: skip the 'cuda' parametrization for them."""
    if backend not in has:
        pytest.skip(f"no {backend} implementation of this op")


# ---------------------------------------------------------------------------- float64 loops
def loop_kl(d, est):
    return {"k1": d, "abs": abs(d), "k2": 0.5 * d * d, "k3": math.expm1(-d) + d}[est]


def loop_shaped(scores, lp, rp, mask, coef, est):
    B, T = lp.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t] != 0]
        for t in valid:
            out[b, t] = -coef * loop_kl(float(lp[b, t]) - float(rp[b, t]), est)
        if valid:
            out[b, valid[-1]] += float(scores[b])
    return out


def loop_gae(r, v, mask, gamma, lam):
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_a = next_v = 0.0
        for t in reversed([t for t in range(T) if mask[b, t] != 0]):
            a = float(r[b, t]) + gamma * next_v - float(v[b, t]) + gamma * lam * next_a
            adv[b, t], ret[b, t] = a, a + float(v[b, t])
            next_a, next_v = a, float(v[b, t])
    return adv, ret


def loop_whiten(x, mask, shift_mean=True, eps=1e-8):
    vals = [float(a) for a, m in zip(x.reshape(-1).tolist(), mask.reshape(-1).tolist()) if m != 0]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    rstd = 1.0 / math.sqrt(sum((a - mean) ** 2 for a in vals) / (n - 1) + eps) if n >= 2 else 0.0
    out = [((float(a) - mean) * rstd + (0.0 if shift_mean else mean)) if m != 0 else 0.0
           for a, m in zip(x.reshape(-1).tolist(), mask.reshape(-1).tolist())]
    return torch.tensor(out, dtype=torch.float64).view(x.shape)


def loop_group(scores, G, baseline, scale, eps):
    s = [float(a) for a in scores]
    out = []
    allmean = sum(s) / len(s)
    batch_std = math.sqrt(sum((a - allmean) ** 2 for a in s) / (len(s) - 1)) if len(s) > 1 else float("nan")
    for g0 in range(0, len(s), G):
        grp = s[g0:g0 + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((a - mean) ** 2 for a in grp) / (G - 1)) if G > 1 else float("nan")
        for a in grp:
            base = mean if baseline == "mean" else (sum(grp) - a) / (G - 1)
            div = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            out.append((a - base) / div)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------- inputs
def make_mask(B, T, dtype=torch.bool, device="cpu", seed=0):
    """Random holes, plus special rows: all masked, one valid token, left padding, right padding."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) > 0.3
    special = [lambda r: r.zero_(), lambda r: (r.zero_(), r.__setitem__(T // 2, True)),
               lambda r: r.__setitem__(slice(0, T // 3), False), lambda r: r.__setitem__(slice(T - T // 3, T), False)]
    for i, f in enumerate(special[:B]):
        f(m[i])
    return m.to(device=device, dtype=dtype)


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)


MASK_DTYPES = [torch.bool, torch.int64, torch.float32]

