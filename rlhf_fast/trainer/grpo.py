"""GRPO: group-relative policy optimisation, no value head.

Each step:
  1. rollout: sample ``group_size`` completions for each of ``rollout_batch_size`` prompts
     (HF ``generate``, KV cache, temperature T), score them, and compute under no_grad the
     policy's log-probs at T (the "old" log-probs) and, when ``beta > 0``, the frozen
     reference's.
  2. advantages: ``group_advantages``: each completion's score minus its group's mean (or the
     leave-one-out mean), divided by the group std, the batch std, or nothing; one advantage
     per sequence, shared by its tokens.
  3. update: ``num_iterations`` passes over shuffled mini-batches, each one optimizer step
     accumulated over micro-batches; loss = ppo_policy_loss with clip-higher
     (``clip_eps_high``), the k3 KL to the reference inside the loss (``beta``), an optional
     entropy bonus, aggregated as TRL's ``loss_type`` ("grpo", "bnpo", "dr_grpo", "dapo").
  4. metrics and, every ``save_steps``, an atomic checkpoint.

The loop, the experience, the mini/micro-batching and the optimizer step are the RL base's
(``base.py``); this file holds what is GRPO's: the advantages and the loss. Under torchrun each
rank samples whole groups for its share of the prompts; the advantages are computed on the
gathered global batch (so ``scale="batch"`` takes the std of every rank's scores), and the loss
normalisation and metrics are global.

Options beyond GRPO (config.py documents each field): the objectives of
``rlhf_fast.ops.policy_objectives`` (GSPO's sequence ratio, CISPO, SAPO, the low_var_kl / k3+ KL);
the rollout-mismatch correction from the sampler's own log-probs, which the rollout records
during generation (``use_sampler_logprobs_as_old`` then skips the old-log-prob forward); and
DAPO's sampling tricks: dynamic sampling (groups whose scores are all equal are dropped and
more prompts sampled, at most ``dynamic_sampling_max_tries`` rounds, every rank sampling in
each round; equal groups fill what is still missing), overlong reward shaping (a penalty rising
linearly to ``overlong_penalty`` over the last ``overlong_buffer`` tokens, added to the scores
the advantages see; the logged reward stays the raw one) and overlong filtering (completions
without EOS get no loss; ``response/length`` then counts the loss tokens).

Several weighted reward functions come from the RL base (``reward_fns.py``).
"""
from __future__ import annotations

import torch

from rlhf_fast.ops import group_advantages
from rlhf_fast.trainer.base import RLTrainer
from rlhf_fast.trainer.collectives import all_reduce
from rlhf_fast.trainer.config import GRPOConfig
from rlhf_fast.trainer.lm_head import head_policy_loss
from rlhf_fast.trainer.rollout import Rollout, concat_rollouts


class GRPOTrainer(RLTrainer):
    """GRPO on a causal LM (a PolicyValueModel without value head, or a plain HF causal LM).

    Arguments as for PPOTrainer; ``ref_model`` is used only when ``config.beta > 0``.
    """

    config_class = GRPOConfig
    uses_value_head = False

    @property
    def updates_per_rollout(self) -> int:
        return self.config.num_iterations

    @property
    def uses_reference(self) -> bool:
        return self.config.beta > 0

    @property
    def records_sampler_logprobs(self) -> bool:
        return self.config.rollout_correction is not None or self.config.use_sampler_logprobs_as_old

    @property
    def uses_sampler_logprobs_as_old(self) -> bool:
        return self.config.use_sampler_logprobs_as_old

    # ------------------------------------------------------------------ 1. experience: dynamic sampling
    def make_experience(self, step: int, batch: Rollout | None = None) -> Rollout:
        if batch is None and self.config.dynamic_sampling:
            batch = self.sample_informative(step)
        return super().make_experience(step, batch)

    def sample_informative(self, step: int) -> Rollout:
        """DAPO's dynamic sampling: this rank's share of groups, each with scores that are not all
        equal where possible (module docstring). Sets ``self.dynamic_stats``."""
        cfg = self.config
        G, share = cfg.group_size, cfg.rollout_batch_size // self.world_size
        kept, spare, n_kept, dropped, tries = [], [], 0, 0, 0
        for t in range(cfg.dynamic_sampling_max_tries):
            tries = t + 1
            part = self.sample(step, repeat=G, stream=t)
            s = part.scores.view(-1, G)
            equal = (s.amax(-1) == s.amin(-1)).cpu()
            dropped += int(equal.sum())
            rows = torch.arange(len(part)).view(-1, G)
            good = rows[~equal][: share - n_kept].reshape(-1)
            if len(good):
                kept.append(part.select(good.to(part.scores.device), trim=False))
                n_kept += len(good) // G
            if equal.any():
                spare.append(part.select(rows[equal].reshape(-1).to(part.scores.device), trim=False))
            missing = all_reduce(torch.tensor(float(share - n_kept), device=self.device), "max")
            if float(missing) == 0:
                break
        while n_kept < share:  # out of tries: groups with equal scores (zero advantage) fill the rest
            take = min(share - n_kept, len(spare[0]) // G)
            kept.append(spare[0].select(torch.arange(take * G, device=spare[0].scores.device), trim=False))
            n_kept += take
            spare.pop(0)
        stats = all_reduce(torch.tensor([float(dropped), float(tries)], dtype=torch.float64, device=self.device))
        self.dynamic_stats = {"dynamic_sampling/dropped_groups": float(stats[0]),
                              "dynamic_sampling/tries": float(stats[1]) / self.world_size}
        return concat_rollouts(kept, self.pad_id)

    def after_step(self, batch: Rollout, metrics: dict) -> None:
        metrics.update(getattr(self, "dynamic_stats", {}))

    # ------------------------------------------------------------------ 2. advantages
    def compute_advantages(self, batch: Rollout) -> None:
        """Group-relative advantages (one per sequence) on the global batch's scores."""
        cfg = self.config
        scores = batch.scores + overlong_penalty(batch.response_mask, cfg.max_new_tokens, cfg.overlong_buffer,
                                                 cfg.overlong_penalty)
        (scores,) = self.global_batch(scores)
        adv = group_advantages(scores, cfg.group_size, baseline=cfg.baseline, scale=cfg.scale)
        batch.advantages = self.own_rows(adv, batch.scores)
        if cfg.mask_truncated_completions:
            batch.response_mask = batch.response_mask & batch.has_eos[:, None]

    # ------------------------------------------------------------------ 3. loss
    def compute_loss(self, mb: Rollout):
        """(loss, stats) of one micro-batch: the fused policy loss (from the hidden states with
        ``lm_head="fused"``, else on the response logits) with per-sequence advantages and
        ``beta`` * KL to the reference; every objective option goes to the op."""
        cfg = self.config
        out, _, aux = self.policy_forward(mb, with_values=False, return_hidden=cfg.lm_head == "fused")
        kw = dict(clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, temperature=cfg.temperature,
                  ref_logprobs=mb.ref_logprobs if cfg.beta > 0 else None, kl_coef=cfg.beta,
                  kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef, loss_agg=cfg.loss_agg,
                  max_tokens=cfg.max_new_tokens, compute_entropy=True, ratio_level=cfg.importance_sampling_level,
                  loss_type=cfg.loss_type if cfg.loss_type in ("cispo", "sapo") else "clip",
                  sapo_tau_pos=cfg.sapo_temperature_pos, sapo_tau_neg=cfg.sapo_temperature_neg,
                  sampler_logprobs=mb.sampler_logprobs if cfg.rollout_correction else None,
                  correction=cfg.rollout_correction, correction_level=cfg.rollout_correction_level,
                  correction_low=cfg.rollout_correction_low, correction_high=cfg.rollout_correction_high)
        loss, pg = head_policy_loss(out, mb.responses, mb.logprobs, mb.advantages, mb.response_mask, **kw)
        stats = {"loss/total": loss.detach(), "loss/policy": pg["pg_loss"], "policy/entropy": pg["entropy"],
                 "policy/clip_frac": pg["clip_frac"], "policy/approx_kl": pg["approx_kl"],
                 "policy/ratio_mean": pg["ratio_mean"]}
        if "kl" in pg:
            stats["policy/kl_k3" if cfg.kl_estimator == "k3" else f"policy/kl_{cfg.kl_estimator}"] = pg["kl"]
        for k in ("mismatch_abs_mean", "mismatch_abs_max", "is_ratio_p05", "is_ratio_p50", "is_ratio_p95",
                  "is_masked_frac"):
            if k in pg:
                stats[f"mismatch/{k}"] = pg[k]
        return self.add_router_aux(loss, aux, stats), stats


def overlong_penalty(response_mask: torch.Tensor, max_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """(B,) DAPO's soft overlong punishment (0 with buffer == 0), for completion lengths L:
    0 for L <= max_tokens - buffer, then ``penalty * (max_tokens - buffer - L) / buffer`` down to
    -penalty at L = max_tokens."""
    L = response_mask.sum(-1).float()
    if buffer == 0:
        return torch.zeros_like(L)
    return penalty * ((max_tokens - buffer - L) / buffer).clamp(min=-1.0, max=0.0)
