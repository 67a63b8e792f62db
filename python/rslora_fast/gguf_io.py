"""GGUF (llama.cpp / Ollama) export of a LoRA-trained model, and reading GGUF checkpoints back.

Export (:func:`save_pretrained_gguf`) merges the adapter into the weights with the same
tensor-by-tensor plan as ``save_pretrained_merged`` (``export.merged_state_dict_plan``: 4-bit bases
are dequantized first), renames each tensor with the ``gguf`` package's own name tables
(``gguf.get_tensor_name_map``), applies llama.cpp's per-family conventions, converts it to the
requested GGML type with ``gguf.quants`` and streams it into the file: only one tensor is dense on
the host at a time. The tokenizer (tokens, merges or scores, special token ids, chat template) goes
into the metadata through the ``gguf`` package's vocab readers.

llama.cpp's conventions, which transformers' GGUF reader undoes on load:

- llama / mistral: the rows of ``q_proj`` / ``k_proj`` are reordered per head from the "rotate
  half" layout to the interleaved-pairs layout llama.cpp's RoPE uses; mistral is written as the
  ``llama`` architecture (as llama.cpp's converter does; sliding-window attention is not recorded).
- gemma family: RMSNorm weights are stored as ``1 + w`` (Gemma's norm multiplies by ``1 + w``).
- 1-D tensors (norms, biases) are always float32; a matrix whose rows do not split into the
  quantization block size is written in 16 bits instead.

Import (:class:`GGUFSource`) is the GGUF implementation of the loader's tensor source: names,
shapes and dtypes from the header, then one tensor at a time dequantized with ``gguf.dequantize``
(the file is memory-mapped; nothing else stays on the host).

The ``gguf`` package is the optional extra ``rslora-fast[gguf]``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_file
from .errors import RsloraError

__all__ = [
    "GGUF_FAMILIES",
    "QUANTIZATION_METHODS",
    "GGUFDependencyError",
    "save_pretrained_gguf",
]

log = logging.getLogger(__name__)

#: ``quantization_method`` -> GGML tensor type name. Only types the ``gguf`` package can write
#: in-process (k-quants such as q4_k_m need llama.cpp's C quantizer).
QUANTIZATION_METHODS = {
    "f32": "F32",
    "f16": "F16",
    "bf16": "BF16",
    "q8_0": "Q8_0",
    "q5_1": "Q5_1",
    "q5_0": "Q5_0",
    "q4_1": "Q4_1",
    "q4_0": "Q4_0",
}
# Unsloth's names for the same choices.
_ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0"}

# llama.cpp's file-type code for each method (the "general.file_type" key).
_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
}


@dataclass(frozen=True)
class _Family:
    arch: str  # llama.cpp architecture name
    permute_qk: bool  # q/k rows reordered for llama.cpp's RoPE layout
    norm_plus_one: bool  # RMSNorm weight stored as 1 + w
    head_dim_key: (
        str  # how the head size is recorded: "rope" (rope.dimension_count) or "kv" (key/value_length)
    )


#: transformers ``model_type`` -> how llama.cpp stores that family.
GGUF_FAMILIES = {
    "llama": _Family("llama", True, False, "rope"),
    "mistral": _Family("llama", True, False, "rope"),
    "qwen2": _Family("qwen2", False, False, "rope"),
    "qwen3": _Family("qwen3", False, False, "kv"),
    "phi3": _Family("phi3", False, False, "rope"),
    "gemma": _Family("gemma", False, True, "kv"),
    "gemma2": _Family("gemma2", False, True, "kv"),
    "gemma3_text": _Family("gemma3", False, True, "kv"),
}


class GGUFDependencyError(RsloraError, ImportError):
    """The optional ``gguf`` package is not installed."""


def import_gguf():
    """The ``gguf`` package, or a :class:`GGUFDependencyError` saying which extra to install."""
    try:
        import gguf
    except ImportError as exc:
        raise GGUFDependencyError(
            "GGUF export/import needs the 'gguf' package: pip install 'rslora-fast[gguf]' (or pip install gguf)"
        ) from exc
    return gguf


def _method(quantization_method: str) -> str:
    key = str(quantization_method).lower()
    key = _ALIASES.get(key, key)
    if key not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization_method {quantization_method!r} is not supported; accepted: "
            f"{sorted(QUANTIZATION_METHODS) + sorted(_ALIASES)} (k-quants such as 'q4_k_m' need llama.cpp's "
            "llama-quantize: export 'f16' and run it on the result)"
        )
    return key


# ----------------------------------------------------------------------------------- the config
def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):
        if "rope_theta" in params:
            return float(params["rope_theta"])
        full = params.get("full_attention")  # per-layer-type parameters (gemma 3)
        if isinstance(full, dict) and "rope_theta" in full:
            return float(full["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def _check_rope(cfg: Any) -> None:
    """Only plain RoPE is written; a scaled one would silently give a different model."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kinds = [params] if "rope_type" in params or "type" in params else list(params.values())
    for p in kinds:
        if isinstance(p, dict):
            kind = p.get("rope_type", p.get("type", "default"))
            if kind not in ("default", None):
                raise ValueError(
                    f"GGUF export: RoPE scaling {kind!r} is not supported yet (only unscaled RoPE)"
                )


def _head_dim(cfg: Any) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else int(cfg.hidden_size) // int(cfg.num_attention_heads)


def _write_hparams(w: Any, cfg: Any, fam: _Family, name: str) -> None:
    w.add_name(name)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_vocab_size(int(cfg.vocab_size))
    hd = _head_dim(cfg)
    if fam.head_dim_key == "rope":
        w.add_rope_dimension_count(hd)
    else:
        w.add_key_length(hd)
        w.add_value_length(hd)
    window = getattr(cfg, "sliding_window", None)
    if fam.arch in ("gemma2", "gemma3", "phi3") and window:
        w.add_sliding_window(int(window))
    for attr, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                      ("final_logit_softcapping", w.add_final_logit_softcapping)):  # fmt: skip
        v = getattr(cfg, attr, None)
        if fam.arch == "gemma2" and v is not None:
            add(float(v))


# -------------------------------------------------------------------------------- the tokenizer
def _uses_byte_level(tj: dict[str, Any]) -> bool:
    """Whether a tokenizer.json maps bytes to printable characters (GPT-2 style byte-level BPE)."""

    def has(step: Any) -> bool:
        if not isinstance(step, dict):
            return False
        kids = step.get("pretokenizers") or step.get("decoders") or []
        return step.get("type") == "ByteLevel" or any(has(k) for k in kids)

    return tj.get("model", {}).get("type") == "BPE" and (
        has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))
    )


def _byte_level_tokens(tj: dict[str, Any], gguf: Any) -> tuple[list[str], list[Any]]:
    """Token texts by id and their GGML types for a byte-level BPE tokenizer.json."""
    by_id: dict[int, str] = {int(i): t for t, i in tj["model"]["vocab"].items()}
    kinds: dict[int, Any] = {}
    for added in tj.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = (
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        )
    n = max(by_id) + 1 if by_id else 0
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [kinds.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED) for i in range(n)]
    return tokens, types


def _pre_tokenizer_name(tokenizer: Any, tj: dict[str, Any]) -> str:
    """llama.cpp's name for the text-splitting rule (``tokenizer.ggml.pre``) of a byte-level BPE.

    A tokenizer read from a GGUF file keeps the file's name (transformers' rebuilt tokenizer does
    not carry the rule itself); otherwise two unambiguous layouts are recognised, else ``default``.
    """
    kept = getattr(tokenizer, "gguf_pre_tokenizer", None)
    if isinstance(kept, str) and kept:
        return kept
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [st.get("type") for st in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own split
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"  # one token per digit, then GPT-2's split
    return "default"


def _merge_scores(tj: dict[str, Any], tokens: list[str]) -> list[float]:
    """sentencepiece-style scores: ``-rank`` of the merge that makes a token, 0 for the others.

    llama.cpp's ``llama`` tokenizer merges the adjacent pair whose result scores highest, which is
    the lowest-ranked merge of the BPE model, as the BPE model itself does.
    """
    made_by: dict[str, int] = {}
    for rank, merge in enumerate(tj.get("model", {}).get("merges", [])):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        made_by.setdefault(a + b, rank)
    return [-float(made_by[t]) - 1.0 if t in made_by else 0.0 for t in tokens]


def _write_tokenizer(w: Any, tokenizer: Any, vocab_size: int, gguf: Any) -> None:
    """Tokens, merges or scores, special ids and chat template (with the ``gguf`` package's readers).

    Byte-level BPE (GPT-2, llama 3, qwen, SmolLM) is written as llama.cpp's ``gpt2`` model with its
    merges; sentencepiece-style BPE (byte fallback, llama 2, gemma) as its ``llama`` model with
    scores, through ``gguf.vocab.LlamaHfVocab``.
    """
    import json

    with tempfile.TemporaryDirectory(prefix="rslora-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            tj = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"GGUF export: tokenizer {type(tokenizer).__name__} has no tokenizer.json (a fast tokenizer "
                f"is needed): {exc}"
            ) from exc
        if _uses_byte_level(tj):
            model_kind, scores = "gpt2", None
            tokens, types = _byte_level_tokens(tj, gguf)
        else:
            try:
                vocab = gguf.vocab.LlamaHfVocab(Path(tmp))
            except (FileNotFoundError, TypeError, ValueError, KeyError) as exc:
                raise ValueError(
                    f"GGUF export: tokenizer {type(tokenizer).__name__} ({tj.get('model', {}).get('type')}) is "
                    "neither a byte-level BPE (GPT-2 / llama 3 / qwen style) nor a sentencepiece-style BPE "
                    f"tokenizer, the two kinds GGUF metadata can describe ({exc})"
                ) from exc
            model_kind = "llama"
            entries = list(vocab.all_tokens())
            tokens = [t.decode("utf-8") for t, _, _ in entries]
            scores = _merge_scores(tj, tokens)
            types = [k for _, _, k in entries]
        for i in getattr(tokenizer, "all_special_ids", []) or []:
            if 0 <= i < len(types) and types[i] == gguf.TokenType.NORMAL:
                types[i] = gguf.TokenType.CONTROL
        if len(tokens) > vocab_size:
            raise ValueError(
                f"GGUF export: the tokenizer has {len(tokens)} tokens but the model's vocabulary only "
                f"{vocab_size} rows"
            )
        for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer (padding)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            if scores is not None:
                scores.append(-1000.0)
        w.add_tokenizer_model(model_kind)
        w.add_tokenizer_pre(_pre_tokenizer_name(tokenizer, tj) if model_kind == "gpt2" else "default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        if scores is not None:
            w.add_token_scores(scores)
        special_vocab = gguf.SpecialVocab(Path(tmp), load_merges=model_kind == "gpt2", n_vocab=len(tokens))
        special_vocab.add_to_gguf(w, quiet=True)
        if special_vocab.chat_template is None and getattr(tokenizer, "chat_template", None):
            w.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------------------------- the tensors
@dataclass
class _Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # the converted bytes/values, computed when written


def _reorder_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from (first halves, second halves) to interleaved pairs (llama.cpp's RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pick_type(shape: tuple[int, ...], want: Any, gguf: Any) -> Any:
    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32
    block = gguf.GGML_QUANT_SIZES[want][0]
    if shape[-1] % block:
        return T.BF16 if want == T.BF16 else T.F16
    return want


def _nbytes(shape: tuple[int, ...], qtype: Any, gguf: Any) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) if shape else 1
    return n // block * size


def _plan_tensors(model: nn.Module, cfg: Any, fam: _Family, want: Any, gguf: Any) -> list[_Planned]:
    from .export import merged_state_dict_plan

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == fam.arch)
    names = gguf.get_tensor_name_map(arch, int(cfg.num_hidden_layers))
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    planned: list[_Planned] = []
    unmapped: list[str] = []
    for e in merged_state_dict_plan(model, torch.float32):
        gname = names.get_name(e.key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            unmapped.append(e.key)
            continue
        heads = None
        if fam.permute_qk and ".self_attn.q_proj." in e.key:
            heads = n_head
        elif fam.permute_qk and ".self_attn.k_proj." in e.key:
            heads = n_kv
        plus_one = fam.norm_plus_one and e.key.endswith("norm.weight")
        qtype = _pick_type(e.shape, want, gguf)

        def make(e=e, heads=heads, plus_one=plus_one, qtype=qtype) -> np.ndarray:
            a = e.make().float().numpy()
            if heads is not None:
                a = _reorder_qk(a, heads)
            if plus_one:
                a = a + 1.0
            return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)

        planned.append(_Planned(gname, e.shape, qtype, make))
    if unmapped:
        raise ValueError(
            f"GGUF export: no llama.cpp name for tensor(s) {unmapped[:5]} of a {fam.arch} model "
            "(is the gguf package older than the model family?)"
        )
    return planned


# ------------------------------------------------------------------------------------- writing
def _saved_tokenizer(save_directory: str | os.PathLike) -> Any:
    """The tokenizer saved in ``save_directory``; an error saying what to pass when there is none."""
    from transformers import AutoTokenizer

    folder = Path(save_directory)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(
            f"save_pretrained_gguf needs the tokenizer (GGUF files carry their vocabulary): pass "
            f"tokenizer=, or save it into {str(folder)!r} first (e.g. save_pretrained_merged(dir, tokenizer))"
        )
    return AutoTokenizer.from_pretrained(str(folder))


def _model_name(cfg) -> str:
    """The last part of the model's name or path, without a ``.gguf`` ending (a model imported
    from a GGUF file is named by that file)."""
    name = str(getattr(cfg, "_name_or_path", "") or "").rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def save_pretrained_gguf(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    quantization_method: str = "q8_0",
    progress: bool = True,
    *,
    quantization_type: str | None = None,
) -> Path:
    """Write the merged model as one GGUF file that llama.cpp, Ollama and transformers load.

    Args:
        model: a :class:`~rslora_fast.PeftModel` (4-bit or 16-bit base) or a model from
            ``from_pretrained``; LoRA weights are merged first (4-bit weights dequantized).
        save_directory: output folder (created if missing); the file is
            ``model-<method>.gguf`` inside it.
        tokenizer: the model's tokenizer (byte-level BPE or sentencepiece-style); its vocabulary,
            merges or scores, special token ids and chat template go into the metadata. ``None``:
            the tokenizer saved in ``save_directory`` (e.g. by ``save_pretrained_merged`` just
            before, as Unsloth's Gemma 3 notebook does).
        quantization_method: ``"f16"``, ``"bf16"``, ``"f32"``, ``"q8_0"`` (default), ``"q5_1"``,
            ``"q5_0"``, ``"q4_1"`` or ``"q4_0"`` (Unsloth's ``"not_quantized"`` = f16,
            ``"fast_quantized"`` = q8_0). Norms and biases stay float32.
        progress: show a tqdm bar while tensors are written.
        quantization_type: the same as ``quantization_method`` (the name newer Unsloth notebooks
            use, e.g. ``"Q8_0"``); it wins when both are given.

    Returns:
        The path of the written file. It is written to a temporary sibling and renamed into place,
        so an interrupted export leaves any previous file intact.

    Raises:
        ValueError: unknown ``quantization_method`` (the message lists the accepted ones), a model
            family GGUF export does not support, scaled RoPE, a tokenizer GGUF cannot describe.
        GGUFDependencyError: the ``gguf`` package is missing (``pip install 'rslora-fast[gguf]'``).
    """
    from tqdm.auto import tqdm

    method = _method(quantization_type if quantization_type is not None else quantization_method)
    gguf = import_gguf()
    tokenizer = tokenizer if tokenizer is not None else _saved_tokenizer(save_directory)
    from .export import _inner_model

    cfg = _inner_model(model).config
    fam = GGUF_FAMILIES.get(getattr(cfg, "model_type", None))
    if fam is None:
        raise ValueError(
            f"GGUF export: model_type {getattr(cfg, 'model_type', None)!r} is not supported; "
            f"supported: {sorted(GGUF_FAMILIES)}"
        )
    _check_rope(cfg)
    want = gguf.GGMLQuantizationType[QUANTIZATION_METHODS[method]]
    planned = _plan_tensors(model, cfg, fam, want, gguf)

    out_dir = Path(save_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"model-{method}.gguf"
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), fam.arch)
        name = _model_name(cfg) or fam.arch
        _write_hparams(w, cfg, fam, name)
        w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[method]]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tokenizer(w, tokenizer, int(cfg.vocab_size), gguf)
        for p in planned:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype, gguf), p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in tqdm(planned, desc=f"Writing GGUF ({method})", unit="tensor", disable=not progress):
            w.write_tensor_data(p.make())
        w.close()
    log.info("wrote %s (%d tensors, %s)", path, len(planned), method)
    return path


# ------------------------------------------------------------------------------------- reading
def push_to_hub_gguf(
    model: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    quantization_method: str = "q8_0",
    *,
    quantization_type: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload what :func:`save_pretrained_gguf` writes (one ``.gguf`` file) in one Hub commit.

    The file is written to a temporary folder first (an unknown method fails before that), then
    :func:`rslora_fast.hub.push_folder` uploads it.

    Returns:
        The commit URL.

    Raises:
        ValueError: as :func:`save_pretrained_gguf` (nothing uploaded).
        rslora_fast.hub.HubUnreachableError: offline; nothing uploaded.
        rslora_fast.hub.HubError: the Hub refused the upload.
    """
    import tempfile

    from .hub import push_folder

    _method(quantization_type if quantization_type is not None else quantization_method)
    if tokenizer is None:
        raise ValueError("push_to_hub_gguf needs the tokenizer (GGUF files carry their vocabulary)")
    with tempfile.TemporaryDirectory(prefix="rslora_push_gguf_") as tmp:
        save_pretrained_gguf(
            model, tmp, tokenizer, quantization_method, progress=False, quantization_type=quantization_type
        )
        return push_folder(tmp, repo_id, private=private, token=token, commit_message=commit_message)


class GGUFFormatError(RsloraError, ValueError):
    """A GGUF file cannot be read or describes a model transformers cannot build."""


class GGUFFile:
    """One GGUF file opened once: its parsed metadata (``fields``) and its tensor table (``reader``).

    The ``gguf`` reader memory-maps the file; tensor data is only touched when a tensor is read.
    """

    def __init__(self, path: Path) -> None:
        gguf = import_gguf()
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
            self.fields = {k: f.contents() for k, f in self.reader.fields.items()}
            # The reader keeps one numpy view per array element (every token, every merge): drop them.
            self.reader.fields.clear()
        except Exception as exc:
            raise GGUFFormatError(f"cannot read GGUF file {path}: {exc}") from exc
        self.arch = self.fields.get("general.architecture")
        if not isinstance(self.arch, str):
            raise GGUFFormatError(f"{path}: no general.architecture in the GGUF metadata")

    def close(self) -> None:
        self.reader = None


# Architectures whose config is a plain key-by-key translation of the metadata (transformers' tables);
# gemma (1) has no table of its own and reads like gemma2. Others go through transformers' reader.
_PLAIN_CONFIG = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma": "gemma2",
                 "gemma2": "gemma2", "gemma3": "gemma3"}  # fmt: skip
_MODEL_TYPE = {"gemma3": "gemma3_text"}


def _config_dict(gf: GGUFFile) -> dict[str, Any]:
    """transformers config keys from the metadata, translated with transformers' own GGUF tables."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    fields = gf.fields
    model_type = gf.arch
    if gf.arch == "llama" and fields.get("general.name") == "mistral":  # transformers' convention
        model_type = "mistral"
    tables = {
        gf.arch: GGUF_CONFIG_MAPPING[_PLAIN_CONFIG[gf.arch]],
        "tokenizer": GGUF_CONFIG_MAPPING["tokenizer"],
    }
    cfg: dict[str, Any] = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}))
    cfg["tie_word_embeddings"] = "output.weight" not in {t.name for t in gf.reader.tensors}
    for key, value in fields.items():
        prefix, _, rest = key.partition(".")
        target = tables.get(prefix, {}).get(rest)
        if target is not None and target != -1 and not (gf.arch == "gemma" and target == "sliding_window"):
            cfg[target] = value
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in fields:
        cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"])
    cfg["model_type"] = _MODEL_TYPE.get(model_type, model_type)
    return cfg


def _tokenizer_dict(fields: dict[str, Any]) -> dict[str, Any]:
    from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING

    table = GGUF_TOKENIZER_MAPPING["tokenizer"]
    return {table[k[10:]]: v for k, v in fields.items() if k.startswith("tokenizer.") and k[10:] in table}


def _special_tokens(fields: dict[str, Any]) -> dict[str, str]:
    """``{"bos_token": text, ...}`` from the file's special token ids."""
    tokens = fields.get("tokenizer.ggml.tokens", [])
    out: dict[str, str] = {}
    for role in ("bos", "eos", "unk", "pad"):
        i = fields.get(f"tokenizer.ggml.{role}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            out[f"{role}_token"] = tokens[i]
    return out


def read_gguf_config_and_tokenizer(gf: GGUFFile) -> tuple[Any, Any]:
    """``(config, tokenizer)`` from a GGUF file's metadata, with transformers' GGUF tables and converters.

    The special tokens and the chat template are the file's own.

    Raises:
        GGUFFormatError: an architecture transformers cannot build a config or tokenizer for.
    """
    from transformers import AutoConfig, PreTrainedTokenizerFast
    from transformers.integrations.ggml import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    fields = gf.fields
    try:
        if gf.arch in _PLAIN_CONFIG:  # parsed once, from the fields already read
            cfg, tok_dict = _config_dict(gf), _tokenizer_dict(fields)
        else:  # transformers' reader, with its special cases
            parsed = load_gguf_checkpoint(str(gf.path), return_tensors=False)
            cfg, tok_dict = dict(parsed["config"]), parsed["tokenizer"]
        converter = cfg["model_type"]
        if gf.arch == "gemma":  # no converter of its own: gemma2's (sentencepiece) or llama's (byte BPE)
            converter = "llama" if fields.get("tokenizer.ggml.model") == "gpt2" else "gemma2"
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        fast, extra = convert_gguf_tokenizer(converter, tok_dict)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=fast, **{**extra, **_special_tokens(fields)})
    except Exception as exc:
        raise GGUFFormatError(
            f"{gf.path}: cannot build a transformers config and tokenizer for GGUF architecture {gf.arch!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    # transformers' tables omit the head size for some families (qwen3); the file records it.
    key_length = fields.get(f"{gf.arch}.attention.key_length")
    if isinstance(key_length, int) and hasattr(config, "head_dim"):
        config.head_dim = key_length
    if fields.get("tokenizer.chat_template"):
        tokenizer.chat_template = fields["tokenizer.chat_template"]
    if isinstance(fields.get("tokenizer.ggml.pre"), str):  # written back by a later GGUF export
        tokenizer.gguf_pre_tokenizer = fields["tokenizer.ggml.pre"]
    return config, tokenizer


def _gguf_to_model_names(model: nn.Module, arch: str, processor: Any) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, from one ``gguf`` name table."""
    gguf = import_gguf()
    code = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if code is None:
        raise GGUFFormatError(f"the gguf package has no tensor names for architecture {arch!r}")
    names = gguf.get_tensor_name_map(code, int(model.config.num_hidden_layers))
    out: dict[str, str] = {}
    for key in model.state_dict():
        gname = names.get_name(processor.preprocess_name(key), try_suffixes=(".weight", ".bias"))
        if gname is not None:
            out.setdefault(gname, key)
    return out


_CHUNK = 1 << 22  # elements dequantized at a time (16 MB of float32)


class GGUFSource:
    """Tensors of one GGUF file under the transformers model's names, read one at a time.

    ``header`` maps each model tensor name to ``(path, ggml type name, shape)`` from the file's
    tensor table (no data read); :meth:`get` dequantizes one tensor (``gguf.dequantize``), undoes
    llama.cpp's layout conventions (transformers' tensor processors; the Gemma 1 norm offset) and
    returns a float32 tensor that owns its memory (the file mapping is never referenced).
    ``unmapped`` lists file tensors that have no name in the model.
    """

    def __init__(self, gf: GGUFFile, model: nn.Module) -> None:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        gguf = import_gguf()
        self._gf = gf
        self._dequantize = gguf.dequantize
        self._processor = TENSOR_PROCESSORS.get(gf.arch, TensorProcessor)(config=model.config.to_dict())
        to_model = _gguf_to_model_names(model, gf.arch, self._processor)
        self._tensors: dict[str, Any] = {}
        self.header: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        self.unmapped: list[str] = []
        for t in gf.reader.tensors:
            name = to_model.get(t.name)
            if name is None:
                self.unmapped.append(t.name)
                continue
            self._tensors[name] = t
            self.header[name] = (
                gf.path,
                t.tensor_type.name,
                tuple(int(s) for s in reversed(t.shape.tolist())),
            )

    def get(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        shape = self.header[key][2]
        # Dequantized in slices of rows straight into the result (owned memory, never a view of the
        # mapping), so the largest tensor costs its float32 size, not that plus gguf's temporaries.
        out = np.empty(shape, dtype=np.float32)
        step = max(1, _CHUNK // max(1, int(np.prod(shape[1:])))) if len(shape) > 1 else max(1, shape[0])
        for i in range(0, max(1, shape[0] if shape else 1), step):
            out[i : i + step] = self._dequantize(t.data[i : i + step], t.tensor_type).reshape(
                out[i : i + step].shape
            )
        w = self._processor.process(weights=out, name=t.name).weights
        if self._gf.arch == "gemma" and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's norm weight as 1 + w
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))

    def close(self) -> None:
        """Drop the file mapping (tensors already returned own their memory)."""
        self._tensors.clear()
        self._gf.close()
