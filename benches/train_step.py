"""Full training steps against the baselines: the harness lives in ``rslora_fast.bench`` (so that
``rslora-fast bench`` works from an installed wheel); this file runs it from a checkout, where the
Unsloth systems can run too (their runner, ``benches/peers.py``, is not part of the package).

    python benches/train_step.py --shape llama-3-8b --systems rslora_fast:4bit:unsloth,unsloth:4bit \
        --peer-wheels .peer-wheels
"""

import sys
from pathlib import Path

from rslora_fast import bench

PEERS = Path(__file__).resolve().with_name("peers.py")


def main(argv: list[str] | None = None) -> int:
    runner = [sys.executable, str(PEERS), "train", "--bench-module", bench.__file__]
    return bench.main(argv, runners={"unsloth": runner})


if __name__ == "__main__":
    sys.exit(main())
