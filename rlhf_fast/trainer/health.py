"""Failure-mode metrics of an RL step (reward hacking, over-optimisation, mode collapse) and the
held-out evaluation during RL (``eval_prompts`` / ``eval_steps``).

Per step, over every rank's completions (token ids, up to and including EOS)::

    response/length_max      longest completion (tokens)
    response/truncated_frac  share that hit max_new_tokens without EOS
    response/distinct_1, _2  distinct n-grams / all n-grams of the batch (Li et al. 2016): falls as
                             the policy repeats itself (mode collapse)
    response/self_similarity mean over prompts of the mean pairwise Jaccard similarity of the bigram
                             sets of its completions (groups of GRPO / RLOO; 1: all identical)
    reward/gold, reward/proxy_minus_gold   with a ``gold_fn``: the held-out truth, and the gap
                             the optimised score opens over it (reward hacking watch)

``evaluate_prompts`` samples one completion per held-out prompt with its own RNG stream (the
training stream is untouched, so turning it on changes no training number) and reports
``eval/reward``, ``eval/gold``, ``eval/proxy_minus_gold``, ``eval/kl_ref`` (sum over the
completion of log pi - log pi_ref), ``eval/length``, ``eval/distinct_2``.
"""
from __future__ import annotations

import torch

from rlhf_fast.trainer.collectives import all_reduce, gather_rows, global_max
from rlhf_fast.trainer.rollout import encode_prompts, function_scores, rollout_logprobs, sample_rollout
from rlhf_fast.trainer.sharding import gathered


def ngrams(seq: list[int], n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of ``seqs`` (0.0 when there are none)."""
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_similarity(seqs: list[list[int]], group_size: int) -> float:
    """Mean over consecutive groups of the mean pairwise Jaccard similarity of bigram sets
    (unigram sets for sequences shorter than 2; two empty sets count as identical)."""
    sims = []
    for g in range(0, len(seqs) - group_size + 1, group_size):
        sets = [set(ngrams(s, 2)) if len(s) >= 2 else set(ngrams(s, 1)) for s in seqs[g : g + group_size]]
        pair = [len(a & b) / len(a | b) if a | b else 1.0 for i, a in enumerate(sets) for b in sets[i + 1:]]
        sims.append(sum(pair) / len(pair))
    return sum(sims) / len(sims) if sims else 0.0


def completion_tokens(responses: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Every rank's completions as id lists (the global batch, in rank order)."""
    width = global_max(responses.shape[1])
    shifted = torch.where(mask, responses + 1, 0)  # 0 marks padding (gather_rows pads with 0)
    glob = gather_rows(shifted, width).cpu()
    return [[t - 1 for t in row.tolist() if t > 0] for row in glob]


def health_metrics(batch, *, group_size: int, max_new_tokens: int, gold_fn=None) -> dict:
    """The per-step failure-mode metrics of the module docstring (global over ranks)."""
    seqs = completion_tokens(batch.responses, batch.response_mask)
    lengths = [len(s) for s in seqs]
    truncated = (~batch.has_eos) & (batch.response_mask.sum(-1) >= max_new_tokens)
    n_trunc = int(all_reduce(truncated.sum().to(batch.scores.device)))
    out = {"response/length_max": float(max(lengths)), "response/truncated_frac": n_trunc / len(seqs),
           "response/distinct_1": distinct_n(seqs, 1), "response/distinct_2": distinct_n(seqs, 2)}
    if group_size > 1:
        out["response/self_similarity"] = self_similarity(seqs, group_size)
    if gold_fn is not None:
        gold = function_scores(gold_fn, batch.prompts, batch.completions, batch.scores.device)
        sums = all_reduce(torch.stack([gold.double().sum(), batch.scores.double().sum()]))
        out["reward/gold"] = float(sums[0]) / len(seqs)
        out["reward/proxy_minus_gold"] = float(sums[1] - sums[0]) / len(seqs)
    return out


@torch.no_grad()
def evaluate_prompts(trainer, prompts: list[str], step: int) -> dict:
    """Held-out figures of ``trainer``'s policy on ``prompts`` (module docstring). Every rank
    calls it and samples ``k = ceil(len / world)`` prompts, its contiguous share (the last rank's
    padded with repeats that count 0), so every rank runs as many forwards."""
    cfg, dev = trainer.config, trainer.device
    n_all, world = len(prompts), trainer.world_size
    k = -(-n_all // world)
    pos = [trainer.rank * k + i for i in range(k)]
    mine = [prompts[p % n_all] for p in pos]
    valid = torch.tensor([p < n_all for p in pos], device=dev)
    ids = encode_prompts(trainer.tokenizer, mine, cfg.max_prompt_length, cfg.prompt_truncation)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(((cfg.seed * 1_000_003 + step) * 65_537 + 7919 + trainer.rank) % 2**63)
        with gathered(trainer.model, within=trainer.model.policy), gathered(trainer.reward_model, full=False):
            r = sample_rollout(trainer.model.policy, trainer.tokenizer, mine, ids, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, device=dev, reward_fn=trainer.reward_fn,
                               reward_model=trainer.reward_model, autocast=trainer.autocast)
    kw = dict(temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size, autocast=trainer.autocast)
    logp, _ = rollout_logprobs(trainer.model, r, **kw)
    with gathered(trainer.ref_model, full=False):
        ref, _ = rollout_logprobs(trainer.ref_model, r, **kw)
    w = valid.double()
    kl = ((logp - ref) * r.response_mask).sum(-1).double()
    cols = [w, r.scores.double(), kl, r.response_mask.sum(-1).double()]
    if trainer.gold_fn is not None:
        cols.append(function_scores(trainer.gold_fn, r.prompts, r.completions, dev).double())
    sums = all_reduce(torch.stack([(c * w).sum() for c in cols])).tolist()
    seqs = [s for s, ok in zip(completion_tokens(r.responses, r.response_mask & valid[:, None]),
                               gather_rows(valid).tolist()) if ok]
    n = max(sums[0], 1.0)
    out = {"eval/reward": sums[1] / n, "eval/kl_ref": sums[2] / n, "eval/length": sums[3] / n,
           "eval/distinct_2": distinct_n(seqs, 2)}
    if trainer.gold_fn is not None:
        out["eval/gold"] = sums[4] / n
        out["eval/proxy_minus_gold"] = (sums[1] - sums[4]) / n
    return out
