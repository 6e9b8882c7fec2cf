"""rlhf_fast: fused, streaming RLHF kernels and a lean PPO/GRPO trainer."""
from rlhf_fast.ops.logprobs import token_logprobs, token_logprobs_ref
from rlhf_fast.ops.kl import full_kl, full_kl_ref, kl_penalty, kl_penalty_ref
from rlhf_fast.ops.advantages import (
    gae, gae_ref, group_advantages, group_advantages_ref, kl_shaped_rewards, kl_shaped_rewards_ref,
    masked_whiten, masked_whiten_ref, ppo_advantages, ppo_advantages_ref,
)
from rlhf_fast.ops.policy_loss import ppo_policy_loss, ppo_policy_loss_ref
from rlhf_fast.losses import GRPOLoss, PPOLoss, ValueLoss, dpo_loss, reward_model_loss, value_loss

__version__ = "0.1.0"

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
    "PPOLoss",
    "GRPOLoss",
    "ValueLoss",
]

from rlhf_fast.trainer import GRPOConfig, GRPOTrainer, PolicyValueModel, PPOConfig, PPOTrainer  # noqa: E402

__all__ += ["PolicyValueModel", "PPOTrainer", "PPOConfig", "GRPOTrainer", "GRPOConfig"]

from rlhf_fast.trainer.reward import RewardConfig, RewardTrainer  # noqa: E402
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer  # noqa: E402

__all__ += ["SFTTrainer", "SFTConfig", "RewardTrainer", "RewardConfig"]
