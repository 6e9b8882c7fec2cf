"""Runs every benchmarks/bench_*.py (or some) one after another and prints their tables.

    python benchmarks/run_all.py                 each script at its --quick size
    python benchmarks/run_all.py --full          each script at its --full size
    python benchmarks/run_all.py --only logprobs,kl

``rlhf-fast bench`` calls this file. Each script writes its own JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(only: str | None = None, root: Path = HERE) -> list[Path]:
    """The bench_*.py scripts under ``root``, restricted to the comma-separated names in ``only``."""
    found = sorted(root.glob("bench_*.py"))
    if not only:
        return found
    wanted = {w.strip().removeprefix("bench_").removesuffix(".py") for w in only.split(",") if w.strip()}
    names = {s.stem.removeprefix("bench_") for s in found}
    missing = sorted(wanted - names)
    if missing:
        raise LookupError(f"--only: no benchmark {', '.join(missing)}; available: {', '.join(sorted(names))}")
    return [s for s in found if s.stem.removeprefix("bench_") in wanted]


def size_flag(script: Path, full: bool) -> list[str]:
    """--full or --quick when the script offers it (read from its argparse definitions), else nothing."""
    flag = "--full" if full else "--quick"
    return [flag] if re.search(rf"""["']{flag}["']""", script.read_text()) else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="each script's --full size (default: its --quick)")
    p.add_argument("--only", help="comma-separated names, e.g. logprobs,kl")
    p.add_argument("--dir", type=Path, default=HERE, help="benchmarks folder (default: this file's)")
    args = p.parse_args(argv)
    try:
        chosen = scripts(args.only, args.dir)
    except LookupError as e:
        print(f"rlhf-fast bench: error: {e}", file=sys.stderr)
        return 2
    failed = []
    for s in chosen:
        flags = size_flag(s, args.full)
        print(f"\n==== {s.name} {' '.join(flags)} ====", flush=True)
        rc = subprocess.call([sys.executable, str(s), *flags], cwd=s.parent.parent)
        if rc != 0:
            failed.append(f"{s.name} (exit {rc})")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
