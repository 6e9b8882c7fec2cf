"""Benchmark: KL-shaped rewards + GAE (+ whitening), the advantage pass of PPO, on (B, T).

gae providers:
  rlhf_fast          gae (the kernel RLHF_FAST_BACKEND picks: C++ on CPU, Triton scan on CUDA)
  torch_compile      torch.compile of gae_ref (its loop over T, unrolled by the compiler: only for T <= 256
                     unless --compile-loop; at T = 1024 it had not compiled after 10 minutes)
  torch_compile_scan torch.compile of gae_scan: gae_ref as an associative scan over reversed time
                     (torch's associative_scan, log2(T) levels), the form of it torch.compile can compile
                     at any T (about 20 s at 256 x 1024)
  torch              gae_ref, eager
  python_loop        the loop over t that TRL / verl / OpenRLHF run, one step per t on (B,) vectors
ppo_advantages (KL-shaped rewards -> GAE -> whitening) providers:
  rlhf_fast          ppo_advantages: shaping + GAE + whitening statistics in one pass per row, then
                     one normalising pass
  rlhf_fast_unfused  kl_shaped_rewards -> gae -> masked_whiten, each a rlhf_fast kernel
  torch_compile      torch.compile of ppo_advantages_ref (T <= 256 unless --compile-loop, as above)
  torch_compile_scan torch.compile of ppo_advantages_ref with gae_scan in place of gae_ref
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
from rlhf_fast.ops.gae import kl_shaped_rewards_ref  # noqa: E402
from rlhf_fast.ops.whiten import masked_whiten_ref  # noqa: E402

GAMMA, LAM, KL_COEF = 1.0, 0.95, 0.05
COMPILED = ("torch_compile", "torch_compile_scan")  # the speedup columns


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


def _then(first, second):
    """The composition second(first(.)) of two affine maps of GAE's carried state (next_a, next_v),
    each map (p, q, w, e, f): next_a <- p * next_a + q * next_v + e, next_v <- w * next_v + f."""
    p1, q1, w1, e1, f1 = first
    p2, q2, w2, e2, f2 = second
    return p2 * p1, p2 * q1 + q2 * w1, w2 * w1, p2 * e1 + q2 * f1 + e2, w2 * f1 + f2


def gae_scan(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """gae_ref as an associative scan: going backwards, a valid position t maps the carried state to
    (r_t - v_t + gamma * next_v + gamma * lam * next_a, v_t), a masked one leaves it as it is; the
    composition of the maps from T - 1 down to t, applied to the zero state, gives A[t] at valid t.
    torch._higher_order_ops.associative_scan composes them in log2(T) levels, which torch.compile
    compiles at any T (gae_ref's loop over T unrolls into T steps). fp32 in, fp32 out."""
    from torch._higher_order_ops.associative_scan import associative_scan

    ok = mask != 0
    one, zero = torch.ones_like(rewards), torch.zeros_like(rewards)
    maps = (torch.where(ok, gamma * lam, one), torch.where(ok, gamma, zero), torch.where(ok, zero, one),
            torch.where(ok, rewards - values, zero), torch.where(ok, values, zero))
    mode = "pointwise" if rewards.is_cuda else "generic"  # torch's pointwise mode is CUDA / XPU only
    composed = associative_scan(_then, tuple(x.flip(1) for x in maps), dim=1, combine_mode=mode)
    adv = torch.where(ok, composed[3].flip(1), 0.0)  # next_a right after step t: A[t] where t is valid
    return adv, torch.where(ok, adv + values, 0.0)


def ppo_advantages_scan(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma=GAMMA, lam=LAM):
    """ppo_advantages_ref (k1, whitened) with gae_scan in place of gae_ref."""
    rewards = kl_shaped_rewards_ref(scores, logprobs, ref_logprobs, mask, kl_coef)
    adv, returns = gae_scan(rewards, values, mask, gamma, lam)
    return masked_whiten_ref(adv, mask), returns, rewards


def check_close(name, got, want, rtol=1e-4, atol=1e-4):
    """A contender that computes something else is no contender: its outputs against ours, before timing."""
    for i, (g, w) in enumerate(zip(got, want)):
        if not torch.allclose(g.float(), w.float(), rtol=rtol, atol=atol):
            raise AssertionError(f"{name}: output {i} differs from rlhf_fast by {(g.float() - w.float()).abs().max():.3g}")


def run(B, T, device, skip_loop=False, rounds=15, compile_loop=None):
    inp = make_bt_inputs(B, T, device)
    r, v, m = inp["rewards"], inp["values"], inp["mask"]
    s, lp, rp = inp["scores"], inp["logprobs"], inp["ref_logprobs"]
    n = B * T
    compile_loop = T <= 256 if compile_loop is None else compile_loop
    scan_gae = torch.compile(gae_scan, dynamic=False)
    check_close("torch_compile_scan", scan_gae(r, v, m, GAMMA, LAM), gae(r, v, m, gamma=GAMMA, lam=LAM))
    cases = {"rlhf_fast": lambda: gae(r, v, m, gamma=GAMMA, lam=LAM),
             "torch_compile_scan": lambda: scan_gae(r, v, m, GAMMA, LAM),
             "torch": lambda: gae_ref(r, v, m, GAMMA, LAM)}
    if compile_loop:
        compiled_gae = torch.compile(gae_ref, dynamic=False)
        cases["torch_compile"] = lambda: compiled_gae(r, v, m, GAMMA, LAM)
    if torch.device(device).type == "cuda" and _backend.cuda_library() is not None:
        cases["rlhf_fast_cuda"] = lambda: with_backend("cuda", gae)(r, v, m, gamma=GAMMA, lam=LAM)
    if not skip_loop:
        cases["python_loop"] = lambda: python_loop_gae(r, v, m)
    out = [run_simple("gae", cases, (17 * n, 0), device, rounds=rounds, size=f"B={B} T={T}", against=COMPILED)]

    def unfused():
        rew = kl_shaped_rewards(s, lp, rp, m, kl_coef=KL_COEF)
        adv, ret = gae(rew, v, m, gamma=GAMMA, lam=LAM)
        return masked_whiten(adv, m), ret, rew

    scan_ppo = torch.compile(ppo_advantages_scan, dynamic=False)
    check_close("torch_compile_scan", scan_ppo(s, lp, rp, v, m, KL_COEF),
                ppo_advantages(s, lp, rp, v, m, kl_coef=KL_COEF, gamma=GAMMA, lam=LAM))
    cases = {"rlhf_fast": lambda: ppo_advantages(s, lp, rp, v, m, kl_coef=KL_COEF, gamma=GAMMA, lam=LAM),
             "rlhf_fast_unfused": unfused,
             "torch_compile_scan": lambda: scan_ppo(s, lp, rp, v, m, KL_COEF, GAMMA, LAM),
             "torch": lambda: ppo_advantages_ref(s, lp, rp, v, m, KL_COEF, GAMMA, LAM)}
    if compile_loop:
        compiled_ppo = torch.compile(ppo_advantages_ref, dynamic=False)
        cases["torch_compile"] = lambda: compiled_ppo(s, lp, rp, v, m, KL_COEF, GAMMA, LAM)
    out.append(run_simple("ppo_advantages (KL-shaped rewards + GAE + whitening)", cases, (25 * n, 0), device,
                          rounds=rounds, size=f"B={B} T={T}", against=COMPILED))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--b", type=int, default=None)
    p.add_argument("--t", type=int, default=None)
    p.add_argument("--skip-loop", action="store_true", help="leave out the Python-loop baseline")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--compile-loop", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of gae_ref's loop over T (default: only when T <= 256)")
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.device(args.device).type == "cuda"
    B, T = bt_sizes(args.quick, args.full, gpu)
    B, T = args.b or B, args.t or T
    results = run(B, T, args.device, args.skip_loop, args.rounds, args.compile_loop)
    for res in results:
        print_simple(res)
    if not args.quick or args.out:
        name = args.out or f"gae_{'cuda' if gpu else 'cpu'}.json"
        write_json(name, {"benchmark": "gae, ppo_advantages", "meta": run_meta(args.device),
                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "results": results})
    return results


if __name__ == "__main__":
    main()
