#!/usr/bin/env bash
# The test command (README): installs everything into ./.venv if needed, then runs the whole suite
# (unit tests, tiny-model end-to-end tests, real vLLM serving tests) on the CPU.
# With arguments, runs `pytest ARGS` instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ "$#" -gt 0 ]; then
  exec "$py" -m pytest -q -p no:cacheprovider "$@"
fi
# The Triton kernels are tested under TRITON_INTERPRET=1, which Triton reads when a @triton.jit
# function is created: they get a process of their own, where nothing imported Triton before.
"$py" -m pytest -q -p no:cacheprovider tests/plugin/test_triton_kernels.py
# --durations: every run records its slowest tests, so CI time stays visible (CI budget ~50 min).
exec "$py" -m pytest -q -p no:cacheprovider --durations=40 --ignore=tests/plugin/test_triton_kernels.py
