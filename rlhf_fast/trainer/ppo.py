"""PPO for language models, with the policy and value heads on one transformer body.

Each step:
  1. rollout: sample one completion per prompt (HF ``generate``, KV cache, temperature T),
     score it (``reward_fn`` on text or a reward model on ids, minus ``missing_eos_penalty``
     when it never emits EOS), and compute under no_grad the policy's log-probs (at T) and
     values and the frozen reference's log-probs: the "old" quantities of the update.
  2. advantages: ``ppo_advantages``: rewards = -kl_coef * KL(pi || pi_ref) per token + the score
     on the last token; GAE(gamma, lam); advantages whitened over the batch.
  3. update: ``ppo_epochs`` passes over shuffled mini-batches; each mini-batch is one optimizer
     step, accumulated over micro-batches; loss = ppo_policy_loss (clipped surrogate - entropy
     bonus, fused from logits) + vf_coef * value_loss (clipped); gradient clipping; LR schedule.
  4. KL controller: fixed, or adapted towards kl_target (Ziegler et al.).
  5. metrics and, every ``save_steps``, an atomic checkpoint.

With ``lm_head="fused"`` (the default) the old / reference log-probs and the policy loss come
from the response positions' hidden states (``linear_token_logprobs``, ``linear_ppo_policy_loss``),
so no step holds a (tokens, vocab) tensor; "materialize" computes the response logits and feeds
them to the fused logits ops.

The loop, the experience, the mini/micro-batching and the optimizer step are the RL base's
(``base.py``); this file holds what is PPO's: the advantages, the loss and the KL controller.
Under torchrun each rank samples its share of the prompts; the advantages (and their
whitening) are computed on the gathered global batch, and the loss normalisation, KL
controller input and metrics are global.

Left out: reward normalisation/clipping, value-head pretraining, early stopping on approx KL,
multiple rollouts per step.
"""
from __future__ import annotations

from rlhf_fast.ops import ppo_advantages, value_loss
from rlhf_fast.trainer.base import RLTrainer
from rlhf_fast.trainer.collectives import global_moments
from rlhf_fast.trainer.config import PPOConfig
from rlhf_fast.trainer.kl_controller import KLController
from rlhf_fast.trainer.lm_head import head_policy_loss
from rlhf_fast.trainer.rollout import Rollout


class PPOTrainer(RLTrainer):
    """PPO on a PolicyValueModel.

    Args:
        config: a PPOConfig.
        model: a PolicyValueModel (shared body or ``separate_critic=True``).
        tokenizer: a Hugging Face tokenizer (one without a pad token pads with EOS).
        prompts: list of prompt strings; each step draws ``rollout_batch_size`` of them.
        ref_model: the frozen reference (a causal LM); default: a copy of the initial policy.
        reward_fn: ``reward_fn(prompts, completions) -> B scores``; or
        reward_model: a HF sequence-classification model (one label) or anything with
            ``score_sequences(input_ids, attention_mask)``, sharing the policy's tokenizer.
    """

    config_class = PPOConfig
    uses_value_head = True

    @property
    def updates_per_rollout(self) -> int:
        return self.config.ppo_epochs

    # ------------------------------------------------------------------ 2. advantages
    def compute_advantages(self, batch: Rollout) -> None:
        """KL-shaped rewards, GAE and the whitening, on the global batch (every rank's rows)."""
        cfg = self.config
        glob = self.global_batch(batch.scores, batch.logprobs, batch.ref_logprobs, batch.values, batch.response_mask)
        out = ppo_advantages(*glob, kl_coef=self.kl_ctl.value, gamma=cfg.gamma, lam=cfg.lam,
                             estimator=cfg.kl_estimator, whiten=cfg.whiten_advantages)
        batch.advantages, batch.returns, batch.rewards = (self.own_rows(x, batch.logprobs) for x in out)

    # ------------------------------------------------------------------ 3. loss
    def compute_loss(self, mb: Rollout):
        """(loss, stats) of one micro-batch: the fused clipped policy loss (from the hidden states
        with ``lm_head="fused"``, else on the response logits) plus ``vf_coef`` times the clipped
        value loss."""
        cfg = self.config
        out, values, aux = self.policy_forward(mb, return_hidden=cfg.lm_head == "fused")
        pg_loss, pg = head_policy_loss(out, mb.responses, mb.logprobs, mb.advantages, mb.response_mask,
                                       clip_eps=cfg.clip_eps, temperature=cfg.temperature,
                                       entropy_coef=cfg.entropy_coef, loss_agg=cfg.loss_agg,
                                       max_tokens=cfg.max_new_tokens, compute_entropy=True)
        vf_loss, vf = value_loss(values, mb.values, mb.returns, mb.response_mask,
                                 clip_eps=cfg.vf_clip or None, loss_agg=cfg.loss_agg)
        loss = pg_loss + cfg.vf_coef * vf_loss
        stats = {"loss/total": loss.detach(), "loss/policy": pg["pg_loss"], "loss/value": vf_loss.detach(),
                 "policy/entropy": pg["entropy"], "policy/clip_frac": pg["clip_frac"],
                 "policy/approx_kl": pg["approx_kl"], "policy/ratio_mean": pg["ratio_mean"],
                 "value/clip_frac": vf["clip_frac"]}
        return self.add_router_aux(loss, aux, stats), stats

    # ------------------------------------------------------------------ 4. KL controller
    def after_step(self, batch: Rollout, metrics: dict) -> None:
        """The value head's fit before the update; the KL coefficient used, then adapted."""
        metrics["value/explained_variance"] = explained_variance(batch.values, batch.returns, batch.response_mask)
        metrics["kl/coef"] = self.kl_ctl.value
        self.kl_ctl.update(metrics["kl/ref"], len(batch) * self.world_size)

    # ------------------------------------------------------------------ checkpoint state
    def init_state(self) -> None:
        cfg = self.config
        self.kl_ctl = KLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)

    def extra_state(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])


def explained_variance(values, returns, mask) -> float:
    """1 - Var[returns - values] / Var[returns] over the valid tokens of a rollout, on all ranks;
    as ``value_loss`` defines it where Var[returns] = 0: 1 when the residuals' variance is 0 too
    (the values are the returns up to a constant), else 0."""
    var_r = global_moments(returns, mask, unbiased=False)[2]
    var_e = global_moments(returns.double() - values.double(), mask, unbiased=False)[2]
    if var_r == 0:
        return float(var_e == 0)
    return float(1 - var_e / var_r)
