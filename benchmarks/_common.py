"""Shared benchmark plumbing: timing, peak extra memory, measured bandwidth floor, metadata,
table printing and JSON output. Each benchmarks/bench_<op>.py defines its providers and sizes.

Method (see the project's device METHOD notes): count the bytes an op must move, measure the
machine's copy bandwidth once, and print floor = bytes / bandwidth beside every figure.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, *, warmup=2, reps=7, min_seconds=0.0):
    """Median wall time of fn() in ms (CUDA: triton.testing.do_bench with events)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fixed_mmap_threshold():
    """glibc: serve every block >= 128 KiB by mmap (no dynamic threshold), so that freed tensors leave
    the resident set and the high-water mark counts each allocation."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _profiler_peak(fn):
    """Replays the profiler's allocation events in start order (misses overlapping lifetimes
    inside autograd's backward, so it can under-report): the fallback off Linux."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_extra_bytes(fn, device):
    """Peak memory allocated while fn() runs, above what was live before it.

    CUDA: the caching allocator's peak. CPU on Linux: the process's resident high-water mark,
    reset through /proc/self/clear_refs, with large blocks forced onto mmap so that each
    allocation is counted while it lives and leaves the resident set when freed."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    status = Path("/proc/self/status")
    try:
        fixed_mmap_threshold()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1))
    except (OSError, AttributeError):
        return _profiler_peak(fn)
    out = fn()
    peak = int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1))
    del out
    return max(peak - before, 0) * 1024


def copy_bandwidth(device, nbytes=1 << 29):
    """Measured bytes/s of a large copy (bytes read + bytes written): the memory ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=5)
    return 2 * nbytes / (ms / 1e3)


def metadata(device):
    meta = {
        "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        root = Path(__file__).resolve().parents[1]
        meta["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    if torch.device(device).type == "cpu":
        try:
            meta["cpu_model"] = next(
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            )
        except (OSError, StopIteration):
            pass
    return meta


def print_table(rows, columns):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def write_json(name, payload):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path.relative_to(RESULTS.parent.parent)}")
    return path


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def env_quick():
    return os.environ.get("RLHF_FAST_BENCH_QUICK") == "1"
