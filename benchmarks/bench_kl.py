"""Benchmark: exact full-vocabulary KL and the per-token KL estimators.

full_kl (N, V) logits and ref_logits, providers:
  rlhf_fast          full_kl (dispatch: C++ on CPU, Triton on CUDA): one streaming pass over both
  torch              log_softmax of both, then sum p (log p - log q) (materialises several N x V)
  torch_compile      torch.compile of full_kl_ref (with --compile; slow to compile on CPU)
kl_penalty (N,) log-probs, providers: rlhf_fast, torch (kl_penalty_ref), estimator k3.

Floors (bytes / measured copy bandwidth):
  full_kl forward    read logits + ref_logits once: 2 * N * V * elem
  full_kl fwd+bwd    forward, then read both again and write grad_logits: 5 * N * V * elem
  kl_penalty         read two fp32 tensors, write one: 12 B / token

    python benchmarks/bench_kl.py                       # CPU: N=1024, V=32000 fp32
    python benchmarks/bench_kl.py --quick               # small sizes (smoke)
    python benchmarks/bench_kl.py --n 16384 --v 151936 --dtype bfloat16   # GPU target size
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    copy_bandwidth, default_device, env_quick, metadata, peak_extra_bytes, print_table, time_ms, write_json,
)

from rlhf_fast import full_kl, full_kl_ref, kl_penalty, kl_penalty_ref  # noqa: E402


def full_kl_providers(compile_ref=False):
    out = {"rlhf_fast": lambda x, y: full_kl(x, y), "torch": lambda x, y: full_kl_ref(x, y)}
    if compile_ref:
        out["torch_compile"] = torch.compile(lambda x, y: full_kl_ref(x, y), dynamic=False)
    return out


def run_full_kl(n, v, dtype, device, bw, compile_ref=False):
    torch.manual_seed(0)
    logits = (torch.randn(n, v, device=device) * 2).to(dtype)
    ref_logits = (logits.float() + torch.randn(n, v, device=device)).to(dtype)
    elem = logits.element_size()
    floor_fwd = 2 * n * v * elem / bw * 1e3
    floor_fb = 5 * n * v * elem / bw * 1e3
    rows = []
    for name, fn in full_kl_providers(compile_ref).items():
        x = logits.detach().clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                fn(logits, ref_logits)

        def fwd_bwd():
            torch.autograd.grad(fn(x, ref_logits).sum(), x)

        try:
            fwd()
            row = {"provider": name, "fwd_ms": time_ms(fwd, device, reps=5),
                   "fwd_bwd_ms": time_ms(fwd_bwd, device, reps=5)}
            row["fwd_peak_extra_MB"] = peak_extra_bytes(fwd, device) / 2**20
            row["fwd_bwd_peak_extra_MB"] = peak_extra_bytes(fwd_bwd, device) / 2**20
            row["fwd_of_floor"] = floor_fwd / row["fwd_ms"]
            row["fwd_bwd_of_floor"] = floor_fb / row["fwd_bwd_ms"]
        except Exception as e:  # a provider that cannot run here is reported, not hidden
            row = {"provider": name, "error": f"{type(e).__name__}: {str(e)[:120]}"}
        row.update(floor_fwd_ms=floor_fwd, floor_fwd_bwd_ms=floor_fb)
        rows.append(row)
    return {"n": n, "v": v, "dtype": str(dtype).replace("torch.", ""), "grad_logits_MB": n * v * elem / 2**20,
            "rows": rows}


def run_kl_penalty(n, device, bw):
    lp, rp = torch.randn(n, device=device), torch.randn(n, device=device)
    floor = 12 * n / bw * 1e3
    rows = []
    for name, fn in {"rlhf_fast": lambda: kl_penalty(lp, rp, "k3"), "torch": lambda: kl_penalty_ref(lp, rp, "k3")}.items():
        ms = time_ms(fn, device, reps=7)
        rows.append({"provider": name, "ms": ms, "floor_ms": floor, "of_floor": floor / ms})
    return {"n": n, "estimator": "k3", "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--v", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.device(args.device).type == "cuda"
    n = args.n or (256 if args.quick else (16384 if gpu else 1024))
    v = args.v or (4096 if args.quick else (151936 if gpu else 32000))
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    bw = copy_bandwidth(args.device)
    fk = run_full_kl(n, v, dtype, args.device, bw, args.compile)
    kp = run_kl_penalty(n * 256, args.device, bw)
    print(f"\nfull_kl  N={n} V={v} {fk['dtype']} on {args.device}  (copy bandwidth {bw / 1e9:.1f} GB/s; "
          f"floor = bytes / bandwidth; grad_logits itself is {fk['grad_logits_MB']:.0f} MB)")
    print_table(fk["rows"], ["provider", "fwd_ms", "floor_fwd_ms", "fwd_of_floor", "fwd_bwd_ms", "floor_fwd_bwd_ms",
                             "fwd_bwd_of_floor", "fwd_peak_extra_MB", "fwd_bwd_peak_extra_MB", "error"])
    print(f"\nkl_penalty  N={kp['n']} fp32, k3")
    print_table(kp["rows"], ["provider", "ms", "floor_ms", "of_floor"])
    if not gpu:
        print("\nGPU target (full_kl on bf16 logits, N=16384, V=151936, >= 85% of bandwidth on an H100) is not "
              "measured on CPU: run this script on a GPU.")
    if not args.quick or args.out:
        name = args.out or f"kl_{'cuda' if gpu else 'cpu'}.json"
        write_json(name, {"benchmark": "kl", "meta": metadata(args.device), "bandwidth_GBps": bw / 1e9,
                          "load_average_1_5_15min": os.getloadavg(),
                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                          "full_kl": fk, "kl_penalty": kp})
    return fk, kp


if __name__ == "__main__":
    main()
