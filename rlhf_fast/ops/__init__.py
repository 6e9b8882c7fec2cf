"""Kernels: each module holds its Triton kernels, launchers, autograd Function and ``*_ref``.

(trainer branch: the public ops by name, as the ops branch's version of this file exports them;
that version replaces this one at merge.)"""
from rlhf_fast.ops.advantages import gae, group_advantages, kl_shaped_rewards, masked_whiten, ppo_advantages
from rlhf_fast.ops.kl import full_kl, kl_penalty
from rlhf_fast.ops.logprobs import token_logprobs
from rlhf_fast.ops.policy_loss import LOSS_AGGS, aggregation_weights, ppo_policy_loss
from rlhf_fast.losses import dpo_loss, reward_model_loss, value_loss  # noqa: E402  (ops on the ops branch)

__all__ = ["token_logprobs", "kl_penalty", "full_kl", "kl_shaped_rewards", "gae", "ppo_advantages", "masked_whiten",
           "group_advantages", "ppo_policy_loss", "aggregation_weights", "LOSS_AGGS", "value_loss",
           "reward_model_loss", "dpo_loss"]
