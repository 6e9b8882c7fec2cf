"""The torchrun launcher of the distributed trainer tests."""
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
