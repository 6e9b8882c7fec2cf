"""Tiny models, a character tokenizer and a learnable reward for the trainer tests (no downloads)."""
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

CHARS = "abcdefghijklmn "
TARGET = "a"


def char_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """One token per character of CHARS; <pad>=0, <bos>=1, <eos>=2 (no pad token with pad=False)."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({c: 4 + i for i, c in enumerate(CHARS)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    kw = dict(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    if pad:
        kw["pad_token"] = "<pad>"
    tok = PreTrainedTokenizerFast(**kw)
    if not pad:  # the vocabulary still holds <pad>; the tokenizer just does not know it as pad
        assert tok.pad_token_id is None
    return tok


def tiny_config(kind: str = "llama", vocab_size: int = 4 + len(CHARS)):
    if kind == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=128, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)


def target_fraction(prompts, completions):
    """The learnable reward: the fraction of the completion's characters that are TARGET."""
    return [c.count(TARGET) / max(len(c), 1) for c in completions]


PROMPTS = ["hello", "abc", "the cat", "dog", "in the", "big", "fine day", "lemon", "mind", "hi"]


def seeded_model(kind="llama", seed=0, **kw):
    from rlhf_fast import PolicyValueModel

    torch.manual_seed(seed)
    return PolicyValueModel.from_config(tiny_config(kind), **kw)
