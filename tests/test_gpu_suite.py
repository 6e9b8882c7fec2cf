"""The GPU suite's --dry-run (benchmarks/gpu_suite.py): the committed plan is consistent, and the
check finds each kind of problem it is meant to find."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", ROOT / "benchmarks" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_of_the_committed_plan_passes():
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin:/usr/local/bin", "PYTHON": sys.executable,
                                       "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK" in p.stdout


def test_dry_run_finds_bad_plans(suite, monkeypatch, tmp_path):
    plan = {k: dict(v) for k, v in suite.PLAN.items()}
    plan["kl"]["args"] = plan["kl"]["args"] + ["--no-such-flag"]
    plan["logprobs"]["providers"] = plan["logprobs"]["providers"] + ["not_a_provider"]
    plan["ghost"] = {"script": "bench_ghost.py", "budget_s": 1, "json": "x.json", "args": [], "providers": []}
    del plan["gae"]
    monkeypatch.setattr(suite, "PLAN", plan)
    monkeypatch.setattr(suite, "WHEELS", {**suite.WHEELS, "liger_kernel": "0.0.1"})
    problems = "\n".join(suite.dry_run())
    assert "kl: bench_kl.py rejects" in problems and "--no-such-flag" in problems
    assert "provider 'not_a_provider' is not defined in bench_logprobs.py" in problems
    assert "ghost: bench_ghost.py does not exist" in problems
    assert "bench_gae.py is neither in PLAN nor in CPU_ONLY" in problems
    assert "gpu_suite.sh lists the wheels" in problems


def test_dry_run_checks_the_contenders_wheels_and_budget(suite, monkeypatch):
    monkeypatch.setattr(suite, "WHEELS", {"cut_cross_entropy": suite.WHEELS["cut_cross_entropy"]})
    monkeypatch.setattr(suite, "TOTAL_BUDGET_S", 10)
    problems = "\n".join(suite.dry_run())
    assert "contender 'liger' needs the wheel liger_kernel, not in WHEELS" in problems
    assert "budgets add up to" in problems


def test_markdown_table(suite):
    md = suite.markdown_table({"benchmark": "b", "meta": {"device": "H200"},
                               "runs": [{"n": 4, "rows": [{"provider": "a", "ms": 1.23456}, {"provider": "b"}]}]})
    assert "# b on H200" in md and "| provider | ms |" in md and "| a | 1.235 |" in md and "| b | - |" in md
    assert "n=4" in md
    nested = suite.markdown_table({"benchmark": "c", "results": [{"op": "x", "rows": [{"provider": "p", "ms": 2}]},
                                                                 {"op": "y", "rows": [{"provider": "q", "ms": 3}]}]})
    assert "op=x" in nested and "op=y" in nested and "| p | 2 |" in nested and "| q | 3 |" in nested
