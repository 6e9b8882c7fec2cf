"""User mistakes at the CLI (issue 11, item 11): one line ``rlhf-fast <cmd>: error: ...`` naming
the setting / file / step, exit status 2, a traceback only with --debug; settings checked before
any stage runs; ``--list-keys | head`` without BrokenPipeError."""
import contextlib
import json
import os
import shutil
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


def huge_reward(prompts, completions):  # finite, but the value loss of returns near 3e38 overflows
    return [3e38 if i % 2 else -3e38 for i in range(len(completions))]


def inf_reward(prompts, completions):
    return [float("inf")] * len(completions)


def alternating_reward(prompts, completions):  # every group of 2 gets advantages +-1: a gradient at step 1
    return [float(i % 2) for i in range(len(completions))]


@pytest.mark.parametrize("command, extra, says", [
    ("grpo", ["reward_fn=test_cli_errors:inf_reward"], "step 1: reward_fn inf_reward returned non-finite scores"),
    ("ppo", ["reward_fn=test_cli_errors:huge_reward"], "step 1: non-finite loss (loss inf"),
    ("grpo", ["reward_fn=test_cli_errors:alternating_reward", "learning_rate=1e30", "mini_batch_size=2"],
     "step 1: non-finite gradient norm"),  # the first update makes the weights inf: the op gives NaN
])
def test_a_non_finite_stop_is_one_line_naming_the_step(tmp_path, capsys, command, extra, says):
    argv = _grpo(tmp_path, "--set", "device=cpu", *[a for e in extra for a in ("--set", e)])
    argv[0] = command
    if command == "ppo":
        i = argv.index("group_size=2")
        del argv[i - 1: i + 1]
        argv += ["--set", "mini_batch_size=2"]
    line = one_line_error(capsys, argv, command)
    assert says in line, line
    if "reward_fn" not in says:
        assert "stopped before the optimizer step" in line and "last good checkpoint is none" in line, line


# ---------------------------------------------------------------------------- data and config files
def _bad_utf8_jsonl(path: Path, row: dict):
    """Line 1 is ``row``; line 2 the same with a Latin-1 byte in the prompt (a file saved as cp1252)."""
    good = json.dumps(row).encode()
    path.write_bytes(good + b"\n" + good.replace(b"abc", b"ab\xe9c") + b"\n")


@pytest.mark.parametrize("command, key, row", [
    ("grpo", "prompts_file", {"prompt": "abc"}),
    ("sft", "train_file", {"prompt": "abc", "response": "cba"}),
    ("rm", "train_file", {"prompt": "abc", "chosen": "a", "rejected": "b"}),
    ("dpo", "train_file", {"prompt": "abc", "chosen": "a", "rejected": "b"}),
])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys, command, key, row):
    data = tmp_path / "data.jsonl"
    _bad_utf8_jsonl(data, row)
    argv = [command, "--model", "tiny", "--set", f"{key}={data}", "--set", f"output_dir={tmp_path / 'out'}"]
    if command == "grpo":
        argv += ["--set", "reward_fn=rl_utils:target_fraction"]
    line = one_line_error(capsys, argv, command)
    assert f"{data}:2: not UTF-8 text" in line, line
    assert not (tmp_path / "out").exists()


def test_a_parquet_row_that_is_not_utf8_is_named(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    raw = pa.array([b"abc", b"ab\xffc"], type=pa.binary())
    text = pa.Array.from_buffers(pa.string(), 2, raw.buffers())  # unchecked: as a careless writer leaves it
    pq.write_table(pa.table({"prompt": text}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"prompt": raw}), tmp_path / "bytes.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"\xff\xfe not parquet")
    for name, says in (("p.parquet", "p.parquet row 1: cannot be read (UnicodeDecodeError"),
                       ("bytes.parquet", "bytes.parquet row 0: 'prompt' must be a string or a list of messages, "
                                         "got bytes"),
                       ("junk.parquet", "junk.parquet: not a readable datasets parquet")):
        argv = _grpo(tmp_path, "--set", "reward_fn=rl_utils:target_fraction", "--set", "device=cpu",
                     "--set", f"prompts_file={tmp_path / name}")
        assert says in one_line_error(capsys, argv), name


def test_a_config_file_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(b"seed: 1\nrun_name: caf\xe9\n")
    line = one_line_error(capsys, ["sft", "--config", tmp_path / "c.yaml"], "sft")
    assert f"{tmp_path / 'c.yaml'}:2: not UTF-8 text" in line


# ---------------------------------------------------------------------------- output_dir
def test_an_output_dir_under_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = _grpo(tmp_path, "--set", "reward_fn=rl_utils:target_fraction", "--set", "device=cpu",
                 "--set", f"output_dir={tmp_path / 'file' / 'run' / 'deeper'}")
    line = one_line_error(capsys, argv)
    assert f"cannot be created: {tmp_path / 'file'} is a file, not a folder" in line
    assert (tmp_path / "file").read_text() == "x"


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made unwritable: chmod for a user, the immutable attribute for root (who ignores
    permission bits); skips the test where neither takes effect."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = [lambda: folder.chmod(0o755)]
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = [lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)]
    else:
        pytest.skip("cannot make a folder read-only here")
    try:
        try:
            (folder / ".probe").write_text("x")
        except OSError:
            pass
        else:
            pytest.skip("a read-only folder is still writable here")
        yield
    finally:
        undo[0]()


@pytest.mark.parametrize("where", ["the folder", "its parent"])
def test_a_read_only_output_dir_is_refused_before_anything_is_written(tmp_path, capsys, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro if where == "the folder" else ro / "run"
    argv = _grpo(tmp_path, "--set", "reward_fn=rl_utils:target_fraction", "--set", "device=cpu",
                 "--set", f"output_dir={out}")
    with read_only(ro):
        line = one_line_error(capsys, argv)
    assert (f"output_dir {ro} is read-only" if out == ro else f"output_dir {out} cannot be created: {ro} is "
            "read-only") in line, line
    assert list(ro.iterdir()) == []  # no run_config.yaml


@pytest.mark.parametrize("setting, says", [
    ("max_new_tokens=60", "DemoConfig.max_new_tokens=60: the longest prompt (8 tokens) + max_new_tokens exceeds "
                          "the demo model's 64 positions"),
    ("device=cuda", "device='cuda' but CUDA is not available"),
])
def test_every_demo_setting_is_checked_before_any_stage(tmp_path, capsys, setting, says):
    if "cuda" in setting:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available")
    line = one_line_error(capsys, ["demo", "--quick", "--out", tmp_path / "demo", "--set", setting], "demo")
    assert says in line, line
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("command, data_key", [("sft", "train_file"), ("rm", "train_file"), ("dpo", "train_file"),
                                               ("rloo", "prompts_file"), ("best-of-n", "prompts_file"),
                                               ("label-pairs", "pairs_file")])
def test_every_command_checks_its_settings_before_reading_anything(tmp_path, capsys, command, data_key):
    """A bad device or value fails at once, before the (here missing) data file is read or output_dir written."""
    import torch

    base = [command, "--model", "tiny", "--set", f"{data_key}={tmp_path / 'missing.jsonl'}",
            "--set", f"output_dir={tmp_path / 'out'}"]
    if not torch.cuda.is_available():
        assert "device='cuda:0' but CUDA is not available" in one_line_error(capsys, base + ["--set", "device=cuda:0"],
                                                                             command)
    assert "seed" in one_line_error(capsys, base + ["--set", "seed=x"], command)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_checkpoint_at_resume_is_one_line_naming_the_file(tmp_path, capsys):
    """Item 9 at the CLI: a named checkpoint that does not verify, and a run whose every checkpoint
    is corrupt, end with one line naming the file; a corrupt newest one falls back with a warning."""
    base = _grpo(tmp_path, "--set", "reward_fn=rl_utils:target_fraction", "--set", "device=cpu",
                 "--set", "save_steps=1", "--set", "total_steps=2")
    assert main(base) == 0
    capsys.readouterr()
    ck = tmp_path / "out" / "checkpoints"
    opt = ck / "step-000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    line = one_line_error(capsys, base + ["--set", f"resume_from={ck / 'step-000002'}", "--set", "total_steps=3"])
    assert f"{opt} has 100 bytes, the manifest says" in line
    with pytest.warns(UserWarning, match="falling back to .*step-000001"):
        assert main(base + ["--set", "resume_from=latest", "--set", "total_steps=3"]) == 0
    capsys.readouterr()
    for state in ck.glob("step-*/trainer_state.pt"):
        state.write_bytes(b"")
    line = one_line_error(capsys, base + ["--set", "resume_from=latest", "--set", "total_steps=4"])
    assert f"no complete checkpoint under {ck}" in line and "trainer_state.pt has 0 bytes" in line


def test_a_reward_module_that_fails_on_import_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("def score(prompts, completions):\n    return [0.0] * len(\n")
    (tmp_path / "raising_rewards.py").write_text("raise RuntimeError('needs an API key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, says in (("broken_rewards:score", "importing broken_rewards failed: SyntaxError"),
                       ("raising_rewards:score", "importing raising_rewards failed: RuntimeError: needs an API key")):
        line = one_line_error(capsys, _grpo(tmp_path, "--set", f"reward_fn={spec}", "--set", "device=cpu"))
        assert f"reward_fn='{spec}'" in line and says in line, line


def test_a_policy_with_nan_weights_stops_at_sampling_naming_the_step(tmp_path, capsys):
    """A NaN checkpoint as --model: torch.multinomial's 'probability tensor contains nan' becomes the
    trainer's non-finite stop, one line naming the step."""
    import torch
    from rl_utils import char_tokenizer, seeded_model

    lm = seeded_model(value_head=False).policy
    with torch.no_grad():
        lm.get_output_embeddings().weight.fill_(float("nan"))
    lm.save_pretrained(tmp_path / "nan_model")
    char_tokenizer().save_pretrained(tmp_path / "nan_model")
    argv = _grpo(tmp_path, "--set", "reward_fn=rl_utils:target_fraction", "--set", "device=cpu")
    argv[argv.index("tiny")] = str(tmp_path / "nan_model")
    line = one_line_error(capsys, argv)
    assert "step 1: the policy's next-token probabilities are not finite while sampling" in line, line
