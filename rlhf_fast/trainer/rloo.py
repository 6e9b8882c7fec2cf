"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics"),
a thin specialisation of GRPO.

The paper's estimator, for k completions y_1..y_k of a prompt x::

    R_i = r(x, y_i) - beta * sum_t (log pi_old(y_i,t) - log pi_ref(y_i,t))   # the KL is in the REWARD
    A_i = R_i - 1 / (k - 1) * sum_{j != i} R_j                                # leave-one-out baseline, no std scaling
    grad = mean_i A_i * grad sum_t log pi(y_i,t)                               # sequence-level REINFORCE

Here: ``R`` from the rollout's scores and its "old" and reference log-probs (the k1 estimate of
the sequence KL), ``A = group_advantages(R, k, baseline="leave_one_out", scale="none")`` on the
gathered global batch, and the loss ``ppo_policy_loss`` with ``loss_agg="seq-mean-token-sum"``
(sum over a sequence's tokens, mean over sequences) and no KL term in the loss. With
``num_iterations=1`` and one mini-batch per step the update is on-policy, the ratio is 1 and the
gradient is exactly the REINFORCE one above (the clipping never acts); more iterations or
mini-batches make it the PPO-clipped variant (as TRL's RLOOTrainer does).

Compared with GRPO's defaults: leave-one-out instead of the group mean, no division by the
group std, the KL to the reference shaped into the reward instead of a k3 term in the loss, and
the sequence sum instead of the per-sequence token mean. The same as GRPOConfig settings would
be ``baseline="leave_one_out", scale="none"`` except for the place of the KL, which is why this
is its own small trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf_fast.ops import group_advantages, ppo_policy_loss
from rlhf_fast.trainer.config import RLConfig, check_choice, check_field
from rlhf_fast.trainer.grpo import GRPOTrainer
from rlhf_fast.trainer.rollout import Rollout


@dataclass
class RLOOConfig(RLConfig):
    """RLOO: k completions per prompt, leave-one-out baseline, KL to the reference in the reward."""

    output_dir: str = "runs/rloo"
    group_size: int = 4  # k completions per prompt (the paper's k)
    num_iterations: int = 1  # passes per rollout batch (1 and one mini-batch: exact REINFORCE)
    beta: float = 0.05  # coefficient of the sequence KL (k1) to the reference subtracted from the reward
    scale: str = "none"  # "none" (the paper) | "batch" (divide the advantages by the batch std) | "group"
    clip_eps_high: float | None = None  # PPO clip of the extra iterations; None: the same as clip_eps
    loss_agg: str = "seq-mean-token-sum"  # the paper's sequence-level sum; any of LOSS_AGGS

    # GRPO-only options the GRPO machinery reads, fixed off for RLOO (class attributes, not settings)
    baseline = "leave_one_out"
    loss_type = "grpo"
    importance_sampling_level = "token"
    kl_estimator = "k1"
    sapo_temperature_pos = 1.0
    sapo_temperature_neg = 1.05
    rollout_correction = None
    rollout_correction_level = "token"
    rollout_correction_low = None
    rollout_correction_high = None
    use_sampler_logprobs_as_old = False
    dynamic_sampling = False
    dynamic_sampling_max_tries = 1
    overlong_buffer = 0
    overlong_penalty = 0.0
    mask_truncated_completions = False

    def __post_init__(self):
        super().__post_init__()
        check_field(self, "group_size", self.group_size >= 2, "must be >= 2 (the baseline needs another completion)")
        check_field(self, "num_iterations", self.num_iterations >= 1, "must be >= 1")
        check_field(self, "beta", self.beta >= 0, "must be >= 0")
        check_choice(self, "scale", ("none", "batch", "group"))
        if self.clip_eps_high is not None:
            check_field(self, "clip_eps_high", self.clip_eps_high >= self.clip_eps,
                        f"must be >= clip_eps={self.clip_eps}")

    @property
    def sequences_per_step(self) -> int:
        return self.rollout_batch_size * self.group_size


class RLOOTrainer(GRPOTrainer):
    """RLOO on a causal LM; arguments as for GRPOTrainer (``ref_model`` used when ``beta > 0``)."""

    config_class = RLOOConfig

    def compute_advantages(self, batch: Rollout) -> None:
        """``A = leave-one-out(score - beta * KL_seq)`` on the global batch (module docstring)."""
        cfg = self.config
        shaped = batch.scores.float()
        if cfg.beta > 0:
            kl = ((batch.logprobs - batch.ref_logprobs) * batch.response_mask).sum(-1)
            shaped = shaped - cfg.beta * kl
        batch.rewards = shaped  # (B,): the KL-shaped sequence reward
        (glob,) = self.global_batch(shaped)
        adv = group_advantages(glob, cfg.group_size, baseline="leave_one_out", scale=cfg.scale)
        batch.advantages = self.own_rows(adv, batch.scores)

    def compute_loss(self, mb: Rollout):
        """(loss, stats): the policy-gradient loss with per-sequence advantages, no KL term."""
        cfg = self.config
        with self.autocast():
            logits, _ = self.train_model(mb.input_ids, mb.attention_mask, mb.response_start, with_values=False)
        loss, pg = ppo_policy_loss(
            logits, mb.responses, mb.logprobs, mb.advantages, mb.response_mask, clip_eps=cfg.clip_eps,
            clip_eps_high=cfg.clip_eps_high, temperature=cfg.temperature, entropy_coef=cfg.entropy_coef,
            loss_agg=cfg.loss_agg, max_tokens=cfg.max_new_tokens, compute_entropy=True, inplace_backward=True)
        return loss, {"loss/total": loss.detach(), "loss/policy": pg["pg_loss"], "policy/entropy": pg["entropy"],
                      "policy/clip_frac": pg["clip_frac"], "policy/approx_kl": pg["approx_kl"],
                      "policy/ratio_mean": pg["ratio_mean"], "reward/kl_shaped": mb.rewards.float().mean()}
