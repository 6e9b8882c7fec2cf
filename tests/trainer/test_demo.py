"""The demo: its task (gold reward, demonstrations, noisy preferences) and the whole pipeline at
a reduced size, which must show RL beating SFT on the gold reward."""
import json
import random

import pytest

from rlhf_fast.demo import DemoConfig, run_demo
from rlhf_fast.demo_task import SortTask, edit, gold_reward, gold_rewards, ideal
from rlhf_fast.trainer.config import ConfigError


# ---------------------------------------------------------------------------- task
def test_gold_reward():
    assert ideal("5281:") == "1258"
    assert gold_reward("5281:", "1258") == 1.0
    assert gold_reward("5281:", "") == 0.0
    assert gold_reward("5281:", "xyz") == 0.0
    assert gold_reward("5281:", "5281") == pytest.approx(1 / 3)  # all digits, one ascending pair of three
    assert gold_reward("5281:", "125") == pytest.approx(2 * 0.75 / 1.75)  # f1 of 3 of 4, sorted
    assert gold_reward("5281:", "12589") == pytest.approx(2 * 0.8 / 1.8)
    assert gold_rewards(["12:", "21:"], ["12", "21"]) == [1.0, 0.0]


def test_demonstrations_and_preferences():
    task = SortTask(p_clean=0.3, label_noise=0.1)
    rng = random.Random(0)
    prompts = task.prompts(2000, 1)
    assert all(3 <= len(p) - 1 <= 6 and len(set(p[:-1])) == len(p) - 1 for p in prompts)
    clean = sum(task.demonstration(rng, p) == ideal(p) for p in prompts) / len(prompts)
    assert 0.3 <= clean <= 0.4  # p_clean plus edits that happen to leave the answer right
    exact = task.preference_data(500, 2, noisy=False)
    assert all(gold_reward(r["prompt"], r["chosen"]) > gold_reward(r["prompt"], r["rejected"]) for r in exact)
    noisy = task.preference_data(2000, 2, noisy=True)
    flipped = sum(gold_reward(r["prompt"], r["chosen"]) < gold_reward(r["prompt"], r["rejected"]) for r in noisy)
    assert 0.07 <= flipped / len(noisy) <= 0.13
    assert all(edit(rng, "1") for _ in range(100))


def test_demo_config_checks():
    with pytest.raises(ConfigError, match="DemoConfig.sft_steps=0"):
        DemoConfig(sft_steps=0)
    with pytest.raises(ConfigError, match="DemoConfig.kl_coef=-1"):
        DemoConfig(kl_coef=-1.0)
    with pytest.raises(ValueError, match="label_noise"):
        DemoConfig(label_noise=0.6)
    assert DemoConfig.quick(rl_steps=5).rl_steps == 5


# ---------------------------------------------------------------------------- pipeline
TINY = dict(n_sft=64, n_pairs=64, n_eval_pairs=16, n_prompts=32, n_eval_prompts=8, eval_samples=1, hidden_size=32,
            sft_steps=4, sft_batch_size=16, rm_steps=4, rm_batch_size=8, rl_steps=2, no_kl_steps=2, eval_every=1,
            ppo_rollout_batch_size=8, grpo_prompts=4, max_new_tokens=6)


def test_demo_pipeline_runs_end_to_end_tiny(tmp_path):
    """The CI variant of the slow test below: every stage and file at a size that learns nothing;
    a second demo into the same folder is refused before anything runs."""
    cfg = DemoConfig(output_dir=str(tmp_path), progress_bar=False, **TINY)
    summary = run_demo(cfg, log=lambda *_: None)
    assert set(summary["results"]) == {"SFT", "RM", "PPO", "GRPO"}
    for stage in ("sft", "rm", "ppo", "grpo"):
        assert (tmp_path / stage / "final" / "config.json").exists(), stage
    for f in ("heldout.png", "summary.md", "summary.json", "data/sft.jsonl"):
        assert (tmp_path / f).exists(), f
    with pytest.raises(FileExistsError, match="already holds a demo run"):
        run_demo(cfg, log=lambda *_: None)


@pytest.mark.slow
def test_demo_pipeline_reduced_size(tmp_path):
    """SFT -> RM -> PPO and GRPO (and both without the KL leash) at the CI size, seeded.
    Measured margins at this size are +0.12 to +0.18 gold over SFT (seeds 0-2); asserted: +0.05."""
    lines = []
    cfg = DemoConfig.quick(output_dir=str(tmp_path), progress_bar=False, no_kl_leash=True)
    summary = run_demo(cfg, log=lines.append)
    res = summary["results"]
    sft = res["SFT"]["gold"]
    assert res["RM"]["accuracy"] > 0.65, res["RM"]
    for name in ("PPO", "GRPO"):
        assert res[name]["gold"] > sft + 0.05, (name, res[name]["gold"], sft)
        assert summary["verdicts"][name]["beats_sft"]
        assert res[name]["proxy"] > res["SFT"]["proxy"]  # RL raised what it optimises
    for name in ("PPO", "GRPO"):  # the leash holds the policy nearer the SFT reference
        assert res[f"{name} (no KL)"]["kl"] > res[name]["kl"], (name, res[f"{name} (no KL)"], res[name])
    text = "\n".join(lines)
    assert "| PPO |" in text and "| GRPO (no KL) |" in text and "reward model held-out accuracy" in text
    for stage in ("sft", "rm", "ppo", "grpo", "ppo_no_kl", "grpo_no_kl"):
        assert (tmp_path / stage / "final" / "config.json").exists(), stage
        assert (tmp_path / stage / "metrics.jsonl").exists() and (tmp_path / stage / "metrics.png").exists()
    for f in ("heldout.png", "summary.md", "data/sft.jsonl", "data/preferences.jsonl", "data/prompts.jsonl"):
        assert (tmp_path / f).exists(), f
    curves = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    steps = {run: [c["step"] for c in curves if c["run"] == run] for run in {c["run"] for c in curves}}
    last = {"PPO": cfg.rl_steps, "GRPO": cfg.rl_steps, "PPO (no KL)": cfg.no_kl_steps, "GRPO (no KL)": cfg.no_kl_steps}
    assert {run: s[-1] for run, s in steps.items()} == last  # measured during training, up to the last step
    assert all(s[0] == 0 and len(s) >= 3 for s in steps.values()), steps
    assert json.loads((tmp_path / "summary.json").read_text())["results"]["PPO"]["gold"] == res["PPO"]["gold"]
