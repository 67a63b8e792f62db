"""``from_pretrained``: build a causal LM on the ``meta`` device and stream its weights in.

Nothing is ever materialized twice. The model skeleton is created from ``config.json`` without
memory; every targeted ``nn.Linear`` becomes an empty :class:`~rslora_fast.quant.Linear4bit`
shell; then the weights are read tensor by tensor from a tensor source: safetensors shards (one
open at a time) or a GGUF file (config and tokenizer from its metadata, each tensor dequantized as
it is read; see :mod:`rslora_fast.gguf_io`). A linear weight goes to the target
device and is quantized there as it arrives, so peak host memory stays near one tensor and peak
GPU memory near the final 4-bit model plus one dense tensor. Embeddings, norms, biases and the
output head are materialized in 16 bits (or the requested dtype).

Pre-quantized bitsandbytes checkpoints (``quantization_config.quant_method == "bitsandbytes"``)
load without bitsandbytes; ``model.save_pretrained`` of a model loaded in 4 bits writes the same
layout (:func:`rslora_fast.export.save_4bit`).

Every problem with the input (missing or corrupt files, missing tensors, shapes that disagree with
the config, bad quantization settings) is checked from the safetensors headers *before* any weight
is read, and raised as :class:`CheckpointError` / :class:`CheckpointNotFoundError` (or
:class:`~rslora_fast.errors.QuantFormatError`) naming the file and the tensor. No partially
loaded model is ever returned.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import struct
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._validate import positive_int
from .errors import QuantFormatError, RsloraError

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "from_pretrained",
    "save_pretrained_4bit",
]

log = logging.getLogger(__name__)

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# bitsandbytes stores a 4-bit weight "P.weight" with these companion keys.
_AUX_RE = re.compile(
    r"^(?P<base>.+\.weight)\.(?P<part>absmax|quant_map|nested_absmax|nested_quant_map|"
    r"quant_state\.bitsandbytes__(?:nf4|fp4))$"
)
_STR_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class CheckpointError(RsloraError, ValueError):
    """A checkpoint is malformed: corrupt file, missing tensor, shape disagreeing with the config."""


class CheckpointNotFoundError(RsloraError, FileNotFoundError):
    """A model directory, shard or hub id could not be found (locally or in the hub cache)."""


# --------------------------------------------------------------------------------------- helpers
def _resolve(
    model_name: str | os.PathLike,
    token: str | None,
    revision: str | None,
    cache_dir: str | None,
    gguf_file: str | os.PathLike | None = None,
) -> Path:
    """A local directory, or a hub id downloaded (or found in the cache) with huggingface_hub."""
    p = Path(model_name).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointNotFoundError(
            f"{str(p)!r} is a file; from_pretrained expects a model directory or hub id"
        )
    name = str(model_name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise CheckpointNotFoundError(f"model directory {name!r} does not exist")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise CheckpointNotFoundError(
            f"{name!r} is not a local directory and huggingface_hub is missing"
        ) from exc
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        local = snapshot_download(
            name,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=[str(gguf_file)]
            if gguf_file is not None
            else ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"],
        )
    except Exception as exc:  # offline, unknown repo, gated repo, network error: all end here
        raise CheckpointNotFoundError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"nor found in the cache {cache!r} ({type(exc).__name__}: {exc}). Pass a local directory, "
            "or download the model first while online."
        ) from exc
    return Path(local)


def _pick_device(device_map: Any) -> torch.device:
    if isinstance(device_map, dict):
        devs = set(device_map.values())
        if set(device_map) != {""} or len(devs) != 1:
            raise ValueError(
                "device_map: only a single device is supported (e.g. {'': 0}, 'cuda:0' or 'cpu')"
            )
        device_map = devs.pop()
    if device_map is None or device_map == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    dev = torch.device(device_map)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _pick_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _STR_DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use bfloat16, float16 or float32")
        return _STR_DTYPES[key]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype {dtype!r} not supported; use torch.bfloat16, torch.float16 or torch.float32")
    return dtype


def _name_truncated_tensor(path: Path) -> str:
    """Best effort: the first tensor whose bytes lie beyond the end of a damaged file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                return ""
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__" and 8 + n + int(info["data_offsets"][1]) > size:
                return f"; tensor {name!r} extends past the end of the file ({size} bytes): truncated?"
    except Exception:  # the header itself is unreadable; the caller's message says so
        return ""
    return ""


def _shard_files(root: Path) -> list[Path]:
    index = root / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = [root / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    single = root / _SINGLE
    if single.is_file():
        return [single]
    found = sorted(root.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointNotFoundError(f"no safetensors weights in {root} (expected {_SINGLE} or {_INDEX})")


def _read_headers(files: Iterable[Path]) -> dict[str, tuple[Path, torch.dtype | str, tuple[int, ...]]]:
    """Key -> (file, dtype string, shape) for every tensor, from the headers only."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, Any, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    if key in out:
                        raise CheckpointError(f"tensor {key!r} appears in both {out[key][0]} and {path}")
                    out[key] = (path, sl.get_dtype(), tuple(int(s) for s in sl.get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:  # SafetensorError, OSError
            raise CheckpointError(
                f"cannot read safetensors file {path}: {exc}{_name_truncated_tensor(path)}"
            ) from exc
    return out


class _SafetensorsSource:
    """The tensors of a safetensors checkpoint: every header up front, then one shard open at a time.

    ``header`` maps each checkpoint key to ``(shard path, dtype string, shape)``. :meth:`reading`
    opens one shard and yields a getter; the shard's handle is closed when the block ends. With
    ``copy=True`` (tensors that stay in host memory) each tensor is copied out of the file mapping,
    so no mapping outlives its shard.
    """

    def __init__(self, root: Path) -> None:
        self.files = _shard_files(root)
        self.header = _read_headers(self.files)
        self.unmapped: list[str] = []

    @contextmanager
    def reading(self, path: Path, copy: bool) -> Iterator[Callable[[str], torch.Tensor]]:
        from safetensors import safe_open

        try:
            fh_ctx = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
        with fh_ctx as fh:

            def get(key: str) -> torch.Tensor:
                try:
                    t = fh.get_tensor(key)
                except Exception as exc:
                    raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc
                return t.clone() if copy else t

            yield get


class _GGUFSourceAdapter:
    """:class:`~rslora_fast.gguf_io.GGUFSource` behind the same interface (one file, owned tensors)."""

    def __init__(self, gf: Any, model: nn.Module) -> None:
        from .gguf_io import GGUFFormatError, GGUFSource

        try:
            self._src = GGUFSource(gf, model)
        except GGUFFormatError as exc:
            raise CheckpointError(str(exc)) from exc
        self.files = [gf.path]
        self.header = self._src.header
        self.unmapped = self._src.unmapped

    @contextmanager
    def reading(self, path: Path, copy: bool) -> Iterator[Callable[[str], torch.Tensor]]:
        def get(key: str) -> torch.Tensor:
            try:
                return self._src.get(key)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc

        try:
            yield get
        finally:
            self._src.close()


# Unused checkpoint tensors that are known to be harmless (recomputed buffers, masks, position ids).
_HARMLESS_RE = re.compile(r"(^|\.)(inv_freq|masked_bias|position_ids|rope_freqs\.weight)$|\.attn\.bias$")
# An unused tensor that looks like a model weight means the config describes a smaller model.
_WEIGHTLIKE_RE = re.compile(r"(^|\.)(layers|h|blocks|blk)\.\d+\.|\.(weight|bias)$")


def _check_unused(root: Path, ignored: list[str], n_layers: Any) -> None:
    """Unused tensors are an error unless known-harmless: the config would silently drop weights."""
    bad = [k for k in ignored if _WEIGHTLIKE_RE.search(k) and not _HARMLESS_RE.search(k)]
    if bad:
        raise CheckpointError(
            f"{root}: {len(bad)} checkpoint tensor(s) are not used by the model built from its config "
            f"(num_hidden_layers={n_layers}): {bad[:10]}{' ...' if len(bad) > 10 else ''}; the config "
            "describes a different (smaller) model than the weights"
        )


def _quant_config(config: Any) -> dict | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    return qc


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) or p in name.split(".") for p in patterns)


def _get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = _get_module(model, mod_name)
    if attr in mod._parameters:
        old = mod._parameters[attr]
        rg = old.requires_grad if old is not None else value.is_floating_point()
        mod._parameters[attr] = nn.Parameter(value, requires_grad=rg and value.is_floating_point())
    else:
        mod._buffers[attr] = value


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Give every buffer still on ``meta`` its value, as transformers' own loader does.

    Non-persistent buffers (RoPE ``inv_freq`` and Gemma 3's per-layer-type variants, Gemma's
    ``embed_scale``, ...) are in no checkpoint; the skeleton made them on ``meta`` without values.
    transformers allocates them on the device and lets the model's ``initialize_weights`` (its
    ``_init_weights``) compute them, every loaded tensor being flagged ``_is_hf_initialized`` so
    that nothing else is touched. We do the same, restricted to the modules that own such a
    buffer, and run it twice from two different fills: a buffer that comes out different was not
    computed by the model's init and is rebuilt from its module's config instead (older or remote
    code), else the load fails naming it.
    """
    owners = {
        name: mod
        for name, mod in model.named_modules()
        if any(t is not None and t.is_meta for t in mod._buffers.values())
    }
    if not owners:
        return
    metas = {n: [b for b, t in m._buffers.items() if t is not None and t.is_meta] for n, m in owners.items()}
    shapes = {(n, b): owners[n]._buffers[b] for n, bs in metas.items() for b in bs}
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            t._is_hf_initialized = True
    first = _init_buffers(model, owners, shapes, device, fill=0)
    second = _init_buffers(model, owners, shapes, device, fill=1)
    unwritten = {}
    for key, value in second.items():
        if not torch.equal(first[key], value):
            unwritten.setdefault(key[0], []).append(key[1])
    for mod_name, bufs in unwritten.items():
        _rebuild_from_config(model, mod_name, owners[mod_name], bufs, device)


def _init_buffers(model, owners, shapes, device, fill):
    """Allocate the meta buffers filled with ``fill`` and run the model's own initializer on their owners."""
    for (mod_name, b), meta in shapes.items():
        owners[mod_name]._buffers[b] = torch.full(meta.shape, fill, dtype=meta.dtype, device=device)
    owner_ids = {id(m) for m in owners.values()}
    for mod in model.modules():  # only the owners are (re)initialized; flags set by from_config go
        mod._is_hf_initialized = id(mod) not in owner_ids
    init = getattr(model, "initialize_weights", None)
    if callable(init):
        init()
    return {(n, b): owners[n]._buffers[b].clone() for n, b in shapes}


def _rebuild_from_config(model, mod_name, mod, bufs, device):
    """Fallback: construct the owning module once more from its config on the CPU; copy its buffers."""
    cfg = getattr(mod, "config", None) or model.config
    try:
        with torch.device("cpu"):
            fresh = type(mod)(config=cfg)
    except Exception as exc:
        raise CheckpointError(
            f"cannot materialize buffer(s) {bufs} of module {mod_name!r} ({type(mod).__name__}): they are "
            f"not in the checkpoint, the model's initialize_weights does not compute them and the module "
            f"cannot be rebuilt from the config ({exc})"
        ) from exc
    for b in bufs:
        t = getattr(fresh, b, None)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"cannot materialize buffer {mod_name}.{b}: not produced by {type(mod).__name__}"
            )
        mod._buffers[b] = t.to(device)


def _checked_quant_parts(base: str, parts: dict[str, tuple[Path, Any, tuple[int, ...]]]) -> None:
    """Presence checks for a bitsandbytes-serialized weight, from its header entries."""
    qs = [k for k in parts if ".quant_state.bitsandbytes__" in k]
    if not qs:
        raise CheckpointError(
            f"4-bit weight {base!r} in {parts[base][0] if base in parts else '?'} has no quant_state"
        )
    needed = [base, base + ".absmax"]
    for k in needed:
        if k not in parts:
            raise CheckpointError(f"4-bit weight {base!r}: tensor {k!r} is missing from the checkpoint")


# ------------------------------------------------------------------------------- config options
# RoPE types whose ``factor`` stretches positions; multiplying it extends the context further.
_FACTOR_ROPE_TYPES = ("linear", "yarn", "llama3")


def _rope_groups(config: Any) -> dict[str | None, dict]:
    """The RoPE parameter dicts to scale: the one global dict, or one per layer type (Gemma 3).

    Sliding-window layers never see distances beyond their window, so their RoPE is left alone.
    """
    params = getattr(config, "rope_parameters", None) or {}
    layer_types = getattr(config, "layer_types", None)
    if layer_types and not set(params).isdisjoint(layer_types):
        return {k: v for k, v in params.items() if isinstance(v, dict) and k != "sliding_attention"}
    return {None: params} if params else {}


def _check_rope_scaling(rope_scaling: Any) -> dict | None:
    """Validate an explicit ``rope_scaling=`` dict; return it with ``rope_type`` normalized."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_scaling is None:
        return None
    example = "e.g. {'rope_type': 'linear', 'factor': 2.0}"
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict ({example}), got {rope_scaling!r}")
    out = dict(rope_scaling)
    legacy = out.pop("type", None)  # the pre-5.0 spelling
    kind = out.setdefault("rope_type", legacy)
    accepted = ["default", *ROPE_INIT_FUNCTIONS]
    if kind not in accepted:
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not one of {accepted} ({example})")
    factor = out.get("factor")
    if kind in ("linear", "dynamic", "yarn", "llama3") and (
        isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1
    ):
        raise ValueError(f"rope_scaling: {kind!r} needs a numeric 'factor' >= 1, got {factor!r}")
    return out


def _apply_rope_scaling(config: Any, rope_scaling: dict) -> None:
    """Set an explicit RoPE scaling, keeping the model's base (``rope_theta``, partial rotary)."""
    groups = _rope_groups(config) or {None: {}}
    for key, old in groups.items():
        new = {k: old[k] for k in ("rope_theta", "partial_rotary_factor") if k in old}
        new.update(rope_scaling)
        if new["rope_type"] in ("yarn", "llama3", "longrope"):
            new.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        if key is None:
            config.rope_parameters = new
        else:
            config.rope_parameters[key] = new
    try:
        config.validate_rope()
    except KeyError as exc:  # transformers names the missing keys
        raise ValueError(f"rope_scaling={rope_scaling!r}: {exc.args[0]}") from exc
    log.info("from_pretrained: RoPE scaling set to %s", rope_scaling)


def _extend_rope(config: Any, max_seq_length: int) -> None:
    """Stretch RoPE so that ``max_seq_length`` fits the model's trained context.

    A model without scaling gets linear scaling by ``max_seq_length / max_position_embeddings``;
    a model with linear, YaRN or Llama-3 scaling gets its own ``factor`` multiplied by that ratio
    (``max_position_embeddings`` becomes ``max_seq_length``). Dynamic NTK scaling already extends
    itself; other types are left as they are, with a warning.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if not limit or max_seq_length <= limit:
        return
    groups = _rope_groups(config)
    kinds = {g.get("rope_type", "default") for g in groups.values()}
    if "dynamic" in kinds:
        log.info(
            "max_seq_length=%d exceeds the model's max_position_embeddings=%d; its dynamic NTK RoPE "
            "scaling extends itself (pass rope_scaling= to choose another)", max_seq_length, limit,
        )  # fmt: skip
        return
    if not groups or not kinds <= {"default", *_FACTOR_ROPE_TYPES}:
        log.warning(
            "max_seq_length=%d exceeds the model's max_position_embeddings=%d; RoPE (%s) is not rescaled: "
            "pass rope_scaling= to choose a scaling", max_seq_length, limit, sorted(kinds) or "none",
        )  # fmt: skip
        return
    ratio = max_seq_length / limit
    for group in groups.values():
        kind = group.get("rope_type", "default")
        if kind == "default":
            group.update(rope_type="linear", factor=ratio)
        elif kind in _FACTOR_ROPE_TYPES:
            group["factor"] = float(group["factor"]) * ratio
    config.max_position_embeddings = max_seq_length
    log.info(
        "max_seq_length=%d exceeds the model's max_position_embeddings=%d: RoPE scaled by %.4g (%s)",
        max_seq_length, limit, ratio, sorted(kinds),
    )  # fmt: skip


def _check_attn_implementation(value: Any) -> str | None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if value is None:
        return None
    accepted = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    # "org/name" selects an attention kernel from the Hub; transformers checks it when the model is built.
    if isinstance(value, str) and (value in accepted or "/" in value):
        return value
    raise ValueError(f"attn_implementation {value!r} is not one of {accepted} (or a Hub kernel 'org/name')")


def _apply_config_options(config: Any, max_seq_length: int, options: dict) -> None:
    """Config changes asked for by ``from_pretrained``'s keywords, made before the skeleton is built."""
    if options.get("rope_scaling") is not None:
        _apply_rope_scaling(config, options["rope_scaling"])
    elif options.get("scale_rope"):
        _extend_rope(config, max_seq_length)
    if options.get("attn_implementation") is not None:
        config._attn_implementation = options["attn_implementation"]


# --------------------------------------------------------------------------------------- loading
def from_pretrained(
    model_name: str | os.PathLike,
    max_seq_length: int | None = None,
    dtype: Any = None,
    load_in_4bit: bool | None = None,
    device_map: Any = None,
    token: str | None = None,
    trust_remote_code: bool = False,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    skip_modules: Iterable[str] | None = None,
    *,
    load_in_8bit: bool = False,
    full_finetuning: bool = False,
    rope_scaling: dict | None = None,
    attn_implementation: str | None = None,
    gguf_file: str | os.PathLike | None = None,
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` from a local directory or a hub id, streaming the weights.

    Args:
        model_name: a local model directory (``config.json`` + safetensors) or a hub id.
        max_seq_length: recorded as ``model.max_seq_length`` and ``model.config.max_seq_length``
            (2048 when left out). A value given beyond the model's ``max_position_embeddings``
            scales RoPE to reach it (linear, or the model's own scaling type with its factor
            multiplied), logged on one INFO line.
        dtype: compute / 16-bit dtype; ``None`` picks bf16 on GPUs that support it, else fp16, and
            float32 on the CPU.
        load_in_4bit: quantize every ``nn.Linear`` except the output head and ``skip_modules`` to
            4 bits as it is read; ``False`` loads 16-bit weights (pre-quantized checkpoints are then
            dequantized). ``None`` (the default) means True, or False with ``full_finetuning``.
        device_map: ``None``/``"auto"`` (first GPU, else CPU), a device, an index or ``{"": dev}``.
        token: hub token for private/gated repositories.
        trust_remote_code: passed to ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer``.
        blocksize, quant_type, double_quant: 4-bit settings (64, ``"nf4"``, double-quantized scales).
        skip_modules: module names (or name suffixes) kept dense.
        load_in_8bit: only ``False`` is accepted (there is no 8-bit path; use 4-bit or 16-bit).
        full_finetuning: load 16-bit weights, every one trainable (no LoRA needed).
        rope_scaling: explicit RoPE scaling, e.g. ``{"rope_type": "linear", "factor": 2.0}``; it
            replaces the automatic scaling from ``max_seq_length``.
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ... (what
            transformers accepts), set on the model config.
        gguf_file: read the weights, config and tokenizer from this GGUF file inside ``model_name``
            (a folder); ``model_name`` may also be the path of a ``.gguf`` file itself. Each tensor
            is dequantized as it is read (``gguf`` package: ``pip install 'rslora-fast[gguf]'``).
        **kwargs: ``revision``, ``cache_dir``, ``progress`` (tqdm bar, default True).

    Returns:
        ``(model, tokenizer)``: a transformers causal LM in eval mode and its tokenizer (with a pad
        token set).

    Raises:
        CheckpointNotFoundError: missing directory, shard or hub id (offline: names the cache).
        CheckpointError: corrupt/truncated safetensors or GGUF, missing tensor, shape disagreeing with
            config, unused tensors that look like weights (a config with fewer layers than the file).
        QuantFormatError: unknown quant type, blocksize not allowed, malformed 4-bit state.
        ValueError: a bad option (``max_seq_length``, ``load_in_8bit=True``, ``full_finetuning``
            with ``load_in_4bit=True``, ``rope_scaling``, ``attn_implementation``, ``dtype``).
        TypeError: an unknown keyword (the message lists the accepted ones).
    """
    from .quant.linear4bit import check_quant_args

    progress = kwargs.pop("progress", True)
    revision, cache_dir = kwargs.pop("revision", None), kwargs.pop("cache_dir", None)
    if kwargs:
        raise TypeError(
            f"from_pretrained got unexpected keyword argument(s) {sorted(kwargs)}; accepted: {ACCEPTED_KEYWORDS}"
        )
    scale_rope = max_seq_length is not None
    max_seq_length = 2048 if max_seq_length is None else positive_int("max_seq_length", max_seq_length)
    load_in_4bit = _pick_bits(load_in_4bit, load_in_8bit, full_finetuning)
    config_options = {
        "rope_scaling": _check_rope_scaling(rope_scaling),
        "attn_implementation": _check_attn_implementation(attn_implementation),
        "scale_rope": scale_rope,
    }
    if load_in_4bit:
        check_quant_args(blocksize, quant_type)

    root, gguf_path = _resolve_gguf(model_name, gguf_file, token, revision, cache_dir)
    device = _pick_device(device_map)
    options = _LoadOptions(
        max_seq_length=max_seq_length, dtype=_pick_dtype(dtype, device), load_in_4bit=load_in_4bit,
        device=device, token=token, trust_remote_code=trust_remote_code, blocksize=blocksize,
        quant_type=quant_type, double_quant=double_quant, skip_modules=tuple(skip_modules or ()),
        progress=progress, config_options=config_options, gguf_path=gguf_path,
    )  # fmt: skip
    try:
        model, tokenizer = _load(root, options)
    except BaseException:
        # Whatever was already placed on the GPU is unreachable now; give it back.
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise
    if full_finetuning:
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    return model, tokenizer


#: Every keyword :func:`from_pretrained` accepts (listed in the TypeError for an unknown one).
ACCEPTED_KEYWORDS = [
    "max_seq_length", "dtype", "load_in_4bit", "device_map", "token", "trust_remote_code", "blocksize",
    "quant_type", "double_quant", "skip_modules", "load_in_8bit", "full_finetuning", "rope_scaling",
    "attn_implementation", "gguf_file", "revision", "cache_dir", "progress",
]  # fmt: skip


def _pick_bits(load_in_4bit: bool | None, load_in_8bit: bool, full_finetuning: bool) -> bool:
    """Whether to load 4-bit, from the three switches (``load_in_4bit=None``: not given)."""
    if load_in_8bit:
        raise ValueError(
            "load_in_8bit=True is not supported: there is no 8-bit path. Use load_in_4bit=True (NF4, "
            "QLoRA) or load_in_4bit=False (16-bit weights, LoRA or full_finetuning=True)"
        )
    if full_finetuning:
        if load_in_4bit:
            raise ValueError(
                "full_finetuning=True trains every weight in 16 bits and cannot use load_in_4bit=True; "
                "pass load_in_4bit=False or leave it out"
            )
        return False
    return True if load_in_4bit is None else bool(load_in_4bit)


def _resolve_gguf(model_name, gguf_file, token, revision, cache_dir) -> tuple[Path, Path | None]:
    """``(model folder, GGUF file or None)``: a ``.gguf`` path, a folder + ``gguf_file``, or neither."""
    p = Path(model_name).expanduser()
    if gguf_file is None and p.is_file() and p.suffix.lower() == ".gguf":
        return p.parent, p
    root = _resolve(model_name, token, revision, cache_dir, gguf_file)
    if gguf_file is None:
        return root, None
    path = root / gguf_file
    if not path.is_file():
        found = sorted(f.name for f in root.glob("*.gguf"))
        raise CheckpointNotFoundError(
            f"GGUF file {str(path)!r} does not exist (GGUF files in {root}: {found})"
        )
    return root, path


def _read_config(root: Path, token, trust_remote_code: bool):
    from transformers import AutoConfig

    if not (root / "config.json").is_file():
        raise CheckpointNotFoundError(f"no config.json in {root}")
    try:
        return AutoConfig.from_pretrained(str(root), trust_remote_code=trust_remote_code, token=token)
    except Exception as exc:
        raise CheckpointError(f"cannot read {root / 'config.json'}: {exc}") from exc


def _open_gguf(path: Path):
    """``(open GGUF file, config, tokenizer)``: the file is parsed once and kept for the weights."""
    from .gguf_io import GGUFFile, GGUFFormatError, read_gguf_config_and_tokenizer

    try:
        gf = GGUFFile(path)
        config, tokenizer = read_gguf_config_and_tokenizer(gf)
    except GGUFFormatError as exc:
        raise CheckpointError(str(exc)) from exc
    return gf, config, _with_pad_token(tokenizer, path)


@dataclass(frozen=True)
class _LoadOptions:
    """What :func:`from_pretrained` decided, checked, for the loading steps."""

    max_seq_length: int
    dtype: torch.dtype
    load_in_4bit: bool
    device: torch.device
    token: str | None = None
    trust_remote_code: bool = False
    blocksize: int = 64
    quant_type: str = "nf4"
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ()
    progress: bool = True
    config_options: dict = field(default_factory=dict)
    gguf_path: Path | None = None


@dataclass
class _CheckpointMap:
    """Which checkpoint tensor fills which model tensor."""

    files: list[Path]
    header: dict[str, tuple[Path, Any, tuple[int, ...]]]
    to_model: Callable[[str], str | None]
    quant_parts: dict[str, dict[str, Any]]  # model weight name -> {ckpt key: header} (pre-quantized)
    ckpt_of: dict[str, str]  # model name -> ckpt key (dense tensors and 4-bit bases)
    tied_name: str | None = None  # the output head tied to the input embedding (not read)


def _load(root: Path, opts: _LoadOptions):
    """``(model, tokenizer)``: headers checked first, then one tensor in host memory at a time."""
    config, tokenizer, gfile = _read_config_and_tokenizer(root, opts)
    prequant = _is_prequantized(root, config)
    if gfile is None:  # every check below reads headers only: fail before any weight is touched
        source = _SafetensorsSource(root)
        tokenizer = _load_tokenizer(root, opts.token, opts.trust_remote_code)
    model = _meta_skeleton(config, opts)
    if gfile is not None:  # a GGUF file names its tensors after llama.cpp; the map needs the skeleton
        source = _GGUFSourceAdapter(gfile, model)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(getattr(config, "tie_word_embeddings", False)) and out_emb is not None
    cmap = _map_checkpoint(root, model, config, source, prequant)
    quantize_on_arrival = _install_4bit_shells(model, cmap, prequant, opts)
    if tied:
        cmap.tied_name = next(n for n, m in model.named_modules() if m is out_emb) + ".weight"
    _check_shapes_and_coverage(root, model, cmap)
    _stream_weights(root, model, source, cmap, quantize_on_arrival, opts)
    if tied:
        out_emb.weight = in_emb.weight
    _rebuild_meta_buffers(model, opts.device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"tensor(s) not materialized after loading {root}: {left[:10]}")
    _finish_model(model, tokenizer, opts)
    return model, tokenizer


def _read_config_and_tokenizer(root: Path, opts: _LoadOptions):
    """``(config with the options applied, tokenizer or None, open GGUF file or None)``."""
    gfile = tokenizer = None
    if opts.gguf_path is not None:
        gfile, config, tokenizer = _open_gguf(opts.gguf_path)
        # The model's name_or_path: adapters trained on it record this file as their base.
        config._name_or_path = str(Path(opts.gguf_path).resolve())
    else:
        config = _read_config(root, opts.token, opts.trust_remote_code)
    _apply_config_options(config, opts.max_seq_length, opts.config_options)
    return config, tokenizer, gfile


def _is_prequantized(root: Path, config: Any) -> bool:
    """Whether the checkpoint holds bitsandbytes 4-bit weights; any other quantization is refused."""
    qcfg = _quant_config(config)
    prequant = qcfg is not None and qcfg.get("quant_method") == "bitsandbytes"
    if qcfg is not None and not (prequant and qcfg.get("load_in_4bit", False)):
        raise CheckpointError(
            f"{root / 'config.json'}: quantization_config {qcfg.get('quant_method')!r} "
            f"(load_in_8bit={qcfg.get('load_in_8bit')}) is not supported; only bitsandbytes 4-bit"
        )
    return prequant


def _meta_skeleton(config: Any, opts: _LoadOptions) -> nn.Module:
    """The model built from its config on the meta device (no memory), without quantization_config."""
    from transformers import AutoModelForCausalLM

    skel_cfg = copy.deepcopy(config)
    if hasattr(skel_cfg, "quantization_config"):
        del skel_cfg.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            skel_cfg, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code
        )


def _model_names(model: nn.Module) -> Callable[[str], str | None]:
    """Checkpoint key -> model name (checkpoints saved from the bare base model lack its prefix)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {
        f"{m}.{b}" if m else b
        for m, mod in model.named_modules()
        for b in mod._buffers
        if b not in mod._non_persistent_buffers_set
    }
    prefix = getattr(model, "base_model_prefix", "") or ""

    def to_model(key: str) -> str | None:
        if key in names:
            return key
        if prefix and f"{prefix}.{key}" in names:
            return f"{prefix}.{key}"
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in names:
            return key[len(prefix) + 1 :]
        return None

    to_model.names = names  # type: ignore[attr-defined]  (the coverage check needs the set)
    return to_model


def _map_checkpoint(root: Path, model: nn.Module, config: Any, source, prequant: bool) -> _CheckpointMap:
    """Map every checkpoint tensor to its model tensor; 4-bit parts grouped by weight, then checked."""
    header = source.header
    to_model = _model_names(model)
    quant_parts: dict[str, dict[str, Any]] = {}
    ckpt_of: dict[str, str] = {}
    ignored: list[str] = list(source.unmapped)
    for key in header:
        m = _AUX_RE.match(key)
        base = m.group("base") if m else key
        tgt = to_model(base)
        if tgt is None:
            ignored.append(key)
            continue
        if m:
            quant_parts.setdefault(tgt, {})[key] = header[key]
        else:
            ckpt_of[tgt] = key
    for tgt in quant_parts:
        if tgt not in ckpt_of:
            raise CheckpointError(f"4-bit weight {tgt!r}: packed tensor missing from the checkpoint")
        quant_parts[tgt][ckpt_of[tgt]] = header[ckpt_of[tgt]]
        _checked_quant_parts(ckpt_of[tgt], quant_parts[tgt])
    if quant_parts and not prequant:
        raise CheckpointError(
            f"{root}: tensors carry bitsandbytes 4-bit state but config.json has no quantization_config"
        )
    _check_unused(root, ignored, getattr(config, "num_hidden_layers", None))
    if ignored:
        log.info(
            "from_pretrained: ignoring %d checkpoint tensors the model does not use: %s",
            len(ignored),
            ignored[:5],
        )
    return _CheckpointMap(source.files, header, to_model, quant_parts, ckpt_of)


def _install_4bit_shells(
    model: nn.Module, cmap: _CheckpointMap, prequant: bool, opts: _LoadOptions
) -> set[str]:
    """Replace the targeted linears with 4-bit shells; returns the weights to quantize as they arrive.

    A pre-quantized checkpoint decides from its own layout; otherwise every linear but the output
    head and ``skip_modules``.
    """
    from .quant.linear4bit import Linear4bit

    out_emb = model.get_output_embeddings()
    quantize_on_arrival: set[str] = set()
    for mod_name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or mod is out_emb:
            continue
        wname = f"{mod_name}.weight"
        if prequant:
            make4 = wname in cmap.quant_parts and opts.load_in_4bit
        else:
            make4 = opts.load_in_4bit and not _matches(mod_name, opts.skip_modules)
        if not make4:
            continue
        shell = Linear4bit(
            mod.in_features, mod.out_features, bias=mod.bias is not None, compute_dtype=opts.dtype,
            blocksize=opts.blocksize, quant_type=opts.quant_type, compress_statistics=opts.double_quant,
            device="meta",
        )  # fmt: skip
        parent_name, _, child = mod_name.rpartition(".")
        setattr(_get_module(model, parent_name), child, shell)
        if not prequant:
            quantize_on_arrival.add(wname)
    return quantize_on_arrival


def _prequant_shape(path: Path, key: str, parts: dict[str, Any]) -> tuple[int, ...]:
    """The dense shape a pre-quantized weight stands for, read from its quant_state (checked)."""
    from safetensors import safe_open

    from .quant.linear4bit import check_quant_args

    try:
        qs_key = next(k for k in parts if ".quant_state." in k)
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = json.loads(bytes(fh.get_tensor(qs_key).tolist()).decode("utf-8"))
        shape = tuple(int(s) for s in meta["shape"])
        check_quant_args(int(meta["blocksize"]), meta["quant_type"])
    except QuantFormatError as exc:
        raise QuantFormatError(f"{path}: tensor {key!r}: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: tensor {key!r}: unreadable bitsandbytes quant_state ({exc})") from exc
    return shape


def _check_shapes_and_coverage(root: Path, model: nn.Module, cmap: _CheckpointMap) -> None:
    """Every checkpoint tensor has the shape the skeleton expects; every model tensor is present."""
    from .quant.linear4bit import Linear4bit

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))

    def dense_shape(name: str) -> tuple[int, ...]:
        mod_name, _, attr = name.rpartition(".")
        mod = _get_module(model, mod_name)
        if isinstance(mod, Linear4bit) and attr == "weight":
            return (mod.out_features, mod.in_features)
        t = params.get(name, buffers.get(name))
        return tuple(t.shape)

    header = cmap.header
    for tgt, key in cmap.ckpt_of.items():
        if tgt == cmap.tied_name:
            continue
        if tgt in cmap.quant_parts:
            shape = _prequant_shape(header[key][0], key, cmap.quant_parts[tgt])
        else:
            shape = header[key][2]
        want = dense_shape(tgt)
        if shape != want:
            raise CheckpointError(
                f"{header[key][0]}: tensor {key!r} has shape {list(shape)} but the model built from "
                f"config.json expects {list(want)} for {tgt!r}"
            )
    ckpt_of, names = cmap.ckpt_of, cmap.to_model.names  # type: ignore[attr-defined]
    missing = sorted(
        n for n in params if n not in ckpt_of and n != cmap.tied_name and n not in cmap.quant_parts
    )
    missing += sorted(n for n in names - set(params) if n not in ckpt_of)
    if missing:
        raise CheckpointError(
            f"tensor(s) missing from the checkpoint in {root}: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )


def _reading_order(cmap: _CheckpointMap) -> dict[Path, list[str]]:
    """Checkpoint keys to read, per shard file (the tied head and aux-less bases read once)."""
    todo: dict[Path, list[str]] = {}
    for tgt, key in cmap.ckpt_of.items():
        if tgt != cmap.tied_name:
            todo.setdefault(cmap.header[key][0], []).append(key)
    for tgt, parts in cmap.quant_parts.items():
        for key in parts:
            if key != cmap.ckpt_of[tgt]:
                todo.setdefault(cmap.header[key][0], []).append(key)
    return todo


def _stream_weights(root, model, source, cmap: _CheckpointMap, quantize_on_arrival: set[str], opts) -> None:
    """Read every tensor once, one in host memory at a time; quantize linears on the target device."""
    from tqdm.auto import tqdm

    from .quant.functional import QuantState, dequantize_4bit
    from .quant.linear4bit import Linear4bit

    todo = _reading_order(cmap)
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    device, dtype = opts.device, opts.dtype
    pending: dict[str, dict[str, torch.Tensor]] = {}
    total = sum(len(v) for v in todo.values())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not opts.progress) as bar:
        for path in cmap.files:
            keys = todo.get(path, [])
            if not keys:
                continue
            # On the host, copy tensors out of the file mapping so that no mapping outlives its shard.
            with source.reading(path, copy=device.type == "cpu") as get:
                for key in keys:
                    t = get(key)
                    m = _AUX_RE.match(key)
                    tgt = cmap.to_model(m.group("base") if m else key)
                    if tgt in cmap.quant_parts:
                        got = pending.setdefault(tgt, {})
                        got[key] = t
                        if len(got) == len(cmap.quant_parts[tgt]):
                            _finish_prequant(model, tgt, cmap.ckpt_of[tgt], pending.pop(tgt), device, dtype,
                                             path, QuantState, dequantize_4bit, Linear4bit)  # fmt: skip
                    elif tgt in quantize_on_arrival:
                        w = t.to(device).to(dtype)
                        del t  # the host copy goes before quantizing
                        _quantize_into_shell(model, tgt, w, path, key, opts)
                        del w
                    else:
                        want = torch.float32 if _matches(tgt, keep_fp32) else dtype
                        t = t.to(device, want if t.is_floating_point() else None)
                        _set_tensor(model, tgt, t)
                    bar.update(1)
    if pending:
        raise CheckpointError(f"incomplete 4-bit tensors in {root}: {sorted(pending)}")


def _quantize_into_shell(model: nn.Module, tgt: str, w: torch.Tensor, path: Path, key: str, opts) -> None:
    """Quantize one dense weight (on the target device) into its 4-bit shell; NaN/inf refused, named."""
    from .quant.functional import check_finite_scales, quantize_4bit

    try:
        if w.is_cuda and not bool(torch.isfinite(w).all()):
            # the CUDA quantizer's max ignores NaN, so no scale would show it
            raise QuantFormatError("non-finite (NaN/inf) weight value(s)")
        packed, state = quantize_4bit(
            w, blocksize=opts.blocksize, quant_type=opts.quant_type, compress_statistics=opts.double_quant
        )
        check_finite_scales(state, "scales")  # NaN/inf weights: refused, named
    except QuantFormatError as exc:
        raise QuantFormatError(f"{path}: tensor {key!r}: {exc}") from exc
    mod = _get_module(model, tgt.rpartition(".")[0])
    mod._set_quantized(packed, state)
    mod.compute_dtype = opts.dtype


def _finish_model(model: nn.Module, tokenizer: Any, opts: _LoadOptions) -> None:
    """Eval mode, the recorded options, 4-bit save routing and the export methods."""
    from .quant.linear4bit import Linear4bit

    model.eval()
    model.max_seq_length = opts.max_seq_length
    model.config.max_seq_length = opts.max_seq_length
    model.config.dtype = opts.dtype
    model.is_loaded_in_4bit = any(isinstance(m, Linear4bit) for m in model.modules())
    if model.is_loaded_in_4bit:
        _route_save_to_4bit(model)
        model.num_parameters = types.MethodType(_num_parameters_4bit, model)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    _attach_export_methods(model)


def _num_parameters_4bit(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """transformers' ``num_parameters`` for our 4-bit models, without bitsandbytes.

    transformers imports bitsandbytes to count a model flagged ``is_loaded_in_4bit`` (HF Trainer
    calls it every step to estimate FLOPs), which fails where bitsandbytes is not installed; here a
    packed 4-bit weight counts as the ``out x in`` weights it holds.
    """
    from .quant.linear4bit import Linear4bit

    embeddings = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)}
    packed = {
        f"{n}.weight": m.out_features * m.in_features
        for n, m in self.named_modules()
        if isinstance(m, Linear4bit)
    }
    total = 0
    for name, p in self.named_parameters():
        if (exclude_embeddings and name in embeddings) or (only_trainable and not p.requires_grad):
            continue
        total += packed.get(name, p.numel())
    return total


def _attach_export_methods(model: nn.Module) -> None:
    """Unsloth-style ``model.save_pretrained_gguf(dir, tokenizer, ...)`` and ``push_to_hub_gguf``.

    The methods hold the model weakly, so attaching them creates no reference cycle.
    """
    import weakref

    from . import gguf_io

    ref = weakref.ref(model)

    def save_gguf(save_directory, tokenizer=None, quantization_method="q8_0", progress=True, **kwargs):
        return gguf_io.save_pretrained_gguf(
            ref(), save_directory, tokenizer, quantization_method, progress, **kwargs
        )

    def push_gguf(repo_id, tokenizer=None, quantization_method="q8_0", **kwargs):
        return gguf_io.push_to_hub_gguf(ref(), repo_id, tokenizer, quantization_method, **kwargs)

    save_gguf.__doc__ = gguf_io.save_pretrained_gguf.__doc__
    push_gguf.__doc__ = gguf_io.push_to_hub_gguf.__doc__
    model.save_pretrained_gguf = save_gguf
    model.push_to_hub_gguf = push_gguf


def _finish_prequant(model, tgt, wkey, parts, device, dtype, path, QuantState, dequantize_4bit, Linear4bit):
    """Build a bitsandbytes-serialized weight from its parts; keep it 4-bit or dequantize it."""
    sentinel = "__rslora_q__"
    base = wkey[: -len(".weight")]
    tensors = {sentinel + k[len(base) :]: v for k, v in parts.items()}
    try:
        packed, state = QuantState.from_bnb_dict(sentinel, tensors)
        packed, state = packed.to(device), state.to(device)
    except Exception as exc:
        raise QuantFormatError(
            f"{path}: tensor {wkey!r}: malformed bitsandbytes 4-bit state ({exc})"
        ) from exc
    mod = _get_module(model, tgt.rpartition(".")[0])
    if isinstance(mod, Linear4bit):
        mod._set_quantized(packed, state)
        mod.compute_dtype = dtype
    else:
        _set_tensor(model, tgt, dequantize_4bit(packed, state, dtype=dtype))


def _load_tokenizer(root: Path, token: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(root), token=token, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise CheckpointError(f"cannot load a tokenizer from {root}: {exc}") from exc
    return _with_pad_token(tok, root)


def _with_pad_token(tok: Any, root: Path):
    if tok.pad_token is None:
        # Padding is masked out, so any existing special token works; adding one would change the vocab.
        for cand in (tok.eos_token, tok.unk_token, tok.bos_token):
            if cand is not None:
                tok.pad_token = cand
                break
        else:
            log.warning("tokenizer in %s has no pad, eos, unk or bos token; padding will fail", root)
    return tok


# --------------------------------------------------------------------------------------- saving
def save_pretrained_4bit(
    model: nn.Module, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> Path:
    """Write a 4-bit model in bitsandbytes' pre-quantized layout (same as ``model.save_pretrained``).

    Kept for existing callers; the one implementation is :func:`rslora_fast.export.save_4bit`.
    """
    from .export import save_4bit

    return save_4bit(model, save_directory, max_shard_size)


class _Save4bit:
    """``save_pretrained`` of a model loaded in 4 bits: bitsandbytes' layout via ``export.save_4bit``.

    transformers' own ``save_pretrained`` does not know our 4-bit layers (it would write no
    ``quantization_config``, and the shared code tables stop it). Set on the instance (an object,
    not a function, so the model still deep-copies and pickles with it); transformers'
    ``push_to_hub`` calls it too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self,
        save_directory: str | os.PathLike,
        *,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        max_shard_size: int | str = "5GB",
        **kwargs: Any,
    ) -> None:
        """Write the model to ``save_directory``; other transformers keywords (``safe_serialization``,
        ``variant``...) are accepted and ignored: the output is always safetensors.

        Raises:
            TypeError: ``state_dict=`` (the 4-bit state is read from the modules) or
                ``push_to_hub=True`` (use ``model.push_to_hub``).
        """
        from .export import save_4bit

        if state_dict is not None:
            raise TypeError(
                "save_pretrained of a 4-bit model writes its modules' state; state_dict= is not supported"
            )
        if kwargs.pop("push_to_hub", False):
            raise TypeError(
                "save_pretrained(push_to_hub=True) is not supported here; call model.push_to_hub(repo_id)"
            )
        if is_main_process:
            save_4bit(self.model, save_directory, max_shard_size)


def _route_save_to_4bit(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the bitsandbytes 4-bit layout (this instance only)."""
    model.save_pretrained = _Save4bit(model)
