"""Hugging Face parity of what rlhf_fast exports: ``AutoModelForSequenceClassification`` scores
a (prompt, response) as rlhf_fast does, on left- and right-padded batches, whatever the
tokenizer's pad (distinct, equal to EOS, missing); ``generation_config.json`` holds the stop ids."""
import contextlib
import json

import pytest
import torch
from chat_utils import EOT, EOT_TEXT, chatml_tokenizer, say_task, tiny_lm

from rlhf_fast.encoding import encode_example
from rlhf_fast.stops import stop_token_ids
from rlhf_fast.trainer.hf_io import PAD_TOKEN
from rlhf_fast.trainer.reward import RewardConfig, RewardTrainer, reward_model_from_pretrained
from rlhf_fast.trainer.rollout import reward_model_scores
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")
VARIANTS = {"eos_is_eot": (EOT, EOT_TEXT), "eos_not_eot_pad_is_eos": (EOT_TEXT, EOT_TEXT), "no_pad": (EOT, None)}


def padded(rows: list[list[int]], pad: int, side: str):
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def trained_rm(tmp_path, tok):
    base = tmp_path / "base"
    tiny_lm(tok).save_pretrained(base)
    _, prefs, _ = say_task(16)
    cfg = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=3, batch_size=8, micro_batch_size=8,
                       learning_rate=1e-2, **QUIET)
    tr = RewardTrainer(cfg, model=reward_model_from_pretrained(base), tokenizer=tok, train_data=prefs)
    tr.train()
    return tr, tmp_path / "rm" / "final", prefs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_reward_model_scores_like_rlhf_fast(tmp_path, variant):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = chatml_tokenizer(*VARIANTS[variant])
    stops = stop_token_ids(tok)
    tr, out, prefs = trained_rm(tmp_path, tok)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    pad = hf_tok.pad_token_id
    assert pad == hf.config.pad_token_id and pad not in stops
    if variant != "eos_is_eot":  # the tokenizer's pad was a stop token (or missing): one was added
        assert hf_tok.pad_token == PAD_TOKEN and len(hf_tok) == len(tok) + 1
    # sequences as rlhf_fast trains and scores them, ending at a stop token; one ends at each stop
    rows = [encode_example(tok, p["prompt"], p[k], 64).ids for p in prefs[:4] for k in ("chosen", "rejected")]
    rows += [encode_example(tok, prefs[0]["prompt"], "apple", 64).ids[:-1] + [s] for s in stops]
    for side in ("right", "left"):
        ids, mask = padded(rows, pad, side)
        ours = reward_model_scores(tr.model, ids, mask)
        with torch.no_grad():
            theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5, msg=f"{variant}, {side}-padded")
        # the same batch read with a stop token as the pad: HF reads another token (what the export avoids)
        hf.config.pad_token_id = stops[0]
        with torch.no_grad():
            wrong = hf(input_ids=torch.where(mask.bool(), ids, stops[0]), attention_mask=mask).logits[:, 0]
        hf.config.pad_token_id = pad
        assert (wrong - ours).abs().max() > 1e-3


def test_reward_tokenizer_pads_with_hf_batches(tmp_path):
    """A user batching texts with the exported tokenizer gets rlhf_fast's scores."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = chatml_tokenizer(EOT_TEXT, pad=EOT_TEXT)
    tr, out, prefs = trained_rm(tmp_path, tok)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    rows = [encode_example(tok, p["prompt"], p["chosen"], 64).ids for p in prefs[:5]]
    texts = [tok.decode(r) for r in rows]
    for side in ("left", "right"):
        hf_tok.padding_side = side
        batch = hf_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        assert [r for r in batch["input_ids"].tolist()] and batch["input_ids"].shape[0] == 5
        with torch.no_grad():
            theirs = hf(**batch).logits[:, 0]
        ours = reward_model_scores(tr.model, batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eos, override, want", [
    (EOT, "", [EOT]), (EOT_TEXT, "", [EOT_TEXT, EOT]), (EOT_TEXT, "<|im_start|>", [EOT_TEXT, "<|im_start|>"]),
])
def test_export_writes_stop_ids_to_generation_config(tmp_path, eos, override, want):
    from transformers import GenerationConfig

    tok = chatml_tokenizer(eos)
    sft, _, _ = say_task(8)
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=1, batch_size=8, micro_batch_size=8, stop_tokens=override,
                    **QUIET)
    # an override without the template's end of turn: the SFT data then holds no stop token, and says so
    with pytest.warns(UserWarning, match="8 of 8 SFT training responses contain no stop token") if override \
            else contextlib.nullcontext():
        tr = SFTTrainer(cfg, model=tiny_lm(tok), tokenizer=tok, train_data=sft)
    tr.train()
    ids = sorted(tok.convert_tokens_to_ids(want))
    assert tr.stop_ids == ids
    gen = GenerationConfig.from_pretrained(tmp_path / "final")
    assert sorted([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id) == ids
    raw = json.loads((tmp_path / "final" / "generation_config.json").read_text())
    assert raw["pad_token_id"] == tok.pad_token_id
