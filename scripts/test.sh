#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs all tests: the Rust crate's tests, then pytest
# (GPU tests are marked `cuda` and skipped without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export CUDA_HOME="${CUDA_HOME:-$PWD/.cuda-toolkit/nvidia/cu13}"
cargo test --all-targets -q
python -m pytest tests/python -q "$@"
