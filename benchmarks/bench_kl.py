"""Benchmark: exact full-vocabulary KL, and the per-token KL estimator.

full_kl: KL(softmax(logits) || softmax(ref_logits)) per row of (N, V) logits; forward, and forward +
backward w.r.t. the logits. Providers:
  rlhf_fast          full_kl (the kernel RLHF_FAST_BACKEND picks): one streaming pass over both rows
  torch_compile      torch.compile of full_kl_ref
  torch              full_kl_ref, eager (log_softmax of both, then sum p (log p - log q); several N x V)
TRL has no full-vocabulary KL (it uses the per-token estimators on log-probs).
kl_penalty (k3) on (N * 256,) log-probs: rlhf_fast vs kl_penalty_ref, forward.

Floors beside each figure: exp floor = exps / measured exp rate (forward: 2 exps per element, one per
distribution; forward + backward: 3), copy floor = bytes / measured copy bandwidth (forward reads both
rows once: 2 * N * V * elem; forward + backward: 5 * N * V * elem).

    python benchmarks/bench_kl.py            # CPU: N=1024, V in {32000, 151936}, fp32
    python benchmarks/bench_kl.py --full     # N=4096
    python benchmarks/bench_kl.py --quick    # N=64 (smoke)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    default_device,
    env_quick,
    fixed_mmap_threshold,
    floor_ms,
    floors,
    fused_sizes,
    interleaved_ms,
    print_fused,
    print_table,
    run_fused,
    run_meta,
    write_json,
)

from rlhf_fast import full_kl, full_kl_ref, kl_penalty, kl_penalty_ref  # noqa: E402


def make_full_kl_setup(skip=()):
    def setup(n, v, dtype, device):
        return full_kl_setup(n, v, dtype, device, skip)
    return setup


def full_kl_setup(n, v, dtype, device, skip=()):
    logits = (torch.randn(n, v, device=device) * 2).to(dtype)
    ref = (logits.float() + 0.5 * torch.randn(n, v, device=device)).to(dtype)
    g = torch.randn(n, device=device)
    provs = {"rlhf_fast": lambda x, y: full_kl(x, y), "torch_compile": torch.compile(full_kl_ref, dynamic=False),
             "torch": full_kl_ref}
    cases = {}
    x = logits.detach().clone().requires_grad_()  # only read: one leaf for every provider
    for name, fn in provs.items():
        if name in skip:
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(logits, ref)

        def fwd_bwd(fn=fn, x=x):
            return torch.autograd.grad((fn(x, ref) * g).sum(), x)

        cases[name] = {"fwd": fwd, "fwd_bwd": fwd_bwd}
    nv, elem = n * v, logits.element_size()
    return cases, {"fwd": (2 * nv * elem, 2 * nv), "fwd_bwd": (5 * nv * elem, 3 * nv)}


def run_kl_penalty(n, device, rounds):
    lp, rp = torch.randn(n, device=device) - 5, torch.randn(n, device=device) - 5
    cases = {"rlhf_fast": lambda: kl_penalty(lp, rp, "k3"), "torch_compile": torch.compile(
        lambda a, b: kl_penalty_ref(a, b, "k3"), dynamic=False), "torch": lambda: kl_penalty_ref(lp, rp, "k3")}
    compiled = cases["torch_compile"]
    cases["torch_compile"] = lambda: compiled(lp, rp)
    med, raw, errors = interleaved_ms(cases, device, rounds=max(rounds, 15))
    fl = floors(device)
    copy_f, exp_f = floor_ms(fl, 12 * n, n)
    rows = [{"provider": k, "fwd_ms": med.get(k), "fwd_raw_ms": raw.get(k), "fwd_copy_floor_ms": copy_f,
             "fwd_exp_floor_ms": exp_f, "error": errors.get(k)} for k in cases]
    return {"op": "kl_penalty_k3", "n": n, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--v", type=int, nargs="*", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], help="providers to leave out (e.g. torch at --full)")
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    fixed_mmap_threshold()
    gpu = torch.device(args.device).type == "cuda"
    sizes = fused_sizes(args.quick, args.full, gpu)
    if args.n or args.v:
        sizes = [(args.n or sizes[0][0], v) for v in (args.v or [s[1] for s in sizes])]
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    results = run_fused("full_kl", make_full_kl_setup(args.skip), sizes, dtype, args.device, rounds=args.rounds)
    print_fused(results)
    kp = run_kl_penalty(sizes[0][0] * 256, args.device, args.rounds)
    print(f"\nkl_penalty (k3)  N={kp['n']} fp32")
    print_table(kp["rows"], ["provider", "fwd_ms", "fwd_exp_floor_ms", "fwd_copy_floor_ms", "error"])
    if not args.quick or args.out:
        name = args.out or f"kl_{'cuda' if gpu else 'cpu'}.json"
        write_json(name, {"benchmark": "full_kl, kl_penalty", "meta": run_meta(args.device),
                          "results": results, "kl_penalty": kp})
    return results


if __name__ == "__main__":
    main()
