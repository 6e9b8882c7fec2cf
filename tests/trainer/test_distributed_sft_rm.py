"""SFT and reward-model training on 2 gloo ranks (CPU) under torchrun against one process.

- two SFT / RM updates (FSDP2 and DDP) on fixed global batches give the parameters, training
  metrics and evaluation of one process on them; the second batch (the end of an epoch) is one
  example, so one rank runs a zero-weight filler micro-batch, as does one rank in evaluation
  (5 eval examples over 2 ranks in parts of 2);
- a 2-rank SFT checkpoint resumes on 1 process with the same weights and trains on as a
  1-process run does; only rank 0 writes metrics, the export is a plain HF checkpoint.

This file is also the per-rank worker (``python -m torch.distributed.run ... <this file> worker OUT``).

Adam's eps is 1e-4 (as in tests/trainer/dist_worker.py): Adam moves an entry by ~ lr * g / (|g| + eps),
so with eps=1e-8 a gradient entry that is 0 up to rounding (its sign set by the summation
order, which differs when the batch is cut into other micro-batches) moves by up to lr; with
1e-4 that inherent noise is ~1e-7 and the comparison can be tight (rtol 1e-5).
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before rlhf_fast is imported

import torch  # noqa: E402
from dist_data import KW, QUIET, TOK, pref_data, sft_data, tiny_config  # noqa: E402
from launch import assert_same_supervised_run, save_results, torchrun, worker_job  # noqa: E402

from rlhf_fast.trainer import distributed  # noqa: E402
from rlhf_fast.trainer.reward import RewardConfig, RewardTrainer  # noqa: E402
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CASES = {"sft_fsdp": ("sft", "fsdp"), "sft_ddp": ("sft", "ddp"), "rm_fsdp": ("rm", "fsdp"), "rm_ddp": ("rm", "ddp")}


def make_trainer(kind, strategy, out, **kw):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = dict(output_dir=str(out), distributed_strategy=strategy, **{**QUIET, **KW, **kw})
    if kind == "sft":
        return SFTTrainer(SFTConfig(**cfg), model=LlamaForCausalLM(tiny_config()), tokenizer=TOK,
                          train_data=sft_data(7, 1), eval_data=sft_data(5, 2))
    return RewardTrainer(RewardConfig(**cfg), model=LlamaForSequenceClassification(tiny_config(num_labels=1)),
                         tokenizer=TOK, train_data=pref_data(7, 1), eval_data=pref_data(5, 2))


def run_case(name, out):
    """Two updates (steps 0 and 1) and an evaluation; returns (trainer, gathered parameters
    (rank 0; {} elsewhere), the steps' metrics, the evaluation)."""
    tr = make_trainer(*CASES[name], out)
    metrics = [tr.train_step(0), tr.train_step(1)]
    tr.step = 2
    evaluation = tr.evaluate()
    params, _ = distributed.full_state_dicts(tr.model)
    return tr, {"params": params, "metrics": metrics, "eval": evaluation}


def worker(out):
    torch.set_num_threads(1)
    with distributed.distributed_run("cpu"):  # shutdown: barrier + destroy_process_group
        results = {}
        for name in CASES:  # the first trainer joins the torchrun job
            tr, results[name] = run_case(name, os.path.join(out, name))
            if name == "sft_fsdp":
                tr.save()  # out/sft_fsdp/checkpoints/step-000002, resumed on 1 process by the test
        # a whole run: metrics by rank 0 alone, checkpoint and export from every rank
        tr = make_trainer("rm", "fsdp", os.path.join(out, "run"), max_steps=2)
        results["run"] = tr.train()
        save_results(results, out)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"worker": worker}[mode](*rest)
    sys.exit(0)

# ---------------------------------------------------------------------------- tests
import pytest  # noqa: E402

from rlhf_fast.trainer.metrics import read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return worker_job(tmp_path_factory, "dist_sft_rm", timeout=240, target=(__file__,))


@pytest.mark.parametrize("case", list(CASES))
def test_two_updates_on_two_ranks_equal_one_process(job, tmp_path, case):
    _, results = job
    got = results[case]
    _, want = run_case(case, tmp_path)
    assert_same_supervised_run(got, want, make_trainer(*CASES[case], tmp_path / "start").model.state_dict())


def test_two_rank_sft_checkpoint_resumes_on_one_process(job, tmp_path):
    out, results = job
    path = out / "sft_fsdp" / "checkpoints" / "step-000002"
    resumed = make_trainer("sft", "fsdp", tmp_path / "resumed", resume_from=str(path))
    assert resumed.step == 2
    saved = results["sft_fsdp"]["params"]
    state = resumed.model.state_dict()
    for k in saved:
        assert torch.equal(state[k], saved[k]), k
    resumed.train_step(2)  # the optimizer state came back too: the same step as a 1-process run's
    straight = make_trainer("sft", "fsdp", tmp_path / "straight")
    for step in range(3):
        straight.train_step(step)
    want = straight.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_two_rank_run_logs_once_and_exports_hf_checkpoint(job):
    from transformers import AutoModelForSequenceClassification

    out, results = job
    records = read_jsonl(out / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]  # one writer
    assert records[-1]["eval/accuracy"] == pytest.approx(results["run"]["eval/accuracy"])
    model = AutoModelForSequenceClassification.from_pretrained(out / "run" / "final")
    assert model.config.num_labels == 1
    assert (out / "run" / "checkpoints" / "step-000002" / "trainer_state.pt").exists()


def test_cli_sft_runs_under_torchrun(tmp_path):
    """``torchrun -m rlhf_fast sft --config cfg.yaml``: one writer, "done" printed once."""
    import json

    from rlhf_fast.trainer import checkpoint as ckpt

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in sft_data(8, 3)))
    out = tmp_path / "out"
    (tmp_path / "cfg.yaml").write_text(
        f"model: tiny\ntrain_file: {tmp_path / 'train.jsonl'}\noutput_dir: {out}\nmax_steps: 2\nbatch_size: 4\n"
        "micro_batch_size: 2\ndistributed_strategy: ddp\nprogress_bar: false\ntensorboard: false\nplot: false\n")
    code, log, _ = torchrun("sft", "--config", tmp_path / "cfg.yaml", timeout=240, target=("-m", "rlhf_fast"))
    assert code == 0, log[-6000:]
    assert log.count("done") == 1, log[-6000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step-000002"
    assert (out / "final" / "config.json").exists() and (out / "run_config.yaml").exists()


def test_config_has_the_distribution_fields(tmp_path):
    from rlhf_fast.trainer.config import ConfigError

    assert SFTConfig().distributed_strategy == "fsdp" and RewardConfig(distributed_strategy="ddp")
    with pytest.raises(ConfigError, match="distributed_strategy"):
        SFTConfig(distributed_strategy="zero3")
    with pytest.raises(ConfigError, match="dist_timeout_s"):
        RewardConfig(dist_timeout_s=0.0)
