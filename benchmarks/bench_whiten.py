"""Benchmark: masked_whiten on (B, T) with a right-padded bool mask.

Providers: rlhf_fast (masked_whiten; the kernel RLHF_FAST_BACKEND picks), torch_compile (torch.compile
of masked_whiten_ref), torch (masked_whiten_ref, eager). TRL 1.16 has no masked whitening function.
Forward only (whitened advantages carry no gradient). Floor: read x + mask, write out: 9 B / token.

    python benchmarks/bench_whiten.py           # CPU: B=256, T=1024
    python benchmarks/bench_whiten.py --quick   # B=32, T=128
    python benchmarks/bench_whiten.py --full    # B=512, T=8192
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    bt_sizes,
    default_device,
    env_quick,
    make_bt_inputs,
    print_simple,
    run_meta,
    run_simple,
    write_json,
)

from rlhf_fast import masked_whiten, masked_whiten_ref  # noqa: E402


def run(B, T, device, rounds=15):
    inp = make_bt_inputs(B, T, device)
    x, m = inp["rewards"], inp["mask"]
    compiled = torch.compile(masked_whiten_ref, dynamic=False)
    cases = {"rlhf_fast": lambda: masked_whiten(x, m), "torch_compile": lambda: compiled(x, m),
             "torch": lambda: masked_whiten_ref(x, m)}
    return [run_simple("masked_whiten", cases, (9 * B * T, 0), device, rounds=rounds, size=f"B={B} T={T}")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--b", type=int, default=None)
    p.add_argument("--t", type=int, default=None)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    B, T = bt_sizes(args.quick, args.full, gpu)
    results = run(args.b or B, args.t or T, args.device, args.rounds)
    for res in results:
        print_simple(res)
    if not args.quick or args.out:
        write_json(args.out or f"whiten_{'cuda' if gpu else 'cpu'}.json",
                   {"benchmark": "masked_whiten", "meta": run_meta(args.device), "results": results})
    return results


if __name__ == "__main__":
    main()
