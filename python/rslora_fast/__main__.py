"""The ``rslora-fast`` command (also ``python -m rslora_fast``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = argparse.ArgumentParser(prog="rslora-fast", description="Fast LoRA / QLoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and whether the CUDA kernels load")
    sub.add_parser("selfcheck", help="run every kernel against its reference on this machine")
    from .finetune import build_parser

    build_parser(sub.add_parser("finetune", help="LoRA / QLoRA fine-tune (the embedded demo by default)"))
    sub.add_parser(
        "bench",
        help="training-step benchmark against the baselines (see rslora-fast bench -h)",
        add_help=False,
    )
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["bench"]:  # the harness owns its arguments
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)

    from . import info

    if args.command == "info":
        return info.print_info()
    if args.command == "selfcheck":
        return info.selfcheck()
    if args.command == "finetune":
        from .finetune import run

        run(args)
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
