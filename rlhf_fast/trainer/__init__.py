"""Lean PPO / GRPO trainers on a shared-body policy/value model, plus the checkpointing
(``checkpoint``) and metrics (``metrics``) modules every trainer uses.

    trainer = PPOTrainer(PPOConfig(...), model=PolicyValueModel.from_pretrained(sft_dir),
                         tokenizer=tok, reward_fn=score, prompts=[...])
    trainer.train()
"""
from rlhf_fast.trainer.config import ConfigError, GRPOConfig, PPOConfig, RLConfig
from rlhf_fast.trainer.grpo import GRPOTrainer
from rlhf_fast.trainer.model import PolicyValueModel
from rlhf_fast.trainer.ppo import PPOTrainer

__all__ = ["PolicyValueModel", "PPOTrainer", "PPOConfig", "GRPOTrainer", "GRPOConfig", "RLConfig", "ConfigError"]
