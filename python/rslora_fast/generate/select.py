"""Which engine decodes a model, and the one cached per model (the only owner of that state).

The fast engine is taken when :func:`~rslora_fast.generate.engine.why_not_fast` has no objection;
otherwise the plain :class:`~rslora_fast.generate.reference_engine.ReferenceEngine`, with the reason
logged once at INFO. A fast engine is kept on the model between calls (its KV cache and captured
steps are reused) until :func:`release`; a plain one lives for one call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import nn

from . import engine as fast
from .base import Engine
from .reference_engine import ReferenceEngine

log = logging.getLogger(__name__)

#: Attribute (in the transformers model's ``__dict__``, not a submodule) holding its fast engine.
_SLOT = "_rslora_decode_engine"
#: Lengths are rounded up to this many tokens, so nearby calls reuse one engine.
LENGTH_STEP = 256
_logged: set[str] = set()


def log_once(message: str, *args: object) -> None:
    """Log ``message % args`` at INFO the first time it is seen in this process."""
    text = message % args if args else message
    if text not in _logged:
        _logged.add(text)
        log.info(text)


def batch_bucket(batch: int) -> int:
    """The engine batch for ``batch`` rows: the next power of two."""
    return 1 << max(0, int(batch) - 1).bit_length()


def length_bucket(needed: int, cap: int | None) -> int:
    """Tokens per row: ``needed`` rounded up to :data:`LENGTH_STEP`, at most ``cap`` (never below ``needed``)."""
    rounded = -(-int(needed) // LENGTH_STEP) * LENGTH_STEP
    return max(int(needed), min(rounded, cap)) if cap else rounded


@contextlib.contextmanager
def open_engine(model: nn.Module, batch: int, length: int, cap: int | None = None) -> Iterator[Engine]:
    """An engine for ``batch`` rows of ``length`` tokens (``cap``: the model's ``max_seq_length``)."""
    engine = _fast_engine(model, batch, length, cap)
    if engine is not None:
        yield engine
        return
    plain = ReferenceEngine(model, batch, length)
    try:
        yield plain
    finally:
        plain.release()


def release(model: nn.Module) -> None:
    """Free the fast engine kept on ``model`` (its KV cache); the next generate call builds a new one."""
    engine = model.__dict__.pop(_SLOT, None)
    if engine is not None:
        engine.release()


def _fast_engine(model: nn.Module, batch: int, length: int, cap: int | None) -> Engine | None:
    """The kept fast engine when it fits, else a new one; None when the fast engine does not apply."""
    reason = fast.why_not_fast(model)
    if reason is not None:
        log_once("generate: the plain decode engine is used: %s", reason)
        return None
    kept = model.__dict__.get(_SLOT)
    if kept is not None and kept.max_batch >= batch and kept.max_length >= length:
        return kept
    release(model)
    rows, tokens = batch_bucket(batch), length_bucket(length, cap)
    try:
        engine = fast.FastEngine(model, rows, tokens)
    except Exception as exc:  # noqa: BLE001 - any failure to build leaves the plain path, which is correct
        log_once("generate: the fast decode engine could not be built (%s); the plain engine is used", exc)
        return None
    model.__dict__[_SLOT] = engine
    return engine
