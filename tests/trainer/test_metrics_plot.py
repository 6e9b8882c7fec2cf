"""metrics.png: grouping by meaning (reward first), the smoothing, single-point series."""
import json

import pytest

from rlhf_fast.trainer.metrics import PLOT_ORDER, metric_group, plot_metrics, smooth


@pytest.mark.parametrize("key,group", [
    ("reward/mean", "reward"), ("eval/gold", "reward"), ("reward/proxy_minus_gold", "reward"),
    ("eval/accuracy", "reward"), ("train/rewards/margin", "reward"), ("kl/ref", "KL"), ("policy/approx_kl", "KL"),
    ("eval/kl_ref", "KL"), ("kl_coef", "KL"), ("loss/policy", "loss"), ("eval/loss", "loss"), ("eval/ppl", "loss"),
    ("time/rollout_s", "throughput"), ("perf/tokens_per_s", "throughput"), ("lr", "throughput"),
    ("policy/entropy", "policy health"), ("response/distinct_2", "policy health"), ("grad_norm", "policy health")])
def test_groups(key, group):
    assert metric_group(key) == group


def test_reward_first_and_smoothing():
    assert PLOT_ORDER[0] == "reward" and PLOT_ORDER[-1] == "throughput"
    assert smooth([2.0]) == [2.0]
    assert smooth([1.0] * 30) == pytest.approx([1.0] * 30)  # bias-corrected: a constant stays
    ys = [float(i % 2) for i in range(40)]
    s = smooth(ys)
    assert max(s[10:]) - min(s[10:]) < 0.5  # the zig-zag is damped


def test_plot_with_single_point_series(tmp_path):
    rows = [{"step": i, "train/loss": 1.0 / i, "lr": 1e-3} for i in range(1, 6)] + [{"step": 5, "eval/loss": 0.3}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_metrics(tmp_path / "m.jsonl", tmp_path / "m.png") == tmp_path / "m.png"
    assert (tmp_path / "m.png").stat().st_size > 1000
