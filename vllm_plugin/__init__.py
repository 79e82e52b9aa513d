"""vLLM plugin for rcsr-deploy checkpoints (``quant_method: "rcsr"``).

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point and calls it in every
one of its processes (API server, engine core, workers).  Nothing here imports vLLM at import time,
so ``import vllm_plugin`` works without vLLM installed.

Modules: :mod:`.config` (``RcsrConfig``), :mod:`.linear` (``RcsrLinearMethod``), :mod:`.kernels`
(``select_kernel`` and the CPU/CUDA kernels), :mod:`.partition` (tensor-parallel arithmetic),
:mod:`.serve` (``serve_command``: vLLM's OpenAI server on the CPU or CUDA build).
"""
from __future__ import annotations

from rcsr_deploy.format import QUANT_METHOD


def register() -> None:
    """Register the ``rcsr`` quantization method with vLLM (idempotent)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    if QUANT_METHOD in QUANTIZATION_METHODS:
        return
    from .config import RcsrConfig

    register_quantization_config(QUANT_METHOD)(RcsrConfig)


__all__ = ["register", "QUANT_METHOD"]
