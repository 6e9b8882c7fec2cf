"""DPO on 2 gloo ranks (CPU) under torchrun against one process: two updates (FSDP2 and DDP) on
fixed global batches (the second one pair, so one rank runs a zero-weight filler) give the
parameters, metrics and evaluation of one process. Adam eps 1e-4 as in test_distributed_sft_rm.py.

This file is also the per-rank worker (``python -m torch.distributed.run ... <this file> worker OUT``).
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before rlhf_fast is imported

import torch  # noqa: E402
from dist_data import KW, QUIET, TOK, pref_data, tiny_config  # noqa: E402
from launch import assert_same_supervised_run, save_results, worker_job  # noqa: E402

from rlhf_fast.trainer import distributed  # noqa: E402
from rlhf_fast.trainer.dpo import DPOConfig, DPOTrainer  # noqa: E402

CASES = ("fsdp", "ddp")


def make_trainer(strategy, out):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = DPOConfig(output_dir=str(out), distributed_strategy=strategy, **QUIET, **KW, beta=0.5)
    return DPOTrainer(cfg, model=LlamaForCausalLM(tiny_config()), tokenizer=TOK, train_data=pref_data(7, 1),
                      eval_data=pref_data(5, 2))


def run_case(strategy, out):
    tr = make_trainer(strategy, out)
    metrics = [tr.train_step(0), tr.train_step(1)]
    evaluation = tr.evaluate()
    params, _ = distributed.full_state_dicts(tr.model)
    return {"params": params, "metrics": metrics, "eval": evaluation}


def worker(out):
    torch.set_num_threads(1)
    with distributed.distributed_run("cpu"):
        save_results({s: run_case(s, os.path.join(out, s)) for s in CASES}, out)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"worker": worker}[mode](*rest)
    sys.exit(0)

# ---------------------------------------------------------------------------- tests
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return worker_job(tmp_path_factory, "dist_dpo", timeout=240, target=(__file__,))[1]


@pytest.mark.parametrize("strategy", CASES)
def test_two_ranks_equal_one_process(job, tmp_path, strategy):
    got, want = job[strategy], run_case(strategy, tmp_path)
    assert_same_supervised_run(got, want, make_trainer(strategy, tmp_path / "start").model.state_dict())
