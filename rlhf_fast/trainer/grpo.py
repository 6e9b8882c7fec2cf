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

Left out: reward-function weighting of several rewards, dynamic sampling (DAPO's filtering of
all-equal groups), overlong reward shaping.
"""
from __future__ import annotations

from rlhf_fast.ops import group_advantages, ppo_policy_loss
from rlhf_fast.trainer.base import RLTrainer
from rlhf_fast.trainer.config import GRPOConfig
from rlhf_fast.trainer.rollout import Rollout


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

    # ------------------------------------------------------------------ 2. advantages
    def compute_advantages(self, batch: Rollout) -> None:
        """Group-relative advantages (one per sequence) on the global batch's scores."""
        cfg = self.config
        (scores,) = self.global_batch(batch.scores)
        adv = group_advantages(scores, cfg.group_size, baseline=cfg.baseline, scale=cfg.scale)
        batch.advantages = self.own_rows(adv, batch.scores)

    # ------------------------------------------------------------------ 3. loss
    def compute_loss(self, mb: Rollout):
        """(loss, stats) of one micro-batch: the fused clipped policy loss on the response logits
        with per-sequence advantages and ``beta`` * k3 KL to the reference."""
        cfg = self.config
        logits, _, aux = self.policy_forward(mb, with_values=False)
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
        return self.add_router_aux(loss, aux, stats), stats
