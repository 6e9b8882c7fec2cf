"""Pins a short seeded PPO and GRPO run (tiny model, CPU, one thread) to golden files: every
logged metric and a checksum of the final parameters, compared for exact equality. A
refactor of the trainers must leave these numbers bit-identical.

Regenerate (only for an intended numerical change, saying why in the commit):
    RLHF_FAST_REGEN_GOLDEN=1 python -m pytest tests/trainer/test_golden.py
"""
import json
import os
from pathlib import Path

import pytest
import torch
from rl_utils import PROMPTS, char_tokenizer, seeded_model, target_fraction

from rlhf_fast.trainer.config import GRPOConfig, PPOConfig
from rlhf_fast.trainer.grpo import GRPOTrainer
from rlhf_fast.trainer.metrics import read_jsonl
from rlhf_fast.trainer.ppo import PPOTrainer

GOLDEN = Path(__file__).resolve().parent / "golden"
QUIET = dict(progress_bar=False, tensorboard=False, plot=False)
# timings and throughput are the only metrics that depend on the machine
UNTIMED = ("time/", "perf/")

RUNS = {
    "ppo": (PPOTrainer, PPOConfig, True, dict(total_steps=3, rollout_batch_size=4, mini_batch_size=2,
                                              micro_batch_size=1, ppo_epochs=2, max_new_tokens=6,
                                              learning_rate=3e-3, adaptive_kl=True, kl_target=0.5, save_steps=2)),
    "grpo": (GRPOTrainer, GRPOConfig, False, dict(total_steps=3, rollout_batch_size=2, group_size=4,
                                                  mini_batch_size=4, micro_batch_size=2, num_iterations=2,
                                                  max_new_tokens=6, learning_rate=3e-3, beta=0.02,
                                                  scale="batch", save_steps=2)),
}


def checksum(model: torch.nn.Module) -> dict:
    """Per-parameter float64 sum and sum of squares (exact for a fixed computation)."""
    out = {}
    for name, p in model.state_dict().items():
        x = p.detach().double()
        out[name] = [x.sum().item(), (x * x).sum().item()]
    return out


def run(name: str, tmp_path: Path) -> dict:
    cls, config_cls, value_head, kw = RUNS[name]
    cfg = config_cls(output_dir=str(tmp_path / name), seed=0, device="cpu", **kw, **QUIET)
    trainer = cls(cfg, model=seeded_model(value_head=value_head), tokenizer=char_tokenizer(),
                  reward_fn=target_fraction, prompts=PROMPTS)
    trainer.train()
    records = [{k: v for k, v in r.items() if not k.startswith(UNTIMED)}
               for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
    return {"metrics": records, "params": checksum(trainer.model)}


@pytest.mark.parametrize("name", list(RUNS))
def test_run_matches_golden(name, tmp_path):
    got = run(name, tmp_path)
    path = GOLDEN / f"{name}.json"
    if os.environ.get("RLHF_FAST_REGEN_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert len(got["metrics"]) == len(want["metrics"])
    for g, w in zip(got["metrics"], want["metrics"]):
        assert g == w, {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)}
    assert got["params"] == want["params"]
