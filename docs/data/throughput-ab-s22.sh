#!/usr/bin/env bash
# Interleaved A/B on the default model: offline throughput (64 prompts, 32+128) and batch-16 decode
# latency (vllm bench latency --batch-size 16, 32+128, 1 warm-up + 3 iters), 3 rounds of
# FP / W4 exact / W4 int8 opt-in / W4+head int8 opt-in.  ROUNDS, CONFIGS and OUT override the session-22 run
# (session 23: ROUNDS="1 2" CONFIGS="fp w4a8 w4ha8" OUT=runs/s23/ab, on the session-22 checkpoints; session 24:
# CONFIGS="fp w3 w3a8" with W3=<a W3 g64 checkpoint of the default model>, `rcsr quantize --model default
# --method rtn --bits 3 --group-size 64 --out runs/s24/w3g64`).
set -u
cd "$(dirname "$0")/../.."  # the repository root
source .venv/bin/activate
export RCSR_CACHE="${RCSR_CACHE:-$PWD/.cache}" VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD" VLLM_LOGGING_LEVEL=WARNING
FP=$(python -c 'from rcsr_deploy.assets import default_model_dir; print(default_model_dir())' 2>/dev/null)
[ -n "$FP" ] || FP=$(ls -d .cache/*/ 2>/dev/null | head -1)
W4=runs/s22/serving-default/smollm2-135m-instruct-rtn-w4g64
W4H=runs/s22/serving-default/smollm2-135m-instruct-rtn-w4g64-head
W3=${W3:-runs/s24/w3g64}
out=${OUT:-runs/s22/ab}; mkdir -p $out
echo "FP=$FP"
for round in ${ROUNDS:-1 2 3}; do
  for cfg in ${CONFIGS:-fp w4 w4a8 w4ha8}; do
    case $cfg in
      fp) M=$FP; ISA="";;
      w4) M=$W4; ISA="";;
      w4a8) M=$W4; ISA=avx512_vnni_a8;;
      w4ha8) M=$W4H; ISA=avx512_vnni_a8;;
      w3) M=$W3; ISA="";;
      w3a8) M=$W3; ISA=avx512_vnni_a8;;
    esac
    RCSR_CPU_ISA=$ISA python -m rcsr_cli.vllm_cli bench throughput --model $M --dtype bfloat16 --max-model-len 256 \
      --dataset-name random --random-input-len 32 --random-output-len 128 --random-prefix-len 0 --num-prompts 64 \
      --seed 0 --enforce-eager --output-json $out/thr-$cfg-$round.json > $out/thr-$cfg-$round.log 2>&1
    RCSR_CPU_ISA=$ISA python -m rcsr_cli.vllm_cli bench latency --model $M --dtype bfloat16 --max-model-len 256 \
      --input-len 32 --output-len 128 --batch-size 16 --num-iters-warmup 1 --num-iters 3 --seed 0 --enforce-eager \
      --output-json $out/b16-$cfg-$round.json > $out/b16-$cfg-$round.log 2>&1
    python - "$out" "$cfg" "$round" <<'PY'
import json, sys
out, cfg, r = sys.argv[1:]
t = json.load(open(f"{out}/thr-{cfg}-{r}.json")); l = json.load(open(f"{out}/b16-{cfg}-{r}.json"))
otok = t.get("total_num_tokens", 0)
print(f"round {r} {cfg:6s} throughput req/s {t['requests_per_second']:.3f} tok/s {t['tokens_per_second']:.1f}  b16 latency {l['avg_latency']:.3f} s", flush=True)
PY
  done
done
