#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), prints what this machine has, checks every kernel against
# its reference, then runs the main job: a LoRA fine-tune of the embedded demo model (built locally,
# no download) on the bundled data; it shows the loss falling, saves the adapter, reloads it and
# generates. Extra arguments go to `rslora-fast finetune` (e.g. --model DIR --data FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
rslora-fast info
rslora-fast selfcheck
rslora-fast finetune --output-dir runs/demo "$@"
