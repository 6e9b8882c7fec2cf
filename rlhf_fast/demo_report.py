"""What the demo reports (``rlhf_fast.demo`` runs the stages): every policy measured on held-out
prompts (``evaluate_policy``: gold reward, proxy score, KL to SFT, distinct-2), the verdicts
computed from those numbers, the table of OUT/summary.md, and the plots OUT/heldout.png (each
RL run's held-out curves) and OUT/frontier.png (gold reward against KL for every method).
"""
from __future__ import annotations

import math

import torch

from rlhf_fast.demo_task import gold_rewards, ideal
from rlhf_fast.trainer.health import distinct_n
from rlhf_fast.trainer.rollout import encode_prompts, reward_model_scores, rollout_logprobs, sample_rollout


@torch.no_grad()
def evaluate_policy(policy, prompts, *, tokenizer, reward_model, ref_model, samples, max_new_tokens, seed,
                    device) -> dict:
    """Held-out figures of a policy (a causal LM or PolicyValueModel): mean gold reward, mean
    proxy (reward-model) score, mean KL to ``ref_model`` per completion, share of exactly sorted
    answers, share ending with EOS, and a few (prompt, completion) examples. Sampling at
    temperature 1 with its own seeded RNG, so training's random stream is untouched."""
    lm = getattr(policy, "policy", policy)
    ps = [p for p in prompts for _ in range(samples)]
    was_training = lm.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        r = sample_rollout(lm, tokenizer, ps, encode_prompts(tokenizer, ps, 64), max_new_tokens=max_new_tokens,
                           temperature=1.0, device=device, reward_fn=gold_rewards)
    lm.train(was_training)
    proxy = reward_model_scores(reward_model, r.input_ids, r.attention_mask)
    logp, _ = rollout_logprobs(lm, r, temperature=1.0, micro_batch_size=256)
    ref_logp, _ = rollout_logprobs(ref_model, r, temperature=1.0, micro_batch_size=256)
    kl = (logp - ref_logp).sum(-1)
    exact = sum(c == ideal(p) for p, c in zip(ps, r.completions)) / len(ps)
    toks = [row[m].tolist() for row, m in zip(r.responses.cpu(), r.response_mask.cpu())]
    return {"gold": r.scores.mean().item(), "proxy": proxy.mean().item(), "kl": kl.mean().item(), "exact": exact,
            "eos_frac": r.has_eos.float().mean().item(), "distinct_2": distinct_n(toks, 2),
            "examples": [[p, c] for p, c in zip(ps[::samples][:4], r.completions[::samples][:4])]}


def verdicts(results: dict, curves: list[dict]) -> dict:
    """Plain statements of what the numbers show, computed from them (never assumed)."""
    out, sft = {}, results["SFT"]["gold"]
    for name in results:
        if name not in ("SFT", "RM") and "no KL" not in name:
            gain = results[name]["gold"] - sft
            out[name] = {"gold_gain": gain, "beats_sft": gain > 0}
    for name in ("PPO (no KL)", "GRPO (no KL)"):
        pts = [r for r in curves if r["run"] == name]
        if not pts:
            continue
        peak = max(pts, key=lambda r: r["gold"])
        last = pts[-1]
        out[name] = {"gold_peak": peak["gold"], "gold_peak_step": peak["step"], "gold_final": last["gold"],
                     "proxy_at_peak": peak["proxy"], "proxy_final": last["proxy"],
                     "over_optimised": last["proxy"] > peak["proxy"] and last["gold"] < peak["gold"] - 0.02}
    return out


def summary_table(cfg, results: dict, curves: list[dict], timings: dict, device, out) -> str:
    """OUT/summary.md: the table of every policy's held-out figures, the verdicts, examples and times."""
    c, res, v = cfg, results, verdicts(results, curves)
    lines = ["## rlhf-fast demo: sort the digits (gold reward = programmatic truth, proxy = reward model)", "",
             f"held-out: {c.n_eval_prompts} prompts x {c.eval_samples} samples at temperature 1; "
             f"reward-model accuracy on {c.n_eval_pairs} held-out pairs labelled by the gold reward", "",
             "| method | gold reward | exactly sorted | proxy (RM) | KL to SFT | distinct-2 | wall time |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if name != "RM":
            t = timings.get(timing_key(name))
            kl = f"{r['kl']:.2f}" + (" *" if "kl_note" in r else "")
            lines.append(f"| {name} | {r['gold']:.3f} | {r['exact']:.1%} | {r['proxy']:+.3f} | {kl} | "
                         f"{r.get('distinct_2', float('nan')):.3f} | {'' if t is None else f'{t:.0f}s'} |")
    if any("kl_note" in r for r in res.values()):
        lines.append("\n\\* best-of-N's KL is the analytic log N - (N - 1) / N, not a sampled estimate")
    lines += ["", f"reward model held-out accuracy: {res['RM']['accuracy']:.3f} (chance 0.5)", ""]
    for name in v:
        if "gold_gain" in v[name]:
            g = v[name]["gold_gain"]
            lines.append(f"{name} vs SFT gold reward: {res['SFT']['gold']:.3f} -> {res[name]['gold']:.3f} "
                         f"({g:+.3f}, {'better' if g > 0 else 'NOT better'})")
    for name in ("PPO (no KL)", "GRPO (no KL)"):
        if name in v:
            o = v[name]
            lines.append(
                f"{name}: proxy {o['proxy_at_peak']:+.3f} -> {o['proxy_final']:+.3f} while gold went from its peak "
                f"{o['gold_peak']:.3f} (step {o['gold_peak_step']}) to {o['gold_final']:.3f}: "
                + ("over-optimisation of the reward model" if o["over_optimised"] else
                   "no clear over-optimisation in this run"))
    lines += ["", "examples (held-out prompt -> one sample per policy):"]
    for i, (p, _) in enumerate(res["SFT"]["examples"]):
        row = ", ".join(f"{n}: {r['examples'][i][1]!r}" for n, r in res.items() if n != "RM")
        lines.append(f"  {p} ideal {ideal(p)!r} | {row}")
    t = timings
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()) +
              f" (device {device}, {c.threads} thread{'s' if c.threads > 1 else ''})",
              f"outputs: {out}/{{sft,rm,ppo,grpo}}/final (HF checkpoints), */metrics.jsonl, */metrics.png, "
              "heldout.jsonl, heldout.png, summary.json"]
    return "\n".join(lines)


def timing_key(name: str) -> str:
    """The ``timings`` key of a result row: its output folder (best-of-N: "best_of_n")."""
    if name.startswith("Best-of-"):
        return "best_of_n"
    return name.lower().replace(" (no kl)", "_no_kl")


def heldout_plot(curves: list[dict], sft_gold: float, path) -> None:
    """OUT/heldout.png: held-out gold, proxy and KL of every RL run against its step."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in curves))
    if not runs:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("gold", "proxy", "kl"),
                              ("gold reward (truth)", "proxy reward (RM)", "KL to SFT (nats / completion)")):
        for run in runs:
            pts = [(r["step"], r[key]) for r in curves if r["run"] == run and math.isfinite(r[key])]
            ax.plot(*zip(*pts), marker="o", ms=3, label=run, ls="--" if "no KL" in run else "-",
                    color={"PPO": "tab:blue", "GRPO": "tab:orange", "RLOO": "tab:green",
                           "RLAIF": "tab:red"}.get(run.split(" ")[0], "tab:gray"))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].axhline(sft_gold, color="gray", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def frontier_plot(results: dict, curves: list[dict], path) -> None:
    """OUT/frontier.png: held-out gold reward against KL to SFT, one marker per method and, in its
    colour, each RL run's path through its held-out evaluations (in step order)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    names = [n for n, r in results.items() if "gold" in r]
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    for run in dict.fromkeys(r["run"] for r in curves):  # each RL run's path, in step order
        pts = sorted((r["step"], r["kl"], r["gold"]) for r in curves if r["run"] == run and math.isfinite(r["kl"]))
        if len(pts) > 1:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], lw=1.0, alpha=0.45, color=colors.get(run, "gray"))
    for name in names:
        r = results[name]
        ax.plot(r["kl"], r["gold"], marker="o", ms=7, ls="none", color=colors[name], label=name)
    ax.set_xlabel("KL to SFT (nats / completion)")
    ax.set_ylabel("held-out gold reward")
    ax.set_title("gold reward vs KL: the over-optimisation frontier", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
