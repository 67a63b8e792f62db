#!/usr/bin/env bash
# The release wheel on a GPU machine, as a user gets it: installed into a fresh virtual environment
# (torch and the other dependencies come from the machine's Python; nothing is downloaded), run from
# outside the source tree, so `import rslora_fast` can only find the installed wheel. Steps:
#   1. rslora-fast info and selfcheck (the shipped SASS for this GPU)
#   2. the same with RSLORA_FAST_KERNEL_IMAGE=ptx (the PTX path newer GPUs take, JIT by the driver)
#   3. a tiny 4-bit LoRA fine-tune (the embedded demo model), checking the kernels ran
#   4. RSLORA_FAST_KERNEL_IMAGE=off: one warning, and the same fine-tune still runs (plain torch)
# Usage: bash scripts/gpu_wheel_check.sh [dist/rslora_fast-*.whl]; logs go to $OUT (or ./gpu-out).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$root/gpu-out}
mkdir -p "$OUT"
wheel=$(realpath "${1:-$(ls "$root"/dist/rslora_fast-*.whl | head -1)}")
py=${PYTHON:-python3}
venv=$(mktemp -d)/venv
work=$(mktemp -d)   # run from here: no source tree on sys.path
unset PYTHONPATH
fails=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  echo "=== $name"
  if (cd "$work" && "$@") > "$OUT/$name.log" 2>&1; then echo "ok"; else echo "FAILED (rc $?)"; fails=$((fails + 1)); fi
  tail -n 25 "$OUT/$name.log"
}

"$py" -m venv --system-site-packages "$venv" || exit 1
# A venv made from another venv's python sees the base interpreter's packages, not that venv's:
# point it at the site-packages holding torch (the machine's dependencies; not our source tree).
torch_site=$("$py" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
echo "$torch_site" > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-deps.pth"
"$venv/bin/python" -m pip install -q --no-deps --no-index "$wheel" || exit 1
where=$(cd "$work" && "$venv/bin/python" -c "import rslora_fast; print(rslora_fast.__file__)")
echo "wheel $(basename "$wheel") installed; rslora_fast imported from $where" | tee "$OUT/wheel_check.txt"
case "$where" in "$venv"/*) ;; *) echo "FAILED: not the installed wheel"; exit 1 ;; esac
export PATH="$venv/bin:$PATH"

step info rslora-fast info
step selfcheck rslora-fast selfcheck
step info_ptx env RSLORA_FAST_KERNEL_IMAGE=ptx rslora-fast info
step selfcheck_ptx env RSLORA_FAST_KERNEL_IMAGE=ptx rslora-fast selfcheck
grep -q "compute_90" "$OUT/info_ptx.log" || { echo "FAILED: ptx mode did not load PTX"; fails=$((fails + 1)); }

cat > "$work/train.py" <<'PY'
"""A tiny 4-bit LoRA fine-tune through the installed wheel; says whether our kernels ran."""
import sys
import warnings

from rslora_fast.__main__ import main
from rslora_fast.ops import _launch

expect = sys.argv[1]  # "kernels" or "fallback"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rc = main(["finetune", "--load-in-4bit", "--max-steps", "8", "--logging-steps", "2",
               "--output-dir", sys.argv[2], "--max-new-tokens", "8"])
fallback = [str(w.message) for w in caught if issubclass(w.category, _launch.KernelsFallbackWarning)]
status = _launch.kernel_status()
print(f"finetune rc={rc}; kernels per device: {status}; fallback warnings: {len(fallback)}")
for m in fallback:
    print("  warning:", m)
ok = rc == 0 and (
    (expect == "kernels" and status and all(status.values()) and not fallback)
    or (expect == "fallback" and status and not any(status.values()) and len(fallback) == 1)
)
print("train check:", "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
step train python "$work/train.py" kernels "$work/run-kernels"
step train_fallback env RSLORA_FAST_KERNEL_IMAGE=off python "$work/train.py" fallback "$work/run-off"

echo "=== wheel check: $fails failed step(s); logs in $OUT"
exit $((fails > 0))
