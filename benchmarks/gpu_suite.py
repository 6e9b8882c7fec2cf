"""The GPU suite: on a fresh H100 / H200 machine, build the CUDA parts, run every ``gpu``-marked
test, run every benchmark at its GPU size against its GPU contenders, and write one JSON + one
markdown table per benchmark. ``benchmarks/gpu_suite.sh`` is the entry point (it installs the
carried wheels first; its header lists them); ``--dry-run`` checks the plan on any machine
without building or timing anything:

  * every benchmarks/bench_*.py is in PLAN (or in CPU_ONLY, with the reason);
  * every planned script exists and its argument parser accepts the GPU arguments (its ``main``
    is called with them and stopped right after ``parse_args``);
  * every planned provider is named in its script, and every contender's module comes from a
    wheel that gpu_suite.sh's header lists, with the versions of WHEELS;
  * the steps' time budgets fit within TOTAL_BUDGET_S.

    benchmarks/gpu_suite.sh                      # the real run ($OUT or benchmarks/results/)
    python benchmarks/gpu_suite.py --dry-run     # the plan check (CI runs it: tests/test_gpu_suite.py)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOTAL_BUDGET_S = 480  # 8 minutes on a fresh machine, build included

# the pure-Python wheels the suite needs beyond the machine's image (python 3.12, torch, triton)
WHEELS = {"liger_kernel": "0.8.5", "cut_cross_entropy": "25.1.1"}
# contender provider -> (module it imports, wheel that brings it)
CONTENDERS = {"liger": ("liger_kernel", "liger_kernel"), "liger_flce_nll": ("liger_kernel", "liger_kernel"),
              "cce": ("cut_cross_entropy", "cut_cross_entropy"),
              "cce_nll": ("cut_cross_entropy", "cut_cross_entropy")}

BUILD = {"name": "build", "cmd": [sys.executable, "setup.py", "build_ext", "--inplace"],
         "env": {"RLHF_FAST_BUILD_CUDA": "1", "RLHF_FAST_CUDA_ARCHS": "90", "MAX_JOBS": "16"}, "budget_s": 120}
TESTS = {"name": "gpu_tests", "cmd": [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                      "tests"], "budget_s": 60}

# name -> script, GPU arguments (the GPU sizes), the GPU providers it must offer (ours +
# contenders), its time budget and the JSON it writes under benchmarks/results/
FUSED_GPU = ["--device", "cuda", "--n", "16384", "--v", "151936", "--dtype", "bfloat16", "--rounds", "3"]
PLAN = {
    "logprobs": {"script": "bench_logprobs.py", "budget_s": 45, "json": "logprobs_cuda.json", "args": FUSED_GPU,
                 "providers": ["rlhf_fast", "rlhf_fast_inplace", "liger"]},
    "kl": {"script": "bench_kl.py", "budget_s": 30, "json": "kl_cuda.json", "args": FUSED_GPU,
           "providers": ["rlhf_fast", "torch_compile"]},
    "policy_loss": {"script": "bench_policy_loss.py", "budget_s": 40, "json": "policy_loss_cuda.json",
                    "args": FUSED_GPU, "providers": ["rlhf_fast", "rlhf_fast_inplace", "liger"]},
    "gae": {"script": "bench_gae.py", "budget_s": 35, "json": "gae_cuda.json",
            "args": ["--device", "cuda", "--b", "512", "--t", "8192", "--skip-loop"],
            "providers": ["rlhf_fast", "rlhf_fast_cuda", "torch_compile_scan"]},
    "group_advantages": {"script": "bench_group_advantages.py", "budget_s": 15, "json": "group_advantages_cuda.json",
                         "args": ["--device", "cuda", "--n", str(1 << 22)],
                         "providers": ["rlhf_fast", "torch_compile"]},
    "whiten": {"script": "bench_whiten.py", "budget_s": 15, "json": "whiten_cuda.json",
               "args": ["--device", "cuda", "--b", "512", "--t", "8192"], "providers": ["rlhf_fast", "torch_compile"]},
    "linear_logprobs": {"script": "bench_linear_logprobs.py", "budget_s": 120, "json": "linear_logprobs_cuda.json",
                        "args": ["--device", "cuda", "--n", "16384", "--h", "4096", "--v", "128256", "151936",
                                 "--dtype", "bfloat16", "--reps", "3"],
                        "providers": ["eager", "ours_hidden", "ours_nll", "ours_ppo", "cce", "cce_nll",
                                      "liger_flce_nll", "ours_fused", "ours_fused_nll"]},
}
CPU_ONLY = {"bench_grpo_step.py": "peak RSS of a trainer step (the CPU RSS method), with TRL; not a GPU figure"}


# ---------------------------------------------------------------------------- dry run
class ParsedArgs(Exception):
    """Raised by the patched parse_args: the script accepted its arguments."""


def check_script_args(script: Path, args: list[str]) -> None:
    """Imports ``script`` and calls its ``main(args)``, stopped right after ``parse_args``."""
    spec = importlib.util.spec_from_file_location(f"_plan_{script.stem}", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "main"):
        raise AssertionError(f"{script.name} has no main(argv)")
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        real(self, argv, namespace)
        raise ParsedArgs

    argparse.ArgumentParser.parse_args = parse_then_stop
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            mod.main(args)
    except ParsedArgs:
        return
    except SystemExit as e:
        raise AssertionError(f"{script.name} rejects {' '.join(args)}: {err.getvalue().strip()}") from e
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{script.name}: main() returned without parsing its arguments")


def header_wheels(sh: Path) -> dict:
    """{name: version} from gpu_suite.sh's '#   wheel: name==version' header lines."""
    return dict(re.findall(r"^#\s+wheel:\s+([A-Za-z0-9_.-]+)==(\S+)\s*$", sh.read_text(), re.M))


def dry_run() -> list[str]:
    """The plan's problems (empty when it is consistent); see the module docstring."""
    problems = []
    scripts = {p.name for p in HERE.glob("bench_*.py")}
    planned = {s["script"] for s in PLAN.values()}
    for name in sorted(scripts - planned - set(CPU_ONLY)):
        problems.append(f"{name} is neither in PLAN nor in CPU_ONLY")
    total = BUILD["budget_s"] + TESTS["budget_s"]
    for name, step in PLAN.items():
        script = HERE / step["script"]
        total += step["budget_s"]
        if not script.exists():
            problems.append(f"{name}: {step['script']} does not exist")
            continue
        try:
            check_script_args(script, step["args"])
        except AssertionError as e:
            problems.append(f"{name}: {e}")
        text = script.read_text()
        for prov in step["providers"]:
            if f'"{prov}"' not in text:
                problems.append(f"{name}: provider {prov!r} is not defined in {step['script']}")
            if prov in CONTENDERS:
                module, wheel = CONTENDERS[prov]
                if wheel not in WHEELS:
                    problems.append(f"{name}: contender {prov!r} needs the wheel {wheel}, not in WHEELS")
                if module not in text:
                    problems.append(f"{name}: {step['script']} never imports {module} for {prov!r}")
    if total > TOTAL_BUDGET_S:
        problems.append(f"the steps' budgets add up to {total} s > {TOTAL_BUDGET_S} s")
    listed = header_wheels(HERE / "gpu_suite.sh")
    if listed != WHEELS:
        problems.append(f"gpu_suite.sh lists the wheels {listed}, gpu_suite.py needs {WHEELS}")
    carried = ROOT / ".whl"
    if carried.is_dir():
        for wheel, version in WHEELS.items():
            if not list(carried.glob(f"{wheel}-{version}-*.whl")):
                problems.append(f".whl/ has no {wheel}-{version}-*.whl")
    return problems


# ---------------------------------------------------------------------------- the real run
def row_groups(node, head=None):
    """Yields (header dict, rows) for every dict holding a list of row dicts under "rows", at any depth
    (the benchmarks nest them under "runs", "results" or per op); the header is that dict's scalars."""
    if isinstance(node, dict):
        rows = node.get("rows")
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            yield {k: v for k, v in node.items() if isinstance(v, (int, float, str)) and k != "rows"}, rows
        for k, v in node.items():
            if k != "rows" and isinstance(v, (dict, list)):
                yield from row_groups(v)
    elif isinstance(node, list):
        for v in node:
            yield from row_groups(v)


def markdown_table(payload: dict) -> str:
    """Every group of rows of a benchmark's JSON as a markdown table, under its header's scalars."""
    out = [f"# {payload.get('benchmark', '?')} on {payload.get('meta', {}).get('device', '?')}\n"]
    for head, rows in row_groups({k: v for k, v in payload.items() if k != "meta"}):
        if head:
            out.append(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in head.items()))
            out.append("")
        cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float, str))))
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in rows:
            cells = [r.get(c) for c in cols]
            out.append("| " + " | ".join("-" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c)
                                         for c in cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def run_step(step: dict, log, deadline: float) -> dict:
    left = deadline - time.monotonic()
    if left < 10:
        return {"name": step["name"], "status": "skipped (no time left in the 8-minute budget)"}
    env = {**os.environ, **step.get("env", {}), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    log.write(f"\n==== {step['name']}: {' '.join(step['cmd'])}\n")
    log.flush()
    try:
        rc = subprocess.run(step["cmd"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=min(left, 2 * step["budget_s"])).returncode
        status = "ok" if rc == 0 else f"exit {rc}"
    except subprocess.TimeoutExpired:
        status = "timeout"
    return {"name": step["name"], "status": status, "seconds": round(time.monotonic() - t0, 1)}


def real_run(results: Path, out: Path | None) -> int:
    import shutil

    deadline = time.monotonic() + TOTAL_BUDGET_S
    results.mkdir(parents=True, exist_ok=True)
    log_path = (out or results) / "gpu_suite.log"
    summary = []
    with open(log_path, "w") as log:
        for step in (BUILD, TESTS):
            summary.append(run_step(step, log, deadline))
            print(summary[-1], flush=True)
        for name, plan in PLAN.items():
            step = {"name": name, "cmd": [sys.executable, str(HERE / plan["script"]), *plan["args"], "--out",
                                          plan["json"]], "budget_s": plan["budget_s"]}
            summary.append(run_step(step, log, deadline))
            src = HERE / "results" / plan["json"]
            if src.exists() and summary[-1]["status"] == "ok":
                if results != HERE / "results":
                    shutil.copy(src, results / plan["json"])
                md = results / plan["json"].replace(".json", ".md")
                md.write_text(markdown_table(json.loads(src.read_text())))
                summary[-1]["files"] = [plan["json"], md.name]
            print(summary[-1], flush=True)
    (results / "gpu_suite_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out is not None:  # what comes back from the machine: a few files, so one archive of the results
        with tarfile.open(out / "gpu_results.tar.gz", "w:gz") as tar:
            for f in results.glob("*_cuda.*"):
                tar.add(f, arcname=f.name)
        tables = [markdown_table(json.loads((results / p["json"]).read_text())) for p in PLAN.values()
                  if (results / p["json"]).exists()]
        (out / "gpu_suite.md").write_text("\n".join(tables))
        shutil.copy(results / "gpu_suite_summary.json", out / "gpu_suite_summary.json")
    return 0 if all(s["status"] == "ok" for s in summary) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="check the plan; build and time nothing")
    p.add_argument("--results", default=None, help="folder for the JSON + markdown (default benchmarks/results)")
    a = p.parse_args(argv)
    if a.dry_run:
        problems = dry_run()
        for line in problems:
            print("PLAN:", line)
        print(f"gpu suite plan: {len(PLAN)} benchmarks, {len(WHEELS)} wheels, "
              f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    return real_run(Path(a.results) if a.results else HERE / "results", out)


if __name__ == "__main__":
    sys.exit(main())
