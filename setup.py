"""Builds the CPU kernel library at install time (pyproject.toml holds everything else).

The library is plain C++ with a C interface (gptoss/ops/cpu/kernels.cpp, no torch headers), so
the build needs only a C++ compiler, not torch, and one build serves every torch and Python
version: the wheel is tagged py3-none-<platform>. Without a compiler the install still succeeds,
with a warning; gptoss then builds the library at first use, or runs the plain-torch path.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gptoss_kernel_build", ROOT / "gptoss/ops/cpu/build.py")
kernel_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_build)


class BuildKernels(build_ext):
    """Compiles the one "extension" with gptoss's own recipe, to gptoss/ops/cpu/_kernels.so."""

    def get_ext_filename(self, fullname):
        return str(Path(*fullname.split("."))) + ".so"

    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name))
        try:
            kernel_build.compile_library(out, ROOT / ext.sources[0])
        except RuntimeError as e:
            print(f"warning: gptoss CPU kernels not built ({e}); gptoss will build them at first use, "
                  f"or run its plain-torch path", file=sys.stderr)
            return
        # An editable install runs the package from the source tree, where gptoss looks for it.
        if getattr(self, "editable_mode", False) or self.inplace:
            target = ROOT / self.get_ext_filename(ext.name)
            if target.resolve() != out.resolve():
                shutil.copy2(out, target)

    def copy_extensions_to_source(self):  # done by build_extension (a failed build leaves nothing to copy)
        pass


class PlatformWheel(bdist_wheel):
    """No Python ABI is involved: any Python 3 on this platform."""

    def get_tag(self):
        return ("py3", "none", super().get_tag()[2])


setup(
    ext_modules=[Extension("gptoss.ops.cpu._kernels", sources=["gptoss/ops/cpu/kernels.cpp"])],
    cmdclass={"build_ext": BuildKernels, "bdist_wheel": PlatformWheel},
)
