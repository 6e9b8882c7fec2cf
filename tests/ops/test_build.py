"""Build checks that need no GPU: every Triton kernel compiles to sm_90 machine code (the
interpreter used by the other tests never runs Triton's GPU compiler), the csrc CUDA sources
compile with nvcc, and the C++ extension is the one in use."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (module, kernel, signature, constexprs, num_warps): one entry per kernel variant worth compiling.
# Add your op's kernels here.
TRITON_KERNELS = [
    ("rlhf_fast.ops.logprobs", "_logprobs_fwd_kernel",
     {"logits_ptr": "*bf16", "targets_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
      "V": "i32", "inner": "i64", "s_outer": "i64", "s_inner": "i64", "inv_temp": "fp32", "cap_pre": "fp32"},
     {"WITH_ENTROPY": True, "SOFTCAP": False, "BLOCK_V": 4096}, 8),
    ("rlhf_fast.ops.logprobs", "_logprobs_fwd_kernel",
     {"logits_ptr": "*bf16", "targets_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
      "V": "i32", "inner": "i64", "s_outer": "i64", "s_inner": "i64", "inv_temp": "fp32", "cap_pre": "fp32"},
     {"WITH_ENTROPY": True, "SOFTCAP": True, "BLOCK_V": 4096}, 8),
    ("rlhf_fast.ops.logprobs", "_logprobs_fwd_kernel",
     {"logits_ptr": "*fp32", "targets_ptr": "*i32", "logp_ptr": "*fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
      "V": "i32", "inner": "i32", "s_outer": "i32", "s_inner": "i32", "inv_temp": "fp32", "cap_pre": "fp32"},
     {"WITH_ENTROPY": False, "SOFTCAP": False, "BLOCK_V": 1024}, 4),
    ("rlhf_fast.ops.logprobs", "_logprobs_bwd_kernel",
     {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
      "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "V": "i32", "inner": "i64", "s_outer": "i64", "s_inner": "i64",
      "g_inner": "i64", "g_s_outer": "i64", "g_s_inner": "i64", "inv_temp": "fp32", "cap_pre": "fp32"},
     {"WITH_ENTROPY": True, "SOFTCAP": False, "BLOCK_V": 4096}, 8),
    ("rlhf_fast.ops.logprobs", "_logprobs_bwd_kernel",
     {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
      "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "V": "i32", "inner": "i64", "s_outer": "i64", "s_inner": "i64",
      "g_inner": "i64", "g_s_outer": "i64", "g_s_inner": "i64", "inv_temp": "fp32", "cap_pre": "fp32"},
     {"WITH_ENTROPY": True, "SOFTCAP": True, "BLOCK_V": 4096}, 8),
    # KL and the advantage side (rlhf_fast/ops/kl.py, gae.py, whiten.py, group_advantages.py)
    ("rlhf_fast.ops.gae", "_advantages_fwd_kernel",
     {"scores_ptr": "*fp32", "logp_ptr": "*bf16", "ref_ptr": "*fp32", "rew_ptr": "*u8", "val_ptr": "*bf16",
      "mask_ptr": "*u8", "rew_out_ptr": "*fp32", "adv_ptr": "*fp32", "ret_ptr": "*fp32", "stats_ptr": "*fp64",
      "B": "i32", "T": "i32", "s_logp": "i64", "s_ref": "i64", "s_rew": "i32", "s_val": "i64", "s_mask": "i64",
      "kl_coef": "fp32", "gamma": "fp32", "gl": "fp32"},
     {"EST": 3, "SHAPE": True, "GAE": True, "STATS": True, "BLOCK_B": 1, "BLOCK_T": 2048}, 8),
    ("rlhf_fast.ops.gae", "_advantages_fwd_kernel",
     {"scores_ptr": "*u8", "logp_ptr": "*u8", "ref_ptr": "*u8", "rew_ptr": "*fp32", "val_ptr": "*fp32",
      "mask_ptr": "*i64", "rew_out_ptr": "*u8", "adv_ptr": "*fp32", "ret_ptr": "*fp32", "stats_ptr": "*u8",
      "B": "i32", "T": "i32", "s_logp": "i32", "s_ref": "i32", "s_rew": "i64", "s_val": "i64", "s_mask": "i64",
      "kl_coef": "fp32", "gamma": "fp32", "gl": "fp32"},
     {"EST": 0, "SHAPE": False, "GAE": True, "STATS": False, "BLOCK_B": 16, "BLOCK_T": 128}, 8),
    ("rlhf_fast.ops.whiten", "_whiten_stats_kernel",
     {"x_ptr": "*fp32", "mask_ptr": "*u8", "stats_ptr": "*fp64", "N": "i64"}, {"BLOCK": 4096}, 8),
    ("rlhf_fast.ops.whiten", "_whiten_apply_kernel",
     {"x_ptr": "*fp32", "mask_ptr": "*u8", "out_ptr": "*fp32", "stats_ptr": "*fp64", "N": "i64", "P": "i32",
      "eps": "fp32"}, {"SHIFT_MEAN": True, "BLOCK": 2048, "BLOCK_P": 1024}, 8),
    ("rlhf_fast.ops.group_advantages", "_group_advantages_kernel",
     {"scores_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32", "n_groups": "i32", "G": "i32",
      "baseline_factor": "fp32", "eps": "fp32"}, {"SCALE": 1, "BLOCK_G": 128, "BLOCK_M": 16, "BLOCK_ALL": 4096}, 4),
    ("rlhf_fast.ops.kl", "_kl_penalty_bwd_kernel",
     {"logp_ptr": "*bf16", "ref_ptr": "*fp32", "g_ptr": "*fp32", "grad_ptr": "*bf16", "N": "i64"},
     {"EST": 3, "BLOCK": 2048}, 4),
    ("rlhf_fast.ops.full_kl", "_full_kl_fwd_kernel",
     {"x_ptr": "*bf16", "y_ptr": "*bf16", "kl_ptr": "*fp32", "stats_ptr": "*fp32", "V": "i32", "x_inner": "i64",
      "x_s_outer": "i64", "x_s_inner": "i64", "y_inner": "i64", "y_s_outer": "i64", "y_s_inner": "i64",
      "inv_temp": "fp32", "cap_pre": "fp32"}, {"SOFTCAP": False, "BLOCK_V": 4096}, 8),
    ("rlhf_fast.ops.full_kl", "_full_kl_bwd_kernel",
     {"x_ptr": "*bf16", "y_ptr": "*bf16", "grad_ptr": "*bf16", "kl_ptr": "*fp32", "stats_ptr": "*fp32",
      "g_ptr": "*fp32", "V": "i32", "x_inner": "i64", "x_s_outer": "i64", "x_s_inner": "i64", "y_inner": "i64",
      "y_s_outer": "i64", "y_s_inner": "i64", "g_inner": "i64", "g_s_outer": "i64", "g_s_inner": "i64",
      "inv_temp": "fp32", "cap_pre": "fp32"}, {"SOFTCAP": False, "ACCUMULATE": False, "BLOCK_V": 4096}, 8),
    ("rlhf_fast.ops.full_kl", "_full_kl_fwd_kernel",
     {"x_ptr": "*bf16", "y_ptr": "*bf16", "kl_ptr": "*fp32", "stats_ptr": "*fp32", "V": "i32", "x_inner": "i64",
      "x_s_outer": "i64", "x_s_inner": "i64", "y_inner": "i64", "y_s_outer": "i64", "y_s_inner": "i64",
      "inv_temp": "fp32", "cap_pre": "fp32"}, {"SOFTCAP": True, "BLOCK_V": 4096}, 8),
    ("rlhf_fast.ops.full_kl", "_full_kl_bwd_kernel",
     {"x_ptr": "*bf16", "y_ptr": "*bf16", "grad_ptr": "*bf16", "kl_ptr": "*fp32", "stats_ptr": "*fp32",
      "g_ptr": "*fp32", "V": "i32", "x_inner": "i64", "x_s_outer": "i64", "x_s_inner": "i64", "y_inner": "i64",
      "y_s_outer": "i64", "y_s_inner": "i64", "g_inner": "i64", "g_s_outer": "i64", "g_s_inner": "i64",
      "inv_temp": "fp32", "cap_pre": "fp32"}, {"SOFTCAP": True, "ACCUMULATE": True, "BLOCK_V": 4096}, 8),
]

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = []
    for module, name, sig, consts, warps in json.loads(sys.argv[1]):
        fn = getattr(importlib.import_module(module), name)
        sig = dict(sig, **{k: "constexpr" for k in consts})
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert k.asm["cubin"]
        except Exception as e:  # report every failing kernel, not just the first
            failures.append(f"{module}.{name} {consts}: {type(e).__name__}: {e}")
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
    """
)


def _triton_has_nvidia_backend():
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False


@pytest.mark.skipif(not _triton_has_nvidia_backend(), reason="triton without its NVIDIA backend")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(TRITON_KERNELS)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile(tmp_path):
    sys.path.insert(0, str(ROOT / "csrc"))
    try:
        from build_cuda import build_cuda_library
    finally:
        sys.path.pop(0)
    out = tmp_path / "_cuda_kernels.so"
    build_cuda_library(str(out), archs=["90"])
    symbols = subprocess.run(["nm", "-D", str(out)], capture_output=True, text=True).stdout
    for name in ("rlhf_logprobs_fwd", "rlhf_logprobs_bwd", "rlhf_gae"):
        assert f" T {name}" in symbols, f"{name} not exported"


def test_cpp_extension_is_built_and_used():
    if os.environ.get("RLHF_FAST_PUREPYTHON") == "1":
        pytest.skip("pure-Python mode")
    import torch

    from rlhf_fast import _backend
    from rlhf_fast.ops import logprobs

    assert _backend.cpu_kernels() is not None, "rlhf_fast._C failed to import: run `pip install -e .`"
    assert _backend.cpu_kernels().has_openmp
    assert _backend.select_backend(torch.device("cpu"), logprobs.LAUNCHERS) == "cpu"
