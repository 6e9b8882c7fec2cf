"""Benchmark: group_advantages (GRPO / RLOO) on (B,) scores in groups of G.

Providers: rlhf_fast (group_advantages; the kernel RLHF_FAST_BACKEND picks), torch_compile
(torch.compile of group_advantages_ref), torch (group_advantages_ref, eager), trl_inline (the
view / mean / std / repeat_interleave lines of TRL's GRPOTrainer, written here: TRL has no function
for it). Forward only. Floor: read scores, write advantages: 8 B / score.

    python benchmarks/bench_group_advantages.py           # CPU: 262144 scores, G = 8
    python benchmarks/bench_group_advantages.py --quick   # 4096 scores
    python benchmarks/bench_group_advantages.py --full    # 4194304 scores
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import default_device, env_quick, print_simple, run_meta, run_simple, write_json  # noqa: E402

from rlhf_fast import group_advantages, group_advantages_ref  # noqa: E402


def trl_inline(scores, G, eps=1e-6):
    """As TRL's GRPOTrainer computes it (scale by the group std)."""
    grouped = scores.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    std = grouped.std(dim=1).repeat_interleave(G)
    return (scores - mean) / (std + eps)


def run(n, G, device, rounds=15):
    torch.manual_seed(0)
    s = torch.randn(n, device=device)
    compiled = torch.compile(group_advantages_ref, dynamic=False)
    cases = {"rlhf_fast": lambda: group_advantages(s, G), "torch_compile": lambda: compiled(s, G),
             "torch": lambda: group_advantages_ref(s, G), "trl_inline": lambda: trl_inline(s, G)}
    return [run_simple("group_advantages", cases, (8 * n, 0), device, rounds=rounds, size=f"B={n} G={G}")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    n = args.n or (4096 if args.quick else (1 << 22 if args.full or gpu else 1 << 18))
    results = run(n, args.group_size, args.device, args.rounds)
    for res in results:
        print_simple(res)
    if not args.quick or args.out:
        write_json(args.out or f"group_advantages_{'cuda' if gpu else 'cpu'}.json",
                   {"benchmark": "group_advantages", "meta": run_meta(args.device), "results": results})
    return results


if __name__ == "__main__":
    main()
