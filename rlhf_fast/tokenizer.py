"""A byte-level tokenizer built in code: no download, no training, any text round-trips.

Vocabulary: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then the 256 bytes (byte b is token 3 + b),
259 tokens in all. It is a ``transformers.PreTrainedTokenizerFast`` (a ``tokenizers`` BPE with no
merges whose only tokens are the 256 byte-fallback tokens), so ``save_pretrained`` and
``AutoTokenizer.from_pretrained`` work and checkpoints that carry it are self-contained.

    tok = byte_tokenizer()
    tok("hi")["input_ids"]            # [1, 107, 108]   (<bos>, 'h', 'i')
    tok.decode([107, 108, 2], skip_special_tokens=True)   # 'hi'
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)
VOCAB_SIZE = len(SPECIALS) + 256


def byte_tokenizer(*, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """The built-in byte-level tokenizer (259 tokens, see the module docstring).

    Args:
        add_bos: prepend ``<bos>`` when called with ``add_special_tokens=True`` (the default).
    """
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)})
    # a BPE with no merges and no character tokens: every character falls back to its UTF-8 bytes
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tk.add_special_tokens(list(SPECIALS))
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="right",
        model_max_length=1 << 30,
    )
