"""The rlhf-fast command line: settings from YAML + --set (typed, unknown keys listed), clear
errors for bad configs and bad data, each stage end to end on a tiny model, bench discovery."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_fast.cli import CLIError, main, parse_value, resolve_settings
from rlhf_fast.data import write_jsonl

QUIET = ["--set", "progress_bar=false", "--set", "tensorboard=false", "--set", "plot=false", "--set", "device=cpu"]


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------- settings
def test_yaml_then_set_then_model(tmp_path):
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text(yaml.safe_dump({"learning_rate": 1e-3, "batch_size": 8, "train_file": "a.jsonl", "model": "m"}))
    cfg, run = resolve_settings("sft", cfg_file, ["batch_size=4", "micro_batch_size=2", "plot=no"], model="tiny")
    assert (cfg.learning_rate, cfg.batch_size, cfg.micro_batch_size, cfg.plot) == (1e-3, 4, 2, False)
    assert run == {"train_file": "a.jsonl", "model": "tiny"}


def test_parse_value_by_type():
    import typing

    from rlhf_fast.trainer.config import GRPOConfig

    hints = typing.get_type_hints(GRPOConfig)
    assert parse_value("group_size", "8", hints["group_size"]) == 8
    assert parse_value("beta", "0.5", hints["beta"]) == 0.5
    assert parse_value("clip_eps_high", "none", hints["clip_eps_high"]) is None
    assert parse_value("clip_eps_high", "0.3", hints["clip_eps_high"]) == 0.3
    assert parse_value("progress_bar", "off", hints["progress_bar"]) is False
    with pytest.raises(CLIError, match="--set group_size=eight: expected int"):
        parse_value("group_size", "eight", hints["group_size"])
    with pytest.raises(CLIError, match="expected bool"):
        parse_value("plot", "maybe", hints["plot"])


def test_unknown_key_lists_valid_keys(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "sft", "--model", "tiny", "--set", "train_file=x", "--set", "learning_rat=1")
    assert rc == 2
    assert "rlhf-fast sft: error: unknown key 'learning_rat' in --set" in err
    assert "valid keys for `sft`:" in err and "learning_rate" in err and "train_file" in err
    bad = tmp_path / "ppo.yaml"
    bad.write_text("kl_coeff: 0.1\n")
    rc, _, err = run_cli(capsys, "ppo", "--config", bad)
    assert rc == 2 and f"unknown key 'kl_coeff' in {bad}" in err and "kl_coef" in err


@pytest.mark.parametrize("argv, message", [
    (["sft", "--set", "train_file=x.jsonl"], "`sft` needs model (or --model PATH)"),
    (["sft", "--model", "tiny"], "`sft` needs train_file"),
    (["sft", "--model", "tiny", "--set", "train_file=x", "--set", "batch_size=0"], "SFTConfig.batch_size=0: must be >= 1"),
    (["rm", "--model", "tiny", "--set", "train_file=x", "--set", "epochs=1.5"], "--set epochs=1.5: expected int"),
    (["grpo", "--model", "tiny", "--set", "prompts_file=p", "--set", "group_size=1"], "GRPOConfig.group_size=1"),
    (["ppo", "--set", "nonsense"], "--set 'nonsense': expected key=value"),
    (["demo", "--set", "rl_steps=0"], "DemoConfig.rl_steps=0: must be > 0"),
])
def test_bad_settings_are_errors(capsys, argv, message):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and message in err, err


def test_bad_config_file(capsys, tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    rc, _, err = run_cli(capsys, "sft", "--config", tmp_path / "list.yaml")
    assert rc == 2 and "expected a mapping" in err
    rc, _, err = run_cli(capsys, "sft", "--config", tmp_path / "missing.yaml")
    assert rc == 2 and "does not exist" in err


def test_bad_data_names_file_and_line(capsys, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "reponse": "b"}\n')
    rc, _, err = run_cli(capsys, "sft", "--model", "tiny", "--set", f"train_file={data}", *QUIET,
                         "--set", f"output_dir={tmp_path / 'out'}")
    assert rc == 2 and f"{data}:2: missing key 'response'" in err
    (tmp_path / "empty.jsonl").write_text("")
    rc, _, err = run_cli(capsys, "ppo", "--model", "tiny", "--set", f"prompts_file={tmp_path / 'empty.jsonl'}",
                         "--set", "reward_fn=rlhf_fast.demo_task:gold_rewards", *QUIET)
    assert rc == 2 and "empty dataset" in err


def test_reward_source_must_be_exactly_one(capsys, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1"}])
    rc, _, err = run_cli(capsys, "grpo", "--model", "tiny", "--set", f"prompts_file={tmp_path / 'p.jsonl'}", *QUIET)
    assert rc == 2 and "exactly one of reward_model" in err
    rc, _, err = run_cli(capsys, "grpo", "--model", "tiny", "--set", f"prompts_file={tmp_path / 'p.jsonl'}",
                         "--set", "reward_fn=rlhf_fast.demo_task:no_such_fn", *QUIET)
    assert rc == 2 and "no_such_fn" in err


def test_list_keys(capsys):
    rc, out, _ = run_cli(capsys, "grpo", "--list-keys")
    assert rc == 0 and "beta = 0.04" in out and "reward_model:" in out


# ---------------------------------------------------------------------------- stages end to end
def test_stages_end_to_end(capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_fast.demo_task import SortTask

    task = SortTask()
    write_jsonl(tmp_path / "sft.jsonl", task.sft_data(32, 1))
    write_jsonl(tmp_path / "prefs.jsonl", task.preference_data(32, 2))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in task.prompts(8, 3)])
    sft_cfg = tmp_path / "sft.yaml"
    sft_cfg.write_text(yaml.safe_dump({"train_file": str(tmp_path / "sft.jsonl"), "eval_file": str(tmp_path / "sft.jsonl"),
                                       "max_steps": 3, "batch_size": 8, "micro_batch_size": 8,
                                       "output_dir": str(tmp_path / "sft")}))
    rc, out, err = run_cli(capsys, "sft", "--config", sft_cfg, "--model", "tiny", *QUIET)
    assert rc == 0, err
    assert "eval/loss" in out and (tmp_path / "sft" / "final" / "config.json").exists()
    saved = yaml.safe_load((tmp_path / "sft" / "run_config.yaml").read_text())
    assert saved["model"] == "tiny" and saved["max_steps"] == 3
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final")

    rc, out, err = run_cli(capsys, "rm", "--model", tmp_path / "sft" / "final", "--set",
                           f"train_file={tmp_path / 'prefs.jsonl'}", "--set", "max_steps=2", "--set", "batch_size=8",
                           "--set", "micro_batch_size=8", "--set", f"output_dir={tmp_path / 'rm'}", *QUIET)
    assert rc == 0, err
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")

    def rl(**kw):
        settings = dict(prompts_file=tmp_path / "prompts.jsonl", total_steps=2, rollout_batch_size=4,
                        mini_batch_size=4, micro_batch_size=4, max_new_tokens=4, **kw)
        return [a for k, v in settings.items() for a in ("--set", f"{k}={v}")] + QUIET

    rc, out, err = run_cli(capsys, "ppo", "--model", tmp_path / "sft" / "final",
                           *rl(reward_model=tmp_path / "rm" / "final", output_dir=tmp_path / "ppo"))
    assert rc == 0, err
    assert len((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "ppo" / "final" / "value_head.safetensors").exists()
    rc, out, err = run_cli(capsys, "grpo", "--model", tmp_path / "sft" / "final",
                           *rl(reward_fn="rlhf_fast.demo_task:gold_rewards", group_size=2, output_dir=tmp_path / "grpo"))
    assert rc == 0, err
    rec = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 2 and 0 <= rec[-1]["reward/mean"] <= 1  # the gold reward lies in [0, 1]


def test_missing_model_folder(capsys, tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}])
    rc, _, err = run_cli(capsys, "sft", "--model", tmp_path / "nope", "--set", f"train_file={tmp_path / 'sft.jsonl'}",
                         *QUIET)
    assert rc == 2 and "is not a folder" in err


# ---------------------------------------------------------------------------- bench, module entry
def test_bench_discovers_scripts_and_passes_quick(tmp_path):
    """`rlhf-fast bench` runs benchmarks/run_all.py of the folder: --quick / --full when a script offers it."""
    shutil.copy(Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.py", tmp_path / "run_all.py")
    (tmp_path / "bench_fast.py").write_text(
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--quick', action='store_true')\n"
        "p.add_argument('--full', action='store_true')\nprint('| op | quick |', p.parse_args().quick)\n")
    (tmp_path / "bench_plain.py").write_text("import sys\nprint('plain', sys.argv[1:])\n")
    (tmp_path / "bench_broken.py").write_text("raise SystemExit(3)\n")

    def bench(*argv):
        return subprocess.run([sys.executable, "-m", "rlhf_fast", "bench", "--dir", str(tmp_path), *argv],
                              capture_output=True, text=True, timeout=120)

    out = bench("--only", "fast,plain")
    assert out.returncode == 0, out.stderr
    assert "| op | quick | True" in out.stdout and "plain []" in out.stdout
    out = bench("--only", "fast", "--full")
    assert "| op | quick | False" in out.stdout and "--full" in out.stdout
    out = bench()
    assert out.returncode == 1 and "bench_broken.py (exit 3)" in out.stderr
    out = bench("--only", "nope")
    assert out.returncode == 2 and "no benchmark nope; available: broken, fast, plain" in out.stderr


def test_bench_without_a_runner_is_one_line_error(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "bench", "--dir", tmp_path)
    assert rc == 2 and "no benchmarks/run_all.py found" in err


def test_repository_benchmarks_are_found():
    from rlhf_fast.cli import benchmarks_dir

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    if not root.is_dir():
        pytest.skip("no benchmarks/ in this checkout")
    assert benchmarks_dir() == root


def test_console_script_is_declared():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'rlhf-fast = "rlhf_fast.cli:main"' in text


@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "grpo", "demo"])
def test_example_configs_are_valid(command):
    from rlhf_fast.demo import DemoConfig

    cfg, run = resolve_settings(command, Path(__file__).resolve().parents[2] / "configs" / f"{command}.yaml")
    if command == "demo":
        assert cfg == DemoConfig()  # configs/demo.yaml states the defaults
    else:
        assert run["model"]


def test_demo_settings_quick_keeps_what_the_user_set(tmp_path):
    from rlhf_fast.cli import build_parser, demo_settings
    from rlhf_fast.demo import DemoConfig

    args = build_parser().parse_args(["demo", "--quick", "--no-kl", "--out", str(tmp_path), "--threads", "2",
                                      "--set", "sft_steps=7"])
    cfg, _ = demo_settings(args)
    quick = DemoConfig.quick()
    assert (cfg.sft_steps, cfg.no_kl_leash, cfg.output_dir, cfg.threads) == (7, True, str(tmp_path), 2)
    assert (cfg.rm_steps, cfg.rl_steps) == (quick.rm_steps, quick.rl_steps) != (DemoConfig().rm_steps, DemoConfig().rl_steps)
    full, _ = demo_settings(build_parser().parse_args(["demo"]))
    assert full == DemoConfig()
