"""``from_pretrained``: build a causal LM on the ``meta`` device and stream its weights in.

Nothing is ever materialized twice. The model skeleton is created from ``config.json`` without
memory; every targeted ``nn.Linear`` becomes an empty :class:`~rslora_fast.quant.Linear4bit`
shell; then the safetensors shards are read tensor by tensor. A linear weight goes to the target
device and is quantized there as it arrives, so peak host memory stays near one tensor and peak
GPU memory near the final 4-bit model plus one dense tensor. Embeddings, norms, biases and the
output head are materialized in 16 bits (or the requested dtype).

Pre-quantized bitsandbytes checkpoints (``quantization_config.quant_method == "bitsandbytes"``)
load without bitsandbytes; :func:`save_pretrained_4bit` writes our 4-bit model in the same layout.

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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    model_name: str | os.PathLike, token: str | None, revision: str | None, cache_dir: str | None
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
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"],
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
    """Recompute non-persistent buffers (RoPE ``inv_freq``) for the real device.

    They were created on ``meta`` with the skeleton and are not in any checkpoint, so the
    owning module is constructed once more from its config on the CPU and its buffers copied.
    """
    for mod_name, mod in model.named_modules():
        metas = [b for b, t in mod._buffers.items() if t is not None and t.is_meta]
        if not metas:
            continue
        cfg = getattr(mod, "config", None) or model.config
        try:
            with torch.device("cpu"):
                fresh = type(mod)(config=cfg)
        except Exception as exc:
            raise CheckpointError(
                f"cannot materialize buffer(s) {metas} of module {mod_name!r} ({type(mod).__name__}): "
                f"they are not in the checkpoint and the module cannot be rebuilt from the config ({exc})"
            ) from exc
        for b in metas:
            t = getattr(fresh, b, None)
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(
                    f"cannot materialize buffer {mod_name}.{b}: not produced by {type(mod).__name__}"
                )
            mod._buffers[b] = t.to(device)
        for k, v in vars(fresh).items():  # plain attributes computed with them (e.g. attention_scaling)
            if not k.startswith("_") and isinstance(v, (int, float)):
                setattr(mod, k, v)


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


# --------------------------------------------------------------------------------------- loading
def from_pretrained(
    model_name: str | os.PathLike,
    max_seq_length: int = 2048,
    dtype: Any = None,
    load_in_4bit: bool = True,
    device_map: Any = None,
    token: str | None = None,
    trust_remote_code: bool = False,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    skip_modules: Iterable[str] | None = None,
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` from a local directory or a hub id, streaming the weights.

    Args:
        model_name: a local model directory (``config.json`` + safetensors) or a hub id.
        max_seq_length: recorded as ``model.max_seq_length`` and ``model.config.max_seq_length``.
        dtype: compute / 16-bit dtype; ``None`` picks bf16 on GPUs that support it, else fp16, and
            float32 on the CPU.
        load_in_4bit: quantize every ``nn.Linear`` except the output head and ``skip_modules`` to
            4 bits as it is read; ``False`` loads 16-bit weights (pre-quantized checkpoints are then
            dequantized).
        device_map: ``None``/``"auto"`` (first GPU, else CPU), a device, an index or ``{"": dev}``.
        token: hub token for private/gated repositories.
        trust_remote_code: passed to ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer``.
        blocksize, quant_type, double_quant: 4-bit settings (64, ``"nf4"``, double-quantized scales).
        skip_modules: module names (or name suffixes) kept dense.
        **kwargs: ``revision``, ``cache_dir``, ``progress`` (tqdm bar, default True).

    Returns:
        ``(model, tokenizer)``: a transformers causal LM in eval mode and its tokenizer (with a pad
        token set).

    Raises:
        CheckpointNotFoundError: missing directory, shard or hub id (offline: names the cache).
        CheckpointError: corrupt/truncated safetensors, missing tensor, shape disagreeing with config.
        QuantFormatError: unknown quant type, blocksize not allowed, malformed 4-bit state.
    """
    from .quant.linear4bit import check_quant_args

    if load_in_4bit:
        check_quant_args(blocksize, quant_type)
    progress = kwargs.pop("progress", True)
    revision, cache_dir = kwargs.pop("revision", None), kwargs.pop("cache_dir", None)
    if kwargs:
        raise TypeError(f"from_pretrained got unexpected arguments: {sorted(kwargs)}")

    root = _resolve(model_name, token, revision, cache_dir)
    device = _pick_device(device_map)
    dtype = _pick_dtype(dtype, device)
    try:
        return _load(
            root, max_seq_length, dtype, load_in_4bit, device, token, trust_remote_code,
            blocksize, quant_type, double_quant, list(skip_modules or ()), progress,
        )  # fmt: skip
    except BaseException:
        # Whatever was already placed on the GPU is unreachable now; give it back.
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise


def _load(root, max_seq_length, dtype, load_in_4bit, device, token, trust_remote_code, blocksize, quant_type,
          double_quant, skip_modules, progress):  # fmt: skip
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from .quant.functional import QuantState, check_finite_scales, dequantize_4bit, quantize_4bit
    from .quant.linear4bit import Linear4bit, check_quant_args

    if not (root / "config.json").is_file():
        raise CheckpointNotFoundError(f"no config.json in {root}")
    try:
        config = AutoConfig.from_pretrained(str(root), trust_remote_code=trust_remote_code, token=token)
    except Exception as exc:
        raise CheckpointError(f"cannot read {root / 'config.json'}: {exc}") from exc
    qcfg = _quant_config(config)
    prequant = qcfg is not None and qcfg.get("quant_method") == "bitsandbytes"
    if qcfg is not None and not (prequant and qcfg.get("load_in_4bit", False)):
        raise CheckpointError(
            f"{root / 'config.json'}: quantization_config {qcfg.get('quant_method')!r} "
            f"(load_in_8bit={qcfg.get('load_in_8bit')}) is not supported; only bitsandbytes 4-bit"
        )

    # Every check below reads headers only: fail before any weight is touched.
    files = _shard_files(root)
    header = _read_headers(files)

    tokenizer = _load_tokenizer(root, token, trust_remote_code)

    skel_cfg = copy.deepcopy(config)
    if hasattr(skel_cfg, "quantization_config"):
        del skel_cfg.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(skel_cfg, dtype=dtype, trust_remote_code=trust_remote_code)

    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    tied = bool(getattr(config, "tie_word_embeddings", False)) and out_emb is not None
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])

    # Checkpoint key -> model name (checkpoints saved from the bare base model lack its prefix).
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

    # Which linears become Linear4bit: from the checkpoint's own layout when pre-quantized.
    quant_parts: dict[str, dict[str, Any]] = {}  # model weight name -> {ckpt key: header}
    ckpt_of: dict[str, str] = {}  # model name -> ckpt key (dense tensors and 4-bit bases)
    ignored: list[str] = []
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
    if ignored:
        log.info(
            "from_pretrained: ignoring %d checkpoint tensors the model does not use: %s",
            len(ignored),
            ignored[:5],
        )

    # Replace the targeted linears with 4-bit shells.
    quantize_on_arrival: set[str] = set()
    for mod_name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or mod is out_emb:
            continue
        wname = f"{mod_name}.weight"
        if prequant:
            make4 = wname in quant_parts and load_in_4bit
        else:
            make4 = load_in_4bit and not _matches(mod_name, skip_modules)
        if not make4:
            continue
        shell = Linear4bit(
            mod.in_features, mod.out_features, bias=mod.bias is not None, compute_dtype=dtype,
            blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant, device="meta",
        )  # fmt: skip
        parent_name, _, child = mod_name.rpartition(".")
        setattr(_get_module(model, parent_name), child, shell)
        if not prequant:
            quantize_on_arrival.add(wname)

    # Expected shapes from the skeleton; check every header against them up front.
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))

    def dense_shape(name: str) -> tuple[int, ...]:
        mod_name, _, attr = name.rpartition(".")
        mod = _get_module(model, mod_name)
        if isinstance(mod, Linear4bit) and attr == "weight":
            return (mod.out_features, mod.in_features)
        t = params.get(name, buffers.get(name))
        return tuple(t.shape)

    tied_name = None
    if tied:
        tied_name = next(n for n, m in model.named_modules() if m is out_emb) + ".weight"
    for tgt, key in ckpt_of.items():
        if tgt == tied_name:
            continue
        if tgt in quant_parts:
            path = header[key][0]
            try:
                qs_key = next(k for k in quant_parts[tgt] if ".quant_state." in k)
                with safe_open(str(path), framework="pt", device="cpu") as fh:
                    meta = json.loads(bytes(fh.get_tensor(qs_key).tolist()).decode("utf-8"))
                shape = tuple(int(s) for s in meta["shape"])
                check_quant_args(int(meta["blocksize"]), meta["quant_type"])
            except QuantFormatError as exc:
                raise QuantFormatError(f"{path}: tensor {key!r}: {exc}") from exc
            except Exception as exc:
                raise CheckpointError(
                    f"{path}: tensor {key!r}: unreadable bitsandbytes quant_state ({exc})"
                ) from exc
        else:
            shape = header[key][2]
        want = dense_shape(tgt)
        if shape != want:
            raise CheckpointError(
                f"{header[key][0]}: tensor {key!r} has shape {list(shape)} but the model built from "
                f"config.json expects {list(want)} for {tgt!r}"
            )
    missing = sorted(n for n in params if n not in ckpt_of and n != tied_name and n not in quant_parts)
    missing += sorted(n for n in names - set(params) if n not in ckpt_of)
    if missing:
        raise CheckpointError(
            f"tensor(s) missing from the checkpoint in {root}: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )

    # Stream: one tensor in host memory at a time; quantize linears on the target device.
    todo: dict[Path, list[str]] = {}
    for tgt, key in ckpt_of.items():
        if tgt != tied_name:
            todo.setdefault(header[key][0], []).append(key)
    for tgt, parts in quant_parts.items():
        for key in parts:
            if key != ckpt_of[tgt]:
                todo.setdefault(header[key][0], []).append(key)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    total = sum(len(v) for v in todo.values())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path in files:
            keys = todo.get(path, [])
            if not keys:
                continue
            try:
                fh_ctx = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
            with fh_ctx as fh:
                for key in keys:
                    try:
                        t = fh.get_tensor(key)
                    except Exception as exc:
                        raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc
                    m = _AUX_RE.match(key)
                    tgt = to_model(m.group("base") if m else key)
                    if tgt in quant_parts:
                        got = pending.setdefault(tgt, {})
                        got[key] = t
                        if len(got) == len(quant_parts[tgt]):
                            _finish_prequant(model, tgt, ckpt_of[tgt], pending.pop(tgt), device, dtype, path,
                                             QuantState, dequantize_4bit, Linear4bit)  # fmt: skip
                    elif tgt in quantize_on_arrival:
                        w = t.to(device).to(dtype)
                        del t
                        try:
                            packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                          compress_statistics=double_quant)  # fmt: skip
                            check_finite_scales(state, "scales")  # NaN/inf weights: refused, named
                        except QuantFormatError as exc:
                            raise QuantFormatError(f"{path}: tensor {key!r}: {exc}") from exc
                        del w
                        mod = _get_module(model, tgt.rpartition(".")[0])
                        mod._set_quantized(packed, state)
                        mod.compute_dtype = dtype
                    else:
                        want = torch.float32 if _matches(tgt, keep_fp32) else dtype
                        t = t.to(device, want if t.is_floating_point() else None)
                        _set_tensor(model, tgt, t)
                    bar.update(1)
    if pending:
        raise CheckpointError(f"incomplete 4-bit tensors in {root}: {sorted(pending)}")

    if tied:
        out_emb.weight = in_emb.weight
    _rebuild_meta_buffers(model, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"tensor(s) not materialized after loading {root}: {left[:10]}")

    model.eval()
    model.max_seq_length = max_seq_length
    model.config.max_seq_length = max_seq_length
    model.config.dtype = dtype
    model.is_loaded_in_4bit = any(isinstance(m, Linear4bit) for m in model.modules())
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        log.warning(
            "max_seq_length=%d exceeds the model's max_position_embeddings=%d; RoPE is not rescaled",
            max_seq_length, limit,
        )  # fmt: skip
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


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
    model: nn.Module, save_directory: str | os.PathLike, max_shard_size: int = 4 << 30
) -> None:
    """Write a model loaded by :func:`from_pretrained` in bitsandbytes' pre-quantized layout.

    ``config.json`` gets a bitsandbytes ``quantization_config`` so that transformers + bitsandbytes
    (and :func:`from_pretrained`) load the directory; 4-bit weights are written as packed bytes with
    their ``absmax`` / ``quant_map`` / nested statistics / ``quant_state`` JSON, everything else as
    is. Shards of at most ``max_shard_size`` bytes are built one at a time on the host.
    """
    from safetensors.torch import save_file

    from .quant.linear4bit import Linear4bit

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    linears4 = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not linears4:
        raise ValueError("save_pretrained_4bit: the model has no Linear4bit layers")
    first = next(iter(linears4.values()))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    dense_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    sd = model.state_dict()
    # Drop tied duplicates (the output head sharing the input embedding), as transformers does.
    seen: dict[tuple[int, int], str] = {}
    for name in list(sd):
        t = sd[name]
        if t.device.type == "meta":
            raise ValueError(f"save_pretrained_4bit: {name} is still on the meta device")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen and t.numel() > 0:
            del sd[name]
        else:
            seen[ident] = name

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(sd):
        nbytes = sd[name].numel() * sd[name].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = sd[name]
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = _SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        host = {k: v.detach().to("cpu").contiguous() for k, v in shard.items()}
        save_file(host, str(out / fname), metadata={"format": "pt"})
        del host
        weight_map.update(dict.fromkeys(shard, fname))
    if n > 1:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / _INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )

    cfg = copy.deepcopy(model.config)
    compute = str(first.compute_dtype).removeprefix("torch.")
    skip = [n for n in dense_linears]
    if out_emb is not None:
        skip += [n for n, m in model.named_modules() if m is out_emb]
    cfg.quantization_config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type,
        "bnb_4bit_use_double_quant": first.compress_statistics,
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(set(skip)) or None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
    cfg.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(out))
        except Exception as exc:  # a generation config is optional
            log.warning("save_pretrained_4bit: generation_config not saved: %s", exc)
