"""Nothing lost (issue 11, items 7-10): a fresh run refuses another run's output_dir; a kill -9
while metrics.jsonl is rewritten on resume loses no record; corrupt or half-written checkpoints
are named and skipped for the newest complete one; a resumed ``--model tiny`` run reproduces
the uninterrupted one through the CLI."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from rl_utils import PROMPTS, char_tokenizer, seeded_model, target_fraction

from rlhf_fast.cli import main
from rlhf_fast.data import write_jsonl
from rlhf_fast.trainer import checkpoint as ckpt
from rlhf_fast.trainer.config import PPOConfig
from rlhf_fast.trainer.metrics import read_jsonl
from rlhf_fast.trainer.ppo import PPOTrainer
from rlhf_fast.trainer.runtime import OutputDirInUseError

ROOT = Path(__file__).resolve().parents[2]
QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")
UNTIMED = ("time/", "perf/")


def ppo(out, **kw):
    args = dict(output_dir=str(out), total_steps=2, rollout_batch_size=4, mini_batch_size=4, micro_batch_size=2,
                ppo_epochs=1, max_new_tokens=4, save_steps=1, **QUIET)
    args.update(kw)
    return PPOTrainer(PPOConfig(**args), model=seeded_model(), tokenizer=char_tokenizer(), reward_fn=target_fraction,
                      prompts=PROMPTS)


def untimed(records):
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in records]


# ---------------------------------------------------------------------------- 7. a used output_dir
def test_a_fresh_run_refuses_a_finished_or_started_run(tmp_path):
    ppo(tmp_path / "done").train()
    before = (tmp_path / "done" / "metrics.jsonl").read_bytes()
    with pytest.raises(OutputDirInUseError, match=r"output_dir .*done already holds a run \(metrics.jsonl, "
                                                  r"checkpoints, final\); set resume_from='latest'"):
        ppo(tmp_path / "done")
    assert (tmp_path / "done" / "metrics.jsonl").read_bytes() == before
    started = tmp_path / "started"  # killed before its first checkpoint: only metrics so far
    started.mkdir()
    (started / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
    with pytest.raises(OutputDirInUseError, match=r"already holds a run \(metrics.jsonl\)"):
        ppo(started)
    ppo(tmp_path / "done", overwrite_output_dir=True).train()  # explicit: replaced
    ppo(tmp_path / "done", resume_from="latest")  # or continued
    ppo(tmp_path / "fresh")  # an empty or missing folder is fine


def test_cli_refuses_before_writing_run_config(tmp_path, capsys):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "run"
    argv = ["grpo", "--model", "tiny", "--set", f"prompts_file={tmp_path / 'p.jsonl'}", "--set",
            "reward_fn=rl_utils:target_fraction", "--set", f"output_dir={out}", "--set", "total_steps=1",
            "--set", "rollout_batch_size=2", "--set", "group_size=2", "--set", "mini_batch_size=4",
            "--set", "micro_batch_size=2", "--set", "max_new_tokens=3", "--set", "progress_bar=false",
            "--set", "tensorboard=false", "--set", "plot=false", "--set", "device=cpu"]
    assert main(argv) == 0
    settings = (out / "run_config.yaml").read_bytes()
    capsys.readouterr()
    assert main(argv + ["--set", "learning_rate=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-fast grpo: error: output_dir") and "overwrite_output_dir" in err[0]
    assert (out / "run_config.yaml").read_bytes() == settings  # the failed start wrote nothing
    assert main(argv + ["--set", "overwrite_output_dir=true"]) == 0


# ---------------------------------------------------------------------------- 8. metrics.jsonl on resume
KILLED_WRITER = r"""
import builtins, os, sys, time
from rlhf_fast.trainer import fileio, metrics
path, mode = sys.argv[1], sys.argv[2]
if mode == "mid-write":  # any file of the run opened to be (re)written stops half-way: the kill lands there
    real_open = builtins.open
    class Half:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *e): return self.f.__exit__(*e)
        def __getattr__(self, name): return getattr(self.f, name)
        def write(self, data):
            self.f.write(data[: len(data) // 2]); self.f.flush(); print("WRITING", flush=True); time.sleep(60)
        def writelines(self, lines): self.write(type(lines[0])().join(lines) if lines else "")
    def hooked(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if "w" in mode and os.path.dirname(os.path.abspath(str(file))) == os.path.abspath(path):
            return Half(f)
        return f
    builtins.open = hooked
if mode == "in-rename":  # stop between the temp file's fsync and the rename
    real = fileio.os.replace
    def slow(a, b):
        print("RENAMING", flush=True); time.sleep(60); real(a, b)
    fileio.os.replace = slow
print("START", flush=True)
metrics.MetricsLogger(path, 20000, start_step=10000, progress=False, tensorboard=False, plot=False).close()
print("DONE", flush=True)
"""


def _metrics_file(folder: Path, n: int) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"step": s, "reward/mean": s * 1e-3, "loss/policy": 1.0 / s}) + "\n"
                   for s in range(1, n + 1)).encode()
    (folder / "metrics.jsonl").write_bytes(data)
    return data


def _check_after_kill(folder: Path, original: bytes):
    got = (folder / "metrics.jsonl").read_bytes()
    kept = b"".join(line for line in original.splitlines(keepends=True) if json.loads(line)["step"] <= 10000)
    assert got in (original, kept), f"{len(got.splitlines())} records left of {len(original.splitlines())}"


def _run_and_kill(folder: Path, mode: str, delay: float | None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder), mode], stdout=subprocess.PIPE,
                            text=True, env=env)
    wanted = {"in-rename": "RENAMING", "mid-write": "WRITING"}.get(mode, "START")
    for line in proc.stdout:
        if line.strip() == wanted:
            break
    if delay:
        time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("where", ["mid-write", "in-rename"])
def test_kill_9_during_the_metrics_rewrite_loses_nothing(tmp_path, where):
    original = _metrics_file(tmp_path, 20000)
    _run_and_kill(tmp_path, where, None)
    _check_after_kill(tmp_path, original)
    assert (tmp_path / "metrics.jsonl").read_bytes() == original  # killed before the rename: all there
    from rlhf_fast.trainer.metrics import MetricsLogger

    MetricsLogger(tmp_path, 1, start_step=10000, progress=False, tensorboard=False, plot=False).close()
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 10000 and not list(tmp_path.glob(".metrics.jsonl.tmp-*"))


@pytest.mark.parametrize("tries", [pytest.param(4, id="ci"), pytest.param(20, marks=pytest.mark.slow, id="long")])
def test_kill_9_at_random_points_of_the_metrics_rewrite_loses_nothing(tmp_path, tries):
    g = torch.Generator().manual_seed(0)
    for i in range(tries):
        folder = tmp_path / str(i)
        original = _metrics_file(folder, 20000)
        _run_and_kill(folder, "plain", float(torch.rand((), generator=g)) * 0.15)
        _check_after_kill(folder, original)


def test_a_record_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from rlhf_fast.trainer.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    with pytest.warns(UserWarning, match="dropped 1 unreadable line"):
        MetricsLogger(tmp_path, 3, start_step=2, progress=False, tensorboard=False, plot=False).close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


# ---------------------------------------------------------------------------- 9. checkpoint verification
def _two_checkpoints(root: Path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    for s in (1, 2):
        ckpt.save_checkpoint(root, s, model=model, optimizer=opt, keep_last=None)
    return model, opt


def _truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("bad", ["trainer_state.pt", "optimizer.pt", "model/model.safetensors", "manifest.json"])
def test_a_truncated_file_is_named_and_the_previous_checkpoint_used(tmp_path, bad):
    model, opt = _two_checkpoints(tmp_path)
    _truncate(tmp_path / "step-000002" / bad)
    with pytest.raises(ckpt.CorruptCheckpointError, match=rf"step-000002.{'manifest' if 'manifest' in bad else bad}"):
        ckpt.load_checkpoint(tmp_path / "step-000002", model=model, optimizer=opt)
    with pytest.warns(UserWarning, match=r"latest names step-000002: .*falling back to .*step-000001"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model=model, optimizer=opt)["step"] == 1


@pytest.mark.parametrize("pointer", ["", "step-000009\n"])
def test_an_empty_or_dangling_latest_falls_back(tmp_path, pointer):
    _two_checkpoints(tmp_path)
    (tmp_path / "latest").write_text(pointer)
    with pytest.warns(UserWarning, match="latest is empty" if not pointer else "latest names step-000009"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"


def test_nothing_complete_is_an_error_naming_the_files(tmp_path):
    _two_checkpoints(tmp_path)
    for s in ("step-000001", "step-000002"):
        (tmp_path / s / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"no complete checkpoint .*step-000001.trainer_state.pt"):
        ckpt.latest_checkpoint(tmp_path)


def test_stale_latest_temp_files_are_cleaned(tmp_path):
    model, opt = _two_checkpoints(tmp_path)
    (tmp_path / ".latest.tmp-99999").write_text("step-000001\n")  # a run killed while repointing latest
    ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt)
    assert not list(tmp_path.glob(".latest.tmp-*")) and ckpt.latest_checkpoint(tmp_path).name == "step-000003"


def test_resume_after_a_corrupt_newest_checkpoint_replays_from_the_previous(tmp_path):
    full = ppo(tmp_path / "full", total_steps=3)
    full.train()
    half = ppo(tmp_path / "half", total_steps=3)
    half.train()
    _truncate(tmp_path / "half" / "checkpoints" / "step-000003" / "optimizer.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = ppo(tmp_path / "half", total_steps=3, resume_from="latest", keep_checkpoints=2)
    assert again.step == 2
    again.train()
    want, got = (untimed(read_jsonl(tmp_path / d / "metrics.jsonl")) for d in ("full", "half"))
    assert got == want
    for a, b in zip(full.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- 10. --model tiny resumes exactly
def _cli_rl(command, out, prompts, steps, *extra):
    argv = [command, "--model", "tiny", "--set", f"prompts_file={prompts}", "--set", "reward_fn=rl_utils:target_fraction",
            "--set", f"output_dir={out}", "--set", f"total_steps={steps}", "--set", "save_steps=1",
            "--set", "rollout_batch_size=2", "--set", "mini_batch_size=2", "--set", "micro_batch_size=2",
            "--set", "max_new_tokens=3", "--set", "progress_bar=false", "--set", "tensorboard=false",
            "--set", "plot=false", "--set", "device=cpu", "--set", "learning_rate=1e-3", *extra]
    if command == "grpo":
        argv += ["--set", "group_size=2", "--set", "mini_batch_size=4"]
    assert main(argv) == 0


@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_cli_tiny_model_runs_repeat_and_resume_exactly(tmp_path, command):
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"prompt": p} for p in PROMPTS])
    _cli_rl(command, tmp_path / "a", prompts, 3)
    _cli_rl(command, tmp_path / "b", prompts, 3)  # the same command twice: the same run
    _cli_rl(command, tmp_path / "c", prompts, 2)
    _cli_rl(command, tmp_path / "c", prompts, 3, "--set", "resume_from=latest")  # same reference after resume
    a, b, c = (untimed(read_jsonl(tmp_path / d / "metrics.jsonl")) for d in "abc")
    assert a == b
    assert [r["step"] for r in c] == [1, 2, 3] and c == a
    from rlhf_fast.trainer.hf_io import read_safetensors

    wa, wc = (read_safetensors(tmp_path / d / "final") for d in "ac")
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)
