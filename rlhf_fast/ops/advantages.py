"""Old import path of the advantage ops, kept until every caller imports from ``rlhf_fast.ops``
(the ops now live in gae.py, whiten.py and group_advantages.py). Do not add code here."""
from rlhf_fast.ops.gae import gae, gae_ref, kl_shaped_rewards, kl_shaped_rewards_ref, ppo_advantages, ppo_advantages_ref
from rlhf_fast.ops.group_advantages import group_advantages, group_advantages_ref
from rlhf_fast.ops.whiten import masked_whiten, masked_whiten_ref

__all__ = ["gae", "gae_ref", "kl_shaped_rewards", "kl_shaped_rewards_ref", "ppo_advantages", "ppo_advantages_ref",
           "group_advantages", "group_advantages_ref", "masked_whiten", "masked_whiten_ref"]
