"""Best-of-N / rejection sampling: sample N completions per prompt, keep the best by a reward.

    for each prompt x:   y_1..y_N ~ pi(. | x) at temperature T         (HF generate, KV cache)
                         s_i = reward(x, y_i)                           (reward_fn or reward model)
                         best = y_argmax(s), worst = y_argmin(s)
    write  OUT/samples.jsonl      every completion and score
           OUT/sft.jsonl          {"prompt", "response": best}          -> an SFT data set
           OUT/preferences.jsonl  {"prompt", "chosen": best, "rejected": worst}   (pairs whose
                                  texts or scores tie are left out)
    then, with ``sft_steps > 0``, SFT the policy on OUT/sft.jsonl -> OUT/sft/final (one round of
    the recipe's "rejection sampling"; ``rlhf-fast best-of-n`` runs it all).

At inference, best-of-N is a policy of its own: ``best_of_n_curve(select, value, k)`` is the
expected ``value`` (e.g. the gold reward) of the completion a selector (e.g. a proxy reward)
picks among k of the N samples, averaged exactly over every k-subset (the unbiased estimator)::

    order = argsort(select)  (ascending, per prompt);  E_k = sum_i value[order[i]] * C(i, k-1) / C(N, k)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast.data import write_jsonl
from rlhf_fast.trainer.config import ConfigError, check_field, check_types
from rlhf_fast.trainer.rollout import encode_prompts, sample_rollout


@dataclass
class BestOfNConfig:
    """Fields of ``rlhf-fast best-of-n`` (a sampling run, then an optional SFT round)."""

    output_dir: str = "runs/best_of_n"
    seed: int = 0
    device: str = "auto"
    overwrite_output_dir: bool = False  # replace the samples already in output_dir
    n: int = 8  # completions per prompt
    temperature: float = 1.0
    max_new_tokens: int = 64
    max_prompt_length: int = 256
    batch_size: int = 64  # sequences per generate call
    # the SFT round on the best completions (0 steps: sample and write the data sets only)
    sft_steps: int = 0
    sft_batch_size: int = 16
    sft_learning_rate: float = 1e-5
    progress_bar: bool = True
    tensorboard: bool = False  # of the SFT round
    plot: bool = True  # of the SFT round (output_dir/sft/metrics.png)

    def __post_init__(self):
        check_types(self)
        check_field(self, "device", self.device in ("auto", "cpu") or self.device.startswith("cuda"),
                    "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        for name in ("n", "max_new_tokens", "max_prompt_length", "batch_size", "sft_batch_size"):
            check_field(self, name, getattr(self, name) >= 1, "must be >= 1")
        check_field(self, "n", self.n >= 2, "must be >= 2 (best-of-1 is plain sampling)")
        check_field(self, "sft_steps", self.sft_steps >= 0, "must be >= 0")
        for name in ("temperature", "sft_learning_rate"):
            check_field(self, name, getattr(self, name) > 0, "must be > 0")

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**d)


@torch.no_grad()
def sample_n(policy, tokenizer, prompts: list[str], n: int, *, max_new_tokens: int, temperature: float = 1.0,
             device="cpu", reward_fn=None, reward_model=None, batch_size: int = 64, seed: int = 0,
             max_prompt_length: int = 256) -> list[dict]:
    """Per prompt ``{"prompt", "completions": [N], "scores": [N], "best", "worst", "best_score",
    "worst_score"}``: N sampled completions scored by ``reward_fn`` or ``reward_model``. Uses its
    own seeded RNG stream (the caller's is untouched)."""
    if (reward_fn is None) == (reward_model is None):
        raise ValueError("pass exactly one of reward_fn and reward_model")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = torch.device(device)
    lm = getattr(policy, "policy", policy)
    flat = [p for p in prompts for _ in range(n)]
    ids = encode_prompts(tokenizer, flat, max_prompt_length)
    comps, scores = [], []
    per = max(batch_size // n, 1) * n  # whole groups per call
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for s in range(0, len(flat), per):
            r = sample_rollout(lm, tokenizer, flat[s : s + per], ids[s : s + per], max_new_tokens=max_new_tokens,
                               temperature=temperature, device=device, reward_fn=reward_fn, reward_model=reward_model)
            comps += r.completions
            scores += r.scores.float().cpu().tolist()
    out = []
    for i, p in enumerate(prompts):
        c, sc = comps[i * n : (i + 1) * n], scores[i * n : (i + 1) * n]
        b, w = max(range(n), key=sc.__getitem__), min(range(n), key=sc.__getitem__)
        out.append({"prompt": p, "completions": c, "scores": sc, "best": c[b], "worst": c[w],
                    "best_score": sc[b], "worst_score": sc[w]})
    return out


def best_of_n_curve(select: torch.Tensor, value: torch.Tensor, ks=None) -> dict[int, float]:
    """{k: expected ``value`` of the sample with the highest ``select`` among k of the N samples
    per prompt, averaged over prompts and over every k-subset} (module docstring). ``select``,
    ``value``: (P, N). Ties in ``select`` are broken by position."""
    if select.shape != value.shape or select.dim() != 2:
        raise ValueError(f"select and value must both be (P, N), got {tuple(select.shape)} and {tuple(value.shape)}")
    N = select.shape[1]
    ks = list(range(1, N + 1)) if ks is None else list(ks)
    order = select.double().argsort(dim=-1, stable=True)
    v = value.double().gather(-1, order)  # ascending by select
    out = {}
    for k in ks:
        if not 1 <= k <= N:
            raise ValueError(f"k must lie in [1, {N}], got {k}")
        w = torch.tensor([math.comb(i, k - 1) / math.comb(N, k) for i in range(N)], dtype=torch.float64)
        out[k] = float((v * w).sum(-1).mean())
    return out


def write_datasets(results: list[dict], out_dir) -> dict:
    """OUT/samples.jsonl, OUT/sft.jsonl and OUT/preferences.jsonl (module docstring); returns
    their paths and row counts."""
    out = Path(out_dir)
    write_jsonl(out / "samples.jsonl", [{k: r[k] for k in ("prompt", "completions", "scores")} for r in results])
    sft = [{"prompt": r["prompt"], "response": r["best"]} for r in results if r["best"]]
    pairs = [{"prompt": r["prompt"], "chosen": r["best"], "rejected": r["worst"]} for r in results
             if r["best"] and r["worst"] and r["best"] != r["worst"] and r["best_score"] > r["worst_score"]]
    if sft:
        write_jsonl(out / "sft.jsonl", sft)
    if pairs:
        write_jsonl(out / "preferences.jsonl", pairs)
    return {"sft": out / "sft.jsonl", "sft_rows": len(sft), "preferences": out / "preferences.jsonl",
            "preference_rows": len(pairs)}


def run_best_of_n(cfg: BestOfNConfig, *, policy, tokenizer, prompts: list[str], reward_fn=None, reward_model=None,
                  raw_prompts: list[str] | None = None, gold_fn=None, log=print) -> dict:
    """One round: sample, write the data sets (prompts as ``raw_prompts``, default ``prompts``:
    the policy sees ``prompts``, e.g. rendered with a chat template) and, when
    ``cfg.sft_steps > 0``, SFT ``policy`` on the best completions. Returns a summary (also
    OUT/best_of_n.json). With ``gold_fn``: the gold reward of the samples and ``gold_curve``, the
    expected gold reward of best-of-k by the reward, for k = 1..N."""
    from rlhf_fast.trainer.runtime import resolve_device

    out = Path(cfg.output_dir)
    if (out / "samples.jsonl").exists() and not cfg.overwrite_output_dir:
        raise FileExistsError(f"output_dir {out} already holds best-of-N samples; set overwrite_output_dir=true "
                              "to replace them, or choose another output_dir")
    device = resolve_device(cfg.device)
    if reward_model is not None:
        reward_model = reward_model.to(device).eval()
    res = sample_n(policy.to(device), tokenizer, prompts, cfg.n, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, device=device, reward_fn=reward_fn, reward_model=reward_model,
                   batch_size=cfg.batch_size, seed=cfg.seed, max_prompt_length=cfg.max_prompt_length)
    if raw_prompts is not None:
        for r, p in zip(res, raw_prompts):
            r["prompt"] = p
    files = write_datasets(res, out)
    scores = torch.tensor([r["scores"] for r in res])
    summary = {"prompts": len(res), "n": cfg.n, "mean_score": float(scores.mean()),
               "best_score": float(scores.max(-1).values.mean()), "curve": best_of_n_curve(scores, scores),
               "sft_rows": files["sft_rows"], "preference_rows": files["preference_rows"]}
    if gold_fn is not None:
        gold = torch.tensor([[float(g) for g in gold_fn([r["prompt"]] * len(r["completions"]), r["completions"])]
                             for r in res])
        summary["gold_mean"] = float(gold.mean())
        summary["gold_curve"] = best_of_n_curve(scores, gold)
    log(f"best-of-{cfg.n}: {len(res)} prompts, mean score {summary['mean_score']:.4f}, "
        f"best {summary['best_score']:.4f} "
        f"-> {files['sft']} ({files['sft_rows']} rows), {files['preferences']} ({files['preference_rows']} pairs)")
    if cfg.sft_steps:
        if not files["sft_rows"]:
            raise ConfigError("sft_steps > 0 but no best completion is non-empty: nothing to fine-tune on")
        from rlhf_fast.data import load_sft
        from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer

        scfg = SFTConfig(output_dir=str(out / "sft"), seed=cfg.seed, device=cfg.device, max_steps=cfg.sft_steps,
                         batch_size=cfg.sft_batch_size, micro_batch_size=cfg.sft_batch_size,
                         learning_rate=cfg.sft_learning_rate, overwrite_output_dir=cfg.overwrite_output_dir,
                         progress_bar=cfg.progress_bar, tensorboard=cfg.tensorboard, plot=cfg.plot)
        lm = getattr(policy, "policy", policy)
        summary["sft"] = SFTTrainer(scfg, model=lm, tokenizer=tokenizer, train_data=load_sft(files["sft"])).train()
    (out / "best_of_n.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
