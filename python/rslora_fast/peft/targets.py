"""Which modules of a model get a LoRA adapter (PEFT's matching rules)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from torch import nn

from .. import _native
from ..errors import InvalidArgumentError
from ..quant.linear4bit import is_4bit_linear

if TYPE_CHECKING:
    from .config import LoraConfig

ALL_LINEAR = "all-linear"
logger = logging.getLogger(__name__)

# Projections that some families fuse into one layer (Phi-3). A target list naming any part, on a
# model that has the fused layer and none of the parts, adapts the fused layer: one LoRA pair over
# its whole output, as HF peft does when target_modules names the fused layer.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and 4-bit linear layers: the modules LoRA can wrap."""
    return isinstance(module, nn.Linear) or is_4bit_linear(module)


def _skip_adapter_internals(model: nn.Module):
    """``named_modules`` without the insides of modules rslora_fast itself added."""
    from .layer import LoraLinear, ModulesToSaveWrapper

    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (LoraLinear, ModulesToSaveWrapper)):
            skip.append(name)
        yield name, module


def output_head_name(model: nn.Module) -> str | None:
    """Full name of the model's output head (``get_output_embeddings()``), if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Sorted distinct last components of the names of every linear-like module."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and is_linear_like(m)}
    )


def with_fused_projections(model: nn.Module, target_modules):
    """``target_modules`` with the parts of a fused projection replaced by the fused layer's name
    (e.g. the default q/k/v/gate/up names on Phi-3: ``qkv_proj``, ``gate_up_proj``); logs each
    replacement. Strings (regex, ``all-linear``) are returned as they are."""
    if not isinstance(target_modules, list):
        return target_modules
    leaves = set(linear_leaf_names(model))
    out = list(target_modules)
    for fused, parts in FUSED_PROJECTIONS.items():
        named = [p for p in parts if p in out]
        if named and fused in leaves and fused not in out and not leaves.intersection(parts):
            out = [t for t in out if t not in parts] + [fused]
            logger.info("target_modules: %s -> %s (this model fuses them into one layer)", named, fused)
    return out


def _name_matches_list(name: str, entries) -> bool:
    return name in entries or any(name.endswith("." + e) for e in entries)


# Patterns longer than this are refused (also by the Rust matcher).
MAX_PATTERN_CHARS = 4096
# Fallback guard without the extension: a quantified group holding a quantifier, e.g. "(.*)*",
# is what makes a backtracking engine take exponential time.
_NESTED_QUANTIFIER = re.compile(r"\([^()]*[*+}][^()]*\)\s*[*+{]")


def fullmatch(pattern: str, name: str) -> bool:
    """``re.fullmatch(pattern, name)`` in time linear in ``name``, for patterns from configs.

    A literal equal to the name matches at once; otherwise the Rust ``regex`` crate (a finite
    automaton, no backtracking) matches it through ``_core``. Without the extension, patterns
    with a nested quantifier or over :data:`MAX_PATTERN_CHARS` characters are refused and the
    rest go to Python's ``re``.

    Raises:
        InvalidArgumentError: a pattern that is too long, too large compiled, malformed, or uses
            look-around or back-references (which no linear-time engine runs).
    """
    if pattern == name:
        return True
    core = _native.core_or_none()
    if core is not None:
        return core.regex_fullmatch(pattern, [name])[0]
    if len(pattern) > MAX_PATTERN_CHARS or _NESTED_QUANTIFIER.search(pattern):
        raise InvalidArgumentError(
            f"module-name pattern {pattern[:80]!r} is refused: nested quantifiers or over "
            f"{MAX_PATTERN_CHARS} characters could take exponential time"
        )
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as exc:
        raise InvalidArgumentError(f"module-name pattern {pattern[:80]!r}: {exc}") from None


def layer_index(name: str, layers_pattern) -> int | None:
    """Decoder-layer index in a module name (PEFT's rule), or None.

    Without a pattern the first ``<something>.<digits>.`` component pair is used; with one, the
    digits after ``<pattern>.``.
    """
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    parts = name.split(".")
    # `<...>.<pattern>.<digits>.<...>`: the config's pattern matches whole dotted components, in
    # linear time (see fullmatch); the leftmost digits component wins, as with PEFT's re.match.
    for pattern in patterns:
        for j in range(len(parts) - 2):
            if parts[j + 1].isdigit() and any(
                fullmatch(pattern, ".".join(parts[k : j + 1])) for k in range(j + 1)
            ):
                return int(parts[j + 1])
    return None


def _is_excluded(name: str, config: LoraConfig) -> bool:
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if fullmatch(ex, name):
                return True
        elif _name_matches_list(name, ex):
            return True
    for m in config.modules_to_save or []:
        if fullmatch(rf"(?:.*\.)?(?:{m})(?:\..*)?", name):
            return True
    return False


def _target_matches(name: str, config: LoraConfig) -> bool:
    tm = config.target_modules
    if isinstance(tm, str):
        return fullmatch(tm, name)
    if name in tm:
        return True
    if not any(name.endswith("." + t) for t in tm):
        return False
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    idx = layer_index(name, config.layers_pattern)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def resolve_all_linear(model: nn.Module) -> list[str]:
    """Full names of every linear-like module except the output head."""
    head = output_head_name(model)
    return [name for name, m in _skip_adapter_internals(model) if name and is_linear_like(m) and name != head]


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules ``config`` adapts, in ``named_modules`` order.

    Args:
        model: the (unwrapped) transformers model.
        config: the adapter settings; ``target_modules == "all-linear"`` is resolved here.

    Returns:
        The list of module names to wrap with :class:`~rslora_fast.peft.layer.LoraLinear`.

    Raises:
        ValueError: if nothing matches (the message lists the model's linear leaf names), if a
            matched module is not a linear layer, or if ``layers_to_transform`` names a layer the
            model does not have.
    """
    wanted = config.layers_to_transform
    if wanted is not None and not (isinstance(wanted, list) and not wanted):
        present = sorted(
            {
                i
                for name, m in model.named_modules()
                if is_linear_like(m) and (i := layer_index(name, config.layers_pattern)) is not None
            }
        )
        asked = [wanted] if isinstance(wanted, int) else wanted
        bad = [i for i in asked if i not in present]
        if bad:
            rng = f"0..{present[-1]}" if present else "none found"
            raise ValueError(
                f"layers_to_transform={wanted!r} names layer(s) {bad} that the model does not have "
                f"(layer indices present: {rng}; layers_pattern={config.layers_pattern!r})"
            )

    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        names = [n for n in resolve_all_linear(model) if not _is_excluded(n, config)]
        if not names:
            raise ValueError("target_modules='all-linear' found no linear layers in the model")
        return names

    out: list[str] = []
    not_linear: list[str] = []
    for name, module in _skip_adapter_internals(model):
        if not name or _is_excluded(name, config) or not _target_matches(name, config):
            continue
        if is_linear_like(module):
            out.append(name)
        elif any(True for _ in module.parameters(recurse=False)):
            not_linear.append(f"{name} ({type(module).__name__})")
    if not_linear:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched modules that are not linear layers: "
            f"{not_linear}; LoRA here supports nn.Linear and 4-bit linear layers only "
            "(put embeddings or heads in modules_to_save to train them in full)"
        )
    if not out:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of the model "
            f"(layers_to_transform={config.layers_to_transform!r}, exclude_modules={config.exclude_modules!r}); "
            f"the model's linear layer names are: {linear_leaf_names(model)}"
        )
    return out


def pattern_value(patterns: dict, name: str, default):
    """Per-module override from ``rank_pattern`` / ``alpha_pattern`` (first regex whose match ends the name)."""
    for key, value in patterns.items():
        if fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default
