"""Best-of-N: the chosen samples score above the average, the curve equals brute force over
every k-subset, the data sets load with the loaders, and one CLI-free round with SFT."""
import itertools

import pytest
import torch
from rl_utils import PROMPTS, seeded_model, target_fraction

from rlhf_fast.data import load_preferences, load_sft
from rlhf_fast.trainer.best_of_n import BestOfNConfig, best_of_n_curve, run_best_of_n, sample_n
from rlhf_fast.trainer.config import ConfigError


def test_best_scores_above_average(tokenizer):
    lm = seeded_model(value_head=False).policy
    res = sample_n(lm, tokenizer, PROMPTS, 6, max_new_tokens=6, reward_fn=target_fraction, batch_size=12, seed=1)
    assert len(res) == len(PROMPTS) and all(len(r["completions"]) == 6 for r in res)
    for r in res:  # scores are the reward of the completions, best / worst their extremes
        assert r["scores"] == pytest.approx(target_fraction([r["prompt"]] * 6, r["completions"]))
        assert r["best_score"] == max(r["scores"]) and r["worst_score"] == min(r["scores"])
        assert target_fraction([r["prompt"]], [r["best"]])[0] == pytest.approx(r["best_score"])
    best = sum(r["best_score"] for r in res) / len(res)
    mean = sum(sum(r["scores"]) / 6 for r in res) / len(res)
    assert best > mean + 0.01, (best, mean)
    # the same seed gives the same samples
    again = sample_n(lm, tokenizer, PROMPTS[:2], 6, max_new_tokens=6, reward_fn=target_fraction, batch_size=12, seed=1)
    assert [r["completions"] for r in again] == [r["completions"] for r in res[:2]]


def test_curve_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    sel, val = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    curve = best_of_n_curve(sel, val)
    for k in range(1, 7):
        tot = []
        for p in range(5):
            subs = list(itertools.combinations(range(6), k))
            tot.append(sum(float(val[p, max(s, key=lambda i: float(sel[p, i]))]) for s in subs) / len(subs))
        assert curve[k] == pytest.approx(sum(tot) / 5, abs=1e-9)
    assert curve[1] == pytest.approx(float(val.mean()))
    own = best_of_n_curve(val, val)
    assert all(own[k] <= own[k + 1] + 1e-12 for k in range(1, 6)) and own[6] == pytest.approx(float(val.max(-1).values.mean()))
    with pytest.raises(ValueError, match="select"):
        best_of_n_curve(sel, val[:, :3])


def test_round_writes_data_and_sfts(tmp_path, tokenizer):
    cfg = BestOfNConfig(output_dir=str(tmp_path), device="cpu", n=4, max_new_tokens=6, batch_size=8, sft_steps=2,
                        sft_batch_size=4, sft_learning_rate=1e-3, progress_bar=False)
    out = run_best_of_n(cfg, policy=seeded_model(value_head=False).policy, tokenizer=tokenizer, prompts=PROMPTS,
                        reward_fn=target_fraction, log=lambda *_: None)
    sft = load_sft(tmp_path / "sft.jsonl")
    assert len(sft) == out["sft_rows"] > 0
    if out["preference_rows"]:
        prefs = load_preferences(tmp_path / "preferences.jsonl")
        assert all(target_fraction([r["prompt"]], [r["chosen"]])[0] > target_fraction([r["prompt"]], [r["rejected"]])[0]
                   for r in prefs)
    assert out["best_score"] >= out["mean_score"]
    assert (tmp_path / "sft" / "final" / "config.json").is_file()
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        run_best_of_n(cfg, policy=seeded_model(value_head=False).policy, tokenizer=tokenizer, prompts=PROMPTS,
                      reward_fn=target_fraction, log=lambda *_: None)


def test_config_errors():
    with pytest.raises(ConfigError, match="n="):
        BestOfNConfig(n=1)
    with pytest.raises(ConfigError, match="temperature"):
        BestOfNConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="sft_steps"):
        BestOfNConfig(sft_steps=-1)
