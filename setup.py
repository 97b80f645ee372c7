"""Builds the optional C++ CPU kernels (``rlhf_kernels._cpu``); metadata lives in pyproject.toml.

The extension links against pybind11 only (tensors cross as raw pointers), so it needs no torch at
build time and survives torch upgrades. If it cannot be built (no compiler, unsupported platform)
the package still installs; the ``cpp`` backend then reports why it is unavailable and ``auto``
falls back to the PyTorch reference.
"""
from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

ext_modules = []
try:
    from pybind11.setup_helpers import Pybind11Extension

    sources = sorted(glob.glob(os.path.join("kernels", "csrc", "*.cpp")))
    if sources and platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        ext_modules.append(
            Pybind11Extension(
                "rlhf_kernels._cpu",
                sources,
                cxx_std=17,
                # Baseline code is portable x86-64; AVX2/AVX-512 paths are compiled per function
                # with target attributes and chosen at run time from CPUID.
                extra_compile_args=["-O3", "-fno-math-errno", "-pthread"],
                extra_link_args=["-pthread"],
            )
        )
except ImportError:
    print("rlhf: pybind11 missing at build time; the cpp kernel backend will be unavailable", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Build the extension if possible; a failure is a warning, not a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing or broken
            print(f"rlhf: could not build the C++ kernels ({exc}); the cpp backend will be unavailable", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"rlhf: could not build {ext.name} ({exc}); the cpp backend will be unavailable", file=sys.stderr)


setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
