"""Builds the optional native CPU kernels (``vllm_plugin._rcsr_cpu``, sources in ``csrc/cpu``).

Everything else about the package is in ``pyproject.toml``.  The extension needs torch at build
time, so install with ``pip install --no-build-isolation -e .`` into an environment that has torch
(``scripts/bootstrap.sh`` does).  When it cannot be built (no torch, no C++ compiler, a compile
error, or ``RCSR_NO_NATIVE=1``) the install still succeeds with one warning, and the plugin uses its
other kernels (``vllm_plugin/kernels/__init__.py``).
"""
import os
import sys
import time

from setuptools import setup

SOURCES = [f"csrc/cpu/{name}.cpp" for name in ("ops", "kernel_scalar", "kernel_avx2", "kernel_avx512",
                                                 "kernel_avx512bf16", "kernel_avx512vnni")]


def _warn(msg: str) -> None:
    print(f"WARNING: rcsr-deploy: {msg}; the vLLM plugin will use its other CPU kernels", file=sys.stderr)


def native_extension():
    if os.environ.get("RCSR_NO_NATIVE") == "1":
        _warn("native CPU kernels not built (RCSR_NO_NATIVE=1)")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing in an isolated build env
        _warn(f"native CPU kernels not built: torch is not importable at build time ({type(e).__name__}); "
              "install with `pip install --no-build-isolation`")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            t0 = time.time()
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler failure must leave a working install
                _warn(f"native CPU kernels not built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            else:
                print(f"rcsr-deploy: built {ext.name} in {time.time() - t0:.0f} s", file=sys.stderr)

    # -fopenmp: at::parallel_for is inline ATen code that only runs in parallel when compiled with OpenMP
    ext = CppExtension("vllm_plugin._rcsr_cpu", SOURCES, extra_compile_args=["-O3", "-std=c++17", "-fopenmp"],
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
