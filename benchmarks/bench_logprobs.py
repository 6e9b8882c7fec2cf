"""Benchmark: per-token log-probs (+ entropy) from logits.

Providers, each computing log_softmax(logits / T)[targets] for (N, V) logits:
  rlhf_fast          token_logprobs (dispatch: C++ on CPU, Triton on CUDA)
  rlhf_fast_inplace  the same with inplace_backward=True (grad_logits written into the logits)
  rlhf_fast_cuda     the csrc CUDA kernel (GPU, when built)
  torch              log_softmax + gather (materialises N x V)
  torch_rowloop      a Python loop of per-row logsumexp, as TRL's selective_log_softmax does
  torch_compile      torch.compile of token_logprobs_ref
  liger              Liger-Kernel's cross_entropy(reduction="none") = -logp (GPU, when installed)

Floor: the forward must read the logits once (N*V*elem bytes); forward+backward reads them
twice and writes grad_logits once (3*N*V*elem). floor_ms = bytes / measured copy bandwidth.

    python benchmarks/bench_logprobs.py                 # CPU: N=4096, V=32000 fp32
    python benchmarks/bench_logprobs.py --quick         # small sizes (CI smoke / `rlhf-fast bench`)
    python benchmarks/bench_logprobs.py --n 16384 --v 151936 --dtype bfloat16   # GPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    copy_bandwidth, default_device, env_quick, fixed_mmap_threshold, metadata, peak_extra_bytes, print_table,
    time_ms, write_json,
)

from rlhf_fast import token_logprobs, token_logprobs_ref  # noqa: E402
from rlhf_fast import _backend  # noqa: E402


def torch_gather(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def torch_rowloop(logits, targets):
    """Row by row: logsumexp of one row at a time keeps the temporary at V elements."""
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    lse = torch.stack([torch.logsumexp(row.float(), -1) for row in logits])
    return picked - lse


def providers(device):
    out = {"rlhf_fast": lambda x, t: token_logprobs(x, t),
           # backward writes grad_logits into the logits (the inputs are garbage after the first rep:
           # fine for timing, the kernel's work does not depend on the values)
           "rlhf_fast_inplace": lambda x, t: token_logprobs(x, t, inplace_backward=True)}
    if torch.device(device).type == "cuda" and _backend.cuda_library() is not None:
        def cuda_kernel(x, t):
            os.environ["RLHF_FAST_BACKEND"] = "cuda"
            try:
                return token_logprobs(x, t)
            finally:
                del os.environ["RLHF_FAST_BACKEND"]
        out["rlhf_fast_cuda"] = cuda_kernel
    out["torch"] = torch_gather
    out["torch_rowloop"] = torch_rowloop
    out["torch_compile"] = torch.compile(lambda x, t: token_logprobs_ref(x, t), dynamic=False)
    if torch.device(device).type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            out["liger"] = lambda x, t: -liger_cross_entropy(x, t, reduction="none")
        except ImportError:
            pass
    return out


def run(n, v, dtype, device, names=None):
    torch.manual_seed(0)
    logits = (torch.randn(n, v, device=device) * 2).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    elem = logits.element_size()
    bw = copy_bandwidth(device)
    floor_fwd = n * v * elem / bw * 1e3
    floor_fb = 3 * n * v * elem / bw * 1e3
    rows = []
    for name, fn in providers(device).items():
        if names and name not in names:
            continue
        x = logits.detach().clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                fn(logits, targets)

        def fwd_bwd():
            lp = fn(x, targets)
            torch.autograd.grad(lp.sum(), x)

        try:
            fwd()
            row = {"provider": name, "fwd_ms": time_ms(fwd, device), "fwd_bwd_ms": time_ms(fwd_bwd, device)}
            row["fwd_peak_extra_MB"] = peak_extra_bytes(fwd, device) / 2**20
            row["fwd_bwd_peak_extra_MB"] = peak_extra_bytes(fwd_bwd, device) / 2**20
        except Exception as e:  # a provider that cannot run here is reported, not hidden
            row = {"provider": name, "error": f"{type(e).__name__}: {str(e)[:120]}"}
        row.update(floor_fwd_ms=floor_fwd, floor_fwd_bwd_ms=floor_fb)
        if "fwd_ms" in row:
            row["fwd_of_floor"] = floor_fwd / row["fwd_ms"]
            row["fwd_bwd_of_floor"] = floor_fb / row["fwd_bwd_ms"]
        rows.append(row)
    return {"n": n, "v": v, "dtype": str(dtype).replace("torch.", ""), "bandwidth_GBps": bw / 1e9,
            "grad_logits_MB": n * v * elem / 2**20, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--v", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    fixed_mmap_threshold()  # before allocating, so peak_extra_bytes counts every block
    gpu = torch.device(args.device).type == "cuda"
    n = args.n or (1024 if args.quick else (16384 if gpu else 4096))
    v = args.v or (8192 if args.quick else (151936 if gpu else 32000))
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    res = run(n, v, dtype, args.device, args.providers)
    print(f"\ntoken_logprobs  N={n} V={v} {res['dtype']} on {args.device}  "
          f"(copy bandwidth {res['bandwidth_GBps']:.1f} GB/s; floor = bytes / bandwidth; "
          f"grad_logits itself is {res['grad_logits_MB']:.0f} MB)")
    print_table(res["rows"], ["provider", "fwd_ms", "floor_fwd_ms", "fwd_bwd_ms", "floor_fwd_bwd_ms",
                              "fwd_peak_extra_MB", "fwd_bwd_peak_extra_MB", "error"])
    base = {r["provider"]: r for r in res["rows"] if "fwd_ms" in r}
    if "rlhf_fast" in base and "torch" in base:
        ours, ref = base["rlhf_fast"], base["torch"]
        print(f"\nrlhf_fast vs log_softmax+gather: forward {ref['fwd_ms'] / ours['fwd_ms']:.2f}x faster, "
              f"fwd+bwd {ref['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x faster; extra peak memory forward "
              f"{ours['fwd_peak_extra_MB']:.1f} MB vs {ref['fwd_peak_extra_MB']:.1f} MB")
    if not args.quick or args.out:
        name = args.out or f"logprobs_{'cuda' if gpu else 'cpu'}.json"
        write_json(name, {"benchmark": "token_logprobs", "meta": metadata(args.device), **res})
    return res


if __name__ == "__main__":
    main()
