"""A full disk (issue 11): a checkpoint, metrics, pointer or export write that fails with ENOSPC
(simulated in-process: the writer puts half its bytes down, then raises what the real one raises
on a full disk) is a WriteError naming the file; the part written is removed, the previous
checkpoint stays intact and ``latest`` never names a partial one; at the CLI it is one line, and
the run resumes from the last good checkpoint as if nothing had happened."""
import errno
import json

import pytest
import safetensors.torch
import torch
from rl_utils import PROMPTS

from rlhf_fast.cli import main
from rlhf_fast.data import write_jsonl
from rlhf_fast.trainer import checkpoint as ckpt
from rlhf_fast.trainer import fileio, hf_io, metrics
from rlhf_fast.trainer.fileio import WriteError
from rlhf_fast.trainer.metrics import MetricsLogger, read_jsonl

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch.save's
SAFETENSORS_FULL = safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def half_then(error, real):
    """A writer ``f(obj, path, ...)`` that writes half of what ``real`` would, then raises ``error``."""
    def write(obj, path, *a, **k):
        real(obj, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(max(f.seek(0, 2) // 2, 1))
        raise error
    return write


class HalfFile:
    """A file object whose ``fail_at``-th write puts half its data down, then raises ENOSPC."""

    def __init__(self, f, fail_at=1):
        self.f, self.left = f, fail_at

    def write(self, data):
        self.left -= 1
        if self.left > 0:
            return self.f.write(data)
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _saved_once(root):
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    ckpt.save_checkpoint(root, 1, model=model, optimizer=opt)
    return model, opt


def _only_step_1_left(root):
    assert (root / "latest").read_text() == "step-000001\n"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]  # no part, no temp file
    assert ckpt.latest_checkpoint(root).name == "step-000001"  # verifies, no fallback warning


@pytest.mark.parametrize("where", ["model", "optimizer", "trainer_state"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, recwarn, where):
    model, opt = _saved_once(tmp_path)
    if where == "model":
        monkeypatch.setattr(safetensors.torch, "save_model", half_then(SAFETENSORS_FULL, safetensors.torch.save_model))
    else:
        real = torch.save
        name = f"{where}.pt"
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (half_then(
            ENOSPC if where == "optimizer" else TORCH_FULL, real) if str(f).endswith(name) else real)(obj, f, *a, **k))
    with pytest.raises(WriteError) as e:
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    msg = str(e.value)
    assert msg.startswith(f"cannot write checkpoint {tmp_path / 'step-000002'}: ")
    assert msg.endswith(f"; {tmp_path / 'latest'} still names step-000001")
    assert ("No space left on device" in msg and "(free some space" in msg) == (where != "trainer_state")
    assert where != "trainer_state" or "RuntimeError: [enforce fail" in msg  # a disk with room: no "full" claim
    monkeypatch.undo()
    _only_step_1_left(tmp_path)
    assert ckpt.load_checkpoint(tmp_path / "step-000001", model=model, optimizer=opt)["step"] == 1
    assert not [w for w in recwarn if "falling back" in str(w.message)]


def test_torch_saves_cryptic_error_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch):
    import collections

    model, opt = _saved_once(tmp_path)
    real = torch.save
    monkeypatch.setattr(torch, "save", half_then(TORCH_FULL, real))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: usage(10 << 20, (10 << 20) - 512, 512))
    with pytest.raises(WriteError, match=r"RuntimeError: \[enforce fail .* \(the disk is full: 512 bytes free\) "
                                         r"\(free some space, or point output_dir at another disk\); .*latest still "
                                         r"names step-000001"):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    monkeypatch.undo()
    _only_step_1_left(tmp_path)


def test_a_full_disk_while_repointing_latest_keeps_it_on_the_previous(tmp_path, monkeypatch):
    model, opt = _saved_once(tmp_path)
    real_open = open
    monkeypatch.setattr(fileio, "open", lambda f, mode="r", *a, **k: HalfFile(real_open(f, mode, *a, **k)),
                        raising=False)
    with pytest.raises(WriteError, match=r"cannot write the checkpoint pointer .*latest: No space left on device "
                                         r".*step-000002 is complete; latest still names step-000001"):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "step-000001\n" and not list(tmp_path.glob(".latest.tmp-*"))
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"
    ckpt.verify_checkpoint(tmp_path / "step-000002")  # complete: a later save may point at it


def test_write_atomic_on_a_full_disk_keeps_the_old_content(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("old")
    real_open = open
    monkeypatch.setattr(fileio, "open", lambda f, mode="r", *a, **k: HalfFile(real_open(f, mode, *a, **k)),
                        raising=False)
    with pytest.raises(OSError, match="No space left"):
        fileio.write_atomic(tmp_path / "f", "new content")
    assert (tmp_path / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_full_disk_while_logging_metrics_keeps_the_earlier_records(tmp_path):
    log = MetricsLogger(tmp_path, 3, progress=False, tensorboard=False, plot=True)
    log.log(1, {"a": 1.0})
    log.log(2, {"a": 2.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    log._file = HalfFile(log._file)
    with pytest.raises(WriteError, match=r"cannot write the metrics of step 3 to .*metrics.jsonl: No space left on "
                                         r"device .*; the records before step 3 are intact"):
        log.log(3, {"a": 3.0})
    log.close()  # nothing more written, no error
    assert (tmp_path / "metrics.jsonl").read_bytes() == before and not (tmp_path / "metrics.png").exists()


def test_a_failed_resume_rewrite_leaves_the_metrics_unchanged(tmp_path, monkeypatch):
    data = "".join(json.dumps({"step": s, "a": float(s)}) + "\n" for s in range(1, 6))
    (tmp_path / "metrics.jsonl").write_text(data)
    real_open = open
    monkeypatch.setattr(fileio, "open", lambda f, mode="r", *a, **k: HalfFile(real_open(f, mode, *a, **k)),
                        raising=False)
    with pytest.raises(WriteError, match=r"cannot write metrics .*metrics.jsonl: No space left on device .*the file "
                                         r"is unchanged"):
        MetricsLogger(tmp_path, 5, start_step=2, progress=False, tensorboard=False, plot=False)
    assert (tmp_path / "metrics.jsonl").read_text() == data and len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------------------- through the CLI
def _grpo(tmp_path, out, steps, *extra):
    prompts = tmp_path / "p.jsonl"
    if not prompts.exists():
        write_jsonl(prompts, [{"prompt": p} for p in PROMPTS])
    return ["grpo", "--model", "tiny", "--set", f"prompts_file={prompts}", "--set", "reward_fn=rl_utils:target_fraction",
            "--set", f"output_dir={out}", "--set", f"total_steps={steps}", "--set", "save_steps=1",
            "--set", "rollout_batch_size=2", "--set", "group_size=2", "--set", "mini_batch_size=4",
            "--set", "micro_batch_size=2", "--set", "max_new_tokens=3", "--set", "progress_bar=false",
            "--set", "tensorboard=false", "--set", "plot=false", "--set", "device=cpu",
            "--set", "learning_rate=1e-3", *extra]


def _one_line(capsys, argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("rlhf-fast grpo: error: cannot write "), (rc, err)
    return err[0]


def _untimed(path):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in read_jsonl(path)]


def test_cli_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes_exactly(tmp_path, capsys, monkeypatch):
    assert main(_grpo(tmp_path, tmp_path / "a", 3)) == 0
    real, saves = torch.save, []

    def save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            saves.append(f)
            if len(saves) == 2:
                return half_then(ENOSPC, real)(obj, f, *a, **k)
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "b"
    line = _one_line(capsys, _grpo(tmp_path, out, 3))
    assert f"checkpoint {out / 'checkpoints' / 'step-000002'}: No space left on device" in line
    assert line.endswith(f"{out / 'checkpoints' / 'latest'} still names step-000001")
    monkeypatch.undo()
    _only_step_1_left(out / "checkpoints")
    assert main(_grpo(tmp_path, out, 3, "--set", "resume_from=latest")) == 0
    assert _untimed(out / "metrics.jsonl") == _untimed(tmp_path / "a" / "metrics.jsonl")


def test_cli_a_full_disk_while_logging_or_exporting_is_one_line(tmp_path, capsys, monkeypatch):
    real_open = open

    def opened(f, mode="r", *a, **k):
        h = real_open(f, mode, *a, **k)
        return HalfFile(h, fail_at=2) if str(f).endswith("metrics.jsonl") and "a" in mode else h

    monkeypatch.setattr(metrics, "open", opened, raising=False)
    out = tmp_path / "m"
    line = _one_line(capsys, _grpo(tmp_path, out, 3))
    assert f"the metrics of step 2 to {out / 'metrics.jsonl'}: No space left on device" in line
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    monkeypatch.undo()

    real_save = hf_io.save_weights

    def save_weights(model, directory, *a, **k):
        real_save(model, directory, *a, **k)
        if directory.name == "final":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_io, "save_weights", save_weights)
    out = tmp_path / "e"
    line = _one_line(capsys, _grpo(tmp_path, out, 2))
    assert f"cannot write the model {out / 'final'}: No space left on device" in line
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step-000002"


def test_written_rows_are_whole_or_absent_on_a_full_disk(tmp_path, monkeypatch):
    from rlhf_fast.data import load_jsonl

    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "old", "response": "x"}])
    real_open = open
    monkeypatch.setattr(fileio, "open", lambda f, mode="r", *a, **k: HalfFile(real_open(f, mode, *a, **k)),
                        raising=False)
    for name in ("rows.jsonl", "new.jsonl"):
        with pytest.raises(WriteError, match=rf"cannot write rows .*{name}: No space left on device"):
            write_jsonl(tmp_path / name, [{"prompt": "p" * 1000, "response": "r"}] * 100)
    monkeypatch.undo()
    assert load_jsonl(tmp_path / "rows.jsonl", ("prompt", "response")) == [{"prompt": "old", "response": "x"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
