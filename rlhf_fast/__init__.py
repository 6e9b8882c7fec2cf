"""rlhf_fast: fused, streaming RLHF kernels and a lean PPO/GRPO trainer."""
from rlhf_fast.ops.logprobs import token_logprobs, token_logprobs_ref

__version__ = "0.1.0"

__all__ = [
    "token_logprobs",
    "token_logprobs_ref",
]
