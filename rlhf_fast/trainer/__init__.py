"""Lean PPO / GRPO (and SFT / reward-model) trainers on a shared-body policy/value model.

    runtime.py   what every trainer runs on: device, seeds, autocast, optimizer + schedule,
                 the guarded optimizer step, output_dir, metrics, checkpoint save / resume
    base.py      the RL trainer: one train() loop with hooks; ppo.py / grpo.py: what differs
    minibatch.py   stratified mini-batches, micro-batches and their loss scales (loss_agg)
    step_metrics.py  an RL step's metrics over every rank (update stats, rollout figures)
    supervised.py  the supervised loop; sft.py / reward.py: what differs
    config.py    the config dataclasses; model.py: PolicyValueModel (and its file format)
    rollout.py   sampling, scoring, old log-probs; kl_controller.py; metrics.py
    checkpoint.py  atomic, verified, rank-aware checkpoints; hf_io.py: weights on disk
    process_group.py / collectives.py / sharding.py: torchrun (distributed.py imports them all)

    trainer = PPOTrainer(PPOConfig(...), model=PolicyValueModel.from_pretrained(sft_dir),
                         tokenizer=tok, reward_fn=score, prompts=[...])
    trainer.train()
"""
from rlhf_fast.trainer.config import ConfigError, GRPOConfig, PPOConfig, RLConfig
from rlhf_fast.trainer.grpo import GRPOTrainer
from rlhf_fast.trainer.model import PolicyValueModel
from rlhf_fast.trainer.ppo import PPOTrainer

__all__ = ["PolicyValueModel", "PPOTrainer", "PPOConfig", "GRPOTrainer", "GRPOConfig", "RLConfig", "ConfigError"]
