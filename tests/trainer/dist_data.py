"""What the supervised distributed tests (test_distributed_sft_rm.py, test_distributed_dpo.py)
train on: a tiny Llama config over the byte-level tokenizer, seeded SFT and preference rows, the
quiet CPU settings and the shared batch / optimiser settings (7 examples in batches of 6: the
second step is the epoch's last example alone)."""
import random

from rlhf_fast.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")
KW = dict(batch_size=6, micro_batch_size=2, eval_batch_size=2, max_steps=3, learning_rate=1e-2, adam_eps=1e-4,
          lr_scheduler="constant", seed=0)


def tiny_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, attn_implementation="sdpa", **kw)


def sft_data(n, seed):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcde") for _ in range(rng.randint(1, 6))) for _ in range(n)]
    return [{"prompt": w + "=", "response": w[::-1]} for w in words]


def pref_data(n, seed):
    rng = random.Random(seed)
    words = ["".join(rng.choice("xyz") for _ in range(rng.randint(1, 5))) for _ in range(n)]
    return [{"prompt": w, "chosen": w + "good", "rejected": w + "bad"[: rng.randint(1, 3)]} for w in words]
