"""SFTTrainer and RewardTrainer: losses equal their plain-PyTorch definitions, micro-batching
does not change the step, exact resume, learning on toy data, HF-loadable exports."""
import random

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.encoding import Encoded, pad_batch
from rlhf_fast.tokenizer import byte_tokenizer
from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.reward import RewardConfig, RewardTrainer, reward_model_from_pretrained, sequence_scores
from rlhf_fast.trainer.rollout import reward_model_scores
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer, response_nll

TOK = byte_tokenizer()
QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")


def tiny_lm(seed=0, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def tiny_rm(tmp_path, seed=0):
    tiny_lm(seed).save_pretrained(tmp_path / "base")
    return reward_model_from_pretrained(tmp_path / "base", pad_token_id=0)


def sft_data(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = "".join(rng.choice("abcde") for _ in range(rng.randint(1, 5)))
        out.append({"prompt": w + "=", "response": w[::-1]})
    return out


def pref_data(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 4)))
        out.append({"prompt": w, "chosen": w + "good", "rejected": w + "bad"})
    return out


# ---------------------------------------------------------------------------- SFT
def test_response_nll_matches_masked_cross_entropy():
    model = tiny_lm()
    items = [Encoded([1, 10, 11, 12, 13, 2], 3), Encoded([1, 20, 21, 2], 1), Encoded([1, 30, 2], 2)]
    batch = pad_batch(items, 0)
    loss, count = response_nll(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = torch.where(batch["response_mask"], batch["input_ids"], -100)[:, 1:]
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert count.item() == 3 + 3 + 1
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    # gradients agree with the plain definition too
    loss.backward()
    g = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100).backward()
    torch.testing.assert_close(g, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)


def test_micro_batches_give_the_same_step(tmp_path):
    data = sft_data(8)
    params = []
    for mb in (8, 2):
        cfg = SFTConfig(output_dir=str(tmp_path / f"mb{mb}"), max_steps=1, batch_size=8, micro_batch_size=mb, **QUIET)
        t = SFTTrainer(cfg, model=tiny_lm(), tokenizer=TOK, train_data=data)
        t.train_step(0)
        params.append(torch.cat([p.detach().flatten() for p in t.model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)


def test_sft_learns_and_exports_hf_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = sft_data(64)
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=60, batch_size=16, micro_batch_size=16, learning_rate=3e-3,
                    eval_steps=30, **QUIET)
    t = SFTTrainer(cfg, model=tiny_lm(), tokenizer=TOK, train_data=data, eval_data=data[:16])
    before = t.evaluate()["loss"]
    result = t.train()
    assert result["eval/loss"] < before - 0.5, (before, result)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "checkpoints" / "latest").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    ids = torch.tensor([tok("abc=")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, t.model.eval()(ids).logits)


def test_sft_resume_is_exact(tmp_path):
    data = sft_data(40)

    def make(out, **kw):
        cfg = SFTConfig(output_dir=str(out), max_steps=6, batch_size=8, micro_batch_size=4, **QUIET, **kw)
        return SFTTrainer(cfg, model=tiny_lm(), tokenizer=TOK, train_data=data)

    straight = make(tmp_path / "a")
    straight.train()
    interrupted = make(tmp_path / "b")
    for step in range(3):
        interrupted.train_step(step)
    interrupted.step = 3
    interrupted.save()
    resumed = make(tmp_path / "b", resume_from="latest")
    assert resumed.step == 3
    resumed.train()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_sft_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="SFTConfig.batch_size=0"):
        SFTConfig(batch_size=0)
    with pytest.raises(ConfigError, match="micro_batch_size=3: must divide batch_size=8"):
        SFTConfig(batch_size=8, micro_batch_size=3)
    cfg = SFTConfig(output_dir=str(tmp_path), **QUIET)
    with pytest.raises(ValueError, match="train_data is empty"):
        SFTTrainer(cfg, model=tiny_lm(), tokenizer=TOK, train_data=[])
    with pytest.raises(ValueError, match=r"train_data\[1\]: an SFT example needs a string 'response'"):
        SFTTrainer(cfg, model=tiny_lm(), tokenizer=TOK, train_data=[{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    with pytest.raises(TypeError, match="config must be a SFTConfig"):
        SFTTrainer(RewardConfig(), model=tiny_lm(), tokenizer=TOK, train_data=sft_data(2))


# ---------------------------------------------------------------------------- reward model
def test_sequence_scores_match_rollout_reading(tmp_path):
    rm = tiny_rm(tmp_path).eval()
    right = pad_batch([Encoded([1, 5, 6, 7, 2], 2), Encoded([1, 8, 2], 1)], 0)
    ids, mask = right["input_ids"], right["attention_mask"]
    ours = sequence_scores(rm, ids, mask)
    torch.testing.assert_close(ours, reward_model_scores(rm, ids, mask))
    # left padding reads the same last token
    left_ids = torch.tensor([[1, 5, 6, 7, 2], [0, 0, 1, 8, 2]])
    left_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    torch.testing.assert_close(sequence_scores(rm, left_ids, left_mask), ours, rtol=1e-5, atol=1e-5)
    # and HF's own forward agrees when no row ends in padding-valued tokens
    torch.testing.assert_close(rm(input_ids=ids, attention_mask=mask).logits[:, 0], ours, rtol=1e-5, atol=1e-5)


def test_reward_loss_is_bradley_terry(tmp_path):
    cfg = RewardConfig(output_dir=str(tmp_path / "rm"), margin=0.5, **QUIET)
    data = pref_data(6)
    t = RewardTrainer(cfg, model=tiny_rm(tmp_path), tokenizer=TOK, train_data=data)
    loss, stats = t.compute_loss(t.train_set)
    c = sequence_scores(t.model, *[pad_batch([a for a, _ in t.train_set], 0)[k] for k in ("input_ids", "attention_mask")])
    r = sequence_scores(t.model, *[pad_batch([b for _, b in t.train_set], 0)[k] for k in ("input_ids", "attention_mask")])
    torch.testing.assert_close(loss, -F.logsigmoid(c - r - 0.5).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["accuracy"], (c > r).float().mean())


def test_reward_model_learns_and_exports(tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=40, batch_size=16, micro_batch_size=8,
                       learning_rate=3e-3, **QUIET)
    t = RewardTrainer(cfg, model=tiny_rm(tmp_path), tokenizer=TOK, train_data=pref_data(64, 1),
                      eval_data=pref_data(32, 2))
    result = t.train()
    assert result["eval/accuracy"] == 1.0 and result["eval/margin"] > 0.5, result
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")
    b = pad_batch([t.eval_set[0][0], t.eval_set[0][1]], 0)
    torch.testing.assert_close(sequence_scores(loaded, b["input_ids"], b["attention_mask"]),
                               sequence_scores(t.model.eval(), b["input_ids"], b["attention_mask"]))


def test_reward_model_needs_a_scalar_head(tmp_path):
    cfg = RewardConfig(output_dir=str(tmp_path / "rm"), **QUIET)
    t = RewardTrainer(cfg, model=tiny_lm(), tokenizer=TOK, train_data=pref_data(2))
    with pytest.raises(TypeError, match="score_sequences"):
        t.compute_loss(t.train_set)
