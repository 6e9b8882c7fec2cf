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

Under torchrun each rank samples whole groups for its share of the prompts; ``scale="batch"``
takes the std over the global batch, and the loss normalisation and metrics are global.

Left out: reward-function weighting of several rewards, dynamic sampling (DAPO's filtering of
all-equal groups), overlong reward shaping.
"""
from __future__ import annotations

import torch

from rlhf_fast.ops.advantages import group_advantages
from rlhf_fast.ops.policy_loss import ppo_policy_loss
from rlhf_fast.trainer import distributed
from rlhf_fast.trainer.base import RLTrainer
from rlhf_fast.trainer.config import GRPOConfig
from rlhf_fast.trainer.rollout import Rollout, rollout_logprobs


class GRPOTrainer(RLTrainer):
    """GRPO on a causal LM (a PolicyValueModel without value head, or a plain HF causal LM).

    Arguments as for PPOTrainer; ``ref_model`` is used only when ``config.beta > 0``.
    """

    config_class = GRPOConfig
    uses_value_head = False

    def __init__(self, config: GRPOConfig, *, model, tokenizer, prompts, ref_model=None, reward_fn=None,
                 reward_model=None):
        super().__init__(config, model=model, tokenizer=tokenizer, prompts=prompts, ref_model=ref_model,
                         reward_fn=reward_fn, reward_model=reward_model)

    @property
    def updates_per_rollout(self) -> int:
        return self.config.num_iterations

    def train(self) -> None:
        cfg = self.config
        with self.metrics_logger() as log:
            for step in range(self.step, cfg.total_steps):
                t0 = self.timer()
                batch = self.make_experience(step)
                self.compute_advantages(batch)
                t1 = self.timer()
                stats = self.update(batch, step)
                t2 = self.timer()
                self.step = step + 1
                log.log(self.step, {**self.rollout_metrics(batch, t1 - t0, t2 - t1), **stats})
                self.maybe_save()
        self.export()

    # ------------------------------------------------------------------ 1. rollout
    def make_experience(self, step: int, batch: Rollout | None = None) -> Rollout:
        """Samples this rank's groups (or takes ``batch``, already sampled and scored) and adds the
        old log-probs and, when ``beta > 0``, the reference's."""
        cfg = self.config
        batch = self.sample(step, repeat=cfg.group_size) if batch is None else batch
        kw = dict(temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size, autocast=self.autocast)
        batch.logprobs, _ = rollout_logprobs(self.model, batch, **kw)
        self.check_finite("logprobs", batch.logprobs, step + 1)
        if cfg.beta > 0:
            batch.ref_logprobs = self.frozen_logprobs(batch)
            self.check_finite("ref_logprobs", batch.ref_logprobs, step + 1)
        return batch

    # ------------------------------------------------------------------ 2. advantages
    def compute_advantages(self, batch: Rollout) -> None:
        """Group-relative advantages (a group lives on one rank); ``scale="batch"`` divides by
        the std of every rank's scores."""
        cfg = self.config
        if cfg.scale == "batch" and self.world_size > 1:
            adv = group_advantages(batch.scores, cfg.group_size, baseline=cfg.baseline, scale="none")
            std = distributed.global_moments(batch.scores)[2].sqrt()
            batch.advantages = (adv / (std + 1e-6)).to(adv.dtype)  # group_advantages' eps
        else:
            batch.advantages = group_advantages(batch.scores, cfg.group_size, baseline=cfg.baseline, scale=cfg.scale)

    # ------------------------------------------------------------------ 3. update
    def update(self, batch: Rollout, step: int) -> dict:
        stats, grad_norms = [], []
        for _ in range(self.config.num_iterations):
            for mini in self.mini_batches(len(batch)):
                s, grad_norm = self.optimize_mini_batch(batch, mini, step)
                stats += s
                grad_norms.append(grad_norm)
        out = self.reduce_stats(stats)
        out["grad_norm"] = torch.stack(grad_norms).mean().item()
        return out

    def compute_loss(self, mb: Rollout):
        """(loss, stats) of one micro-batch: the fused clipped policy loss on the response logits
        with per-sequence advantages and ``beta`` * k3 KL to the reference."""
        cfg = self.config
        with self.autocast():
            logits, _ = self.train_model(mb.input_ids, mb.attention_mask, mb.response_start, with_values=False)
        loss, pg = ppo_policy_loss(
            logits, mb.responses, mb.logprobs, mb.advantages, mb.response_mask, clip_eps=cfg.clip_eps,
            clip_eps_high=cfg.clip_eps_high, temperature=cfg.temperature,
            ref_logprobs=mb.ref_logprobs if cfg.beta > 0 else None, kl_coef=cfg.beta, kl_estimator="k3",
            entropy_coef=cfg.entropy_coef, loss_agg=cfg.loss_agg, max_tokens=cfg.max_new_tokens,
            compute_entropy=True, inplace_backward=True)
        stats = {"loss/total": loss.detach(), "loss/policy": pg["pg_loss"], "policy/entropy": pg["entropy"],
                 "policy/clip_frac": pg["clip_frac"], "policy/approx_kl": pg["approx_kl"],
                 "policy/ratio_mean": pg["ratio_mean"]}
        if "kl" in pg:
            stats["policy/kl_k3"] = pg["kl"]
        return loss, stats
