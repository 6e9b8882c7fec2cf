"""Reward functions in the RL trainers (TRL's convention): the prompt rows' columns reach the
function as keyword arguments, several functions combine by ``reward_weights``, ``None`` is "no
opinion", each function is logged as ``reward/<name>/mean``, async functions work; the RLVR
example runs and its accuracy rises."""
import asyncio
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from rl_utils import char_tokenizer, seeded_model

from rlhf_fast.cli import main
from rlhf_fast.data import write_jsonl
from rlhf_fast.trainer.config import ConfigError, GRPOConfig
from rlhf_fast.trainer.grpo import GRPOTrainer
from rlhf_fast.trainer.reward_fns import RewardFunctionError, RewardFunctions

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")
ROOT = Path(__file__).resolve().parents[2]


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def key_matches(prompts, completions, key):
    """Checks that each sample's ``key`` column is the one of its own prompt row."""
    assert all(k == "k:" + p for p, k in zip(prompts, key)), (prompts, key)
    return [1.0] * len(completions)


def sometimes_none(prompts, completions, **_):
    return [None if i % 2 else 2.0 for i in range(len(completions))]


# ---------------------------------------------------------------------------- RewardFunctions
def test_columns_reach_the_functions_that_take_them():
    seen = {}

    def named(prompts, completions, answer):
        seen["named"] = answer
        return [0.0] * len(completions)

    def var_kw(prompts, completions, **kw):
        seen["var_kw"] = kw
        return [0.0] * len(completions)

    def plain(prompts, completions):  # the old two-argument convention keeps working
        return [0.0] * len(completions)

    cols = {"answer": ["1", "2"], "source": ["a", "b"]}
    RewardFunctions([named, var_kw, plain])(["p", "q"], ["x", "y"], cols)
    assert seen == {"named": ["1", "2"], "var_kw": cols}


def test_weights_combine_and_none_is_no_opinion():
    fns = RewardFunctions([length_reward, sometimes_none], weights=[0.5, 3.0])
    total, parts = fns(["p"] * 4, ["a", "bb", "ccc", "dddd"])
    assert parts["length_reward"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert parts["sometimes_none"][0::2].tolist() == [2.0, 2.0] and parts["sometimes_none"][1::2].isnan().all()
    # the function with no opinion is left out of the weighted sum
    assert total.tolist() == [0.5 + 6.0, 1.0, 1.5 + 6.0, 2.0]


def test_all_none_scores_zero_with_a_warning():
    with pytest.warns(UserWarning, match="2 of 2 samples got None"):
        total, _ = RewardFunctions(lambda p, c: [None, None])(["p", "q"], ["a", "b"])
    assert total.tolist() == [0.0, 0.0]


def test_async_functions_are_awaited_together():
    async def slow_one(prompts, completions, **_):
        await asyncio.sleep(0.01)
        return [1.0] * len(completions)

    total, parts = RewardFunctions([slow_one, length_reward])(["p", "q"], ["a", "bc"])
    assert total.tolist() == [2.0, 3.0] and parts["slow_one"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("fn, message", [
    (lambda p, c: [1.0], "must return 2 scores"),
    (lambda p, c: [1.0, float("nan")], "non-finite"),
    (lambda p, c: "no", "must return 2 numbers"),
    (lambda p, c: 1 / 0, "raised ZeroDivisionError"),
])
def test_bad_functions_are_named(fn, message):
    with pytest.raises(RewardFunctionError, match=message):
        RewardFunctions(fn)(["p", "q"], ["a", "b"])


def test_weights_must_match_functions():
    with pytest.raises(ValueError, match="2 values for 1 reward functions"):
        RewardFunctions([length_reward], weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="reward_weights"):
        GRPOConfig(reward_weights="1.0,x")
    assert GRPOConfig(reward_weights=[1, 0.5]).weights == [1.0, 0.5]


# ---------------------------------------------------------------------------- in the trainer
def grpo(tmp_path, reward_fn, prompts, **kw):
    cfg = GRPOConfig(output_dir=str(tmp_path), total_steps=1, rollout_batch_size=2, group_size=2, mini_batch_size=4,
                     micro_batch_size=2, max_new_tokens=4, **QUIET, **kw)
    tr = GRPOTrainer(cfg, model=seeded_model(value_head=False).policy, tokenizer=char_tokenizer(), prompts=prompts,
                     reward_fn=reward_fn)
    tr.train()
    return tr, [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_trainer_passes_columns_and_logs_each_function(tmp_path):
    rows = [{"prompt": p, "key": "k:" + p} for p in ("ab", "cd", "ef")]
    tr, log = grpo(tmp_path, [key_matches, sometimes_none, length_reward], rows, reward_weights="1,0.5,0.25")
    m = log[0]
    assert m["reward/key_matches/mean"] == 1.0
    assert m["reward/sometimes_none/mean"] == 2.0  # over the samples it scored
    # reward/mean = sum over functions of weight * (their mean over all samples, None as 0)
    expect = 1.0 + 0.5 * 2.0 * 0.5 + 0.25 * m["reward/length_reward/mean"]
    assert math.isclose(m["reward/mean"], expect, rel_tol=1e-6), (m, expect)


def test_single_function_keeps_the_old_metrics(tmp_path):
    _, log = grpo(tmp_path, length_reward, ["ab", "cd"])
    assert not any(k.startswith("reward/length_reward") for k in log[0])
    cfg = GRPOConfig(output_dir=str(tmp_path / "b"), rollout_batch_size=2, group_size=2, mini_batch_size=4,
                     micro_batch_size=2, reward_weights="1", **QUIET)
    with pytest.raises(ConfigError, match="reward_weights"):  # weights mean nothing to a reward model
        GRPOTrainer(cfg, model=seeded_model(value_head=False).policy, tokenizer=char_tokenizer(), prompts=["ab"],
                    reward_model=seeded_model())


def test_cli_reward_functions_with_weights(tmp_path, capsys):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "key": "k:" + p} for p in ("ab", "cd")])
    argv = ["grpo", "--model", "tiny", "--set", f"prompts_file={tmp_path / 'prompts.jsonl'}",
            "--set", "reward_fn=test_reward_fns:key_matches,test_reward_fns:length_reward",
            "--set", "reward_weights=1,0.5", "--set", "total_steps=1", "--set", "rollout_batch_size=2",
            "--set", "group_size=2", "--set", "mini_batch_size=4", "--set", "micro_batch_size=2",
            "--set", "max_new_tokens=3", "--set", f"output_dir={tmp_path / 'out'}"]
    argv += [x for k, v in QUIET.items() for x in ("--set", f"{k}={v}")]
    assert main(argv) == 0
    m = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["reward/key_matches/mean"] == 1.0 and "reward/length_reward/mean" in m


def test_conversational_prompts_get_message_completions(tmp_path):
    from chat_utils import chatml_tokenizer, tiny_lm

    seen = {}

    def record(prompts, completions, **_):
        seen.update(prompts=prompts, completions=completions)
        return [0.0] * len(completions)

    tok = chatml_tokenizer()
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say apple"}]}]
    cfg = GRPOConfig(output_dir=str(tmp_path), total_steps=1, rollout_batch_size=1, group_size=2, mini_batch_size=2,
                     micro_batch_size=2, max_new_tokens=3, **QUIET)
    GRPOTrainer(cfg, model=tiny_lm(tok), tokenizer=tok, prompts=rows, reward_fn=record).train()
    assert seen["prompts"][0] == rows[0]["prompt"]
    assert seen["completions"][0][0]["role"] == "assistant" and isinstance(seen["completions"][0][0]["content"], str)


# ---------------------------------------------------------------------------- the RLVR example
def test_rlvr_example_accuracy_rises(tmp_path):
    spec = importlib.util.spec_from_file_location("rlvr_arithmetic", ROOT / "examples" / "rlvr_arithmetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    res = mod.main(["--quick", "--out", str(tmp_path)])
    acc = [m["reward/math_answer/mean"] for m in res["metrics"]]
    assert "reward/boxed_format/mean" in res["metrics"][0]
    assert sum(acc[-5:]) / 5 > sum(acc[:5]) / 5 + 0.05, acc



def test_concatenated_rollouts_keep_each_functions_scores():
    """Dynamic sampling's refills (concat_rollouts) carry the per-function scores along."""
    from rlhf_fast.trainer.rollout import Rollout, concat_rollouts

    def part(P, R, start):
        B = 2
        ids = torch.ones(B, P + R, dtype=torch.long)
        mask = torch.ones(B, R, dtype=torch.bool)
        return Rollout([""] * B, [""] * B, ids, torch.ones_like(ids), P, mask, torch.zeros(B), mask.any(-1),
                       reward_parts={"f": torch.tensor([start, start + 1.0]), "g": torch.tensor([float("nan"), 1.0])})

    out = concat_rollouts([part(3, 2, 0.0), part(2, 4, 5.0)], pad_id=0)
    assert out.reward_parts["f"].tolist() == [0.0, 1.0, 5.0, 6.0]
    assert out.reward_parts["g"].isnan().tolist() == [True, False, True, False]
    assert out.select(torch.tensor([2])).reward_parts["f"].tolist() == [5.0]
