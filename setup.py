"""Builds rlhf_fast._C (C++17 + OpenMP, pybind11) and, when asked, the CUDA kernels.

Environment:
  RLHF_FAST_PUREPYTHON=1   build no extension (the pure-PyTorch path is used at run time)
  RLHF_FAST_BUILD_CUDA=1   compile csrc/cuda/*.cu with plain nvcc into rlhf_fast/_cuda_kernels.so
                           (also done automatically when nvcc and a CUDA torch are both present)
  RLHF_FAST_CUDA_ARCHS     semicolon list of SM versions, default "80;90"
"""
import glob
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_cuda import build_cuda_library  # noqa: E402
from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext


def _want_cuda():
    flag = os.environ.get("RLHF_FAST_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    if shutil.which("nvcc") is None:
        return False
    try:  # only visible when building without isolation
        import torch

        return torch.version.cuda is not None
    except ImportError:
        return False


class BuildExt(build_ext):
    def run(self):
        super().run()
        if _want_cuda():
            out_dir = os.path.dirname(self.get_ext_fullpath("rlhf_fast._C"))
            os.makedirs(out_dir, exist_ok=True)
            build_cuda_library(os.path.join(out_dir, "_cuda_kernels.so"))


ext_modules = []
if os.environ.get("RLHF_FAST_PUREPYTHON") != "1":
    ext_modules.append(
        Pybind11Extension(
            "rlhf_fast._C",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=["csrc/cpu"],
            depends=sorted(glob.glob("csrc/cpu/*.h")),  # a header edit rebuilds the kernels
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
