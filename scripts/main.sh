#!/usr/bin/env bash
# The main job (README): install, quantize the embedded default model with K-SNRQ (W4 g64), serve it
# with vLLM, answer one chat request, print FP vs quantized perplexity, size on disk and decode tok/s.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$py" tools/main_job.py "$@"
