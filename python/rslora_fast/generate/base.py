"""What the generate loop needs from a decode engine (the fast one and the plain fallback)."""

from __future__ import annotations

from typing import Protocol

import torch


class Engine(Protocol):
    """A model prepared for decoding a batch of at most ``max_batch`` rows of ``max_length`` tokens.

    Rows are left-padded: ``attention_mask`` is 0 on the pads, each row's positions count its real
    tokens from 0. Logits come back as float32 ``[B, vocab]`` for the last position of each row.
    """

    max_batch: int
    max_length: int

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts ``[B, T]``, fill the cache, return the next-token logits ``[B, V]``."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[B]``), return the following logits ``[B, V]``."""
        ...

    def release(self) -> None:
        """Free the cache (the engine may be prefilled again afterwards)."""
        ...
