"""The metrics of one RL step, over every rank (each collective is the identity on one
process): the update's per-micro-batch stats averaged (``reduce_stats``) and the rollout's
batch-level figures (``rollout_metrics``: rewards, lengths, KL to the reference, times, memory,
plus the failure-mode metrics of ``health.py``). Sums are float64 and converted with one host
sync each, never per micro-batch."""
from __future__ import annotations

import torch

from rlhf_fast.trainer.collectives import all_reduce, global_moments
from rlhf_fast.trainer.health import health_metrics
from rlhf_fast.trainer.process_group import world_size
from rlhf_fast.trainer.rollout import Rollout


def reduce_stats(stats: list[dict]) -> dict:
    """Means of per-micro-batch 0-d tensor stats over every rank's micro-batches (ranks run
    equally many), converted with one host sync."""
    if not stats:
        return {}
    keys = list(stats[0])
    means = torch.stack([torch.stack([s[k].detach().double() for s in stats]).mean() for k in keys])
    means = all_reduce(means) / world_size()
    return dict(zip(keys, means.tolist()))


def rollout_metrics(batch: Rollout, t_rollout: float, t_update: float, *, device: torch.device, lr: float,
                    group_size: int, max_new_tokens: int, gold_fn=None) -> dict:
    """Batch-level metrics of a step over all ranks' sequences (means from all-reduced sums,
    the reward std from global moments, times of the slowest rank); ``lr`` is logged as it is,
    ``group_size``, ``max_new_tokens`` and ``gold_fn`` go to ``health_metrics``."""
    m = batch.response_mask.double()  # every sum in float64: scores near the fp32 limit must not overflow
    lengths = m.sum(-1)
    sums = [torch.tensor(float(len(batch)), dtype=torch.float64, device=device), batch.scores.double().sum(),
            lengths.sum(), batch.has_eos.double().sum()]
    if batch.ref_logprobs is not None:  # sum over the completion of log pi - log pi_ref (k1), mean over sequences
        sums.append(((batch.logprobs.double() - batch.ref_logprobs.double()) * m).sum(-1).sum())
    sums = all_reduce(torch.stack(sums))
    std = global_moments(batch.scores)[2].sqrt()
    n, score, length, eos, *kl = (sums.cpu() / sums[0].cpu()).tolist()
    out = {"reward/mean": score, "reward/std": float(std), "response/length": length, "response/eos_frac": eos}
    if kl:
        out["kl/ref"] = kl[0]
    if batch.reward_parts:  # each of several reward functions: its mean over the samples it scored
        parts = torch.stack(list(batch.reward_parts.values())).double()  # (F, B), NaN = no opinion
        sc = all_reduce(torch.stack([parts.nan_to_num(0.0).sum(1), (~parts.isnan()).sum(1).double()]))
        for name, s, c in zip(batch.reward_parts, *sc.cpu().tolist()):
            out[f"reward/{name}/mean"] = s / c if c else float("nan")
    times = [t_rollout, t_update]
    if device.type == "cuda":
        times.append(torch.cuda.max_memory_allocated(device) / 2**30)
        torch.cuda.reset_peak_memory_stats(device)
    times = all_reduce(torch.tensor(times, dtype=torch.float64, device=device), "max").tolist()
    out.update({"time/rollout_s": times[0], "time/update_s": times[1],
                "perf/tokens_per_s": float(sums[2]) / max(times[0] + times[1], 1e-9), "lr": lr})
    if device.type == "cuda":
        out["perf/peak_mem_gib"] = times[2]
    out.update(health_metrics(batch, group_size=group_size, max_new_tokens=max_new_tokens, gold_fn=gold_fn))
    return out
