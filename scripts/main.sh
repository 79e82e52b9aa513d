#!/usr/bin/env bash
# The main job (README): install, quantize the embedded default model with K-SNRQ (W4 g64), serve it
# with vLLM, answer one chat request, print FP vs quantized perplexity, size on disk and decode tok/s.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/bootstrap.sh
export RCSR_CACHE="${RCSR_CACHE:-$here/.cache}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export TOKENIZERS_PARALLELISM=false
exec "${RCSR_VENV:-$here/.venv}/bin/python" tools/main_job.py "$@"
