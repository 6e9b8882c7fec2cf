#!/usr/bin/env bash
# The GPU suite (issue 14): on a fresh H100 / H200 machine, within 8 minutes, build the CUDA parts
# (RLHF_FAST_BUILD_CUDA=1, sm_90), run every `gpu`-marked test, run every benchmark at its GPU size
# against its GPU contenders, and write one JSON + one markdown table per benchmark under
# benchmarks/results/ (and, when $OUT is set, gpu_results.tar.gz + gpu_suite.md + the log there).
# The plan (steps, sizes, providers, budgets) is benchmarks/gpu_suite.py's PLAN.
#
#   benchmarks/gpu_suite.sh             # the run
#   benchmarks/gpu_suite.sh --dry-run   # check the plan on any machine (no build, no timing)
#
# Nothing is installed from the network. The machine's image has python 3.12, torch, triton,
# transformers and pytest; the contenders come as pure-Python wheels carried in .whl/ at the repo
# root (git-ignored). Fetch them where pip reaches PyPI:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform any -d .whl liger_kernel==0.8.5 cut_cross_entropy==25.1.1
# and carry .whl with the call. The wheels (gpu_suite.py --dry-run checks this list against WHEELS):
#   wheel: liger_kernel==0.8.5
#   wheel: cut_cross_entropy==25.1.1
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--dry-run" ]]; then
  exec "$PY" benchmarks/gpu_suite.py --dry-run
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rlhf_fast_site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/rlhf_fast_site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_suite: no .whl/ folder: the Liger and CCE contenders will be absent" >&2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/gpu_suite.py "$@"
