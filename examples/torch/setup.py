# SPDX-License-Identifier: MIT
"""Builds mxd_torch, the PyTorch extension over the header-only mxd library, with torch's own
C++ extension machinery, against the torch that is installed (the one it will run with), so
pip must not isolate the build:

    python -m pip install --no-build-isolation ./examples/torch          # in a venv with torch
    /usr/bin/python3 -m pip install --user --break-system-packages --no-build-isolation ./examples/torch

The CPU half is mxd_torch/_ext.cpp (the host compiler). With CUDA the extension also gets
mxd_torch/_ext_cuda.cu, compiled by nvcc (a CUDAExtension): mxd's CUDA backend for tensors on
a GPU. CUDA is chosen when torch is a CUDA build (torch.version.cuda; or torch.cuda is
available) and nvcc is found (CUDA_HOME/bin/nvcc or on PATH); no GPU is needed to build. The
choice is printed.

Environment: MXD_INCLUDE_DIR (default: this repository's include/), EIGEN_INCLUDE_DIR (default
/usr/include/eigen3), MXD_TORCH_NATIVE=0 to build without -march=native (for a wheel that runs
on other CPUs), MXD_TORCH_CUDA=0/1 to force the CPU-only or the CUDA build,
TORCH_CUDA_ARCH_LIST for the GPU architectures (default: the visible GPUs', or "9.0+PTX",
Hopper code plus PTX that newer GPUs compile at load time, where none is visible).
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths
except ImportError as e:
    raise SystemExit(f"mxd_torch builds against the installed torch, which this Python cannot "
                     f"import ({e}): install torch first, then run pip with "
                     f"--no-build-isolation (an isolated build would see no torch)")

HERE = os.path.dirname(os.path.abspath(__file__))
MXD_INCLUDE = os.environ.get("MXD_INCLUDE_DIR", os.path.join(HERE, "..", "..", "include"))
EIGEN_INCLUDE = os.environ.get("EIGEN_INCLUDE_DIR", "/usr/include/eigen3")
NATIVE = os.environ.get("MXD_TORCH_NATIVE", "1") != "0"

if not os.path.isfile(os.path.join(MXD_INCLUDE, "mxd", "mxd.hpp")):
    raise SystemExit(f"mxd headers not found in {MXD_INCLUDE}: set MXD_INCLUDE_DIR")


def cxx_standard():
    """mxd needs C++17; torch's headers state their own minimum (C++14 in 1.13, C++20 in
    recent releases) in ATen/ATen.h. The larger of the two."""
    need = 17
    for root in include_paths():
        path = os.path.join(root, "ATen", "ATen.h")
        if os.path.isfile(path):
            m = re.search(r"__cplusplus < (\d{4})\d\dL", open(path, encoding="utf-8").read())
            if m:
                need = max(need, {2014: 14, 2017: 17, 2020: 20, 2023: 23}.get(int(m.group(1)), 17))
            break
    return need


def nvcc_path():
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    return nvcc if nvcc and os.path.isfile(nvcc) else shutil.which("nvcc")


def cuda_choice():
    """(build with CUDA?, why), from MXD_TORCH_CUDA, torch's build and nvcc."""
    forced = os.environ.get("MXD_TORCH_CUDA", "")
    if forced not in ("", "0", "1"):
        raise SystemExit(f"MXD_TORCH_CUDA={forced}: expected 0 or 1")
    nvcc = nvcc_path()
    if forced == "0":
        return False, "MXD_TORCH_CUDA=0"
    if forced == "1":
        if not torch.version.cuda or not nvcc:
            raise SystemExit(f"MXD_TORCH_CUDA=1, but torch {torch.__version__} "
                             f"{'is a CUDA build' if torch.version.cuda else 'has no CUDA'} and "
                             f"nvcc {'is ' + nvcc if nvcc else 'was not found (set CUDA_HOME)'}")
        return True, f"MXD_TORCH_CUDA=1, nvcc {nvcc}"
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} has no CUDA"
    if not nvcc:
        return False, (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build but no "
                       f"nvcc was found (set CUDA_HOME)")
    return True, f"torch CUDA {torch.version.cuda}, nvcc {nvcc}"


STD = cxx_standard()
CUDA, CUDA_WHY = cuda_choice()
# -O3 as the mxd tool is built, -pthread for mxd's worker threads, -g0: Python's default -g
# doubles the compile time, hidden visibility as pybind11 asks of modules (only PyInit_ is
# exported; the two translation units still link to each other inside the module).
cflags = [f"-std=c++{STD}", "-O3", "-g0", "-pthread", "-fvisibility=hidden",
          "-Wno-deprecated-declarations"]
if NATIVE:
    cflags.append("-march=native")
nvcc_flags = [f"-std=c++{STD}", "-O3", "-DMXD_TORCH_CUDA", "-Xcompiler=-pthread"]
if CUDA:
    cflags.append("-DMXD_TORCH_CUDA")
    # One architecture unless told: compile time. torch's machinery reads the variable.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"


class Build(BuildExtension):
    """Says, before compiling, which standard and GEMM vector width the extension gets."""

    def build_extensions(self):
        cxx = self.compiler.compiler_so[0]
        try:
            macros = subprocess.run([cxx, *cflags, "-dM", "-E", "-x", "c++", os.devnull],
                                    capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            macros = ""
        # backend/gemm.hpp's vector width follows these macros.
        isa = next((name for macro, name in (("__AVX512F__", "AVX-512, 64-byte vectors"),
                                             ("__AVX2__", "AVX2, 32-byte vectors"),
                                             ("__AVX__", "AVX, 32-byte vectors"))
                    if f"#define {macro} " in macros), "16-byte vectors")
        print(f"mxd_torch: torch {torch.__version__}, C++{STD}, mxd's own GEMM "
              f"({'-march=native' if NATIVE else 'no -march'}: {isa})", file=sys.stderr)
        if CUDA:
            print(f"mxd_torch: CUDA build, mxd's CUDA backend for GPU tensors ({CUDA_WHY}; "
                  f"architectures {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')})",
                  file=sys.stderr)
        else:
            print(f"mxd_torch: CPU-only build ({CUDA_WHY})", file=sys.stderr)
        super().build_extensions()


setup(
    name="mxd_torch",
    version="0.1.0",
    description="Mixture of Decoders (MxD) layers for PyTorch over the header-only mxd library",
    license="MIT",
    packages=["mxd_torch"],
    ext_modules=[
        cpp_extension.CUDAExtension(
            "mxd_torch._C",
            ["mxd_torch/_ext.cpp", "mxd_torch/_ext_cuda.cu"],
            include_dirs=[MXD_INCLUDE, EIGEN_INCLUDE],
            extra_compile_args={"cxx": cflags, "nvcc": nvcc_flags},
            libraries=["cublas"],
            extra_link_args=["-pthread"],
        ) if CUDA else CppExtension(
            "mxd_torch._C",
            ["mxd_torch/_ext.cpp"],
            include_dirs=[MXD_INCLUDE, EIGEN_INCLUDE],
            extra_compile_args=cflags,
            extra_link_args=["-pthread"],
        )
    ],
    cmdclass={"build_ext": Build},
)
