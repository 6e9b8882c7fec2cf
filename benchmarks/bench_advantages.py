"""Benchmark: the advantage side of PPO / GRPO.

gae (B, T), providers:
  rlhf_fast          gae (dispatch: C++ on CPU, Triton parallel scan on CUDA)
  rlhf_fast_cuda     the csrc CUDA kernel (GPU, when built)
  python_loop        the loop over time that TRL / verl / OpenRLHF run: one step per t on (B,)
                     vectors, masked positions carry the state (written here, same semantics)
ppo_advantages (B, T), providers:
  rlhf_fast          ppo_advantages: KL shaping + GAE + whitening statistics in one pass per row,
                     then one normalising pass
  rlhf_fast_unfused  kl_shaped_rewards -> gae -> masked_whiten, each a rlhf_fast kernel
  torch_composition  the unfused torch ops: KL estimator, shaped rewards, the Python-loop GAE,
                     masked whitening (ppo_advantages_ref)
masked_whiten (B, T) and group_advantages (B,): rlhf_fast vs the torch ops (*_ref).

Floors (bytes the op must move / measured copy bandwidth), fp32 inputs, bool mask:
  gae               read rewards + values + mask, write advantages + returns: 17 B / token
  ppo_advantages    read logprobs + ref_logprobs + values + mask, write advantages + returns +
                    rewards: 25 B / token (the whitening's second pass over the advantages,
                    8 B / token more, is not in the floor: the target counts one pass)
  masked_whiten     read x + mask, write out: 9 B / token
  group_advantages  read scores, write advantages: 8 B / score

    OMP_WAIT_POLICY=passive python benchmarks/bench_advantages.py   # CPU: B=256, T=1024 (passive:
                                                    # on a shared, loaded machine spinning OpenMP
                                                    # workers stall every parallel region)
    python benchmarks/bench_advantages.py --quick       # small sizes (smoke)
    python benchmarks/bench_advantages.py --b 512 --t 8192   # GPU target size
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    copy_bandwidth, default_device, env_quick, metadata, print_table, time_ms, write_json,
)

from rlhf_fast import (  # noqa: E402
    gae, group_advantages, group_advantages_ref, kl_shaped_rewards, masked_whiten, masked_whiten_ref,
    ppo_advantages, ppo_advantages_ref,
)
from rlhf_fast import _backend  # noqa: E402

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


def with_backend(name, fn):
    def call(*a, **k):
        old = os.environ.get("RLHF_FAST_BACKEND")
        os.environ["RLHF_FAST_BACKEND"] = name
        try:
            return fn(*a, **k)
        finally:
            if old is None:
                del os.environ["RLHF_FAST_BACKEND"]
            else:
                os.environ["RLHF_FAST_BACKEND"] = old
    return call


def make_inputs(B, T, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)  # right padding, as after generation
    x = lambda: torch.randn(B, T, generator=g).to(device)  # noqa: E731
    return {"scores": torch.randn(B, generator=g).to(device), "logprobs": x(), "ref_logprobs": x(),
            "values": x(), "rewards": x(), "mask": mask}


def bench_rows(cases, device, floor_ms):
    rows = []
    for name, fn in cases.items():
        try:
            t0 = time.perf_counter()
            fn()
            quick = time.perf_counter() - t0 < 5e-3  # fast ops: more samples, the median of a noisy machine
            ms = time_ms(fn, device, reps=31 if quick else 5)
            row = {"provider": name, "ms": ms, "floor_ms": floor_ms, "of_floor": floor_ms / ms}
        except Exception as e:  # a provider that cannot run here is reported, not hidden
            row = {"provider": name, "error": f"{type(e).__name__}: {str(e)[:120]}", "floor_ms": floor_ms}
        rows.append(row)
    base = next((r["ms"] for r in rows if r["provider"] == "rlhf_fast" and "ms" in r), None)
    for r in rows:
        if base and "ms" in r:
            r["rlhf_fast_speedup"] = r["ms"] / base
    return rows


def run(B, T, device, skip_loop=False):
    inp = make_inputs(B, T, device)
    r, v, m = inp["rewards"], inp["values"], inp["mask"]
    s, lp, rp = inp["scores"], inp["logprobs"], inp["ref_logprobs"]
    bw = copy_bandwidth(device)
    floor = lambda nbytes: nbytes / bw * 1e3  # noqa: E731
    n = B * T
    gpu = torch.device(device).type == "cuda"
    results = {}

    cases = {"rlhf_fast": lambda: gae(r, v, m, gamma=GAMMA, lam=LAM)}
    if gpu and _backend.cuda_library() is not None:
        cases["rlhf_fast_cuda"] = lambda: with_backend("cuda", gae)(r, v, m, gamma=GAMMA, lam=LAM)
    if not skip_loop:
        cases["python_loop"] = lambda: python_loop_gae(r, v, m)
    results["gae"] = bench_rows(cases, device, floor(17 * n))

    def unfused():
        rew = kl_shaped_rewards(s, lp, rp, m, kl_coef=KL_COEF)
        adv, ret = gae(rew, v, m, gamma=GAMMA, lam=LAM)
        return masked_whiten(adv, m), ret, rew

    cases = {"rlhf_fast": lambda: ppo_advantages(s, lp, rp, v, m, kl_coef=KL_COEF, gamma=GAMMA, lam=LAM),
             "rlhf_fast_unfused": unfused}
    if not skip_loop:
        cases["torch_composition"] = lambda: ppo_advantages_ref(s, lp, rp, v, m, KL_COEF, GAMMA, LAM)
    results["ppo_advantages"] = bench_rows(cases, device, floor(25 * n))

    results["masked_whiten"] = bench_rows(
        {"rlhf_fast": lambda: masked_whiten(r, m), "torch": lambda: masked_whiten_ref(r, m)}, device, floor(9 * n))

    G = 8
    scores = torch.randn(B * G * 4, device=device)
    results["group_advantages"] = bench_rows(
        {"rlhf_fast": lambda: group_advantages(scores, G), "torch": lambda: group_advantages_ref(scores, G)},
        device, floor(8 * scores.numel()))
    return {"B": B, "T": T, "group_scores": scores.numel(), "group_size": G, "bandwidth_GBps": bw / 1e9,
            "results": results}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--b", type=int, default=None)
    p.add_argument("--t", type=int, default=None)
    p.add_argument("--skip-loop", action="store_true", help="leave out the Python-loop baselines")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.device(args.device).type == "cuda"
    B = args.b or (32 if args.quick else (512 if gpu else 256))
    T = args.t or (128 if args.quick else (8192 if gpu else 1024))
    res = run(B, T, args.device, args.skip_loop)
    print(f"\nadvantages  B={B} T={T} fp32, bool mask, on {args.device}  (copy bandwidth "
          f"{res['bandwidth_GBps']:.1f} GB/s; floor = bytes / bandwidth; of_floor = floor / time)")
    for op, rows in res["results"].items():
        print(f"\n{op}")
        print_table(rows, ["provider", "ms", "floor_ms", "of_floor", "rlhf_fast_speedup", "error"])
    if not gpu:
        print("\nGPU targets (gae / ppo_advantages >= 70% of bandwidth at B=512, T=8192 on an H100) are not "
              "measured on CPU: run this script on a GPU.")
    if not args.quick or args.out:
        name = args.out or f"advantages_{'cuda' if gpu else 'cpu'}.json"
        write_json(name, {"benchmark": "advantages", "meta": metadata(args.device),
                          "load_average_1_5_15min": os.getloadavg(),
                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), **res})
    return res


if __name__ == "__main__":
    main()
