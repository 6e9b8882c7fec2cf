"""Pins a short seeded PPO and GRPO run (tiny model, CPU, one thread) to golden files: every
logged metric and a checksum of the final parameters. A refactor of the trainers must leave
these numbers bit-identical: ``RLHF_FAST_GOLDEN_EXACT=1`` compares for exact equality, on a
machine of the CPU kind that wrote the files. By default they are compared to a relative
``TOL``: the C++ kernels pick an ISA clone at run time (x86-64-v4 / AVX-512 where the CPU has
it, else v3 / AVX2), and the vector width changes the summation order (seen: 3e-7 relative
after 3 PPO steps on an AVX-512 machine against files written on another).

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
TOL = 1e-5  # metrics; the parameter sums (Adam at lr 3e-3 amplifies the last bits) get PARAM_TOL
PARAM_TOL = 1e-4
EXACT = os.environ.get("RLHF_FAST_GOLDEN_EXACT") == "1"


def mismatches(got, want, tol=TOL) -> dict:
    """{key: (got, want)} of the entries of two flat dicts that differ (beyond ``TOL`` unless EXACT)."""
    def same(g, w):
        if EXACT or not all(isinstance(x, (int, float)) for x in (g, w)):
            return g == w
        return abs(g - w) <= tol * max(1.0, abs(w))

    return {k: (got.get(k), want.get(k)) for k in set(got) | set(want)
            if k not in got or k not in want or not same(got[k], want[k])}

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


def run(name: str, tmp_path: Path, lm_head: str = "materialize") -> dict:
    cls, config_cls, value_head, kw = RUNS[name]
    cfg = config_cls(output_dir=str(tmp_path / name), seed=0, device="cpu", lm_head=lm_head, **kw, **QUIET)
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
        assert not mismatches(g, w), mismatches(g, w)
    flat = {f"{k}[{i}]": x for k, v in got["params"].items() for i, x in enumerate(v)}
    assert not mismatches(flat, {f"{k}[{i}]": x for k, v in want["params"].items() for i, x in enumerate(v)},
                          PARAM_TOL)


@pytest.mark.parametrize("name", list(RUNS))
def test_fused_run_matches_golden(name, tmp_path):
    """The default lm_head="fused" run against the same golden file: equal up to the summation
    order of the chunked LM head (every metric within 1e-4 relative + 1e-6, parameters' sums
    within PARAM_TOL relative), and the same number of steps and metric names."""
    got = run(name, tmp_path, lm_head="fused")
    want = json.loads((GOLDEN / f"{name}.json").read_text())
    assert len(got["metrics"]) == len(want["metrics"])
    for step, (g, w) in enumerate(zip(got["metrics"], want["metrics"])):
        assert set(g) == set(w)
        bad = {k: (g[k], w[k]) for k in w if g[k] != pytest.approx(w[k], rel=1e-4, abs=1e-6, nan_ok=True)}
        assert not bad, (step, bad)
    assert set(got["params"]) == set(want["params"])
    for k, (s, sq) in want["params"].items():
        assert got["params"][k] == pytest.approx([s, sq], rel=PARAM_TOL, abs=1e-6), k
