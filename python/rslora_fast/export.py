"""Export a LoRA-trained model: the adapter, a merged 16-bit model, or a bitsandbytes-layout 4-bit model.

``save_method="merged_16bit"`` folds ``scaling * B @ A`` into each adapted weight. For a 4-bit base
the merge happens on the *dequantized* 4-bit weight (the weight the model was trained against), so
the export computes what the trained 4-bit + LoRA model computes, not "original weights + delta".

``save_method="merged_4bit"`` folds the update in the same way and quantizes each adapted weight
again (NF4/FP4 with its layer's settings), writing bitsandbytes' serialized layout (see
:func:`save_4bit`, which is also what ``model.save_pretrained`` runs on a model that
:func:`rslora_fast.loading.from_pretrained` loaded in 4 bits).

The live model is never modified: the state dict is built tensor by tensor, one shard at a time
(only one shard's tensors are ever dense on the host at once), straight from the adapted modules.
Every folder is written through :func:`rslora_fast.atomic.atomic_dir`: a failure mid-save leaves the
previous export as it was.
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

from .atomic import atomic_dir
from .peft.layer import LoraLinear, ModulesToSaveWrapper
from .quant.linear4bit import is_4bit_linear

__all__ = [
    "SAVE_METHODS",
    "iter_entries",
    "merged_state_dict_plan",
    "parse_shard_size",
    "save_4bit",
    "save_pretrained_merged",
]

log = logging.getLogger(__name__)

#: Accepted ``save_method`` values.
SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# Files a model export owns inside its folder (others, e.g. a tokenizer, are kept on a re-save).
MODEL_FILES = ("model*.safetensors", _INDEX, "config.json", "generation_config.json")
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


def _visit_own_tensors(module: nn.Module, prefix: str, plain, visit) -> None:
    """``module``'s own parameters and persistent buffers to ``plain``, then its children to ``visit``."""
    for name, p in module._parameters.items():
        if p is not None:
            plain(prefix + name, p)
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            plain(prefix + name, b)
    for name, child in module._modules.items():
        if child is not None:
            visit(child, prefix + name + ".")


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
        _visit_own_tensors(module, prefix, plain, visit)

    visit(inner, "")
    return entries


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


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model is saved in by default: the one it was loaded in.

    ``config.dtype`` (recorded at load; a later ``model.float()``, e.g. by a trainer on a machine
    without bf16, does not change it), else the input embedding's dtype, else float32. LoRA and
    ``modules_to_save`` copies are kept in float32 for training and never decide it.
    """
    inner = _inner_model(model)
    cfg = getattr(inner, "config", None)
    for attr in ("dtype", "torch_dtype"):
        d = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(d, str):
            d = getattr(torch, d.removeprefix("torch."), None)
        if isinstance(d, torch.dtype) and d.is_floating_point:
            return d
    get_in = getattr(inner, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if isinstance(emb, ModulesToSaveWrapper):
        emb = emb.original_module
    w = getattr(emb, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32


# ------------------------------------------------------------------------- 4-bit (bitsandbytes) plan
@dataclass
class _Group:
    """Tensors written together (one module's 4-bit state, or one plain tensor), made on demand."""

    nbytes: int
    make: Callable[[], dict[str, torch.Tensor]]


def _bnb_nbytes(n: int, blocksize: int, nested: bool) -> int:
    """Bytes of one weight in bitsandbytes' layout (packed codes, scales, tables; JSON not counted)."""
    nblocks = -(-n // blocksize)
    scales = nblocks + 4 * (-(-nblocks // 256)) + 4 * 256 if nested else 4 * nblocks
    return (n + 1) // 2 + scales + 4 * 16


def _bnb_tensors(prefix: str, packed: torch.Tensor, state: Any) -> dict[str, torch.Tensor]:
    from .quant.linear4bit import _packed_bytes

    packed = _packed_bytes(packed, state)
    return {k: _host(v) for k, v in state.as_bnb_dict(prefix, packed).items()}


def _plan_4bit(
    model: nn.Module, dtype: torch.dtype, quantize_dense: bool, settings: dict[str, Any]
) -> tuple[list[_Group], list[str]]:
    """The groups of a bitsandbytes-layout checkpoint, and the linears left dense.

    4-bit layers are written as they are stored (same bytes). An adapted layer is merged
    (``W + scaling * B @ A``, ``W`` dequantized) and quantized again with its base layer's settings
    (``settings`` for a dense base). With ``quantize_dense`` every other dense linear except the
    output head is quantized too; otherwise it stays dense (and is listed so loaders keep it so).
    Plain tensors are cast to ``dtype``; a tensor shared by several modules appears once.
    """
    from .quant.functional import quantize_4bit

    inner = _inner_model(model)
    get_out = getattr(inner, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    head = head.modules_to_save if isinstance(head, ModulesToSaveWrapper) else head
    groups: list[_Group] = []
    dense: list[str] = []
    seen: set[int] = set()

    def plain(key: str, t: torch.Tensor) -> None:
        if id(t) in seen:
            return
        seen.add(id(t))
        if t.device.type == "meta":
            raise ValueError(f"cannot save {key}: the tensor is on the meta device")
        d = dtype if t.is_floating_point() else t.dtype
        nbytes = t.numel() * torch.empty((), dtype=d).element_size()
        groups.append(_Group(nbytes, lambda k=key, t=t, d=d: {k: _host(t).to(d)}))

    def stored(prefix: str, layer: nn.Module) -> None:
        state = layer.quant_state
        n = layer.in_features * layer.out_features
        groups.append(
            _Group(
                _bnb_nbytes(n, state.blocksize, state.nested),
                lambda p=prefix, m=layer: _bnb_tensors(p, m.weight, m.quant_state),
            )
        )

    def requantized(prefix: str, base: nn.Module, lora: LoraLinear | None) -> None:
        if is_4bit_linear(base):
            q = {
                "blocksize": base.blocksize,
                "quant_type": base.quant_type,
                "compress_statistics": base.compress_statistics,
            }
        else:
            q = settings

        def make(p=prefix, base=base, lora=lora, q=q) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                w = _dense_weight_f32(base)
                if lora is not None and not lora.merged:
                    w = w + lora.get_delta_weight().to(w.device)
                packed, state = quantize_4bit(w.to(dtype).contiguous(), **q)
            return _bnb_tensors(p, packed, state)

        n = base.in_features * base.out_features
        groups.append(_Group(_bnb_nbytes(n, q["blocksize"], q["compress_statistics"]), make))

    def linear(prefix: str, base: nn.Module, lora: LoraLinear | None) -> None:
        if lora is None and is_4bit_linear(base):
            stored(prefix, base)
        elif is_4bit_linear(base) or (quantize_dense and base is not head):
            requantized(prefix, base, lora)
        elif lora is None:  # stays dense, as it is (a tied head is written once, with the embedding)
            dense.append(prefix.rstrip("."))
            plain(prefix + "weight", base.weight)
        else:  # stays dense: merged in 16 bits as merged_16bit does
            dense.append(prefix.rstrip("."))

            def make(base=base, lora=lora, key=prefix + "weight") -> dict[str, torch.Tensor]:
                with torch.no_grad():
                    w = _dense_weight_f32(base)
                    if not lora.merged:
                        w = w + lora.get_delta_weight().to(w.device)
                return {key: _host(w.to(dtype))}

            nbytes = base.in_features * base.out_features * torch.empty((), dtype=dtype).element_size()
            groups.append(_Group(nbytes, make))
        if getattr(base, "bias", None) is not None:
            plain(prefix + "bias", base.bias)

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, LoraLinear):
            linear(prefix, module.base_layer, module)
        elif isinstance(module, ModulesToSaveWrapper):
            visit(module.modules_to_save, prefix)
        elif is_4bit_linear(module) or isinstance(module, nn.Linear):
            linear(prefix, module, None)
        else:
            _visit_own_tensors(module, prefix, plain, visit)

    visit(inner, "")
    return groups, dense


def _quantization_config(
    inner: nn.Module, dtype: torch.dtype, settings: dict[str, Any], dense: list[str]
) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for a bitsandbytes 4-bit checkpoint."""
    first = next((m for m in inner.modules() if is_4bit_linear(m)), None)
    quant_type = first.quant_type if first is not None else settings["quant_type"]
    double = first.compress_statistics if first is not None else settings["compress_statistics"]
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double),
        "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(set(dense)) or None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


# ------------------------------------------------------------------------- writing a model folder
def _pack(groups: list[_Group], limit: int) -> list[list[_Group]]:
    shards: list[list[_Group]] = [[]]
    size = 0
    for g in groups:
        if shards[-1] and size + g.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += g.nbytes
    return shards


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy any tensor whose memory another tensor of the shard already uses (safetensors refuses them).

    The 16- and 256-entry code tables of 4-bit layers are one tensor in memory; bitsandbytes writes
    them once per layer, so do we.
    """
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if ident in seen and t.numel() else t
        seen.add(ident)
    return out


def _write_model_folder(
    folder: Path, inner: nn.Module, groups: list[_Group], limit: int, cfg: Any, tokenizer: Any = None
) -> None:
    """Shards (+ index), ``config.json``, ``generation_config.json`` (and the tokenizer) into ``folder``."""
    from safetensors.torch import save_file

    shards = _pack(groups, limit)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = _SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for g in shard:
            tensors.update(g.make())
        tensors = _unshared(tensors)
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
        log.info("wrote %s (%d/%d)", fname, i + 1, n)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    cfg.save_pretrained(str(folder))
    gen = getattr(inner, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(folder))
        except Exception as exc:  # a generation config is optional; a bad one must not lose the weights
            log.warning("generation_config not saved: %s", exc)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


_DEFAULT_4BIT = {"blocksize": 64, "quant_type": "nf4", "compress_statistics": True}


def save_4bit(
    model: nn.Module,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    quantize_dense: bool | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write a model in bitsandbytes' pre-quantized 4-bit layout, loadable by transformers + bitsandbytes.

    Every 4-bit layer is written with its own quant state, as bitsandbytes serializes it:
    ``P.weight`` (packed uint8 codes), ``P.weight.absmax``, ``P.weight.quant_map``, and with double
    quantization ``P.weight.nested_absmax`` / ``P.weight.nested_quant_map``, plus
    ``P.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``: the JSON state as uint8 bytes).
    ``config.json`` gets a bitsandbytes ``quantization_config`` (linears kept dense are listed in
    ``llm_int8_skip_modules``). LoRA layers are merged and quantized again with their base layer's
    settings. :func:`rslora_fast.loading.from_pretrained` and ``transformers`` (with bitsandbytes)
    load the folder. The folder is replaced atomically (other files in it are kept).

    Args:
        model: a transformers model (or our PeftModel) with 4-bit layers.
        save_directory: output folder.
        max_shard_size: bytes or a string like ``"5GB"``.
        dtype: dtype of the dense tensors, the compute dtype recorded and the original dtype of
            re-quantized weights; default :func:`model_dtype`.
        quantize_dense: also quantize dense linears (not the output head) with NF4, blocksize 64,
            double quantization; default: only when the model has no 4-bit layer.
        tokenizer: saved in the same folder, in the same atomic step.

    Returns:
        The output folder.

    Raises:
        ValueError: bad ``max_shard_size``, a tensor still on the meta device.
    """
    limit = parse_shard_size(max_shard_size)
    inner = _inner_model(model)
    dtype = dtype or model_dtype(model)
    has4 = any(is_4bit_linear(m) for m in inner.modules())
    if quantize_dense is None:
        quantize_dense = not has4
    groups, dense = _plan_4bit(model, dtype, quantize_dense, _DEFAULT_4BIT)
    cfg = _export_config(inner, dtype, _ties_broken(inner))
    cfg.quantization_config = _quantization_config(inner, dtype, _DEFAULT_4BIT, dense)
    out = Path(save_directory)
    with atomic_dir(out, owned=MODEL_FILES) as tmp:
        _write_model_folder(tmp, inner, groups, limit, cfg, tokenizer)
    return out


def save_pretrained_merged(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Save a LoRA-trained model as an adapter, a merged 16-bit or a merged 4-bit checkpoint.

    Args:
        model: a :class:`~rslora_fast.PeftModel` (4-bit or 16-bit base); for the merged methods a
            transformers model with LoRA / 4-bit layers works too.
        save_directory: output folder (created if missing; replaced atomically, files that are not
            part of the export, e.g. a README, are kept).
        tokenizer: saved alongside when given.
        save_method: ``"merged_16bit"``: ``W + scaling * B @ A`` folded into every adapted weight
            (4-bit weights dequantized first, so the result computes what the trained model
            computes), every 4-bit layer written as a dense weight, sharded safetensors +
            ``config.json`` without ``quantization_config`` + ``generation_config.json``, loadable by
            plain ``transformers.AutoModelForCausalLM.from_pretrained``. ``"merged_4bit"``: the same
            merge, then every adapted weight quantized again (its base layer's settings; NF4 for a
            16-bit base, whose other linears except the output head are quantized too), written in
            bitsandbytes' 4-bit layout (:func:`save_4bit`). ``"lora"``: the adapter in PEFT format
            (``adapter_config.json`` + ``adapter_model.safetensors``).
        max_shard_size: largest shard, in bytes or a string like ``"5GB"`` / ``"500MiB"``;
            several shards come with ``model.safetensors.index.json``.
        dtype: dtype of every floating tensor written; default: the dtype the model was loaded in
            (:func:`model_dtype`), so a bf16 model is saved in bf16 even after training cast it.

    Returns:
        The output folder.

    Raises:
        ValueError: unknown ``save_method`` (the message lists the accepted ones) or bad
            ``max_shard_size``; ``"lora"`` on a model without an adapter.
        TypeError: a 4-bit layer that cannot be dequantized.
    """
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method must be one of {list(SAVE_METHODS)}, got {save_method!r}")
    limit = parse_shard_size(max_shard_size)
    out = Path(save_directory)
    if save_method == "lora":
        if not (hasattr(model, "peft_config") and callable(getattr(model, "save_pretrained", None))):
            raise ValueError("save_method='lora' needs a PeftModel (the model has no adapter to save)")
        model.save_pretrained(out)
        if tokenizer is not None:
            with atomic_dir(out, owned=()) as tmp:  # beside the adapter, whose files are kept
                tokenizer.save_pretrained(str(tmp))
    elif save_method == "merged_4bit":
        save_4bit(model, out, limit, dtype, tokenizer=tokenizer)
    else:
        _save_merged(model, out, limit, dtype or model_dtype(model), tokenizer)
    return out


def _save_merged(model: nn.Module, out: Path, limit: int, dtype: torch.dtype, tokenizer: Any) -> None:
    inner = _inner_model(model)
    groups = [_Group(e.nbytes, lambda e=e: {e.key: e.make()}) for e in merged_state_dict_plan(model, dtype)]
    # A tied head trained apart from the embedding (modules_to_save) is written under its own name
    # by the plan; the config must then say the two are no longer tied.
    cfg = _export_config(inner, dtype, _ties_broken(inner))
    with atomic_dir(out, owned=MODEL_FILES) as tmp:
        _write_model_folder(tmp, inner, groups, limit, cfg, tokenizer)


def iter_entries(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` of the merged export one tensor at a time (host, final dtype)."""
    for e in merged_state_dict_plan(model, dtype):
        yield e.key, e.make()
