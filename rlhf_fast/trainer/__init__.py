"""Lean PPO / GRPO trainers on a shared-body policy/value model, plus checkpointing and metrics
shared by every trainer (``checkpoint``, ``metrics``)."""
