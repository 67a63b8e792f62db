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
        return _finetune(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


# A hint per known error class, when the error carries none of its own.
_HINTS = {
    "DataError": "see `rslora-fast finetune --help` and docs/finetune-cli.md for the accepted data formats",
    "CheckpointNotFoundError": "pass --model a local model folder (config.json, *.safetensors, tokenizer)",
    "CheckpointError": "the model folder is damaged or not a Hugging Face causal LM checkpoint",
}


def _finetune(args: argparse.Namespace) -> int:
    """Run ``finetune``: known errors become one line, a hint and an exit code (see EXIT_CODES_HELP)."""
    from .errors import RsloraError, TrainingDivergedError
    from .finetune import EXIT_DIVERGED, EXIT_SIGINT, EXIT_USAGE, run

    try:
        return int(run(args).get("exit_code", 0))
    except TrainingDivergedError as exc:
        _report(exc)
        return EXIT_DIVERGED
    except RsloraError as exc:
        _report(exc)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before or after training (during it, the adapter is saved first)
        print("rslora-fast finetune: interrupted", file=sys.stderr)
        return EXIT_SIGINT


def _report(exc: BaseException) -> None:
    hint = getattr(exc, "hint", None) or _HINTS.get(type(exc).__name__)
    print(f"rslora-fast finetune: error: {exc}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
