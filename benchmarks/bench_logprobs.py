"""Benchmark: per-token log-probs, and log-probs + entropy, from (N, V) logits.

Ops (each forward, and forward + backward of sum(g * logp) [+ sum(g' * H)] w.r.t. the logits):
  logprobs          log_softmax(logits)[targets]
  logprobs_entropy  the same and the entropy of softmax(logits)

Providers:
  rlhf_fast          token_logprobs (the kernel RLHF_FAST_BACKEND picks: C++ on CPU, Triton on CUDA)
  rlhf_fast_inplace  the same with inplace_backward=True (grad_logits written into the logits)
  rlhf_fast_entropy_off  (in logprobs_entropy) the log-prob alone; the entropy on / off ratio pairs it with
                     rlhf_fast (_common.paired_ratio: the two alone, alternating)
  torch_compile      torch.compile of token_logprobs_ref
  torch              token_logprobs_ref, eager (log_softmax + gather; materialises N x V)
  trl                trl.trainer.utils.selective_log_softmax / selective_log_softmax_and_entropy
  liger              Liger-Kernel's cross_entropy(reduction="none") = -logp (GPU, log-probs only)

Floors, printed beside each figure: exp floor = exps / the kernels' measured exp rate (forward: one
exp per element; forward + backward: two), copy floor = bytes / measured copy bandwidth (forward
reads the logits once, forward + backward reads them twice and writes grad_logits once).

    python benchmarks/bench_logprobs.py            # CPU: N=1024, V in {32000, 151936}, fp32
    python benchmarks/bench_logprobs.py --full     # N=4096
    python benchmarks/bench_logprobs.py --quick    # N=64 (smoke)
    RLHF_FAST_BACKEND=triton python benchmarks/bench_logprobs.py --dtype bfloat16   # GPU
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
    fused_sizes,
    print_entropy_ratios,
    print_fused,
    print_paired_speedups,
    run_fused,
    run_meta,
    write_json,
)

from rlhf_fast import token_logprobs, token_logprobs_ref  # noqa: E402


def torch_gather(logits, targets):  # kept for benchmarks/test_bench_logprobs.py
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def torch_rowloop(logits, targets):
    """Row by row: logsumexp of one row at a time keeps the temporary at V elements."""
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    lse = torch.stack([torch.logsumexp(row.float(), -1) for row in logits])
    return picked - lse


def _trl():
    try:
        from trl.trainer import utils
    except ImportError:
        return None
    return utils


def providers(device, entropy=False):
    """name -> fn(logits, targets) returning logp or (logp, entropy)."""
    ref = lambda x, t: token_logprobs_ref(x, t, 1.0, entropy)  # noqa: E731
    out = {"rlhf_fast": lambda x, t: token_logprobs(x, t, return_entropy=entropy),
           "rlhf_fast_inplace": lambda x, t: token_logprobs(x, t, return_entropy=entropy, inplace_backward=True),
           "torch_compile": torch.compile(ref, dynamic=False),
           "torch": ref}
    trl = _trl()
    if trl is not None:
        if entropy and hasattr(trl, "selective_log_softmax_and_entropy"):
            out["trl"] = lambda x, t: trl.selective_log_softmax_and_entropy(x, t)
        elif not entropy:
            out["trl"] = lambda x, t: trl.selective_log_softmax(x, t)
    if torch.device(device).type == "cuda" and not entropy:
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            out["liger"] = lambda x, t: -liger_cross_entropy(x, t, reduction="none")
        except ImportError:
            pass
    return out


def make_setup(entropy, skip=()):
    def setup(n, v, dtype, device):
        logits = (torch.randn(n, v, device=device) * 2).to(dtype)
        targets = torch.randint(0, v, (n,), device=device)
        g_lp, g_ent = torch.randn(n, device=device), torch.randn(n, device=device)
        cases = {}
        shared = logits.detach().clone().requires_grad_()  # only read: one leaf for the providers that keep it
        for name, fn in providers(device, entropy).items():
            if name in skip:
                continue
            x = logits.detach().clone().requires_grad_() if name.endswith("_inplace") else shared

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(logits, targets)

            def fwd_bwd(fn=fn, x=x):
                out = fn(x, targets)
                loss = (out[0] * g_lp).sum() + (out[1] * g_ent).sum() if entropy else (out * g_lp).sum()
                return torch.autograd.grad(loss, x)

            cases[name] = {"fwd_bwd": fwd_bwd} if name.endswith("_inplace") else {"fwd": fwd, "fwd_bwd": fwd_bwd}
        if entropy and "rlhf_fast" not in skip:  # the entropy-off kernel in the same rotation: on / off ratio
            x_off = shared

            def fwd_off():
                with torch.no_grad():
                    return token_logprobs(logits, targets)

            def fwd_bwd_off():
                return torch.autograd.grad((token_logprobs(x_off, targets) * g_lp).sum(), x_off)

            cases["rlhf_fast_entropy_off"] = {"fwd": fwd_off, "fwd_bwd": fwd_bwd_off}
        nv, elem = n * v, logits.element_size()
        return cases, {"fwd": (nv * elem, nv), "fwd_bwd": (3 * nv * elem, 2 * nv)}
    return setup


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--v", type=int, nargs="*", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--skip", nargs="*", default=[], help="providers to leave out (e.g. torch trl at --full)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    fixed_mmap_threshold()  # before allocating: every provider's large blocks are fresh mmaps alike
    gpu = torch.device(args.device).type == "cuda"
    sizes = fused_sizes(args.quick, args.full, gpu)
    if args.n or args.v:
        sizes = [(args.n or sizes[0][0], v) for v in (args.v or [s[1] for s in sizes])]
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    results = []
    for op, entropy in (("logprobs", False), ("logprobs_entropy", True)):
        results += run_fused(op, make_setup(entropy, args.skip), sizes, dtype, args.device, rounds=args.rounds,
                             pairs=[("torch_compile", "rlhf_fast")]
                             + ([("rlhf_fast", "rlhf_fast_entropy_off")] if entropy else []))
    print_fused(results)
    print_entropy_ratios(results)
    print_paired_speedups(results)
    if not args.quick or args.out:
        name = args.out or f"logprobs_{'cuda' if gpu else 'cpu'}.json"
        write_json(name, {"benchmark": "token_logprobs", "meta": run_meta(args.device), "results": results})
    return results


if __name__ == "__main__":
    main()
