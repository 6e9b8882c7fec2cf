"""Failure-mode metrics (distinct-n, self-similarity, truncation, proxy minus gold) and the
held-out evaluation during RL: values against hand computations, and evaluation leaving the
training numbers bit-identical."""
import pytest
import torch
from rl_utils import PROMPTS, seeded_model, target_fraction

from rlhf_fast.trainer.config import ConfigError, GRPOConfig
from rlhf_fast.trainer.grpo import GRPOTrainer
from rlhf_fast.trainer.health import distinct_n, self_similarity
from rlhf_fast.trainer.metrics import read_jsonl

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")


def test_distinct_and_self_similarity():
    seqs = [[1, 2, 3], [1, 2, 3], [4], []]
    assert distinct_n(seqs, 1) == pytest.approx(4 / 7)
    assert distinct_n(seqs, 2) == pytest.approx(2 / 4)
    assert distinct_n([[], [5]], 2) == 0.0
    # group 1: identical -> 1; group 2: {4} vs {} -> 0
    assert self_similarity(seqs, 2) == pytest.approx(0.5)
    # {(1,2),(2,3)} vs {(2,3),(3,4)}: 1/3
    assert self_similarity([[1, 2, 3], [2, 3, 4]], 2) == pytest.approx(1 / 3)


def not_a(prompts, completions):  # a gold reward that disagrees with the proxy
    return [1.0 - c.count("a") / max(len(c), 1) for c in completions]


def run(tmp_path, eval_prompts=None, gold_fn=None):
    cfg = GRPOConfig(output_dir=str(tmp_path), total_steps=2, rollout_batch_size=2, group_size=4, mini_batch_size=8,
                     micro_batch_size=4, max_new_tokens=5, learning_rate=3e-3, beta=0.02, eval_steps=1, **QUIET)
    from rl_utils import char_tokenizer

    t = GRPOTrainer(cfg, model=seeded_model(value_head=False), tokenizer=char_tokenizer(), reward_fn=target_fraction,
                    prompts=PROMPTS, gold_fn=gold_fn, eval_prompts=eval_prompts)
    t.train()
    return t, read_jsonl(tmp_path / "metrics.jsonl")


def test_metrics_logged_and_eval_changes_nothing(tmp_path):
    plain, rec0 = run(tmp_path / "plain")
    evald, rec1 = run(tmp_path / "eval", eval_prompts=["hi", "cab", "dog", "mind", "lemon"], gold_fn=not_a)
    for a, b in zip(plain.model.state_dict().values(), evald.model.state_dict().values()):
        assert torch.equal(a, b)
    for r0, r1 in zip(rec0, rec1):
        for k in ("reward/mean", "loss/policy", "response/distinct_2", "response/self_similarity"):
            assert r0[k] == r1[k], k
    last = rec1[-1]
    for k in ("response/length_max", "response/truncated_frac", "response/distinct_1", "eval/reward", "eval/gold",
              "eval/kl_ref", "eval/length", "eval/distinct_2"):
        assert k in last, k
    assert "eval/reward" in rec1[0]  # eval_steps=1: every step
    assert last["reward/proxy_minus_gold"] == pytest.approx(last["reward/mean"] - last["reward/gold"])
    assert last["eval/proxy_minus_gold"] == pytest.approx(last["eval/reward"] - last["eval/gold"])
    assert 0 <= last["response/truncated_frac"] <= 1 and last["response/length_max"] <= 5
    assert "eval/reward" not in rec0[-1] and "reward/gold" not in rec0[-1]


def test_bad_arguments(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="eval_steps"):
        GRPOConfig(eval_steps=-1)
    cfg = GRPOConfig(output_dir=str(tmp_path), total_steps=1, rollout_batch_size=2, group_size=2, mini_batch_size=4,
                     micro_batch_size=4, **QUIET)
    with pytest.raises(ValueError, match="eval_prompts"):
        GRPOTrainer(cfg, model=seeded_model(value_head=False), tokenizer=tokenizer, reward_fn=target_fraction,
                    prompts=PROMPTS, eval_prompts="hi")
    with pytest.raises(TypeError, match="gold_fn"):
        GRPOTrainer(cfg, model=seeded_model(value_head=False), tokenizer=tokenizer, reward_fn=target_fraction,
                    prompts=PROMPTS, gold_fn=3)
