"""The plain decode engine: the model's own forward with transformers' dynamic KV cache.

It serves families the fast engine does not cover, and is the oracle the fast engine and the
generate loop are tested against: its logits are the ones HF ``generate`` sees (same forward, same
positions, same cache), so the loop over it reproduces HF ``generate`` token for token.
"""

from __future__ import annotations

import torch
from torch import nn


class ReferenceEngine:
    """Implements :class:`rslora_fast.generate.base.Engine` through ``model.forward``.

    ``max_batch`` / ``max_length`` only bound what the loop may ask (the cache grows as needed).
    The model runs in whatever mode it is in (dropout included), as HF ``generate`` runs it.
    """

    def __init__(self, model: nn.Module, max_batch: int, max_length: int) -> None:
        self.model = model
        self.max_batch = int(max_batch)
        self.max_length = int(max_length)
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._next_position: torch.Tensor | None = None
        supports = getattr(model, "_supports_logits_to_keep", None)
        self._keeps_logits = bool(supports()) if callable(supports) else False

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts ``[B, T]``; positions count each row's real tokens from 0."""
        batch, length = input_ids.shape
        if batch > self.max_batch or length > self.max_length:
            raise ValueError(
                f"prompt batch {tuple(input_ids.shape)} exceeds the engine's {self.max_batch} rows x "
                f"{self.max_length} tokens"
            )
        from transformers import DynamicCache

        mask = attention_mask.to(torch.long)
        positions = mask.cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1)  # pads are masked out; HF gives them 1
        self._cache = DynamicCache(config=self.model.config)
        self._mask = mask
        self._next_position = positions[:, -1] + 1
        return self._forward(input_ids, positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row and return the logits of the following position."""
        if self._cache is None or self._mask is None or self._next_position is None:
            raise RuntimeError("step() before prefill(): call prefill with the prompts first")
        if self._mask.shape[1] >= self.max_length:
            raise ValueError(f"the engine holds at most {self.max_length} tokens per row")
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        positions = self._next_position[:, None]
        self._next_position = self._next_position + 1
        return self._forward(tokens[:, None], positions)

    def release(self) -> None:
        """Drop the cache (a later prefill starts a new one)."""
        self._cache = None
        self._mask = None
        self._next_position = None

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        keep = {"logits_to_keep": 1} if self._keeps_logits else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            **keep,
        )
        self._cache = out.past_key_values
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)
