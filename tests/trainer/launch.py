"""The torchrun launcher of the distributed trainer tests, and the comparison they all make: what
2 ranks gathered against what one process computes (parameters to rtol 1e-5 / atol 1e-6, logged
figures to the same relative / absolute tolerance)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def torchrun(*args, timeout: float, target):
    """``torchrun --standalone --nproc_per_node 2 <target> args`` on CPU (one thread per rank) ->
    (returncode, output, seconds); the process group is killed if it outlives ``timeout``."""
    import pytest

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target,
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "tests"), str(ROOT)])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {' '.join(map(str, [*target, *args]))} still running after {timeout}s:\n{out[-4000:]}")
    return proc.returncode, out, time.perf_counter() - t0


def run_job(*args, timeout: float, target):
    """``torchrun(...)`` that must exit 0 (else the failure shows the tail of its output)."""
    code, log, _ = torchrun(*args, timeout=timeout, target=target)
    assert code == 0, log[-8000:]


def worker_job(tmp_path_factory, name: str, *, timeout: float, target) -> tuple:
    """Runs ``torchrun <target> worker OUT`` in a fresh folder OUT (it must exit 0) -> (OUT, the
    results its rank 0 saved with ``save_results``)."""
    import torch

    out = tmp_path_factory.mktemp(name)
    run_job("worker", out, timeout=timeout, target=target)
    return out, torch.load(out / "results.pt", weights_only=False)


def save_results(results: dict, out) -> None:
    """The worker's side of ``worker_job``: rank 0 writes OUT/results.pt."""
    import torch

    from rlhf_fast.trainer.process_group import rank

    if rank() == 0:
        torch.save(results, os.path.join(out, "results.pt"))


def assert_same_params(got: dict, want: dict) -> None:
    """Two state dicts with the same names hold the same tensors (rtol 1e-5, atol 1e-6)."""
    import torch

    assert got.keys() == want.keys()
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def assert_same_figures(got: dict, want: dict, what: str = "") -> None:
    """Two dicts of logged numbers with the same keys and values (rel 1e-5, abs 1e-6)."""
    import pytest

    assert got.keys() == want.keys(), what
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (what, k)


def assert_same_supervised_run(got: dict, want: dict, start: dict) -> None:
    """A supervised case (SFT, RM, DPO: ``{"params", "metrics": [per step], "eval"}``) on 2 ranks
    against one process: the same parameters, each step's metrics and the evaluation, and the
    parameters moved from ``start`` (the comparison is not between two untouched models)."""
    import torch

    assert_same_params(got["params"], want["params"])
    assert len(got["metrics"]) == len(want["metrics"]) == 2
    for step, (g, w) in enumerate(zip(got["metrics"], want["metrics"])):
        assert_same_figures(g, w, f"step {step}")
    assert got["eval"]
    assert_same_figures(got["eval"], want["eval"], "eval")
    assert any(not torch.equal(start[k], want["params"][k]) for k in want["params"])
