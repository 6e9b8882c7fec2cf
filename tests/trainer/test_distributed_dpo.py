"""DPO on 2 gloo ranks (CPU) under torchrun against one process: two updates (FSDP2 and DDP) on
fixed global batches (the second one pair, so one rank runs a zero-weight filler) give the
parameters, metrics and evaluation of one process. Adam eps 1e-4 as in test_distributed_sft_rm.py.

This file is also the per-rank worker (``python -m torch.distributed.run ... <this file> worker OUT``).
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before rlhf_fast is imported

import torch  # noqa: E402
from launch import torchrun as _torchrun  # noqa: E402

from rlhf_fast.tokenizer import byte_tokenizer  # noqa: E402
from rlhf_fast.trainer import distributed  # noqa: E402
from rlhf_fast.trainer.dpo import DPOConfig, DPOTrainer  # noqa: E402

TOK = byte_tokenizer()
QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")
KW = dict(batch_size=6, micro_batch_size=2, eval_batch_size=2, max_steps=3, learning_rate=1e-2, adam_eps=1e-4,
          lr_scheduler="constant", seed=0, beta=0.5)
CASES = ("fsdp", "ddp")


def pref_data(n, seed):
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("xyz") for _ in range(rng.randint(1, 5))) for _ in range(n)]
    return [{"prompt": w, "chosen": w + "good", "rejected": w + "bad"[: rng.randint(1, 3)]} for w in words]


def make_trainer(strategy, out):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    cfg = DPOConfig(output_dir=str(out), distributed_strategy=strategy, **QUIET, **KW)
    return DPOTrainer(cfg, model=LlamaForCausalLM(mcfg), tokenizer=TOK, train_data=pref_data(7, 1),
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
        results = {s: run_case(s, os.path.join(out, s)) for s in CASES}
        if distributed.rank() == 0:
            torch.save(results, os.path.join(out, "results.pt"))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"worker": worker}[mode](*rest)
    sys.exit(0)

# ---------------------------------------------------------------------------- tests
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_dpo")
    code, log, _ = _torchrun("worker", out, timeout=240, target=(__file__,))
    assert code == 0, log[-8000:]
    return torch.load(out / "results.pt", weights_only=False)


@pytest.mark.parametrize("strategy", CASES)
def test_two_ranks_equal_one_process(job, tmp_path, strategy):
    got, want = job[strategy], run_case(strategy, tmp_path)
    for k in want["params"]:
        torch.testing.assert_close(got["params"][k], want["params"][k], rtol=1e-5, atol=1e-6, msg=k)
    for g, w in zip(got["metrics"], want["metrics"]):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), k
    for k in want["eval"]:
        assert got["eval"][k] == pytest.approx(want["eval"][k], rel=1e-5, abs=1e-6), k
    start = make_trainer(strategy, tmp_path / "start").model.state_dict()
    assert any(not torch.equal(start[k], want["params"][k]) for k in want["params"])
