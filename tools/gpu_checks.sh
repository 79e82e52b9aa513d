#!/usr/bin/env bash
# The checks one GPU lease runs, in one go (docs/KERNELS.md "Measured" records what they gave).
# From the repository root on a CUDA machine with torch + triton + transformers + click + pytest-xdist:
#   OUT=gpu-out bash tools/gpu_checks.sh
# Every step has its own time cap (seconds, overridable), so a slow or hanging step leaves the rest
# to run. $OUT gets log.txt (everything printed), triton_tests.txt and four JSON files.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
exec > >(tee -a "$OUT/log.txt") 2>&1
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }

step env
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$py -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
grep -m1 'model name' /proc/cpuinfo; nproc; git log -1 --format='commit %H' 2>/dev/null

step "1. compiled Triton kernels vs the fp32 dequantized reference (tests/plugin/test_triton_kernels.py)"
# Compiling every specialization takes minutes: 16 workers, and the summary (-rf) even if one test hangs.
RCSR_TRITON_TEST_DEVICE=cuda timeout -k 5 "${T_TESTS:-240}" $py -m pytest -q -p no:cacheprovider -p no:benchmark \
  -n 16 -rf --timeout "${T_TEST_ONE:-200}" tests/plugin/test_triton_kernels.py > "$OUT/triton_tests.txt" 2>&1
echo "rc=$?" >> "$OUT/triton_tests.txt"; grep -E "^(FAILED|ERROR)|^E  |passed|failed|rc=" "$OUT/triton_tests.txt" | head -40

step "2. kernel speed per call (host overhead included), heuristic launch configs"
timeout -k 5 "${T_HEUR:-90}" $py tools/bench_kernels.py --heuristic --m 1,16,64,256 --json "$OUT/kernels_heuristic.json"
echo "rc=$?"

step "3. kernel speed under CUDA-graph replay (GPU time only), heuristic launch configs, vs the dequant kernel"
timeout -k 5 "${T_GRAPH:-100}" $py tools/bench_kernels.py --heuristic --cuda-graph --dequant --m 1,16,256 --no-layer \
  --json "$OUT/kernels_graph.json" 2>/dev/null
echo "rc=$?"

step "4. quantizer on CUDA vs CPU"
timeout -k 5 "${T_QUANT:-110}" $py tools/check_cuda.py --json "$OUT/check_cuda.jsonl"
echo "rc=$?"

step "5. kernel speed, autotuned, CUDA-graph replay"
timeout -k 5 "${T_TUNE:-150}" $py tools/bench_kernels.py --cuda-graph --shapes 4096x4096,8192x28672 --m 1,16,256 \
  --bits 4,3,2 --no-layer --json "$OUT/kernels_tuned.json"
echo "rc=$?"
step done
