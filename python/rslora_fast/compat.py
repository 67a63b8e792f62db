"""Names that scripts written for Unsloth import, so they run with only the import changed."""

from __future__ import annotations

from typing import Any

import torch


def is_bfloat16_supported() -> bool:
    """Whether training here can compute in bfloat16.

    On a GPU: compute capability 8.0 or newer (Ampere on), without counting emulation. Without a
    GPU, training runs on the CPU, where torch computes bfloat16 natively, so the answer is True
    (notebooks use it as ``bf16=is_bfloat16_supported(), fp16=not is_bfloat16_supported()``; fp16
    mixed precision has no CPU path).
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def PatchDPOTrainer() -> None:  # noqa: N802 - the name scripts import
    """Make ``DPOTrainer`` accept the keywords of Unsloth's DPO notebooks.

    Our models need no DPO-specific patch for speed (TRL runs them as any PEFT model); what this
    does is :func:`rslora_fast.trl_compat.install`, which importing rslora_fast already did.
    """
    from .trl_compat import install

    install()


def PatchFastRL(algorithm: str | None = None, FastLanguageModel: Any = None) -> None:  # noqa: N802, N803
    """Accepted for Unsloth's RL notebooks; installs the TRL keyword mapping and nothing else.

    ``algorithm`` (e.g. ``"GRPO"``) and ``FastLanguageModel`` are accepted and unused: TRL's
    trainers run our models without patches.
    """
    from .trl_compat import install

    install()
