#!/usr/bin/env bash
# The GPU figures of the README's GPU section in one run on a CUDA machine:
#
#   bash scripts/gpu_figures.sh [OUT_DIR] [RUN_DIR ...]   # default OUT_DIR: $OUT or ./gpu_figures
#
# 1. The CUDA tests (tests/test_precision.py; they skip without a GPU).
# 2. PrunedModel speed: deit_small_patch16_224 shape (random weights, random scorer, sites 3 6 9), fp16,
#    keep_ratio schedule at 0.5 of the FLOPs, batch 1 and 256, eager.
# 3. With RUN_DIRs (digits-vit runs, e.g. the README's runs/digits-s0 s1 s2): the README's digits-vit eval on
#    cuda, fp32: the deployed call and every baseline, quality, FLOPs and ms per sample at batch 64 and 1.
# 4. Batched-env samples/s on digits-vit-random (no pretrain needed), cuda vs cpu, batch 64 and 256.
# 5. A short training run on cuda with the backbone in bf16 (digits-vit-random, PPO preset), timed.
# 6. Step 2 with both models torch.compile'd.
# Each step writes JSON (or a log) under OUT_DIR and a failing step does not stop the others.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_figures}}
RUNS=("${@:2}")
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
PP="$PY -m policy_prune.cli"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, log it, time it, never abort the script
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
  tail -n 25 "$OUT/$name.log"
}

$PY - <<'PY' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")
PY

step tests_cuda 240 $PY -m pytest -q tests/test_precision.py -p no:cacheprovider
MODEL=(--what model --model deit_small_patch16_224 --sites 3 6 9 --batch 1 256 --flops 0.5 --device cuda --dtype fp16
       --warmup 10 --repeats 50 --seed 0)
step model_fp16_eager 180 $PP bench "${MODEL[@]}" --out "$OUT/model_fp16_eager.json"
if [ ${#RUNS[@]} -gt 0 ]; then
  step eval_cuda 300 $PP eval "${RUNS[@]}" --split test --targets 0.7 0.5 0.35 0.25 0.15 --learned learned-deployed \
       --vis-target 0.15 --device cuda --seed 0 --out "$OUT/eval_cuda"
fi
for dev in cuda cpu; do
  step "env_$dev" 120 $PP bench --what env --env digits-vit-random --batch 64 256 --device "$dev" --warmup 2 --repeats 5 \
       --seed 0 --out "$OUT/env_$dev.json"
done
step train_cuda_bf16 240 $PP train --env digits-vit-random --device cuda --dtype bf16 --timesteps 15360 --seed 0 \
     --runs-dir "$OUT/runs" --name train_cuda_bf16 --set train.eval_every=15360 --set train.checkpoint_every=15360
step model_fp16_compiled 240 $PP bench "${MODEL[@]}" --compile --out "$OUT/model_fp16_compiled.json"
echo "done: $OUT (steps.log has each step's exit code and seconds)"
