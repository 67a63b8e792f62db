"""Exception hierarchy shared by the Python package and the Rust extension.

Every error rslora_fast raises on purpose derives from :class:`RsloraError`. These classes are the
canonical ones: the extension (``src/python/errors.rs``) imports them from this module and raises
them, so this module never needs the extension and ``except rslora_fast.RsloraError`` catches both
sides.

Two classes also derive from a builtin, so older ``except`` clauses keep working:
:class:`InvalidArgumentError` is a ``ValueError`` (a size, shape, pointer or option the call cannot
accept) and :class:`HostMemoryError` is a ``MemoryError`` (host memory refused or the offload cap
reached).
"""

from __future__ import annotations


class RsloraError(Exception):
    """Base class of every error raised by rslora_fast."""


class CudaError(RsloraError):
    """A CUDA driver call or kernel launch failed; the message names the kernel and the CUDA error."""


class KernelsUnavailableError(RsloraError):
    """The compiled extension or kernels are missing or cannot load on this machine."""


class QuantFormatError(RsloraError, ValueError):
    """A quantized tensor or its serialized state is malformed."""


class OffloadError(RsloraError):
    """The activation-offload scheduler was misused or ran out of host memory."""


class InvalidArgumentError(RsloraError, ValueError):
    """An argument is not acceptable (a size, shape, pointer or option)."""


class HostMemoryError(RsloraError, MemoryError):
    """Host memory could not be allocated or a configured cap was reached."""


class DataError(RsloraError, ValueError):
    """Training data (a file, a row, a chat template) is missing, malformed or cannot be used."""


class UsageError(RsloraError, ValueError):
    """A command was called in a way that cannot work (``hint`` says what to do instead)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class TrainingDivergedError(RsloraError):
    """Training produced a non-finite loss or non-finite adapter weights (``step`` says when)."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


__all__ = [
    "CudaError",
    "DataError",
    "HostMemoryError",
    "InvalidArgumentError",
    "KernelsUnavailableError",
    "OffloadError",
    "QuantFormatError",
    "RsloraError",
    "TrainingDivergedError",
    "UsageError",
]
