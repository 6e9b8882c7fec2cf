"""Shared benchmark plumbing: timing (interleaved across providers), peak extra memory, measured
floors (copy bandwidth, exp throughput), metadata, table printing and JSON output. Each
benchmarks/bench_<op>.py defines its providers and sizes; run_fused() is the harness of the ops
that take (N, V) logits.

Method: count the bytes an op must move and the exps it must evaluate, measure the machine's copy
bandwidth and the kernels' own vectorised exp throughput in the same run, timed interleaved with
the providers (floor_cases: the same machine load), and print both floors (bytes / bandwidth,
exps / exp rate) beside every figure. The CPU kernels are exp-bound.
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
from collections.abc import Callable
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


# ---- floors ------------------------------------------------------------------------------------
def exp_rate(device, n=1 << 26):
    """Measured exps/s of the C++ kernels' vectorised exp (rlhf_fast._C.exp_floor_seconds) on the
    threads the kernels use; None where that entry point is absent (GPU, pure-Python build)."""
    if torch.device(device).type != "cpu":
        return None
    try:
        from rlhf_fast import _C
    except ImportError:
        return None
    if not hasattr(_C, "exp_floor_seconds"):
        return None
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    _C.exp_floor_seconds(n // 8, threads)  # warm the threads
    return n / min(_C.exp_floor_seconds(n, threads) for _ in range(5))


def floors(device):
    """{"bandwidth_Bps": copy bandwidth, "exp_per_s": exp throughput or None}, measured now."""
    return {"bandwidth_Bps": copy_bandwidth(device), "exp_per_s": exp_rate(device)}


def floor_cases(device, n_exp=1 << 24, nbytes=1 << 28):
    """Two callables doing floor work, to time interleaved with the providers (so that the floors
    see the same machine load): n_exp of the kernels' exps, and a copy moving nbytes (read +
    write). Empty where the exp entry point is absent (the copy is then timed by floors())."""
    if torch.device(device).type != "cpu":
        return {}
    try:
        from rlhf_fast import _C
    except ImportError:
        return {}
    if not hasattr(_C, "exp_floor_seconds"):
        return {}
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    src = torch.empty(nbytes // 8, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return {"floor:exp": lambda: _C.exp_floor_seconds(n_exp, threads), "floor:copy": lambda: dst.copy_(src)}


def rates_from(med, n_exp=1 << 24, nbytes=1 << 28):
    """{"bandwidth_Bps", "exp_per_s"} from the interleaved medians of floor_cases()."""
    return {"bandwidth_Bps": nbytes / (med["floor:copy"] / 1e3), "exp_per_s": n_exp / (med["floor:exp"] / 1e3)}


def floor_ms(fl, nbytes, n_exp):
    """(copy floor, exp floor) in ms for an op that moves nbytes and evaluates n_exp exps."""
    copy = nbytes / fl["bandwidth_Bps"] * 1e3
    exp = n_exp / fl["exp_per_s"] * 1e3 if fl.get("exp_per_s") and n_exp else None
    return copy, exp


# ---- interleaved timing ------------------------------------------------------------------------
def interleaved_ms(cases: dict[str, Callable], device, *, rounds=5, warmup=1):
    """Times every callable round-robin (one call of each per round, so load drift on a shared
    machine hits all cases alike). Returns ({name: median ms}, {name: [raw ms]}, {name: error}).
    A case that raises is reported, not hidden, and leaves the rotation."""
    errors, live = {}, dict(cases)
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
            sync(device)
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {str(e)[:160]}"
            del live[name]
    raw = {k: [] for k in live}
    for _ in range(rounds):
        for name, fn in live.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            raw[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in raw.items()}, raw, errors


def with_backend(name, fn):
    """fn run with RLHF_FAST_BACKEND=name (the benchmarks' one way of picking a backend)."""
    def call(*a, **k):
        old = os.environ.get("RLHF_FAST_BACKEND")
        os.environ["RLHF_FAST_BACKEND"] = name
        try:
            return fn(*a, **k)
        finally:
            if old is None:
                del os.environ["RLHF_FAST_BACKEND"]
            else:
                os.environ["RLHF_FAST_BACKEND"] = old
    return call


def paired_ratio(fa, fb, device, rounds=7):
    """Median over rounds of time(fa) / time(fb), the two called back to back in alternating order
    (a b, b a, ...): a ratio of two close variants that no third case's aftermath (a compiled
    reference freeing gigabytes just before one of them) can tilt."""
    fa()
    fb()
    ratios = []
    for i in range(rounds):
        t = {}
        for name, fn in ((("a", fa), ("b", fb)) if i % 2 == 0 else (("b", fb), ("a", fa))):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            t[name] = time.perf_counter() - t0
        ratios.append(t["a"] / t["b"])
    return statistics.median(ratios)


def run_fused(op, setup, sizes, dtype, device, *, rounds=5, memory=True, ours="rlhf_fast",
              against="torch_compile", pairs=()):
    """Harness of the (N, V)-logits ops. setup(n, v, dtype, device) returns
    (cases, cost): cases = {provider: {"fwd": fn, "fwd_bwd": fn}} (a mode may be absent),
    cost = {"fwd": (bytes, exps), "fwd_bwd": (bytes, exps)}. Every (provider, mode) of one size
    is timed interleaved; floors are measured once per size in the same run. Each (a, b) of pairs
    is also timed alone in alternation (paired_ratio): res["paired_ratios"]["a/b"][mode]."""
    out = []
    for n, v in sizes:
        torch.manual_seed(0)
        cases, cost = setup(n, v, dtype, device)
        flat = {(p, m): fn for p, modes in cases.items() for m, fn in modes.items()}
        timed = {f"{p}|{m}": fn for (p, m), fn in flat.items()}
        fcases = floor_cases(device)
        med, raw, errors = interleaved_ms({**timed, **fcases}, device, rounds=rounds)
        fl = rates_from(med) if fcases and not errors.keys() & fcases.keys() else floors(device)
        rows = []
        for p, modes in cases.items():
            row = {"provider": p}
            for m in ("fwd", "fwd_bwd"):
                if m not in modes:
                    continue
                key = f"{p}|{m}"
                if key in errors:
                    row["error"] = errors[key]
                    continue
                copy_f, exp_f = floor_ms(fl, *cost[m])
                row[f"{m}_ms"] = med[key]
                row[f"{m}_raw_ms"] = raw[key]
                row[f"{m}_copy_floor_ms"] = copy_f
                row[f"{m}_exp_floor_ms"] = exp_f
                if memory:
                    try:
                        row[f"{m}_peak_extra_MB"] = peak_extra_bytes(modes[m], device) / 2**20
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(row)
        base = {r["provider"]: r for r in rows}
        for r in rows:
            for m in ("fwd", "fwd_bwd"):
                if against in base and f"{m}_ms" in r and f"{m}_ms" in base[against]:
                    r[f"{m}_speedup_vs_{against}"] = base[against][f"{m}_ms"] / r[f"{m}_ms"]
                if f"{m}_ms" in r and r.get(f"{m}_exp_floor_ms"):
                    r[f"{m}_of_exp_floor"] = r[f"{m}_exp_floor_ms"] / r[f"{m}_ms"]
                mem, ref = r.get(f"{m}_peak_extra_MB"), base.get(against, {}).get(f"{m}_peak_extra_MB")
                if mem is not None and ref:
                    r[f"{m}_mem_vs_{against}"] = mem / ref
        paired = {f"{a}/{b}": {m: paired_ratio(cases[a][m], cases[b][m], device, rounds=max(rounds, 5))
                               for m in ("fwd", "fwd_bwd") if m in cases[a] and m in cases[b]}
                  for a, b in pairs if a in cases and b in cases}
        out.append({"op": op, "n": n, "v": v, "dtype": str(dtype).replace("torch.", ""), "paired_ratios": paired,
                    "load_average_1min_after": os.getloadavg()[0],
                    "bandwidth_GBps": fl["bandwidth_Bps"] / 1e9,
                    "exp_Gps": fl["exp_per_s"] / 1e9 if fl["exp_per_s"] else None, "rows": rows})
    return out


FUSED_COLUMNS = ["provider", "fwd_ms", "fwd_exp_floor_ms", "fwd_copy_floor_ms", "fwd_bwd_ms",
                 "fwd_bwd_exp_floor_ms", "fwd_bwd_copy_floor_ms", "fwd_speedup_vs_torch_compile",
                 "fwd_bwd_speedup_vs_torch_compile", "fwd_peak_extra_MB", "fwd_bwd_peak_extra_MB", "error"]


def print_fused(results):
    for res in results:
        exp = f"{res['exp_Gps']:.2f} G exp/s" if res["exp_Gps"] else "exp rate n/a"
        print(f"\n{res['op']}  N={res['n']} V={res['v']} {res['dtype']}  (copy {res['bandwidth_GBps']:.1f} GB/s, "
              f"{exp}; floors = exps / exp rate, bytes / bandwidth)")
        print_table(res["rows"], FUSED_COLUMNS)


def print_entropy_ratios(results, pair="rlhf_fast/rlhf_fast_entropy_off"):
    """Entropy on / off of our kernel, from run_fused's paired_ratios (also kept as entropy_on_over_off)."""
    for r in results:
        ratio = r.get("paired_ratios", {}).get(pair)
        if ratio and "fwd" in ratio and "fwd_bwd" in ratio:
            r["entropy_on_over_off"] = ratio
            print(f"{r['op']}: entropy on / off (paired, alternating), V={r['v']}: forward {ratio['fwd']:.2f}x, "
                  f"fwd+bwd {ratio['fwd_bwd']:.2f}x (target <= 1.15x)")


def print_paired_speedups(results, against="torch_compile", ours="rlhf_fast"):
    """Our kernel against ``against`` from run_fused's paired_ratios (time(against) / time(ours), the two
    alone in alternation; kept as paired_speedup_vs_<against>): the main rotation's figure for the case
    that follows a compiled reference's multi-GB frees reads slow from that neighbour, not the kernel."""
    for r in results:
        ratio = r.get("paired_ratios", {}).get(f"{against}/{ours}")
        if ratio:
            r[f"paired_speedup_vs_{against}"] = ratio
            modes = ", ".join(f"{'forward' if m == 'fwd' else 'fwd+bwd'} {x:.2f}x" for m, x in ratio.items())
            print(f"{r['op']}: {ours} vs {against} (paired, alternating), V={r['v']}: {modes} faster")


def fused_sizes(quick, full, gpu=False):
    """(N, V) pairs: V in {32000, 151936}; N = 4096 with --full, 1024 by default, 64 with --quick."""
    n = 64 if quick else (4096 if full or gpu else 1024)
    return [(n, 32000), (n, 151936)]


def run_meta(device):
    meta = metadata(device)
    meta["load_average_1_5_15min"] = os.getloadavg()
    try:  # the machine may be shared: its load, as `uptime` prints it, when the run started
        meta["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    meta["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    meta["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    meta["RLHF_FAST_BACKEND"] = os.environ.get("RLHF_FAST_BACKEND")
    for mod in ("trl", "liger_kernel", "transformers"):
        try:
            meta[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            pass
    return meta


# ---- the (B, T) advantage-side ops -------------------------------------------------------------
def make_bt_inputs(B, T, device, seed=0):
    """Scores (B,), log-probs / ref log-probs / values / rewards (B, T) fp32 and a right-padded bool mask."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)  # right padding, as after generation
    x = lambda: torch.randn(B, T, generator=g).to(device)  # noqa: E731
    return {"scores": torch.randn(B, generator=g).to(device), "logprobs": x(), "ref_logprobs": x(),
            "values": x(), "rewards": x(), "mask": mask}


def run_simple(op, cases, cost, device, *, rounds=15, size=None, ours="rlhf_fast", against=("torch_compile",)):
    """Forward-only harness: cases = {provider: fn()}, cost = (bytes, exps). Interleaved timing, both floors;
    fwd_speedup_vs_<name> for each provider name in against."""
    fcases = floor_cases(device)
    med, raw, errors = interleaved_ms({**cases, **fcases}, device, rounds=rounds)
    fl = rates_from(med) if fcases and not errors.keys() & fcases.keys() else floors(device)
    copy_f, exp_f = floor_ms(fl, *cost)
    rows = []
    for k in cases:
        row = {"provider": k, "fwd_ms": med.get(k), "fwd_raw_ms": raw.get(k), "fwd_copy_floor_ms": copy_f,
               "fwd_exp_floor_ms": exp_f, "error": errors.get(k)}
        for base in against:
            if k in med and base in med:
                row[f"fwd_speedup_vs_{base}"] = med[base] / med[k]
        rows.append(row)
    return {"op": op, "size": size, "bandwidth_GBps": fl["bandwidth_Bps"] / 1e9,
            "exp_Gps": fl["exp_per_s"] / 1e9 if fl["exp_per_s"] else None, "rows": rows}


SIMPLE_COLUMNS = ["provider", "fwd_ms", "fwd_exp_floor_ms", "fwd_copy_floor_ms", "fwd_speedup_vs_torch_compile",
                  "error"]


def print_simple(res):
    print(f"\n{res['op']}  {res['size']}  (copy {res['bandwidth_GBps']:.1f} GB/s; floor = bytes / bandwidth"
          + (f", exps / {res['exp_Gps']:.2f} G exp/s)" if res["exp_Gps"] else ")"))
    extra = sorted({k for r in res["rows"] for k in r if k.startswith("fwd_speedup_vs_")} - set(SIMPLE_COLUMNS))
    print_table(res["rows"], SIMPLE_COLUMNS[:-1] + extra + SIMPLE_COLUMNS[-1:])


def bt_sizes(quick, full, gpu=False):
    """(B, T): 32 x 128 with --quick, 256 x 1024 by default, 512 x 8192 with --full or on a GPU."""
    return (32, 128) if quick else ((512, 8192) if full or gpu else (256, 1024))
