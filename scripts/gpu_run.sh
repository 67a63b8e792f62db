#!/usr/bin/env bash
# What we run on the lent H200 (see docs/gpu.md): install the wheel built here, then the phases asked
# for. Results and logs go to $OUT (or ./gpu-out). Usage: bash scripts/gpu_run.sh tests kernels train
# WHEELS names the folder holding the wheel (default target/wheels).
set -uo pipefail
OUT=${OUT:-gpu-out}
WHEELS=${WHEELS:-target/wheels}
mkdir -p "$OUT"
# Install once per wheel (phases may run as concurrent invocations, one per GPU).
stamp=$(sha1sum "$WHEELS"/*.whl | cut -c1-40)
if [ "$(cat /tmp/site/.wheel 2>/dev/null)" != "$stamp" ]; then
  python3 -m pip install -q --no-deps --no-index --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  echo "$stamp" > /tmp/site/.wheel
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ -d .whl/bnbsite ] && export PYTHONPATH=$PYTHONPATH:$PWD/.whl/bnbsite   # bitsandbytes, baseline only
export PYTHONUNBUFFERED=1
for phase in "$@"; do
  echo "=== $phase ($(date +%T))"
  case "$phase" in
    tests)
      (cd /tmp && python3 -m rslora_fast info && python3 -m rslora_fast selfcheck) 2>&1 | tee "$OUT/info.log"
      python3 -m pytest -m cuda tests/python -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
      ;;
    kernels)
      python3 benches/kernels.py --out "$OUT/kernels.jsonl" 2>&1 | tail -12
      [ -n "${WAVES_EXPERIMENT:-}" ] && RSLORA_FAST_MAX_WAVES=1 python3 benches/kernels.py --out "$OUT/kernels_w1.jsonl" 2>&1 | tail -8
      [ -f benches/nf4.py ] && python3 benches/nf4.py --out "$OUT/nf4.jsonl" 2>&1 | tail -12
      [ -n "${WAVES_EXPERIMENT:-}" ] && RSLORA_FAST_MAX_WAVES=1 python3 benches/nf4.py --out "$OUT/nf4_w1.jsonl" 2>&1 | tail -10
      ;;
    offload)  # "unsloth" vs plain checkpointing at 16k tokens, interleaved on one model, per base
      for base in ${OFFLOAD_BASES:-bf16 4bit}; do
        python3 benches/offload_step.py --seq 16384 --base "$base" --rounds "${OFFLOAD_ROUNDS:-4}" \
          --out "$OUT/offload.jsonl" 2>>"$OUT/offload.err" | tail -3
      done
      ;;
    longctx)  # longest batch-1 sequence under a 24 GiB cap, per checkpointing mode (4-bit base)
      python3 benches/train_step.py --cache bench-cache --out "$OUT/longctx.jsonl" --mode longctx --cap-gib 24 \
        --len-step "${LEN_STEP:-4096}" --max-len 131072 \
        --systems "${LONGCTX_SYSTEMS:-rslora_fast:4bit:unsloth,rslora_fast:4bit:true,rslora_fast:4bit:false}" \
        2>"$OUT/longctx.err" | tail -8
      ;;
    budget)  # tokens/s when a memory budget lets layers skip recompute (activation budgets in GiB)
      python3 benches/train_step.py --cache bench-cache --out "$OUT/budget.jsonl" \
        --systems "rslora_fast:4bit:unsloth,rslora_fast:4bit:unsloth:budget=7,rslora_fast:4bit:unsloth:budget=21" \
        2>"$OUT/budget.err" | tail -6
      ;;
    multi)  # needs 2+ GPUs (kind nvidia-h200-x2): NCCL tests, then DDP / FSDP2 throughput at 1 and 2 GPUs
      python3 -m pytest -m cuda tests/python/test_distributed_cpu.py -q -p no:cacheprovider 2>&1 \
        | tee "$OUT/pytest_multi_gpu.log" | tail -8
      python3 benches/ddp.py --shape llama-3-8b --gpus 1,2 --mode "${DIST_MODES:-ddp,fsdp2}" --base 4bit \
        --cache bench-cache --out "$OUT/ddp.jsonl" 2>"$OUT/ddp.err" | tail -12
      ;;
    load)
      python3 benches/train_step.py --systems "" --cache bench-cache >/dev/null 2>&1
      python3 benches/load.py --cache bench-cache --out "$OUT/load.jsonl" 2>&1 | tail -10
      ;;
    train)
      python3 benches/train_step.py --cache bench-cache --out "$OUT/train_step.jsonl" \
        --systems "${SYSTEMS:-rslora_fast:4bit:unsloth,rslora_fast:4bit:true,rslora_fast:16bit:unsloth,hf_peft:bf16,hf_peft_bnb:nf4}" \
        2>"$OUT/train_step.err" | tail -12
      ;;
    profile)
      python3 benches/profile_step.py --cache bench-cache --out "$OUT/profile.txt" 2>&1 | tail -45
      ;;
    *) echo "unknown phase $phase" ;;
  esac
done
