"""Benchmark: per-token log-probs and scalar losses straight from hidden states (the LM head fused in).

Providers, each computing logp = log_softmax(hidden @ W.T)[targets] for hidden (N, H), W (V, H):
  eager              hidden @ W.T, log_softmax, gather (materialises N x V, and its grad)
  torch_compile      torch.compile of eager
  torch_lce          -F.linear_cross_entropy(reduction="none"), reference path (options=None)
  torch_lce_chunked  the same with LinearCrossEntropyOptions() (torch's chunked path, "auto" policy)
  torch_lce_chunked_accurate  LinearCrossEntropyOptions(acc_policy="accurate")
  ours_logits        hidden @ W.T materialised, then our token_logprobs(inplace_backward=True)
  ours_hidden        linear_token_logprobs (chunked, backward recomputes: 8NHV for fwd+bwd)
  ours_fused         linear_token_logprobs(impl="fused"): the Triton GEMM+softmax kernels (8NHV; CUDA only)
and the scalar losses (sum / mean of -logp; gradients formed in the forward where fused):
  eager_nll          F.cross_entropy(hidden @ W.T, targets)
  torch_lce_mean_chunked  F.linear_cross_entropy(reduction="mean", options=LinearCrossEntropyOptions())
  ours_nll           linear_cross_entropy (6NHV)
  ours_ppo           linear_ppo_policy_loss, GRPO-style (per-sequence advantages, k3 KL, entropy bonus) (6NHV)
  ours_fused_nll     linear_cross_entropy(impl="fused") (8NHV; CUDA only)
and on CUDA, when installed (the GPU suite carries their wheels; see benchmarks/gpu_suite.sh):
  cce                cut_cross_entropy.linear_cross_entropy(reduction="none") = -logp (Apple's CCE)
  cce_nll            the same, reduction="mean"
  liger_flce_nll     Liger-Kernel's LigerFusedLinearCrossEntropyLoss (token mean; gradients in the forward)

Floor: FLOPs over this machine's GEMM rate, measured in the same run with plain matmuls of the same
shapes: forward = t(h @ W.T); forward+backward = t(h @ W.T) + t(g @ W) + t(g.T @ h) (6NHV), plus one
more t(h @ W.T) for the per-token ops that recompute (8NHV). Peak extra memory beside the unavoidable
outputs (grad_hidden + grad_weight, the memory floor of fwd+bwd).

    python benchmarks/bench_linear_logprobs.py --quick      # small sizes (smoke)
    python benchmarks/bench_linear_logprobs.py --full       # CPU: N=4096, H=1024, V in {32000, 151936}
    python benchmarks/bench_linear_logprobs.py --n 4096 --h 1024 --v 32000 --providers eager ours_hidden
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    default_device,
    env_quick,
    fixed_mmap_threshold,
    metadata,
    peak_extra_bytes,
    print_table,
    time_ms,
    write_json,
)

from rlhf_fast import token_logprobs  # noqa: E402
from rlhf_fast.ops.head_gemm import mm_into, native_gemm  # noqa: E402
from rlhf_fast.ops.linear_logprobs import linear_token_logprobs  # noqa: E402
from rlhf_fast.ops.linear_policy_loss import linear_cross_entropy, linear_ppo_policy_loss  # noqa: E402

PER_TOKEN = ("eager", "torch_compile", "torch_lce", "torch_lce_chunked", "torch_lce_chunked_accurate", "ours_logits",
             "ours_hidden")
SCALAR = ("eager_nll", "torch_lce_mean_chunked", "ours_nll", "ours_ppo")


def eager(h, w, t):
    return torch.log_softmax((h @ w.T).float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def per_token_providers():
    opts = torch.nn.LinearCrossEntropyOptions
    return {
        "eager": eager,
        "torch_compile": torch.compile(eager, dynamic=False),
        "torch_lce": lambda h, w, t: -F.linear_cross_entropy(h, w, t, reduction="none"),
        "torch_lce_chunked": lambda h, w, t: -F.linear_cross_entropy(h, w, t, reduction="none", options=opts()),
        "torch_lce_chunked_accurate": lambda h, w, t: -F.linear_cross_entropy(
            h, w, t, reduction="none", options=opts(acc_policy="accurate")),
        "ours_logits": lambda h, w, t: token_logprobs(h @ w.T, t, inplace_backward=True),
        "ours_hidden": lambda h, w, t: linear_token_logprobs(h, w, t),
    } | gpu_contenders(per_token=True) | fused_providers(per_token=True)


def fused_providers(per_token: bool) -> dict:
    """impl="fused" (rlhf_fast/ops/linear_triton.py), on CUDA only: Triton runs no CPU tensors here."""
    if not torch.cuda.is_available():
        return {}
    if per_token:
        return {"ours_fused": lambda h, w, t: linear_token_logprobs(h, w, t, impl="fused")}
    return {"ours_fused_nll": lambda h, w, t: linear_cross_entropy(h, w, t, impl="fused")}


def gpu_contenders(per_token: bool) -> dict:
    """CCE and Liger's fused linear cross-entropy, on CUDA when they import (else absent)."""
    if not torch.cuda.is_available():
        return {}
    out = {}
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        if per_token:
            out["cce"] = lambda h, w, t: -cce(h, w, t, reduction="none")
        else:
            out["cce_nll"] = lambda h, w, t: cce(h, w, t, reduction="mean")
    except ImportError:
        pass
    if not per_token:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            flce = LigerFusedLinearCrossEntropyLoss(reduction="mean")
            out["liger_flce_nll"] = lambda h, w, t: flce(w, h, t)
        except ImportError:
            pass
    return out


def scalar_providers(n):
    B = max(n // 64, 1)
    T = n // B
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.1
    ref = torch.full((B, T), -9.0)

    def ppo(h, w, t):
        return linear_ppo_policy_loss(h.view(B, T, -1), w, t.view(B, T), None, adv, mask, ref_logprobs=ref,
                                      kl_coef=0.04, entropy_coef=0.01, loss_agg="seq-mean-token-mean")[0]

    return {
        "eager_nll": lambda h, w, t: F.cross_entropy((h @ w.T).float(), t),
        "torch_lce_mean_chunked": lambda h, w, t: F.linear_cross_entropy(
            h, w, t, options=torch.nn.LinearCrossEntropyOptions()),
        "ours_nll": lambda h, w, t: linear_cross_entropy(h, w, t),
        "ours_ppo": ppo,
    } | gpu_contenders(per_token=False) | fused_providers(per_token=False)


def gemm_fns(h, w, device):
    """The three GEMMs of one head pass, as callables to time beside the providers: torch.mm (the
    floor the targets are stated against) and, on CPU, the same shapes through head_gemm.mm_into
    (csrc/cpu/linear.cpp, what ours use) and oneDNN (torch.ops.mkldnn._linear_pointwise, the
    fastest GEMM torch ships for this CPU; it allocates its output)."""
    g = torch.randn(h.shape[0], w.shape[0], dtype=h.dtype, device=device)
    gw = torch.empty_like(w)
    fns = {"gemm_fwd": lambda: torch.mm(h, w.T), "gemm_grad_hidden": lambda: torch.mm(g, w),
           "gemm_grad_weight": lambda: torch.mm(g.T, h, out=gw)}
    if torch.device(device).type == "cpu" and h.dtype == torch.float32:
        z, gh = g, torch.empty_like(h)  # native_fwd overwrites g (values do not matter for timing): one N x V less
        if native_gemm(h.device):
            fns |= {"native_fwd": lambda: mm_into(z, h, w.T), "native_grad_hidden": lambda: mm_into(gh, g, w),
                    "native_grad_weight": lambda: mm_into(gw, g.T, h, beta=1.0)}
        pw = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
        if pw is not None and torch.backends.mkldnn.is_available():
            fns |= {"onednn_fwd": lambda: pw(h, w, None, "none", [], ""),
                    "onednn_grad_hidden": lambda: pw(g, w.T, None, "none", [], ""),
                    "onednn_grad_weight": lambda: pw(h.T.contiguous(), g.T, None, "none", [], "")}
    return fns


def floors(ms, prefix, at):
    """(fwd, 6NHV, 8NHV) ms of one GEMM family from the timings ``ms`` (at=0: min, 1: median)."""
    keys = [f"{prefix}_{k}" for k in ("fwd", "grad_hidden", "grad_weight")]
    if not all(k in ms for k in keys):
        return None
    f, gh, gw = (ms[k][at] for k in keys)
    return f, f + gh + gw, 2 * f + gh + gw


def provider_fns(fn, h, w, t, device, scalar):
    hx = h.detach().clone().requires_grad_()
    wx = w.detach().clone().requires_grad_()
    go = torch.randn(h.shape[0], device=device)

    def fwd():
        with torch.no_grad():
            return fn(h, w, t)

    def fwd_bwd():
        out = fn(hx, wx, t)
        return torch.autograd.grad(out * 1.5 if scalar else (out * go).sum(), (hx, wx))

    return ({} if scalar else {"fwd": fwd}) | {"fwd_bwd": fwd_bwd}


def interleaved_ms(fns, device, rounds, budget_s=60.0):
    """{key: (min, median, n) ms}: every callable once per round, rounds interleaved, so that load from
    other processes hits all contenders alike; the min is the least-disturbed figure. A callable
    that has used budget_s seconds is not timed again (the slow contenders get fewer rounds)."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            if sum(times[k]) < budget_s * 1e3:
                times[k].append(time_ms(f, device, warmup=0, reps=1))
    return {k: (min(v), sorted(v)[len(v) // 2], len(v)) for k, v in times.items()}


def run(n, hd, v, dtype, device, names=None, reps=5):
    torch.manual_seed(0)
    h = torch.randn(n, hd, device=device).to(dtype)
    w = (torch.randn(v, hd, device=device) / hd ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), device=device)
    out_mb = (n * hd + v * hd) * h.element_size() / 2**20  # grad_hidden + grad_weight
    fns, rows = gemm_fns(h, w, device), {}
    for provs, scalar in ((per_token_providers(), False), (scalar_providers(n), True)):
        for name, fn in provs.items():
            if names and name not in names:
                continue
            rows[name] = {"provider": name, "scalar": scalar}
            try:
                pf = provider_fns(fn, h, w, t, device, scalar)
                pf["fwd_bwd"]()  # warm-up / compile
                rows[name]["fwd_bwd_peak_extra_MB"] = peak_extra_bytes(pf["fwd_bwd"], device) / 2**20
                if "fwd" in pf:
                    rows[name]["fwd_peak_extra_MB"] = peak_extra_bytes(pf["fwd"], device) / 2**20
                fns.update({f"{name}/{k}": f for k, f in pf.items()})
            except Exception as e:  # a provider that cannot run here is reported, not hidden
                rows[name]["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            print(f"  ready: {name}", flush=True)
    ms = interleaved_ms(fns, device, reps)
    fl = {k: ms[k][0] for k in ("gemm_fwd", "gemm_grad_hidden", "gemm_grad_weight")}
    floor_fwd, floor_6, floor_8 = floors(ms, "gemm", 0)
    med_fwd, med_6, med_8 = floors(ms, "gemm", 1)
    extra = {}
    for fam in ("native", "onednn"):
        for at, tag in ((0, ""), (1, "_median")):
            f = floors(ms, fam, at)
            if f is not None:
                extra |= {f"{fam}_floor_fwd{tag}_ms": f[0], f"{fam}_floor_6NHV{tag}_ms": f[1],
                          f"{fam}_floor_8NHV{tag}_ms": f[2]}
    for name, row in rows.items():
        for k in ("fwd", "fwd_bwd"):
            if f"{name}/{k}" in ms:
                row[f"{k}_ms"], row[f"{k}_median_ms"], row[f"{k}_rounds"] = ms[f"{name}/{k}"]
        recompute = name in ("ours_hidden", "torch_lce_chunked", "torch_lce_chunked_accurate", "cce",
                             "cce_nll", "ours_fused", "ours_fused_nll")
        row["floor_fwd_ms"] = None if row.pop("scalar") else floor_fwd
        row["floor_fwd_bwd_ms"] = floor_8 if recompute else floor_6
        row["floor_fwd_bwd_median_ms"] = med_8 if recompute else med_6
        row["floor_peak_MB"] = out_mb
        if "fwd_bwd_ms" in row:
            row["fwd_bwd_x_floor"] = row["fwd_bwd_ms"] / row["floor_fwd_bwd_ms"]
            row["fwd_bwd_median_x_floor_median"] = row["fwd_bwd_median_ms"] / row["floor_fwd_bwd_median_ms"]
            row["fwd_bwd_peak_beyond_outputs_MB"] = row["fwd_bwd_peak_extra_MB"] - out_mb
            native = extra.get("native_floor_8NHV_median_ms" if recompute else "native_floor_6NHV_median_ms")
            if native:
                row["fwd_bwd_median_x_native_floor_median"] = row["fwd_bwd_median_ms"] / native
        if "fwd_ms" in row:
            row["fwd_x_floor"] = row["fwd_ms"] / floor_fwd
    return {"n": n, "h": hd, "v": v, "dtype": str(dtype).replace("torch.", ""),
            "timing": "min and median of interleaved rounds", "rounds": reps,
            **{f"{k}_ms": x for k, x in fl.items()}, "gemm_GFLOPs": 2 * n * hd * v / (floor_fwd / 1e3) / 1e9,
            "gemm_GFLOPs_median": 2 * n * hd * v / (med_fwd / 1e3) / 1e9, "floor_fwd_ms": floor_fwd,
            "floor_6NHV_ms": floor_6, "floor_8NHV_ms": floor_8, "floor_6NHV_median_ms": med_6,
            "floor_8NHV_median_ms": med_8, **extra,
            "gemm_timings_ms": {k: {"min": v[0], "median": v[1], "rounds": v[2]} for k, v in ms.items() if "/" not in k},
            "logits_MB": n * v * 4 / 2**20, "grad_outputs_MB": out_mb,
            "chunk_bytes": int(os.environ.get("RLHF_FAST_HEAD_CHUNK_BYTES", str(64 << 20))),
            "rows": list(rows.values())}


def summary(res):
    """Medians of the interleaved rounds (the shared machine's load hits every contender alike)."""
    by = {r["provider"]: r for r in res["rows"] if "fwd_bwd_ms" in r}
    lines = []
    if "eager" in by and "ours_hidden" in by:
        e, o = by["eager"], by["ours_hidden"]
        lines.append(f"ours_hidden vs eager: fwd+bwd {e['fwd_bwd_median_ms'] / o['fwd_bwd_median_ms']:.2f}x faster "
                     f"(medians), peak beyond the grad outputs {o['fwd_bwd_peak_beyond_outputs_MB']:.0f} MB vs "
                     f"{e['fwd_bwd_peak_beyond_outputs_MB']:.0f} MB ("
                     f"{e['fwd_bwd_peak_beyond_outputs_MB'] / max(o['fwd_bwd_peak_beyond_outputs_MB'], 1e-9):.1f}x less)")
    for a, b in (("ours_fused", "ours_hidden"), ("ours_fused_nll", "ours_nll")):
        if a in by and b in by:
            lines.append(f"{a} vs {b}: fwd+bwd {by[b]['fwd_bwd_median_ms'] / by[a]['fwd_bwd_median_ms']:.2f}x faster")
    for name in ("ours_hidden", "ours_nll", "ours_ppo"):
        if name in by:
            r = by[name]
            native = r.get("fwd_bwd_median_x_native_floor_median")
            lines.append(f"{name}: fwd+bwd {r['fwd_bwd_median_x_floor_median']:.2f}x the torch.mm GEMM floor"
                         + (f", {native:.2f}x the same FLOPs through our GEMM" if native else "") + " (medians)")
    for ours, lce in (("ours_hidden", "torch_lce_chunked"), ("ours_hidden", "torch_lce_chunked_accurate"),
                      ("ours_nll", "torch_lce_mean_chunked")):
        if lce in by and ours in by:
            lines.append(f"{ours} vs {lce}: fwd+bwd {by[lce]['fwd_bwd_median_ms'] / by[ours]['fwd_bwd_median_ms']:.1f}x "
                         "faster (medians)")
    return lines


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--h", type=int, default=None)
    p.add_argument("--v", type=int, nargs="*", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--reps", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--chunk-mb", type=float, default=None,
                   help="RLHF_FAST_HEAD_CHUNK_BYTES in MiB (default 64; --quick 2)")
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    fixed_mmap_threshold()  # before allocating, so peak_extra_bytes counts every block
    load_start = os.getloadavg()  # the machine may be shared: load recorded beside the figures
    chunk_mb = args.chunk_mb or (2 if args.quick else None)
    if chunk_mb:
        os.environ["RLHF_FAST_HEAD_CHUNK_BYTES"] = str(int(chunk_mb * 2**20))
    n = args.n or (512 if args.quick else 4096)
    hd = args.h or (256 if args.quick else 1024)
    vs = args.v or ([8192] if args.quick else [32000, 151936] if args.full else [32000])
    dtype = getattr(torch, args.dtype)
    results = []
    for v in vs:
        res = run(n, hd, v, dtype, args.device, args.providers, args.reps)
        print(f"\nfrom-hidden log-probs  N={n} H={hd} V={v} {res['dtype']} on {args.device}, "
              f"{torch.get_num_threads()} threads (GEMM {res['gemm_GFLOPs']:.0f} GFLOP/s measured here; "
              f"fp32 logits alone would be {res['logits_MB']:.0f} MB)")
        print_table(res["rows"], ["provider", "fwd_ms", "floor_fwd_ms", "fwd_bwd_ms", "floor_fwd_bwd_ms",
                                  "fwd_bwd_x_floor", "fwd_peak_extra_MB", "fwd_bwd_peak_extra_MB", "floor_peak_MB",
                                  "error"])
        for line in summary(res):
            print(line)
        results.append(res)
    name = args.out or f"linear_logprobs_{'cuda' if torch.device(args.device).type == 'cuda' else 'cpu'}" \
                       f"{'_quick' if args.quick else ''}.json"
    meta = metadata(args.device) | {"loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                                     "uptime_end": uptime(), "head_gemm": "native" if native_gemm(args.device) else "torch"}
    write_json(name, {"benchmark": "linear_token_logprobs", "meta": meta, "runs": results})
    return results


if __name__ == "__main__":
    main()
