"""Benchmark: forward + backward of the clipped PPO/GRPO policy loss from logits.

Providers, all computing the same loss (per-sequence advantages, clip 0.2 / 0.28, k3 KL with
beta 0.04, token-mean) on (B, T, V) logits and the gradient w.r.t. them:
  torch              ppo_policy_loss_ref: log_softmax + gather + loss, torch autograd
  rlhf_fast          ppo_policy_loss (fused; grad_logits is its only N x V allocation)
  rlhf_fast_inplace  ppo_policy_loss(inplace_backward=True): grad_logits written into the logits
  rlhf_fast:<mode>   ppo_policy_loss with one of the issue-15 objectives (MODES below) on top of
                     the same options; vs_clip = its time over plain rlhf_fast (target <= 1.1;
                     "full" also reads the (B, T, V) ref_logits twice, so its floor is 5/3 of the others')
  liger              Liger-Kernel's triton_grpo_loss (GPU only; in place, loss_type="dapo"),
                     given the (B, T + 1, V) logits it expects

Floor: forward + backward must read the logits twice and write grad_logits once:
bytes = 3 * N * V * sizeof(dtype), floor_ms = bytes / measured copy bandwidth (N = B * T).
Peak extra memory is what the op allocates above its inputs (grad_logits included); on CPU it
is the resident-set high-water mark (see _common.peak_extra_bytes).

    python benchmarks/bench_policy_loss.py              # CPU: fp32, N=4096 at V=32000, N=1024 at the larger V
    python benchmarks/bench_policy_loss.py --quick      # small sizes (smoke)
    python benchmarks/bench_policy_loss.py --n 16384 --dtype bfloat16   # GPU (the default there)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    copy_bandwidth, default_device, env_quick, fixed_mmap_threshold, metadata, peak_extra_bytes, print_table,
    time_ms, write_json,
)

from rlhf_fast import _backend, ppo_policy_loss, ppo_policy_loss_ref  # noqa: E402

OPTS = dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.04, kl_estimator="k3", loss_agg="token-mean")
VOCABS = (32000, 128256, 151936)
MODES = {
    "gspo": dict(ratio_level="sequence"),
    "gspo_token": dict(ratio_level="sequence_token"),
    "cispo": dict(loss_type="cispo"),
    "sapo": dict(loss_type="sapo"),
    "tis": dict(correction="tis"),
    "icepop": dict(correction="icepop"),
    "low_var_kl": dict(kl_estimator="low_var_kl"),
    "k3+": dict(kl_estimator="k3+"),
    "full": dict(kl_estimator="full"),
}


def make_inputs(n, v, dtype, device, seq_len=512):
    T = min(seq_len, n)
    B = max(n // T, 1)
    g = torch.Generator(device=device).manual_seed(0)
    full = (torch.randn(B, T + 1, v, generator=g, device=device) * 2).to(dtype)  # as a model returns them
    lp = torch.randn(B, T, generator=g, device=device) - 10.0
    return dict(full=full, targets=torch.randint(0, v, (B, T), generator=g, device=device),
                old=lp + 0.1 * torch.randn(B, T, generator=g, device=device),
                ref=lp + 0.1 * torch.randn(B, T, generator=g, device=device),
                sampler=lp + 0.1 * torch.randn(B, T, generator=g, device=device),
                adv=torch.randn(B, generator=g, device=device), mask=torch.ones(B, T, dtype=torch.bool, device=device))


def providers(device):
    """name -> fn(inputs) returning a closure that runs forward + backward once."""

    def ours(op, **extra):
        def setup(inp):
            # The (B, T, V) logits as their own tensor: slicing a tensor that requires grad would add
            # torch's SliceBackward (a zero-filled full-size gradient) to every provider alike.
            x = inp["full"][:, :-1].contiguous().requires_grad_()
            args = (inp["targets"], inp["old"], inp["adv"], inp["mask"])
            kw = {**OPTS, **extra}
            if kw.get("correction"):
                kw["sampler_logprobs"] = inp["sampler"]
            if kw["kl_estimator"] == "full":
                kw["ref_logits"] = (x.detach() + 0.1).contiguous()

            def run():
                loss, _ = op(x, *args, ref_logprobs=inp["ref"], **kw)
                return torch.autograd.grad(loss, x)
            return run
        return setup

    out = {"torch": ours(ppo_policy_loss_ref), "rlhf_fast": ours(ppo_policy_loss),
           "rlhf_fast_inplace": ours(ppo_policy_loss, inplace_backward=True)}
    out.update({f"rlhf_fast:{m}": ours(ppo_policy_loss, **kw) for m, kw in MODES.items()})
    if torch.device(device).type == "cuda":
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        except ImportError:
            return out

        def liger(inp):
            full = inp["full"].requires_grad_()

            def run():
                loss, _ = triton_grpo_loss(full, inp["old"], inp["ref"], inp["targets"], inp["adv"], inp["mask"],
                                           temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.28, inplace=True,
                                           loss_type="dapo", reduce=True)
                return torch.autograd.grad(loss, full)
            return run
        out["liger"] = liger
    return out


def run(n, v, dtype, device, bw, names=None, reps=5):
    """One row per provider. CPU: the providers are timed in interleaved rounds (a shared machine's
    load hits them alike); fwd_bwd_ms is the median, best_ms the minimum. GPU: triton's do_bench."""
    elem = torch.finfo(dtype).bits // 8
    floor_ms = 3 * n * v * elem / bw * 1e3
    rows, fns = [], {}
    for name, setup in providers(device).items():
        if names and name not in names:
            continue
        inp = make_inputs(n, v, dtype, device)
        row = {"provider": name}
        try:
            fn = setup(inp)
            if name != "liger":
                del inp["full"]  # only the (B, T, V) copy stays live
            fn()
            row["peak_extra_MB"] = peak_extra_bytes(fn, device) / 2**20
            fns[name] = fn
        except Exception as e:  # a provider that cannot run here is reported, not hidden
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        row.update(V=v, N=n, floor_ms=floor_ms, grad_logits_MB=n * v * elem / 2**20)
        rows.append(row)
        del inp
    if torch.device(device).type == "cuda":
        times = {name: [time_ms(fn, device)] for name, fn in fns.items()}
    else:
        times = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    fns.clear()
    for r in rows:
        if r["provider"] in times:
            t = times[r["provider"]]
            r.update(fwd_bwd_ms=statistics.median(t), best_ms=min(t), times_ms=t)
            r["of_floor"] = floor_ms / r["fwd_bwd_ms"]
    base = {r["provider"]: r for r in rows if "fwd_bwd_ms" in r}
    for r in rows:
        if "fwd_bwd_ms" in r and "torch" in base:
            r["speedup_vs_torch"] = base["torch"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["mem_vs_torch"] = r["peak_extra_MB"] / max(base["torch"]["peak_extra_MB"], 1e-9)
        if "fwd_bwd_ms" in r and r["provider"].startswith("rlhf_fast:") and "rlhf_fast" in base:
            r["vs_clip"] = r["fwd_bwd_ms"] / base["rlhf_fast"]["fwd_bwd_ms"]
            r["best_vs_clip"] = r["best_ms"] / base["rlhf_fast"]["best_ms"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--n", type=int, default=None, help="B * T (default: see above)")
    p.add_argument("--v", type=int, nargs="*", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    args = p.parse_args(argv)
    fixed_mmap_threshold()  # before allocating, so peak_extra_bytes counts every block
    gpu = torch.device(args.device).type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    vocabs = args.v or ([8192] if args.quick else list(VOCABS))
    bw = copy_bandwidth(args.device)
    notes = []
    if not gpu:
        notes.append("liger's triton_grpo_loss needs a GPU (Triton kernels): not run on CPU")
        notes.append(f"CPU: {torch.get_num_threads()} threads on a shared machine; timings are noisy")
    rows = []
    for v in vocabs:
        n = args.n or (512 if args.quick else (16384 if gpu else (4096 if v <= 32000 else 1024)))
        rows += run(n, v, dtype, args.device, bw, args.providers, reps=3 if args.quick else 7)
    backend = _backend.select_backend(torch.device(args.device))
    print(f"\nppo_policy_loss forward+backward, {str(dtype).replace('torch.', '')} on {args.device} "
          f"(backend {backend}; copy bandwidth {bw / 1e9:.1f} GB/s; floor = 3*N*V*elem bytes / bandwidth)")
    print_table(rows, ["V", "N", "provider", "fwd_bwd_ms", "best_ms", "floor_ms", "of_floor", "peak_extra_MB",
                       "grad_logits_MB", "speedup_vs_torch", "mem_vs_torch", "vs_clip", "best_vs_clip", "error"])
    for note in notes:
        print("note:", note)
    if not args.quick or args.out:
        name = args.out or f"policy_loss_{'cuda' if gpu else 'cpu'}.json"
        write_json(name, {"benchmark": "ppo_policy_loss forward+backward", "meta": metadata(args.device),
                          "dtype": str(dtype).replace("torch.", ""), "options": OPTS, "bandwidth_GBps": bw / 1e9,
                          "floor": "3 * N * V * sizeof(dtype) bytes (2 reads + 1 write of the logits) / bandwidth",
                          "notes": notes, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
