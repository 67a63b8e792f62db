"""Export a LoRA-trained model: the adapter alone, or a merged 16-bit model plain transformers loads.

``save_method="merged_16bit"`` folds ``scaling * B @ A`` into each adapted weight. For a 4-bit base
the merge happens on the *dequantized* 4-bit weight (the weight the model was trained against), so
the export computes what the trained 4-bit + LoRA model computes, not "original weights + delta".

The live model is never modified: the state dict is built tensor by tensor, one shard at a time
(only one shard's tensors are ever dense on the host at once), straight from the adapted modules.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .peft.layer import LoraLinear, ModulesToSaveWrapper
from .peft.targets import is_4bit_linear

__all__ = [
    "SAVE_METHODS",
    "iter_entries",
    "merged_state_dict_plan",
    "parse_shard_size",
    "save_pretrained_merged",
]

log = logging.getLogger(__name__)

#: Accepted ``save_method`` values.
SAVE_METHODS = ("merged_16bit", "lora")

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_shard_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10^9) / ``"500MiB"`` (2^20).

    Raises:
        ValueError: for a non-positive size or an unknown unit.
    """
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(size))
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size: cannot parse {size!r}; use e.g. 5GB, 500MB, 2GiB or bytes")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


@dataclass
class _Entry:
    """One tensor of the export: its key, final shape/dtype, and how to compute it on demand."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def _dense_weight_f32(layer: nn.Module) -> torch.Tensor:
    """The weight of a dense or 4-bit linear layer, in float32 (4-bit: dequantized, fresh tensor)."""
    if is_4bit_linear(layer):
        if not callable(getattr(layer, "dequantize", None)):
            raise TypeError(
                f"cannot export {type(layer).__name__}: a 4-bit layer needs a dequantize() method"
            )
        return layer.dequantize(torch.float32)
    return layer.weight.detach().float()


def _weight_dtype(layer: nn.Module) -> torch.dtype:
    """The 16-bit (dense) dtype a linear layer's exported weight takes."""
    if is_4bit_linear(layer):
        return getattr(layer, "compute_dtype", None) or torch.get_default_dtype()
    return layer.weight.dtype


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def merged_state_dict_plan(model: nn.Module, dtype: torch.dtype | None = None) -> list[_Entry]:
    """The export's tensors in the order of ``model.state_dict()``, each computed only when asked.

    ``model`` is a :class:`~rslora_fast.PeftModel` or a transformers model holding LoRA / 4-bit
    layers. Keys are the transformers model's own (no ``base_model.model.`` prefix, no
    ``base_layer`` / ``lora_*``). Adapted weights are ``W + scaling * B @ A`` (``W`` dequantized for
    4-bit bases), computed in float32 and cast to the layer's 16-bit dtype (``dtype`` overrides every
    floating tensor's dtype). ``modules_to_save`` copies replace the originals. A tensor shared by
    several modules (tied embeddings) appears once, under its first name.

    Raises:
        TypeError: for a 4-bit layer that cannot be dequantized.
    """
    inner = _inner_model(model)
    entries: list[_Entry] = []
    seen: set[int] = set()

    def plain(key: str, t: torch.Tensor) -> None:
        ident = id(t)
        if ident in seen:
            return
        seen.add(ident)
        if t.device.type == "meta":
            raise ValueError(f"cannot export {key}: the tensor is on the meta device")
        out_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        entries.append(_Entry(key, tuple(t.shape), out_dtype, lambda t=t, d=out_dtype: _host(t).to(d)))

    def linear(prefix: str, base: nn.Module, delta_of: LoraLinear | None) -> None:
        out_dtype = dtype or _weight_dtype(base)

        def make(base=base, lora=delta_of, d=out_dtype) -> torch.Tensor:
            with torch.no_grad():
                w = _dense_weight_f32(base)
                if lora is not None and not lora.merged:
                    w = w + lora.get_delta_weight().to(w.device)
                return _host(w.to(d))

        entries.append(_Entry(prefix + "weight", (base.out_features, base.in_features), out_dtype, make))
        if getattr(base, "bias", None) is not None:
            plain(prefix + "bias", base.bias)

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, LoraLinear):
            linear(prefix, module.base_layer, module)
            return
        if isinstance(module, ModulesToSaveWrapper):
            visit(module.modules_to_save, prefix)
            return
        if is_4bit_linear(module):
            linear(prefix, module, None)
            return
        for name, p in module._parameters.items():
            if p is not None:
                plain(prefix + name, p)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                plain(prefix + name, b)
        for name, child in module._modules.items():
            if child is not None:
                visit(child, prefix + name + ".")

    visit(inner, "")
    return entries


def _shards(entries: list[_Entry], limit: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _inner_model(model: nn.Module) -> nn.Module:
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        return model.base_model.model
    return model


def _export_config(inner: nn.Module, out_dtype: torch.dtype | None, untie: bool):
    cfg = copy.deepcopy(inner.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                setattr(cfg, attr, None)
    if out_dtype is not None:
        cfg.dtype = out_dtype
    if untie:
        cfg.tie_word_embeddings = False
    return cfg


def _ties_broken(inner: nn.Module) -> bool:
    """Whether a tied output head was trained apart from the input embedding (modules_to_save)."""
    if not getattr(inner.config, "tie_word_embeddings", False):
        return False
    get_out = getattr(inner, "get_output_embeddings", None)
    get_in = getattr(inner, "get_input_embeddings", None)
    if not (callable(get_out) and callable(get_in)):
        return False
    out, emb = get_out(), get_in()
    return isinstance(out, ModulesToSaveWrapper) or isinstance(emb, ModulesToSaveWrapper)


def save_pretrained_merged(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Save a LoRA-trained model as an adapter or as a merged 16-bit transformers checkpoint.

    Args:
        model: a :class:`~rslora_fast.PeftModel` (4-bit or 16-bit base); for ``"merged_16bit"`` a
            transformers model with LoRA / 4-bit layers works too.
        save_directory: output folder (created if missing).
        tokenizer: saved alongside when given.
        save_method: ``"merged_16bit"``: ``W + scaling * B @ A`` folded into every adapted weight
            (4-bit weights dequantized first, so the result computes what the trained model
            computes), every 4-bit layer written as a dense weight, sharded safetensors +
            ``config.json`` without ``quantization_config`` + ``generation_config.json``, loadable by
            plain ``transformers.AutoModelForCausalLM.from_pretrained``. ``"lora"``: the adapter in
            PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).
        max_shard_size: largest shard, in bytes or a string like ``"5GB"`` / ``"500MiB"``;
            several shards come with ``model.safetensors.index.json``.
        dtype: cast every floating tensor to this dtype (default: each weight keeps its 16-bit dtype;
            4-bit weights take their layer's compute dtype).

    Returns:
        The output folder.

    Raises:
        ValueError: unknown ``save_method`` or bad ``max_shard_size``; ``"lora"`` on a model without
            an adapter.
        TypeError: a 4-bit layer that cannot be dequantized.
    """
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method must be one of {list(SAVE_METHODS)}, got {save_method!r}")
    limit = parse_shard_size(max_shard_size)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)

    if save_method == "lora":
        if not (hasattr(model, "peft_config") and callable(getattr(model, "save_pretrained", None))):
            raise ValueError("save_method='lora' needs a PeftModel (the model has no adapter to save)")
        model.save_pretrained(out)
    else:
        _save_merged(model, out, limit, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _save_merged(model: nn.Module, out: Path, limit: int, dtype: torch.dtype | None) -> None:
    from safetensors.torch import save_file

    inner = _inner_model(model)
    entries = merged_state_dict_plan(model, dtype)
    # A tied head trained apart from the embedding (modules_to_save) is written under its own name
    # by the plan; the config must then say the two are no longer tied.
    untie = _ties_broken(inner)

    # Remove a previous export's shards so a reload never mixes old and new files.
    for old in list(out.glob("model-*-of-*.safetensors")) + [out / _SINGLE, out / _INDEX]:
        if old.is_file():
            old.unlink()

    shards = _shards(entries, limit)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = _SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {e.key: e.make() for e in shard}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys((e.key for e in shard), fname))
        log.info("wrote %s (%d tensors)", fname, len(shard))
    if n > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        (out / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    emb = inner.get_input_embeddings() if callable(getattr(inner, "get_input_embeddings", None)) else None
    emb_w = getattr(emb, "weight", None)
    cfg_dtype = dtype or (emb_w.dtype if isinstance(emb_w, torch.Tensor) else None)
    _export_config(inner, cfg_dtype, untie).save_pretrained(str(out))
    gen = getattr(inner, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(out))
        except Exception as exc:  # a generation config is optional; a bad one must not lose the weights
            log.warning("generation_config not saved: %s", exc)


def iter_entries(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` of the merged export one tensor at a time (host, final dtype)."""
    for e in merged_state_dict_plan(model, dtype):
        yield e.key, e.make()
