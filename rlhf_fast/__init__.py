"""rlhf_fast: fused, streaming RLHF kernels and a lean PPO/GRPO trainer.

``import rlhf_fast`` loads the ops and losses only; the trainer classes (and with them
transformers) load on first attribute access, e.g. ``rlhf_fast.PPOTrainer``.
"""
import importlib

from rlhf_fast.losses import GRPOLoss, PPOLoss, ValueLoss
from rlhf_fast.ops import (
    dpo_loss,
    full_kl,
    full_kl_ref,
    gae,
    gae_ref,
    group_advantages,
    group_advantages_ref,
    kl_penalty,
    kl_penalty_ref,
    kl_shaped_rewards,
    kl_shaped_rewards_ref,
    linear_cross_entropy,
    linear_full_kl,
    linear_ppo_policy_loss,
    linear_token_logprobs,
    masked_whiten,
    masked_whiten_ref,
    ppo_advantages,
    ppo_advantages_ref,
    ppo_policy_loss,
    ppo_policy_loss_ref,
    reward_model_loss,
    token_logprobs,
    token_logprobs_ref,
    value_loss,
)

__version__ = "0.1.0"

# trainer names -> the module that defines them, imported on first access
_LAZY = {
    "PolicyValueModel": "rlhf_fast.trainer",
    "PPOTrainer": "rlhf_fast.trainer",
    "PPOConfig": "rlhf_fast.trainer",
    "GRPOTrainer": "rlhf_fast.trainer",
    "GRPOConfig": "rlhf_fast.trainer",
    "SFTTrainer": "rlhf_fast.trainer.sft",
    "SFTConfig": "rlhf_fast.trainer.sft",
    "RewardTrainer": "rlhf_fast.trainer.reward",
    "RewardConfig": "rlhf_fast.trainer.reward",
    "DPOTrainer": "rlhf_fast.trainer.dpo",
    "DPOConfig": "rlhf_fast.trainer.dpo",
    "RLOOTrainer": "rlhf_fast.trainer.rloo",
    "RLOOConfig": "rlhf_fast.trainer.rloo",
}

__all__ = [
    "token_logprobs",
    "token_logprobs_ref",
    "kl_penalty",
    "kl_penalty_ref",
    "full_kl",
    "full_kl_ref",
    "kl_shaped_rewards",
    "kl_shaped_rewards_ref",
    "gae",
    "gae_ref",
    "ppo_advantages",
    "ppo_advantages_ref",
    "group_advantages",
    "group_advantages_ref",
    "masked_whiten",
    "masked_whiten_ref",
    "ppo_policy_loss",
    "ppo_policy_loss_ref",
    "value_loss",
    "reward_model_loss",
    "dpo_loss",
    "linear_token_logprobs",
    "linear_ppo_policy_loss",
    "linear_cross_entropy",
    "linear_full_kl",
    "PPOLoss",
    "GRPOLoss",
    "ValueLoss",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'rlhf_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
