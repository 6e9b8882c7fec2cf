"""Benchmark: the fused clipped PPO/GRPO policy loss from (B, T, V) logits, with and without entropy.

Ops (forward, and forward + backward w.r.t. the logits), all computing the same loss (per-sequence
advantages, clip 0.2 / 0.28, k3 KL with beta 0.04, token-mean):
  policy_loss          entropy off
  policy_loss_entropy  entropy bonus on (entropy_coef = 0.01)
Providers:
  rlhf_fast          ppo_policy_loss (the kernel RLHF_FAST_BACKEND picks; grad_logits its only N x V buffer)
  rlhf_fast_inplace  ppo_policy_loss(inplace_backward=True): grad_logits written into the logits
  rlhf_fast_entropy_off  (in policy_loss_entropy) the loss without the entropy bonus; the entropy on / off
                     ratio pairs it with rlhf_fast (_common.paired_ratio: the two alone, alternating)
  torch_compile      torch.compile of ppo_policy_loss_ref
  torch              ppo_policy_loss_ref, eager (log_softmax + gather + loss, torch autograd)
  liger              Liger-Kernel's triton_grpo_loss (GPU only; in place, loss_type="dapo", entropy off)
Op policy_loss_modes: ppo_policy_loss with each issue-15 objective (MODES below) on top of the same
options, against plain rlhf_fast (speedup_vs_rlhf_fast; the target is >= 1 / 1.1 = 0.91). "full"
also reads the (B, T, V) ref_logits in the separate full_kl op's forward and backward.
TRL computes this loss inline in its GRPOTrainer (selective_log_softmax + torch ops): the log-prob
part is TRL's row of bench_logprobs.py.

Floors beside each figure: exp floor = exps / measured exp rate (1 per element forward, 2 forward +
backward), copy floor = bytes / measured copy bandwidth (1 resp. 3 passes over N x V).

    python benchmarks/bench_policy_loss.py            # CPU: N=1024, V in {32000, 151936}, fp32
    python benchmarks/bench_policy_loss.py --full     # N=4096
    python benchmarks/bench_policy_loss.py --quick    # N=64 (smoke)
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
    print_table,
    run_fused,
    run_meta,
    write_json,
)

from rlhf_fast import ppo_policy_loss, ppo_policy_loss_ref  # noqa: E402

OPTS = dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.04, kl_estimator="k3", loss_agg="token-mean")
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


def providers(device, entropy):
    opts = dict(OPTS, entropy_coef=0.01) if entropy else OPTS
    ref = lambda x, *a, **k: ppo_policy_loss_ref(x, *a, **k)  # noqa: E731
    out = {"rlhf_fast": (ppo_policy_loss, {}), "rlhf_fast_inplace": (ppo_policy_loss, {"inplace_backward": True}),
           "torch_compile": (torch.compile(ref, dynamic=False), {}), "torch": (ppo_policy_loss_ref, {})}
    return {k: (fn, dict(opts, **extra)) for k, (fn, extra) in out.items()}


def liger_case(inp):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    full = inp["full"].detach().clone().requires_grad_()

    def run():
        loss, _ = triton_grpo_loss(full, inp["old"], inp["ref"], inp["targets"], inp["adv"], inp["mask"],
                                   temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.28, inplace=True,
                                   loss_type="dapo", reduce=True)
        return torch.autograd.grad(loss, full)
    return {"fwd_bwd": run}


def make_setup(entropy, skip=()):
    def setup(n, v, dtype, device):
        inp = make_inputs(n, v, dtype, device)
        # the (B, T, V) logits as their own tensor: slicing a tensor that requires grad would add torch's
        # SliceBackward (a zero-filled full-size gradient) to every provider alike
        logits = inp["full"][:, :-1].contiguous()
        if torch.device(device).type != "cuda":
            del inp["full"]  # (Liger's GPU case reads it)
        args = (inp["targets"], inp["old"], inp["adv"], inp["mask"])
        cases = {}
        shared = logits.detach().clone().requires_grad_()  # only read: one leaf for the providers that keep it
        for name, (fn, opts) in providers(device, entropy).items():
            if name in skip:
                continue
            x = logits.detach().clone().requires_grad_() if name.endswith("_inplace") else shared

            def fwd(fn=fn, opts=opts):
                with torch.no_grad():
                    return fn(logits, *args, ref_logprobs=inp["ref"], **opts)

            def fwd_bwd(fn=fn, opts=opts, x=x):
                loss, _ = fn(x, *args, ref_logprobs=inp["ref"], **opts)
                return torch.autograd.grad(loss, x)

            cases[name] = {"fwd_bwd": fwd_bwd} if name.endswith("_inplace") else {"fwd": fwd, "fwd_bwd": fwd_bwd}
        if entropy and "rlhf_fast" not in skip:  # the loss without the entropy bonus: the on / off pair
            fn, opts = ppo_policy_loss, dict(OPTS)

            def fwd_off():
                with torch.no_grad():
                    return fn(logits, *args, ref_logprobs=inp["ref"], **opts)

            def fwd_bwd_off():
                loss, _ = fn(shared, *args, ref_logprobs=inp["ref"], **opts)
                return torch.autograd.grad(loss, shared)

            cases["rlhf_fast_entropy_off"] = {"fwd": fwd_off, "fwd_bwd": fwd_bwd_off}
        if torch.device(device).type == "cuda" and not entropy:
            try:
                cases["liger"] = liger_case(inp)
            except ImportError:
                pass
        nv, elem = logits.numel(), logits.element_size()
        return cases, {"fwd": (nv * elem, nv), "fwd_bwd": (3 * nv * elem, 2 * nv)}
    return setup


def modes_setup(n, v, dtype, device):
    """fwd_bwd of plain rlhf_fast and of each MODES entry (same inputs, same base options)."""
    inp = make_inputs(n, v, dtype, device)
    logits = inp["full"][:, :-1].contiguous()
    del inp["full"]
    args = (inp["targets"], inp["old"], inp["adv"], inp["mask"])
    cases = {}
    for name, extra in {"rlhf_fast": {}, **{f"rlhf_fast:{m}": kw for m, kw in MODES.items()}}.items():
        x = logits.detach().clone().requires_grad_()
        opts = dict(OPTS, **extra)
        if opts.get("correction"):
            opts["sampler_logprobs"] = inp["sampler"]
        if opts["kl_estimator"] == "full":
            opts["ref_logits"] = logits + 0.1

        def fwd_bwd(x=x, opts=opts):
            loss, _ = ppo_policy_loss(x, *args, ref_logprobs=inp["ref"], **opts)
            return torch.autograd.grad(loss, x)
        cases[name] = {"fwd_bwd": fwd_bwd}
    nv, elem = logits.numel(), logits.element_size()
    return cases, {"fwd": (nv * elem, nv), "fwd_bwd": (3 * nv * elem, 2 * nv)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--v", type=int, nargs="*", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], help="providers to leave out (e.g. torch at --full)")
    p.add_argument("--no-modes", action="store_true", help="leave out the policy_loss_modes rows")
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
    results = []
    for op, entropy in (("policy_loss", False), ("policy_loss_entropy", True)):
        results += run_fused(op, make_setup(entropy, args.skip), sizes, dtype, args.device, rounds=args.rounds,
                             pairs=[("torch_compile", "rlhf_fast")]
                             + ([("rlhf_fast", "rlhf_fast_entropy_off")] if entropy else []))
    modes = [] if args.no_modes else run_fused("policy_loss_modes", modes_setup, sizes, dtype, args.device,
                                               rounds=args.rounds, memory=False, against="rlhf_fast")
    print_fused(results)
    print_entropy_ratios(results)
    print_paired_speedups(results)
    for res in modes:  # cost of each mode relative to the plain fused clipped loss (target <= 1.1)
        for r in res["rows"]:
            if "fwd_bwd_ms" in r:
                r["vs_clip"] = 1 / r["fwd_bwd_speedup_vs_rlhf_fast"]
        print(f"\n{res['op']}  N={res['n']} V={res['v']} {res['dtype']}  (copy {res['bandwidth_GBps']:.1f} GB/s)")
        print_table(res["rows"], ["provider", "fwd_bwd_ms", "fwd_bwd_copy_floor_ms", "vs_clip", "error"])
    results += modes
    if not args.quick or args.out:
        name = args.out or f"policy_loss_{'cuda' if gpu else 'cpu'}.json"
        write_json(name, {"benchmark": "ppo_policy_loss", "meta": run_meta(args.device), "results": results})
    return results


if __name__ == "__main__":
    main()
