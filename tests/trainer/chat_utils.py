"""A real byte-level BPE tokenizer with a ChatML template, trained offline on text written here
(the ``tokenizers`` library), in the two variants real models ship:

    chatml_tokenizer(eos="<|im_end|>")      # eos == end of turn (Qwen chat models); pad <|endoftext|>
    chatml_tokenizer(eos="<|endoftext|>")   # eos != end of turn (Qwen base models); pad == eos

and a tiny toy chat task on it: "say <word>" -> "<word>", preferences for the correct word.
"""
from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOT, EOT_TEXT, START = "<|im_end|>", "<|endoftext|>", "<|im_start|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "paper", "light"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        w = rng.sample(WORDS, 3)
        lines.append(f"say {w[0]}\n{w[0]} and {w[1]} or {w[2]}, the 12 + 7 = 19 answer is \\boxed{{19}}.")
    return lines


def chatml_tokenizer(eos: str = EOT, pad: str | None = EOT_TEXT, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenizer) trained on ``corpus()``, ChatML template
    (``pad=None``: no pad token, as many base models ship)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT, START, EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus(), trainer)
    kw = {} if pad is None else {"pad_token": pad}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, padding_side="right", model_max_length=1 << 30,
                                  **kw)
    tok.chat_template = CHATML
    return tok


def tiny_lm(tok, seed: int = 0, hidden: int = 64):
    """A seeded tiny Llama over ``tok``'s vocabulary (pad/eos from the tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def say_task(n: int, seed: int = 0):
    """(sft rows, preference rows, prompt rows) of "say <word>" -> "<word>"."""
    rng = random.Random(seed)
    sft, prefs, prompts = [], [], []
    for _ in range(n):
        w, other = rng.sample(WORDS, 2)
        sft.append({"prompt": f"say {w}", "response": w})
        prefs.append({"prompt": f"say {w}", "chosen": w, "rejected": other})
        prompts.append({"prompt": f"say {w}", "word": w})
    return sft, prefs, prompts


def said_word(prompts, completions, word=None, **_):
    """1 when the completion is the row's word (the toy task's verifiable reward)."""
    return [float(c.strip() == w) for c, w in zip(completions, word)]
