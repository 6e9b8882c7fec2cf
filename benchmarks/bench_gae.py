"""Benchmark: KL-shaped rewards + GAE (+ whitening), the advantage pass of PPO, on (B, T).

gae providers:
  rlhf_fast          gae (the kernel RLHF_FAST_BACKEND picks: C++ on CPU, Triton scan on CUDA)
  torch_compile      torch.compile of gae_ref
  torch              gae_ref, eager
  python_loop        the loop over t that TRL / verl / OpenRLHF run, one step per t on (B,) vectors
ppo_advantages (KL-shaped rewards -> GAE -> whitening) providers:
  rlhf_fast          ppo_advantages: shaping + GAE + whitening statistics in one pass per row, then
                     one normalising pass
  rlhf_fast_unfused  kl_shaped_rewards -> gae -> masked_whiten, each a rlhf_fast kernel
  torch_compile      torch.compile of ppo_advantages_ref
  torch              ppo_advantages_ref, eager
TRL 1.16 has no GAE function (its PPO trainer was removed); python_loop is what such trainers ran.
Forward only: advantages carry no gradient. No exps (k1 estimator): the floor is bandwidth.

Floors: gae reads rewards + values + mask and writes advantages + returns: 17 B / token;
ppo_advantages reads logprobs + ref_logprobs + values + mask and writes advantages + returns +
rewards: 25 B / token (one pass; the whitening's second pass is not in the floor).

    OMP_WAIT_POLICY=passive python benchmarks/bench_gae.py   # CPU: B=256, T=1024
    python benchmarks/bench_gae.py --quick      # B=32, T=128 (smoke)
    python benchmarks/bench_gae.py --full       # B=512, T=8192 (the GPU target size)
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
    with_backend,
    write_json,
)

from rlhf_fast import (  # noqa: E402
    _backend,  # noqa: E402
    gae,
    gae_ref,
    kl_shaped_rewards,
    masked_whiten,
    ppo_advantages,
    ppo_advantages_ref,
)

GAMMA, LAM, KL_COEF = 1.0, 0.95, 0.05


def python_loop_gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """GAE as the RLHF libraries compute it: a Python loop over t, vectorised over the batch.
    Masked positions pass (next advantage, next value) through, so holes match rlhf_fast.gae."""
    m = (mask != 0).to(rewards.dtype)
    B, T = rewards.shape
    next_a = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_v = torch.zeros_like(next_a)
    advs = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * next_a
        mt = m[:, t]
        next_a = mt * a + (1 - mt) * next_a
        next_v = mt * values[:, t] + (1 - mt) * next_v
        advs.append(mt * a)
    adv = torch.stack(advs[::-1], dim=1)
    return adv, (adv + values) * m


def run(B, T, device, skip_loop=False, rounds=15):
    inp = make_bt_inputs(B, T, device)
    r, v, m = inp["rewards"], inp["values"], inp["mask"]
    s, lp, rp = inp["scores"], inp["logprobs"], inp["ref_logprobs"]
    n = B * T
    compiled_gae = torch.compile(gae_ref, dynamic=False)
    cases = {"rlhf_fast": lambda: gae(r, v, m, gamma=GAMMA, lam=LAM),
             "torch_compile": lambda: compiled_gae(r, v, m, GAMMA, LAM),
             "torch": lambda: gae_ref(r, v, m, GAMMA, LAM)}
    if torch.device(device).type == "cuda" and _backend.cuda_library() is not None:
        cases["rlhf_fast_cuda"] = lambda: with_backend("cuda", gae)(r, v, m, gamma=GAMMA, lam=LAM)
    if not skip_loop:
        cases["python_loop"] = lambda: python_loop_gae(r, v, m)
    out = [run_simple("gae", cases, (17 * n, 0), device, rounds=rounds, size=f"B={B} T={T}")]

    def unfused():
        rew = kl_shaped_rewards(s, lp, rp, m, kl_coef=KL_COEF)
        adv, ret = gae(rew, v, m, gamma=GAMMA, lam=LAM)
        return masked_whiten(adv, m), ret, rew

    compiled_ppo = torch.compile(ppo_advantages_ref, dynamic=False)
    cases = {"rlhf_fast": lambda: ppo_advantages(s, lp, rp, v, m, kl_coef=KL_COEF, gamma=GAMMA, lam=LAM),
             "rlhf_fast_unfused": unfused,
             "torch_compile": lambda: compiled_ppo(s, lp, rp, v, m, KL_COEF, GAMMA, LAM),
             "torch": lambda: ppo_advantages_ref(s, lp, rp, v, m, KL_COEF, GAMMA, LAM)}
    out.append(run_simple("ppo_advantages (KL-shaped rewards + GAE + whitening)", cases, (25 * n, 0), device,
                          rounds=rounds, size=f"B={B} T={T}"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--b", type=int, default=None)
    p.add_argument("--t", type=int, default=None)
    p.add_argument("--skip-loop", action="store_true", help="leave out the Python-loop baseline")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.device(args.device).type == "cuda"
    B, T = bt_sizes(args.quick, args.full, gpu)
    B, T = args.b or B, args.t or T
    results = run(B, T, args.device, args.skip_loop, args.rounds)
    for res in results:
        print_simple(res)
    if not args.quick or args.out:
        name = args.out or f"gae_{'cuda' if gpu else 'cpu'}.json"
        write_json(name, {"benchmark": "gae, ppo_advantages", "meta": run_meta(args.device),
                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "results": results})
    return results


if __name__ == "__main__":
    main()
