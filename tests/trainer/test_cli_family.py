"""The family's commands end to end on the tiny model: dpo, rloo (with a judge reward, a gold
reward and held-out prompts), best-of-n (with its SFT round) and label-pairs."""
import json

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.data import load_preferences, write_jsonl
from rlhf_fast.demo_task import SortTask

QUIET = ["--set", "progress_bar=false", "--set", "tensorboard=false", "--set", "plot=false", "--set", "device=cpu"]


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def sets(quiet=True, **kw):
    return [a for k, v in kw.items() for a in ("--set", f"{k}={v}")] + (QUIET if quiet else ["--set", "device=cpu"])


def test_family_commands(capsys, tmp_path):
    task = SortTask()
    write_jsonl(tmp_path / "prefs.jsonl", task.preference_data(16, 2))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in task.prompts(8, 3)])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "response_a": r["rejected"], "response_b": r["chosen"]}
                                           for r in task.preference_data(4, 4)])

    rc, out, err = run_cli(capsys, "dpo", "--model", "tiny", *sets(train_file=tmp_path / "prefs.jsonl", max_steps=2,
                           batch_size=8, micro_batch_size=4, output_dir=tmp_path / "dpo"))
    assert rc == 0, err
    assert "train/rewards/accuracy" in out and (tmp_path / "dpo" / "final" / "config.json").exists()

    rc, out, err = run_cli(capsys, "rloo", "--model", "tiny", *sets(
        prompts_file=tmp_path / "prompts.jsonl", reward_judge="tiny", gold_fn="rlhf_fast.demo_task:gold_rewards",
        eval_prompts_file=tmp_path / "prompts.jsonl", total_steps=2, rollout_batch_size=2, group_size=2,
        mini_batch_size=4, micro_batch_size=4, max_new_tokens=4, output_dir=tmp_path / "rloo"))
    assert rc == 0, err
    rec = [json.loads(line) for line in (tmp_path / "rloo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 2 and "eval/gold" in rec[-1] and "reward/proxy_minus_gold" in rec[-1]

    rc, out, err = run_cli(capsys, "best-of-n", "--model", "tiny", *sets(
        prompts_file=tmp_path / "prompts.jsonl", reward_fn="rlhf_fast.demo_task:gold_rewards",
        gold_fn="rlhf_fast.demo_task:gold_rewards", n=3, max_new_tokens=4, sft_steps=1, sft_batch_size=4,
        output_dir=tmp_path / "bon"))
    assert rc == 0, err
    assert "gold reward of best-of-k" in out and (tmp_path / "bon" / "sft" / "final" / "config.json").exists()

    rc, out, err = run_cli(capsys, "label-pairs", "--model", "tiny", *sets(False, pairs_file=tmp_path / "pairs.jsonl",
                           output_dir=tmp_path / "lab"))
    assert rc == 0, err
    assert len(load_preferences(tmp_path / "lab" / "preferences.jsonl")) == 4
    rc, _, err = run_cli(capsys, "label-pairs", "--model", "tiny", *sets(False, pairs_file=tmp_path / "pairs.jsonl",
                         output_dir=tmp_path / "lab"))
    assert rc == 2 and "overwrite_output_dir" in err


def test_family_errors(capsys, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1"}])
    rc, _, err = run_cli(capsys, "rloo", "--model", "tiny", *sets(prompts_file=tmp_path / "p.jsonl",
                         reward_fn="rlhf_fast.demo_task:gold_rewards", reward_judge="tiny"))
    assert rc == 2 and "exactly one of reward_model" in err and "reward_judge" in err
    rc, _, err = run_cli(capsys, "dpo", "--model", "tiny", *sets(train_file=tmp_path / "p.jsonl", beta=0))
    assert rc == 2 and "DPOConfig.beta=0.0" in err
    rc, _, err = run_cli(capsys, "best-of-n", "--model", "tiny", *sets(prompts_file=tmp_path / "p.jsonl", n=1))
    assert rc == 2 and "BestOfNConfig.n=1" in err
    rc, _, err = run_cli(capsys, "label-pairs", "--model", "tiny")
    assert rc == 2 and "pairs_file" in err


def test_family_example_configs_are_valid():
    from pathlib import Path

    from rlhf_fast.settings import resolve_settings

    root = Path(__file__).resolve().parents[2] / "configs"
    for command, name in (("dpo", "dpo"), ("rloo", "rloo"), ("best-of-n", "best_of_n")):
        cfg, run = resolve_settings(command, root / f"{name}.yaml")
        assert run["model"] and (run.get("train_file") or run.get("prompts_file")), command


def test_dpo_loads_policy_and_reference_with_the_load_settings(capsys, tmp_path, monkeypatch):
    """``model_dtype`` (``models.load_kwargs``) reaches DPO's policy and reference as it reaches the
    SFT and RM models: the three supervised commands load through one path."""
    import rlhf_fast.models as models

    write_jsonl(tmp_path / "prefs.jsonl", SortTask().preference_data(4, 2))
    real, seen = models.load_causal_lm, []

    class Loaded(Exception):
        pass

    def recording(path, tok, *, key="model", seed=0, **kw):
        seen.append((key, kw))
        if key == "ref_model":
            raise Loaded
        return real(path, tok, key=key, seed=seed, **kw)

    monkeypatch.setattr(models, "load_causal_lm", recording)
    with pytest.raises(Loaded):
        main(["dpo", "--model", "tiny", *map(str, sets(train_file=tmp_path / "prefs.jsonl", ref_model="tiny",
                                                        model_dtype="fp32", output_dir=tmp_path / "dpo"))])
    assert seen == [("model", {"dtype": torch.float32}), ("ref_model", {"dtype": torch.float32})]
