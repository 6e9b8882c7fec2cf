"""User mistakes at the CLI (issue 11, item 11): one line ``rlhf-fast <cmd>: error: ...`` naming
the setting / file / step, exit status 2, a traceback only with --debug; settings checked before
any stage runs; ``--list-keys | head`` without BrokenPipeError."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rl_utils import PROMPTS

from rlhf_fast.cli import main
from rlhf_fast.data import write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def bad_reward_raises(prompts, completions):
    raise KeyError("no score")


def bad_reward_none(prompts, completions):
    return None


def bad_reward_text(prompts, completions):
    return "1.0"


def bad_reward_dict(prompts, completions):
    return {"a": 1.0}


def bad_reward_count(prompts, completions):
    return [0.0] * (len(completions) + 1)


def bad_reward_nan(prompts, completions):
    return [float("nan")] * len(completions)


def _grpo(tmp_path, *extra):
    prompts = tmp_path / "p.jsonl"
    if not prompts.exists():
        write_jsonl(prompts, [{"prompt": p} for p in PROMPTS])
    return ["grpo", "--model", "tiny", "--set", f"prompts_file={prompts}", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", "total_steps=1", "--set", "rollout_batch_size=2", "--set", "group_size=2",
            "--set", "mini_batch_size=4", "--set", "micro_batch_size=2", "--set", "max_new_tokens=3",
            "--set", "progress_bar=false", "--set", "tensorboard=false", "--set", "plot=false", *extra]


def one_line_error(capsys, argv, command="grpo"):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"rlhf-fast {command}: error: "), (rc, err)
    return err[0]


@pytest.mark.parametrize("fn, says", [
    ("bad_reward_raises", "raised KeyError: 'no score'"),
    ("bad_reward_none", "must return 4 numbers, got NoneType"),
    ("bad_reward_text", "must return 4 numbers, got str"),
    ("bad_reward_dict", "must return 4 numbers, got dict"),
    ("bad_reward_count", "must return 4 scores, got shape (5,)"),
    ("bad_reward_nan", "returned non-finite scores"),
])
def test_a_bad_reward_function_names_itself_and_the_step(tmp_path, capsys, fn, says):
    line = one_line_error(capsys, _grpo(tmp_path, "--set", f"reward_fn=test_cli_errors:{fn}", "--set", "device=cpu"))
    assert f"step 1: reward_fn {fn} " in line and says in line


@pytest.mark.parametrize("extra, says", [
    (["--threads", "-1"], "--threads -1: must be >= 1"),
    (["--set", "device=cuda:0"], "device='cuda:0' but CUDA is not available"),
    (["--set", "max_new_tokens=600"], "max_new_tokens: the longest prompt"),
    (["--set", "resume_from=/nonexistent/step-000001"], "resume_from=/nonexistent/step-000001: no such checkpoint"),
    (["--set", "reward_fn=nomodule:fn"], "reward_fn='nomodule:fn'"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, extra, says):
    if "device" not in " ".join(extra):
        extra = [*extra, "--set", "device=cpu"]
    if not any("reward_fn" in e for e in extra):
        extra = [*extra, "--set", "reward_fn=rl_utils:target_fraction"]
    assert says in one_line_error(capsys, _grpo(tmp_path, *extra))
    assert not (tmp_path / "out").exists()  # a failed start leaves no run_config.yaml


def test_bad_folders_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = _grpo(tmp_path, "--set", "reward_fn=rl_utils:target_fraction", "--set", "device=cpu")
    argv[argv.index("tiny")] = str(tmp_path / "empty")
    assert "model: " in (line := one_line_error(capsys, argv)) and "holds no tokenizer files" in line
    (tmp_path / "file").write_text("x")
    argv = _grpo(tmp_path, "--set", "reward_fn=rl_utils:target_fraction", "--set", f"output_dir={tmp_path / 'file'}")
    assert "is a file, not a folder" in one_line_error(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    from rlhf_fast.cli import CLIError

    with pytest.raises(CLIError, match="--threads -1"):
        main(_grpo(tmp_path, "--threads", "-1", "--debug"))


def test_demo_settings_are_checked_before_any_stage(tmp_path, capsys):
    line = one_line_error(capsys, ["demo", "--quick", "--out", tmp_path / "demo", "--set", "group_size=1"], "demo")
    assert "GRPOConfig.group_size=1" in line
    assert not (tmp_path / "demo" / "data").exists()  # nothing ran


def test_list_keys_into_a_closed_pipe(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(f"{sys.executable} -m rlhf_fast ppo --list-keys | head -1", shell=True, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("settings of `ppo`") and "Traceback" not in proc.stderr, proc.stderr
