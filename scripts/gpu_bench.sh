#!/usr/bin/env bash
# Side-by-side benches on one lent H200 in one device call (see docs/benchmarks.md): our wheel,
# the peer wheels (Unsloth, bitsandbytes, TRL; each peer system in its own process), random
# checkpoints built there. Results as JSON lines under $OUT, logs under $OUT/logs.
#
#   bash scripts/gpu_bench.sh train8b            # the deciding training rows (~7 min with the 8B build)
#   bash scripts/gpu_bench.sh train1b grpo       # 1B-like training rows + GRPO on/off (~7 min)
#   bash scripts/gpu_bench.sh gen4bit            # 8B generation, 4-bit, with Unsloth and HF peft + bnb (~6 min)
#   bash scripts/gpu_bench.sh gen16bit profile   # 8B generation, 16-bit; the step's profile (~6 min)
#   bash scripts/gpu_bench.sh train8b-fused      # the deciding row again with fused AdamW (~4.5 min)
#   bash scripts/gpu_bench.sh train8b-budget     # max_memory_gb=21 vs Unsloth without checkpointing (~4.5 min)
#   bash scripts/gpu_bench.sh train8b-long       # 8 x 8192 (~9 min: a call of its own, checkpoint cached first)
# Aliases: train = train8b train1b, generate = gen4bit gen16bit (each over 10 minutes together:
# give them one call each). Every part stops starting systems when BUDGET_S (default 570 s from
# the script's start) is spent, so one call stays under the 10-minute limit and keeps what ran.
# WHEELS: folder of our wheel (default dist; "none": use the installed package); PEERS: folder of the
# peer wheels (default .peer-wheels). `bash scripts/gpu_bench.sh smoke` runs the parts' commands on a
# tiny shape (CPU is fine) to check this script.
set -uo pipefail
OUT=${OUT:-gpu-out}
WHEELS=${WHEELS:-dist}
PEERS=${PEERS:-.peer-wheels}
CACHE=${CACHE:-bench-cache}
START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT/logs"
if [ "$WHEELS" != none ]; then
  python3 -m pip install -q --no-deps --no-index --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
peer_args=()
if ls "$PEERS"/*.whl >/dev/null 2>&1; then peer_args=(--peer-wheels "$PEERS"); else
  echo "no peer wheels in $PEERS: the Unsloth / bitsandbytes / TRL systems are skipped"; fi
left() { local s=$((BUDGET_S - ($(date +%s) - START))); echo $((s > 1 ? s : 1)); }
train() {  # shape batch systems optimizer
  python3 benches/train_step.py --cache "$CACHE" --out "$OUT/train.jsonl" "${peer_args[@]}" \
    --shape "$1" --batch "$2" --seq-len "${SEQ:-2048}" --systems "$3" --optimizer "$4" --warmup "${WARMUP:-3}" \
    --steps "${STEPS:-20}" \
    --time-budget-s "$(left)" 2>>"$OUT/logs/train.err" | sed -n '/^| system/,$p'
}
parts=()
for a in "$@"; do
  case "$a" in
    train) parts+=(train8b train1b) ;;
    generate) parts+=(gen4bit gen16bit) ;;
    *) parts+=("$a") ;;
  esac
done
for part in "${parts[@]}"; do
  echo "=== $part ($(date +%T), $(left) s left)"
  case "$part" in
    train8b)
      train llama-3-8b 2 rslora_fast:4bit:unsloth,unsloth:4bit default
      train llama-3-8b 2 rslora_fast:16bit:unsloth,unsloth:bf16 default ;;
    train8b-fused) train llama-3-8b 2 rslora_fast:4bit:unsloth,unsloth:4bit fused ;;
    train8b-budget)  # max_memory_gb = Unsloth-without-checkpointing's peak, against it
      train llama-3-8b 2 "rslora_fast:4bit:unsloth:budget=${BUDGET_GIB:-21},unsloth:4bit:false" default ;;
    train8b-long)  # batch 8 x 8192: ~6.5 s steps, about 9 minutes with the checkpoint cached
      SEQ=8192 train llama-3-8b 8 rslora_fast:4bit:unsloth,unsloth:4bit default ;;
    train1b)
      train llama-3.2-1b 4 rslora_fast:4bit:unsloth,unsloth:4bit,rslora_fast:16bit:unsloth,unsloth:bf16 default ;;
    gen4bit|gen16bit)
      systems=rslora_fast:4bit,unsloth:4bit,hf_peft_bnb:nf4
      [ "$part" = gen16bit ] && systems=rslora_fast:16bit,unsloth:bf16
      python3 benches/generate.py --part generate --cache "$CACHE" --out "$OUT/generate.jsonl" "${peer_args[@]}" \
        --systems "$systems" --time-budget-s "$(left)" 2>>"$OUT/logs/generate.err" | sed -n '/^| system/,$p' ;;
    grpo)
      python3 benches/generate.py --part grpo --cache "$CACHE" --out "$OUT/generate.jsonl" "${peer_args[@]}" \
        --grpo-bases "${GRPO_BASES:-4bit}" --time-budget-s "$(left)" 2>>"$OUT/logs/grpo.err" | sed -n '/^| GRPO/,$p' ;;
    profile)
      timeout "$(left)" python3 benches/profile_step.py --cache "$CACHE" --out "$OUT/profile.txt" \
        --json-out "$OUT/profile.jsonl" --system "${PROFILE_SYSTEM:-rslora_fast:4bit:unsloth}" 2>>"$OUT/logs/profile.err" | head -20 ;;
    smoke)  # the same commands on a tiny shape, to check this script anywhere
      SEQ=32 WARMUP=1 STEPS=2 train tiny 2 rslora_fast:4bit:unsloth,unsloth:4bit default,fused
      python3 benches/generate.py --smoke --part generate,grpo --cache "$CACHE" --out "$OUT/generate.jsonl" \
        "${peer_args[@]}" --systems rslora_fast:4bit,unsloth:4bit --time-budget-s "$(left)" \
        2>>"$OUT/logs/generate.err" | sed -n '/^| system/,$p'
      python3 benches/profile_step.py --smoke --cache "$CACHE" --out "$OUT/profile.txt" --json-out "$OUT/profile.jsonl" \
        2>>"$OUT/logs/profile.err" | head -3 ;;
    *) echo "unknown part $part (train8b train8b-fused train8b-budget train8b-long train1b gen4bit gen16bit grpo profile smoke; train; generate)" ;;
  esac
done
cp "$CACHE"/logs/*.log "$OUT/logs/" 2>/dev/null
echo "=== done in $(( $(date +%s) - START )) s"
