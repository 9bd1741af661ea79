# SPDX-License-Identifier: MIT
"""Builds mxd_torch, the PyTorch extension over the header-only mxd library, with torch's own
C++ extension machinery (one translation unit, mxd_torch/_ext.cpp).

    /usr/bin/python3 -m pip install --user --break-system-packages --no-build-isolation ./examples/torch

Environment: MXD_INCLUDE_DIR (default: this repository's include/), EIGEN_INCLUDE_DIR
(default /usr/include/eigen3), MXD_TORCH_NATIVE=0 to build without -march=native (for a wheel that runs on other CPUs).
"""
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
MXD_INCLUDE = os.environ.get("MXD_INCLUDE_DIR", os.path.join(HERE, "..", "..", "include"))
EIGEN_INCLUDE = os.environ.get("EIGEN_INCLUDE_DIR", "/usr/include/eigen3")

if not os.path.isfile(os.path.join(MXD_INCLUDE, "mxd", "mxd.hpp")):
    raise SystemExit(f"mxd headers not found in {MXD_INCLUDE}: set MXD_INCLUDE_DIR")

# -O3 as the mxd tool is built, -pthread for mxd's worker threads (torch would otherwise pass
# -std=c++14; -g0 halves the compile time Python's default -g costs).
cflags = ["-std=c++17", "-O3", "-g0", "-pthread", "-DEIGEN_DONT_PARALLELIZE", "-Wno-deprecated-declarations"]
if os.environ.get("MXD_TORCH_NATIVE", "1") != "0":
    cflags.append("-march=native")
include_dirs = [MXD_INCLUDE, EIGEN_INCLUDE]

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
            include_dirs=include_dirs,
            extra_compile_args=cflags,
            extra_link_args=["-pthread"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
