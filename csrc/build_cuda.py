"""Compiles csrc/cuda/*.cu with plain nvcc into one C-ABI shared library.

torch's CUDAExtension needs a CUDA torch at build time; plain nvcc does not, and the
library is loaded with ctypes by rlhf_fast/_backend.py. Used by setup.py and tests/test_build.py.
"""
import glob
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvcc_path():
    return shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")


def build_cuda_library(out_path, archs=None):
    """archs: SM versions, default from RLHF_FAST_CUDA_ARCHS ("80;90")."""
    archs = archs or os.environ.get("RLHF_FAST_CUDA_ARCHS", "80;90").split(";")
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    cmd = [nvcc_path(), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-lineinfo"]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cmd += [f"-I{cuda_dir}", *sorted(glob.glob(os.path.join(cuda_dir, "*.cu"))), "-o", out_path]
    print(" ".join(cmd))
    subprocess.check_call(cmd)
