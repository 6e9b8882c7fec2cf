"""Atomic checkpoints and the metrics logger."""
import json
import random

import pytest
import torch

from rlhf_fast.trainer import checkpoint as ckpt
from rlhf_fast.trainer.metrics import MetricsLogger, read_jsonl


def _model_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_roundtrip_restores_weights_optimizer_scheduler_rng(tmp_path):
    model, opt, sched = _model_opt()
    gen = torch.Generator().manual_seed(7)
    torch.rand(3, generator=gen)
    path = ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched,
                                state={"kl": 0.123}, generators={"sampler": gen})
    assert ckpt.latest_checkpoint(tmp_path) == path
    expect = (torch.rand(4), random.random(), torch.rand(2, generator=gen))

    model2, opt2, sched2 = _model_opt()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    gen2 = torch.Generator()
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, generators={"sampler": gen2})
    assert state["step"] == 3 and state["kl"] == 0.123
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    got = (torch.rand(4), random.random(), torch.rand(2, generator=gen2))
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1] and torch.equal(got[2], expect[2])


def test_crash_mid_save_keeps_previous_latest(tmp_path, monkeypatch):
    model, opt, sched = _model_opt()
    good = ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "fsync_tree", boom)  # fails after the files are written, before the rename
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]
    monkeypatch.undo()
    ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt)  # the next save cleans the debris
    assert not list(tmp_path.glob(".tmp-*"))
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"


def test_keep_last_and_bad_arguments(tmp_path):
    model, _, _ = _model_opt()
    for s in range(1, 5):
        ckpt.save_checkpoint(tmp_path, s, model=model, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint(tmp_path, 5, model=model, keep_last=0)
    with pytest.raises(ValueError, match="step"):
        ckpt.save_checkpoint(tmp_path, -1, model=model)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nope")
    assert ckpt.latest_checkpoint(tmp_path / "empty") is None


def test_metrics_logger_jsonl_png_and_resume_truncation(tmp_path):
    with MetricsLogger(tmp_path, total_steps=4, progress=False) as log:
        for s in range(1, 5):
            log.log(s, {"reward/mean": torch.tensor(s * 0.5), "loss/policy": 1.0 / s})
    rec = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rec] == [1, 2, 3, 4] and rec[1]["reward/mean"] == 1.0
    assert (tmp_path / "metrics.png").stat().st_size > 0
    assert (tmp_path / "tensorboard").is_dir()
    with MetricsLogger(tmp_path, total_steps=4, start_step=2, progress=False, plot=False) as log:
        log.log(3, {"reward/mean": 9.0})
    rec = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rec] == [1, 2, 3] and rec[-1]["reward/mean"] == 9.0
    with pytest.raises(ValueError, match="'bad'"):
        MetricsLogger(tmp_path, 1, progress=False, enabled=False).log(1, {"bad": torch.ones(2)})
    json.dumps(rec)
