#!/usr/bin/env bash
# The test command (README): installs everything into ./.venv if needed, then runs the whole suite
# (unit tests, tiny-model end-to-end tests, real vLLM serving tests) on the CPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/bootstrap.sh
export RCSR_CACHE="${RCSR_CACHE:-$here/.cache}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export TOKENIZERS_PARALLELISM=false
exec "${RCSR_VENV:-$here/.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
