# Sourced by main.sh and test.sh: installs everything into the venv if needed (bootstrap.sh), then sets
# the environment both run in.  Defines $here (the checkout) and $py (the venv's python).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/bootstrap.sh
export RCSR_CACHE="${RCSR_CACHE:-$here/.cache}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export TOKENIZERS_PARALLELISM=false
py="${RCSR_VENV:-$here/.venv}/bin/python"
