"""The one gateway to the compiled extension ``rslora_fast._core``.

Every module that needs the extension asks here, never imports ``_core`` itself, so the import
happens at first use (``import rslora_fast`` stays cheap) and a missing or broken build is reported
the same way everywhere: :func:`core` raises :class:`~rslora_fast.errors.KernelsUnavailableError`
naming the import error and what to do; :func:`core_or_none` lets a caller with a pure-Python
path fall back to it; :func:`missing_reason` says why the extension is unavailable (for ``info``).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from .errors import KernelsUnavailableError

_FIX = (
    "install the package (`pip install rslora-fast`, or `pip install .` in a source checkout) or "
    "build the extension in place with `maturin develop`"
)


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    """(the extension, None) or (None, why it did not import); tried once per process."""
    try:
        return importlib.import_module("rslora_fast._core"), None
    except ImportError as exc:  # not built, built for another Python/platform, missing libraries
        return None, f"{type(exc).__name__}: {exc}"


def core() -> ModuleType:
    """The compiled extension, or a :class:`KernelsUnavailableError` saying why and what to do."""
    module, reason = _load()
    if module is None:
        raise KernelsUnavailableError(f"rslora_fast._core cannot be imported ({reason}); {_FIX}")
    return module


def core_or_none() -> ModuleType | None:
    """The compiled extension, or None when it cannot be imported (the caller's pure-Python path)."""
    return _load()[0]


def missing_reason() -> str | None:
    """Why the extension cannot be imported, with what to do; None when it imports."""
    module, reason = _load()
    return None if module is not None else f"{reason}; {_FIX}"
