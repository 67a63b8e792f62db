#!/usr/bin/env bash
# Builds the release wheel (cp310-abi3, manylinux_2_28_x86_64: glibc 2.28+, e.g. RHEL/Rocky 8,
# Ubuntu 20.04+) and the sdist into dist/, then checks them (scripts/check_wheel.py).
# Needs Rust, and in the active Python: maturin, ziglang (links against glibc 2.28 without a
# container) and auditwheel; and the CUDA compilers build.rs uses (scripts/setup.sh puts them
# into .cuda-toolkit: nvcc 13.0 and ptxas 12.4).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-$PWD/.cuda-toolkit/nvidia/cu13}"
for mod in maturin ziglang auditwheel; do
  python -c "import $mod" 2>/dev/null || { echo "missing $mod: python -m pip install maturin ziglang auditwheel" >&2; exit 2; }
done
mkdir -p dist
rm -f dist/rslora_fast-*.whl dist/rslora_fast-*.tar.gz
maturin build --release --compatibility manylinux_2_28 --zig --out dist
maturin sdist --out dist
python scripts/check_wheel.py dist/rslora_fast-*.whl dist/rslora_fast-*.tar.gz
