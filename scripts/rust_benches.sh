#!/usr/bin/env bash
# The criterion benches (benches/offload.rs, benches/quant.rs) built where Rust is and run where
# the GPU is. The binaries embed the kernels and open libcuda at run time, so a machine with only
# the NVIDIA driver runs them (no toolchain, no CUDA toolkit). See docs/benchmarks.md.
#
#   bash scripts/rust_benches.sh build [DIR]        # cargo bench --no-run; binaries into DIR
#                                                   # (default target/bench-bin, git-ignored)
#   bash scripts/rust_benches.sh run DIR [ARGS...]  # run every binary in DIR; ARGS go to criterion
#                                                   # (a filter such as `cuda` or `host`, then
#                                                   # options such as --measurement-time 2)
#   bash scripts/rust_benches.sh ci                 # build, then the host half with short times and
#                                                   # the cuda half (one skip line each without a GPU)
#
# `run` writes criterion's reports under $OUT/criterion when OUT is set (else DIR/criterion), its
# log to $OUT/rust_benches.log, and reprints the ratio tables of all binaries at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCHES=(offload quant)

die() {
  echo "rust_benches.sh: $*" >&2
  exit 2
}

build() {
  local dir=${1:-target/bench-bin}
  mkdir -p "$dir"
  local args=()
  for b in "${BENCHES[@]}"; do args+=(--bench "$b"); done
  # The JSON messages name each bench's executable; diagnostics still go to the terminal.
  cargo bench --no-run "${args[@]}" --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
    cp "$exe" "$dir/$name"
  done
  for b in "${BENCHES[@]}"; do
    [ -x "$dir/$b" ] || die "cargo did not report the executable of bench '$b'"
  done
  {
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- src benches kernels || echo ' + uncommitted changes')"
    echo "built $(date -u +%FT%TZ) on $(uname -m), $(ldd --version | head -1)"
  } >"$dir/BUILD.txt"
  echo "bench binaries in $dir:"
  (cd "$dir" && ls -l "${BENCHES[@]}" BUILD.txt | awk '{print "  " $5 " bytes  " $9}')
}

run() {
  local dir=${1:-}
  [ -n "$dir" ] || die "run needs the folder of built binaries (from: rust_benches.sh build DIR)"
  shift
  for b in "${BENCHES[@]}"; do
    [ -f "$dir/$b" ] || die "no binary $dir/$b; build it where Rust is: bash scripts/rust_benches.sh build $dir"
    [ -x "$dir/$b" ] || chmod u+x "$dir/$b" # a copy may have lost the mode bit
  done
  local out=${OUT:-$dir}
  mkdir -p "$out"
  export CRITERION_HOME=$out/criterion
  local log=$out/rust_benches.log
  : >"$log"
  [ -f "$dir/BUILD.txt" ] && cat "$dir/BUILD.txt" | tee -a "$log"
  local failed=()
  for b in "${BENCHES[@]}"; do
    echo "=== $b $*" | tee -a "$log"
    # --bench: criterion's benchmark mode (without it the binary runs each bench once, as a test).
    # A failing binary does not stop the next one; the script fails at the end.
    "$dir/$b" --bench "$@" 2>&1 | tee -a "$log" || failed+=("$b")
  done
  echo
  echo "=== summary ($log)"
  grep -E '^(== |[A-Za-z].* ratio [0-9]|[a-z/]+: skipped)' "$log" || echo "(no ratio lines: nothing measured against a plain copy)"
  if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (see $log)" >&2
    return 1
  fi
}

ci() {
  build target/bench-bin
  local quick=(--warm-up-time 0.1 --measurement-time 0.2)
  OUT=target/bench-ci run target/bench-bin host "${quick[@]}"
  OUT=target/bench-ci run target/bench-bin cuda "${quick[@]}"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  build) build "$@" ;;
  run) run "$@" ;;
  ci) ci ;;
  *) die "usage: rust_benches.sh build [DIR] | run DIR [criterion args...] | ci" ;;
esac
