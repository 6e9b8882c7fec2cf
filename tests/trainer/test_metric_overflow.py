"""Logged means that stay finite where their inputs are (issue 11 item 5, the siblings of
reward/mean): the per-micro-batch loss stats are averaged in float64, and a float64 metric is
logged as it is, not through float32."""
import math

import torch

from rlhf_fast.trainer.base import RLTrainer
from rlhf_fast.trainer.metrics import MetricsLogger, read_jsonl


def test_micro_batch_stats_near_the_fp32_limit_average_to_a_finite_mean():
    stats = [{"loss/value": torch.tensor(3e38), "loss/policy": torch.tensor(-3e38)} for _ in range(4)]
    out = RLTrainer.reduce_stats(stats)
    assert math.isclose(out["loss/value"], float(torch.tensor(3e38)), rel_tol=1e-12)
    assert math.isclose(out["loss/policy"], float(torch.tensor(-3e38)), rel_tol=1e-12)


def test_a_float64_metric_beyond_the_fp32_range_is_logged_as_it_is(tmp_path):
    with MetricsLogger(tmp_path, 1, progress=False, tensorboard=False, plot=False) as log:
        got = log.log(1, {"big": torch.tensor(1e300, dtype=torch.float64), "tiny": torch.tensor(1e-300,
                                                                                               dtype=torch.float64)})
    assert got == {"big": 1e300, "tiny": 1e-300}
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "big": 1e300, "tiny": 1e-300}]
