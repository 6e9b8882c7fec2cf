"""Tiny configs of the common causal-LM families (no downloads), for the char tokenizer of
rl_utils (vocab 19, <pad>=0, <bos>=1, <eos>=2)."""
import torch
import transformers as T
from rl_utils import CHARS

VOCAB = 4 + len(CHARS)
IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
COMMON = dict(IDS, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

SPECS = {
    "gpt2": (T.GPT2Config, dict(IDS, n_embd=32, n_layer=2, n_head=4, n_positions=128)),
    "llama_tied": (T.LlamaConfig, dict(COMMON, tie_word_embeddings=True)),
    "llama_untied": (T.LlamaConfig, dict(COMMON, tie_word_embeddings=False)),
    "qwen2": (T.Qwen2Config, COMMON),
    "qwen3": (T.Qwen3Config, dict(COMMON, head_dim=8)),
    "gemma": (T.GemmaConfig, dict(COMMON, head_dim=8)),
    "gemma2": (T.Gemma2Config, dict(COMMON, head_dim=8, final_logit_softcapping=3.0)),  # a cap the logits reach
    "gemma3": (T.Gemma3TextConfig, dict(COMMON, head_dim=8)),
    "mistral": (T.MistralConfig, COMMON),
    "phi3": (T.Phi3Config, COMMON),
    "gpt_neox": (T.GPTNeoXConfig, dict(IDS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=128)),
    "opt": (T.OPTConfig, dict(IDS, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=16)),
    "granite": (T.GraniteConfig, dict(COMMON, logits_scaling=8.0)),
    "cohere": (T.CohereConfig, dict(COMMON, logit_scale=0.0625)),
    "qwen2_moe": (T.Qwen2MoeConfig, dict(COMMON, **MOE, shared_expert_intermediate_size=32)),
    "mixtral": (T.MixtralConfig, dict(COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": (T.OlmoeConfig, dict(COMMON, num_experts=4, num_experts_per_tok=2)),
}


def arch_config(name: str):
    cls, kw = SPECS[name]
    return cls(**kw)


def arch_lm(name: str, seed: int = 0, scale: float = 1.0):
    """A seeded tiny causal LM of family ``name``; ``scale`` multiplies the LM head's weights
    (larger logits, so a softcap / logit scaling matters)."""
    torch.manual_seed(seed)
    m = T.AutoModelForCausalLM.from_config(arch_config(name))
    if scale != 1.0:
        with torch.no_grad():
            m.get_output_embeddings().weight.mul_(scale)
    return m.eval()
