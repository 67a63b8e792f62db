"""Full training steps against the baselines: the harness lives in ``rslora_fast.bench`` (so that
``rslora-fast bench`` works from an installed wheel); this file runs it from a checkout.

    python benches/train_step.py --shape llama-3-8b --systems rslora_fast:4bit:unsloth,hf_peft:bf16
"""

import sys

from rslora_fast.bench import main

if __name__ == "__main__":
    sys.exit(main())
