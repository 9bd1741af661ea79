# SPDX-License-Identifier: MIT
"""Builds mxd_torch, the PyTorch extension over the header-only mxd library, with torch's own
C++ extension machinery (one translation unit, mxd_torch/_ext.cpp), against the torch that is
installed (the one it will run with), so pip must not isolate the build:

    python -m pip install --no-build-isolation ./examples/torch          # in a venv with torch
    /usr/bin/python3 -m pip install --user --break-system-packages --no-build-isolation ./examples/torch

Environment: MXD_INCLUDE_DIR (default: this repository's include/), EIGEN_INCLUDE_DIR (default
/usr/include/eigen3), MXD_TORCH_NATIVE=0 to build without -march=native (for a wheel that runs
on other CPUs).
"""
import os
import re
import subprocess
import sys

from setuptools import setup

try:
    import torch
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


STD = cxx_standard()
# -O3 as the mxd tool is built, -pthread for mxd's worker threads, -g0: Python's default -g
# doubles the compile time.
cflags = [f"-std=c++{STD}", "-O3", "-g0", "-pthread", "-Wno-deprecated-declarations"]
if NATIVE:
    cflags.append("-march=native")


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
        super().build_extensions()


setup(
    name="mxd_torch",
    version="0.1.0",
    description="Mixture of Decoders (MxD) layers for PyTorch over the header-only mxd library",
    license="MIT",
    packages=["mxd_torch"],
    ext_modules=[
        CppExtension(
            "mxd_torch._C",
            ["mxd_torch/_ext.cpp"],
            include_dirs=[MXD_INCLUDE, EIGEN_INCLUDE],
            extra_compile_args=cflags,
            extra_link_args=["-pthread"],
        )
    ],
    cmdclass={"build_ext": Build},
)
