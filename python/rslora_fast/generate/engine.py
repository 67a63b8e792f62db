"""The fast decode engine: a static KV cache and the per-token step captured as one CUDA graph.

:class:`FastEngine` reads the weights of a llama, mistral, qwen2, qwen3, gemma, gemma 2 or gemma 3
(text) causal LM (plain or wrapped by :func:`rslora_fast.get_peft_model`, 16-bit or 4-bit) straight
from its modules and runs its decoder without the transformers forward:

* **prefill** runs the prompts ``[B, T]`` through the training path's fused ops under ``no_grad``
  (``lora_linears`` for the projections, our RMSNorm / RoPE / SwiGLU / GeGLU ops, torch SDPA with a
  causal, left-padding and sliding-window mask) and writes each layer's rotated K and V into cache
  slots ``0..T-1``;
* **step** appends one token per row: every row writes the same cache slot (rows are left-padded,
  so slot ``s`` holds each row's token ``s - pads``), attends over all ``max_length`` slots with a
  mask of the valid ones, and returns the float32 logits. The projections run through
  :class:`~rslora_fast.generate.matvec.ProjectionGroup` (q/k/v as one group, gate/up as one).

On CUDA the whole step (embedding to logits, every layer) is captured once per batch-size bucket
(1, 2, 4, ... up to ``max_batch``; a smaller batch is padded up to its bucket) and replayed per
token. The step reads its token, positions, slot and valid-slot mask from device buffers that the
graph itself advances, so one graph serves every position and a replay needs no host work beyond
copying the tokens in. On CPU the same step runs eagerly.

GPU memory: the cache (one INFO line states its bytes), a few per-row state buffers, the cos/sin
tables, and the graphs' shared memory pool. The model is never changed; LoRA stays unmerged, and
:meth:`FastEngine.refresh_adapters` copies the adapters' current weights into the groups (in place,
so the graphs keep reading them) before each generation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..ops.geglu import geglu
from ..ops.lora_linear import lora_linears
from ..ops.rms_norm import rms_norm
from ..ops.rope import apply_rope_
from ..ops.swiglu import swiglu
from .matvec import ProjectionGroup

logger = logging.getLogger(__name__)

# config.model_type -> the class-name prefix of its attention / norm modules
_FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
}
# gemma 2/3: a norm on the attention output and two around the MLP ("sandwich" layers)
_SANDWICH = ("gemma2", "gemma3_text")
_QK_NORM = ("qwen3", "gemma3_text")  # RMSNorm over each head of q and k before RoPE
# transformers' activation name -> None (SiLU: SwiGLU) or the gelu approximation (GeGLU)
_ACTIVATIONS = {"silu": None, "swish": None, "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# rope types whose cos/sin do not depend on the sequence length seen so far (dynamic NTK and
# longrope rescale once the sequence grows: a table built once would differ from the model's)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------ what qualifies
def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (a PeftModel's wrapped model, or itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _unwrap(module: nn.Module) -> nn.Module:
    """The module in use behind a ``modules_to_save`` wrapper (the module itself otherwise)."""
    return getattr(module, "active_module", module) if hasattr(module, "modules_to_save") else module


def _projection_why_not(layer: object, name: str) -> str | None:
    """Why ``layer`` cannot be read by a ProjectionGroup (None when it can)."""
    from ..peft.layer import LoraLinear
    from ..quant.linear4bit import Linear4bit

    if not isinstance(layer, nn.Module):
        return f"{name} is missing"
    base = layer.base_layer if isinstance(layer, LoraLinear) else layer
    if "base_layer" in base._modules:
        return f"{name} is a {type(layer).__name__} (only rslora_fast's LoraLinear adapters are read)"
    if type(base) is nn.Linear:
        return None
    if isinstance(base, Linear4bit) and base.quant_state is not None:
        return None
    kind = f"{type(base).__module__}.{type(base).__name__}"
    return f"{name} is a {kind} (expected torch.nn.Linear or rslora_fast's Linear4bit)"


def _is_gemma_norm(norm: object) -> bool:
    """Gemma's RMSNorm: ``x_hat * (1 + w)`` in float32, epsilon named ``eps``."""
    return type(norm).__name__.startswith("Gemma")


def _norm_why_not(norm: object, prefix: str, name: str) -> str | None:
    if type(norm).__name__ != f"{prefix}RMSNorm":
        return f"{name} is a {type(norm).__name__}, not {prefix}RMSNorm"
    eps = "eps" if _is_gemma_norm(norm) else "variance_epsilon"
    if not isinstance(getattr(norm, eps, None), float):
        return f"{name} has no float {eps} (unknown transformers layout)"
    return None


def _layer_norms(family: str) -> tuple[str, ...]:
    if family in _SANDWICH:
        return (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        )
    return ("input_layernorm", "post_attention_layernorm")


def _layer_why_not(layer: nn.Module, family: str, i: int) -> str | None:
    prefix = _FAMILIES[family]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(attn).__name__ != f"{prefix}Attention":
        return f"layer {i}'s attention is a {type(attn).__name__}, not {prefix}Attention"
    for attr in ("head_dim", "scaling"):
        if not isinstance(getattr(attn, attr, None), (int, float)):
            return f"layer {i}'s attention has no {attr} (unknown transformers layout)"
    checks = [_projection_why_not(getattr(attn, p, None), f"layer {i} {p}") for p in _ATTN]
    checks += [_projection_why_not(getattr(mlp, p, None), f"layer {i} {p}") for p in _MLP]
    checks += [_norm_why_not(getattr(layer, n, None), prefix, f"layer {i} {n}") for n in _layer_norms(family)]
    if family in _QK_NORM:
        checks += [
            _norm_why_not(getattr(attn, n, None), prefix, f"layer {i} {n}") for n in ("q_norm", "k_norm")
        ]
    return next((c for c in checks if c is not None), None)


def _model_why_not(lm: nn.Module) -> str | None:
    """Reasons that concern the whole model (family, activation, rope, placement)."""
    config = getattr(lm, "config", None)
    family = getattr(config, "model_type", None)
    if family not in _FAMILIES:
        return f"model type {family!r} is not one of {sorted(_FAMILIES)}"
    decoder = getattr(lm, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if getattr(decoder, attr, None) is None:
            return f"{type(lm).__name__}.model has no {attr} (unknown transformers layout)"
    act_attr = _activation_attr(family)
    if getattr(config, act_attr, None) not in _ACTIVATIONS:
        return f"{act_attr}={getattr(config, act_attr, None)!r} (the engine runs SiLU- and GELU-gated MLPs)"
    rope = getattr(decoder.rotary_emb, "rope_type", None)
    for kind in rope.values() if isinstance(rope, dict) else (rope,):
        if kind not in _STATIC_ROPE:
            return f"rope type {kind!r} is not reproduced (supported: {', '.join(_STATIC_ROPE)})"
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention=True (the engine decodes causally)"
    embed = _unwrap(decoder.embed_tokens)
    if type(embed) is not nn.Embedding and not (
        type(embed).__name__.endswith("ScaledWordEmbedding")
        and isinstance(embed, nn.Embedding)
        and isinstance(getattr(embed, "embed_scale", None), torch.Tensor)
    ):
        return f"embed_tokens is a {type(embed).__name__}, not nn.Embedding"
    if embed.weight.dtype not in _DTYPES:
        return f"embedding dtype {embed.weight.dtype} (expected float32, float16 or bfloat16)"
    norms = {m.weight.dtype for m in lm.modules() if type(m).__name__.endswith("RMSNorm")}
    if norms - {embed.weight.dtype}:
        kinds = ", ".join(sorted(map(str, norms)))
        return f"norm weights in {kinds} beside a {embed.weight.dtype} embedding (one dtype expected)"
    params = [p for p in lm.parameters()]
    if any(p.is_meta for p in params) or len({p.device for p in params}) != 1:
        return "the model's weights are not all on one device (device_map offload or sharding)"
    if any(hasattr(m, "_hf_hook") for m in lm.modules()):
        return "the model has accelerate hooks (device_map dispatch)"
    return None


def _activation_attr(family: str) -> str:
    """The config attribute naming the MLP activation (gemma 2/3 renamed it)."""
    return "hidden_activation" if family in _SANDWICH else "hidden_act"


def why_not_fast(model: nn.Module) -> str | None:
    """Why ``model`` cannot use :class:`FastEngine` (None when it can)."""
    lm = _causal_lm(model)
    reason = _model_why_not(lm)
    if reason is not None:
        return reason
    family = lm.config.model_type
    for i, layer in enumerate(lm.model.layers):
        reason = _layer_why_not(layer, family, i)
        if reason is not None:
            return reason
    head = lm.get_output_embeddings() if callable(getattr(lm, "get_output_embeddings", None)) else None
    reason = _projection_why_not(_unwrap(head) if head is not None else None, "lm_head")
    if reason is not None:
        return reason
    return _norm_why_not(lm.model.norm, _FAMILIES[family], "the final norm")


# ------------------------------------------------------------------------------ the plan
@dataclass
class _Norm:
    weight: torch.Tensor
    eps: float
    gemma: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, gemma=self.gemma)


def _norm(module: nn.Module | None) -> _Norm | None:
    if module is None:
        return None
    gemma = _is_gemma_norm(module)
    return _Norm(module.weight, float(module.eps if gemma else module.variance_epsilon), gemma)


@dataclass
class _Layer:
    """One decoder layer: its modules (prefill), its projection groups (step), its shape."""

    attn: tuple[nn.Module, ...]  # q, k, v, o
    mlp: tuple[nn.Module, ...]  # gate, up, down
    input_norm: _Norm
    attn_out_norm: _Norm | None  # gemma 2/3: on the attention output, before the residual
    ffn_norm: _Norm
    ffn_out_norm: _Norm | None  # gemma 2/3: on the MLP output, before the residual
    q_norm: _Norm | None
    k_norm: _Norm | None
    act: str | None  # None: SwiGLU; else GeGLU with this gelu approximation
    qkv: ProjectionGroup
    o: ProjectionGroup
    gate_up: ProjectionGroup
    down: ProjectionGroup
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int | None  # sliding window (keys with slot > query slot - window), None for full
    softcap: float | None  # attention-score soft-capping (gemma 2 outside SDPA)
    rope: str | None  # key of the rotary table (gemma 3: the layer type)


def _window(attn: nn.Module, family: str) -> int | None:
    """The sliding window transformers applies to this layer (mistral: the config's; qwen2/3: the
    layer's own, set on sliding-attention layers only)."""
    w = (
        getattr(attn.config, "sliding_window", None)
        if family == "mistral"
        else getattr(attn, "sliding_window", None)
    )
    return int(w) if isinstance(w, int) and w > 0 else None


def _softcap(attn: nn.Module, family: str) -> float | None:
    """Gemma 2's attention soft-cap where transformers applies it: every attention function but
    SDPA (which has no such argument and drops it); Gemma 3 stores one but never passes it."""
    cap = getattr(attn, "attn_logit_softcapping", None) if family == "gemma2" else None
    if cap is None or getattr(attn.config, "_attn_implementation", None) == "sdpa":
        return None
    return float(cap)


def _plan_layer(layer: nn.Module, i: int, family: str, dtype: torch.dtype) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    sandwich = family in _SANDWICH
    qk_norm = family in _QK_NORM
    layer_types = getattr(attn.config, "layer_types", None)
    projs = tuple(getattr(attn, p) for p in _ATTN)
    ffn = tuple(getattr(mlp, p) for p in _MLP)
    head_dim = int(attn.head_dim)
    heads = projs[0].out_features // head_dim
    kv_heads = projs[1].out_features // head_dim
    return _Layer(
        attn=projs,
        mlp=ffn,
        input_norm=_norm(layer.input_layernorm),
        attn_out_norm=_norm(layer.post_attention_layernorm) if sandwich else None,
        ffn_norm=_norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm),
        ffn_out_norm=_norm(layer.post_feedforward_layernorm) if sandwich else None,
        q_norm=_norm(attn.q_norm) if qk_norm else None,
        k_norm=_norm(attn.k_norm) if qk_norm else None,
        act=_ACTIVATIONS[getattr(attn.config, _activation_attr(family))],
        qkv=ProjectionGroup.from_modules(projs[:3], dtype),
        o=ProjectionGroup.from_modules(projs[3:], dtype),
        gate_up=ProjectionGroup.from_modules(ffn[:2], dtype),
        down=ProjectionGroup.from_modules(ffn[2:], dtype),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scaling=float(attn.scaling),
        window=_window(attn, family),
        softcap=_softcap(attn, family),
        rope=layer_types[i] if family == "gemma3_text" else None,
    )


def _buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: powers of two below ``max_batch``, and ``max_batch``."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
    return (*sizes, max_batch)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, -inf elsewhere (what SDPA makes of a boolean mask). The rows are laid out
    16 elements apart, as the GPU's memory-efficient attention wants them (else it pads a copy)."""
    *lead, width = allowed.shape
    padded = torch.zeros((*lead, -(-width // 16) * 16), dtype=dtype, device=allowed.device)
    return padded[..., :width].masked_fill_(~allowed, float("-inf"))


def _residual(x: torch.Tensor, y: torch.Tensor, norm: _Norm | None) -> torch.Tensor:
    return x + (y if norm is None else norm(y))


def _gated(g: torch.Tensor, u: torch.Tensor, act: str | None) -> torch.Tensor:
    return swiglu(g, u) if act is None else geglu(g, u, act)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """Attention of ``q [B, H, Tq, D]`` over ``k``/``v`` ``[B, H, Tk, D]`` with an additive mask.
    With a soft-cap, transformers' eager formula (scores capped as ``cap * tanh(s / cap)`` before
    the mask, softmax in float32); without, SDPA."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _prefill_attention(
    lay: _Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Prompt attention; ``mask`` None means plain causal (SDPA's causal kernels)."""
    if lay.softcap is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=lay.scaling,
            enable_gqa=lay.heads != lay.kv_heads,
        )
    group = lay.heads // lay.kv_heads
    if mask is None:
        t = q.shape[2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _attention(q, k, v, _additive(mask, q.dtype), lay.scaling, lay.softcap)


def _fingerprint(lm: nn.Module) -> tuple:
    """What the engine's plan depends on besides weight values: which module sits at each
    projection, its adapter switches, and where the embedding lives (device, dtype, address)."""
    layers = lm.model.layers
    owners = [(lay.self_attn, _ATTN) for lay in layers] + [(lay.mlp, _MLP) for lay in layers]
    mods = [getattr(o, n, None) for o, names in owners for n in names]
    mods.append(_unwrap(lm.get_output_embeddings()))
    w = _unwrap(lm.model.embed_tokens).weight
    switches = tuple((id(m), getattr(m, "disabled", None), getattr(m, "merged", None)) for m in mods)
    return switches, w.device, w.dtype, w.data_ptr()


def _embedding_table(embed: nn.Embedding, device: torch.device) -> torch.Tensor:
    """The input embedding table readable on ``device`` (offload_embedding keeps it in host memory)."""
    from ..models.host_embedding import device_table

    table = device_table(embed, device)
    if table is None:
        raise InvalidArgumentError(
            f"FastEngine: the input embedding lives on {embed.weight.device} and {device} cannot read it "
            "directly (offload_embedding without a device alias)"
        )
    return table


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"FastEngine: {name} must be a positive int, got {value!r}")
    return value


# ------------------------------------------------------------------------------ the engine
class FastEngine:
    """Implements :class:`rslora_fast.generate.base.Engine` for the llama, qwen and gemma families.

    Args:
        model: the causal LM (or a :class:`~rslora_fast.PeftModel` around one); read, never changed.
        max_batch: the most rows a prefill may hold.
        max_length: cache slots per row: the longest prompt (with its left padding) plus the tokens
            generated after it.

    Raises:
        InvalidArgumentError: ``max_batch`` / ``max_length`` are not positive ints, or the model does
            not qualify (the message is :func:`why_not_fast`'s reason).

    ``cuda_graphs=False`` runs the CUDA step eagerly (the same math; for tests and debugging).
    """

    def __init__(
        self, model: nn.Module, max_batch: int, max_length: int, *, cuda_graphs: bool = True
    ) -> None:
        self.max_batch = _positive_int(max_batch, "max_batch")
        self.max_length = _positive_int(max_length, "max_length")
        self.buckets = _buckets(self.max_batch)
        self._model = model
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._batch = 0  # rows of the current prefill (0: none yet)
        self._length = 0  # slots used by the current rows (host copy of the device slot)
        self._want_graphs = bool(cuda_graphs)
        self._plan()

    def _plan(self) -> None:
        """Read the model's modules: layers, groups, norms, rotary tables (again after it changed)."""
        reason = why_not_fast(self._model)
        if reason is not None:
            raise InvalidArgumentError(f"FastEngine cannot run this model: {reason}")
        lm = _causal_lm(self._model)
        decoder = lm.model
        embed = _unwrap(decoder.embed_tokens)
        self.dtype = embed.weight.dtype
        self.device = decoder.norm.weight.device  # the embedding table may live in host memory
        self.embed = _embedding_table(embed, self.device)
        family = lm.config.model_type
        # never inference tensors: the engine is written in place later, maybe outside inference mode
        with torch.no_grad(), torch.inference_mode(False):
            # gemma: the embedding is scaled (by sqrt(hidden), rounded to the model dtype)
            scale = getattr(embed, "embed_scale", None)
            self.embed_scale = None if scale is None else scale.to(self.device, self.dtype)
            self.layers = [
                _plan_layer(layer, i, family, self.dtype) for i, layer in enumerate(decoder.layers)
            ]
            self.final_norm = _norm(decoder.norm)
            self.lm_head = ProjectionGroup.from_modules([_unwrap(lm.get_output_embeddings())], self.dtype)
            self.rope = {
                key: self._rope_table(decoder.rotary_emb, key) for key in {lay.rope for lay in self.layers}
            }
        cap = getattr(lm.config, "final_logit_softcapping", None)
        self.logit_softcap = float(cap) if cap else None
        self._windows = sorted({lay.window for lay in self.layers if lay.window is not None})
        self._fingerprint = _fingerprint(lm)
        self.cuda_graphs = self._want_graphs and self.device.type == "cuda"

    # -------------------------------------------------------------- building blocks
    def _rope_table(self, rotary: nn.Module, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[max_length, head_dim]`` from the model's own rotary module, positions 0..L-1
        (gemma 3: the table of one layer type)."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        positions = torch.arange(self.max_length, device=self.device).unsqueeze(0)
        extra = () if layer_type is None else (layer_type,)
        cos, sin = rotary(probe, positions, *extra)
        head_dim = self.layers[0].head_dim
        if cos.shape[-1] != head_dim:
            raise InvalidArgumentError(
                f"FastEngine cannot run this model: its rotary table covers {cos.shape[-1]} of "
                f"{head_dim} head features (partial rotary is not reproduced)"
            )
        return cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()

    def _allocate(self) -> None:
        """The KV cache and the step's state buffers, once (until :meth:`release`)."""
        shapes = [(self.max_batch, lay.kv_heads, self.max_length, lay.head_dim) for lay in self.layers]
        kw = dict(dtype=self.dtype, device=self.device)
        # zeros, not empty: masked slots are multiplied by 0 in attention, and 0 * NaN garbage is NaN
        self._cache = [(torch.zeros(s, **kw), torch.zeros(s, **kw)) for s in shapes]
        nbytes = sum(2 * math.prod(s) for s in shapes) * self.embed.element_size()
        logger.info(
            "fast decode: KV cache of %d layers x %d rows x %d slots (%s) on %s: %.1f MiB (%d bytes)",
            len(shapes),
            self.max_batch,
            self.max_length,
            str(self.dtype).replace("torch.", ""),
            self.device,
            nbytes / 2**20,
            nbytes,
        )
        idx = dict(dtype=torch.long, device=self.device)
        self._tokens = torch.zeros(self.max_batch, **idx)
        self._positions = torch.zeros(self.max_batch, **idx)
        self._slot = torch.zeros(1, **idx)
        self._valid = torch.zeros(self.max_batch, self.max_length, dtype=torch.bool, device=self.device)
        self._slot_ids = torch.arange(self.max_length, **idx)

    def _bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    # -------------------------------------------------------------- Engine
    @torch.no_grad()
    def refresh_adapters(self) -> None:
        """Copy the adapters' current weights into every projection group (in place).

        When the model changed shape since the engine read it (adapters injected, removed, merged,
        disabled or enabled; weights moved to another device or dtype), the engine reads it again
        instead: the graphs are dropped (and the cache, on a new device or dtype) and made again
        at the next prefill.
        """
        if _fingerprint(_causal_lm(self._model)) != self._fingerprint:
            where = (self.device, self.dtype)
            self._graphs.clear()
            self._batch = self._length = 0
            self._plan()
            if (self.device, self.dtype) != where:
                self.release()
            return
        for lay in self.layers:
            for group in (lay.qkv, lay.o, lay.gate_up, lay.down):
                group.refresh_adapters()
        self.lm_head.refresh_adapters()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts ``[B, T]``, fill cache slots ``0..T-1``, return ``[B, V]``
        float32 logits of each row's last position."""
        rows, length = self._check_prompt(input_ids, attention_mask)
        if self._cache is None:
            with torch.inference_mode(False):  # written in place by later calls, in any mode
                self._allocate()
        bucket = self._bucket(rows)
        if self.cuda_graphs and bucket not in self._graphs:
            # before the prompt is written: the warm-up runs write cache slot 0 and the state
            self._graphs[bucket] = self._capture(bucket)
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).bool()
        logits = self._prefill_layers(ids, mask)
        self._positions.zero_()
        self._positions[:rows] = mask.sum(-1)
        self._slot.fill_(length)
        self._valid.zero_()
        self._valid[:rows, :length] = mask
        self._tokens.zero_()
        self._batch, self._length = rows, length
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens [B]`` (one per row of the last prefill), return the next ``[B, V]`` logits."""
        if self._batch == 0 or self._cache is None:
            raise InvalidArgumentError("FastEngine.step: call prefill first (no prompt in the cache)")
        if tokens.dim() != 1 or tokens.shape[0] != self._batch:
            raise InvalidArgumentError(
                f"FastEngine.step: tokens must be [{self._batch}] (one per prompt row), got {tuple(tokens.shape)}"
            )
        if self._length >= self.max_length:
            raise InvalidArgumentError(
                f"FastEngine.step: the cache is full ({self.max_length} slots); build the engine "
                "with a larger max_length"
            )
        bucket = self._bucket(self._batch)
        self._tokens[: self._batch].copy_(tokens, non_blocking=True)
        if bucket in self._graphs:
            graph, out = self._graphs[bucket]
            graph.replay()
        else:
            out = self._step(bucket)
        self._length += 1
        return out[: self._batch].clone()

    def release(self) -> None:
        """Free the cache and the graphs (the next prefill allocates and captures them again)."""
        self._graphs.clear()
        self._pool = None
        self._cache = None
        self._batch = self._length = 0

    # -------------------------------------------------------------- prefill
    def _check_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[int, int]:
        if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise InvalidArgumentError(
                "FastEngine.prefill: input_ids and attention_mask must both be [batch, length], got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        rows, length = input_ids.shape
        if not 1 <= rows <= self.max_batch:
            raise InvalidArgumentError(
                f"FastEngine.prefill: {rows} rows; this engine takes 1 to {self.max_batch}"
            )
        if not 1 <= length <= self.max_length:
            raise InvalidArgumentError(
                f"FastEngine.prefill: prompt length {length}; this engine takes 1 to {self.max_length}"
            )
        return rows, length

    def _prefill_mask(self, mask: torch.Tensor, window: int | None) -> torch.Tensor:
        """``[B, 1, T, T]`` bool: key j is seen by query i when j <= i, j is a real token and (with a
        window) j > i - window. Each query also sees itself, so a padding row is never empty."""
        t = mask.shape[1]
        i = torch.arange(t, device=mask.device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed = allowed & (i[None, :] > i[:, None] - window)
        allowed = allowed[None, None] & mask[:, None, None, :]
        return allowed | torch.eye(t, dtype=torch.bool, device=mask.device)

    def _prefill_layers(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, length = ids.shape
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        rope = {key: (cos[positions], sin[positions]) for key, (cos, sin) in self.rope.items()}  # [B, T, D]
        # without padding, a window no shorter than the prompt masks nothing beyond causality: SDPA
        # then takes its causal kernels (flash) instead of reading a mask (one host sync per prompt)
        plain = bool(mask.all())
        masks = {
            w: None if plain and (w is None or w >= length) else self._prefill_mask(mask, w)
            for w in (None, *self._windows)
        }
        x = self._embed(ids)
        for lay, (k_cache, v_cache) in zip(self.layers, self._cache):
            h = lay.input_norm(x)
            q, k, v = lora_linears(h, lay.attn[:3])
            q = self._heads(q.view(rows, length, lay.heads, lay.head_dim), lay.q_norm)
            k = self._heads(k.view(rows, length, lay.kv_heads, lay.head_dim), lay.k_norm)
            v = v.view(rows, length, lay.kv_heads, lay.head_dim).transpose(1, 2)
            apply_rope_(q, k, *rope[lay.rope])
            k_cache[:rows, :, :length] = k
            v_cache[:rows, :, :length] = v
            o = _prefill_attention(lay, q, k, v, masks[lay.window])
            (o,) = lora_linears(o.transpose(1, 2).reshape(rows, length, -1), lay.attn[3:])
            x = _residual(x, o, lay.attn_out_norm)
            g, u = lora_linears(lay.ffn_norm(x), lay.mlp[:2])
            (d,) = lora_linears(_gated(g, u, lay.act), lay.mlp[2:])
            x = _residual(x, d, lay.ffn_out_norm)
        return self._logits(x[:, -1])

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        return x if self.embed_scale is None else x * self.embed_scale

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, head, gemma's logit soft-cap (in the model dtype, as transformers), float32."""
        (logits,) = self.lm_head(self.final_norm(x))
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.float()

    @staticmethod
    def _heads(x: torch.Tensor, norm: _Norm | None) -> torch.Tensor:
        """``[B, T, H, D]`` -> per-head normalized (Qwen3) ``[B, H, T, D]``."""
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)

    # -------------------------------------------------------------- the step
    def _step_masks(self, valid: torch.Tensor) -> dict[int | None, torch.Tensor]:
        """``[b, 1, 1, L]`` additive masks (0 or -inf, model dtype) of the slots the new token sees:
        the valid ones (and, per sliding window, those with slot > current slot - window). Made once
        per step, so attention does not convert a boolean mask in every layer."""
        seen = {None: valid}
        for w in self._windows:
            seen[w] = valid & (self._slot_ids > self._slot - w)
        return {w: _additive(m, self.dtype)[:, None, None, :] for w, m in seen.items()}

    def _step(self, b: int) -> torch.Tensor:
        """One token for ``b`` rows from the state buffers; advances the state. No host sync, no
        allocation outside torch's allocator: this is what the graph captures."""
        slot, positions = self._slot, self._positions[:b]
        valid = self._valid[:b]
        valid.index_fill_(1, slot, True)
        masks = self._step_masks(valid)
        rope = {  # [b, 1, D]
            key: (cos.index_select(0, positions)[:, None], sin.index_select(0, positions)[:, None])
            for key, (cos, sin) in self.rope.items()
        }
        x = self._embed(self._tokens[:b])
        for lay, (k_cache, v_cache) in zip(self.layers, self._cache):
            q, k, v = lay.qkv(lay.input_norm(x))
            q = self._heads(q.view(b, 1, lay.heads, lay.head_dim), lay.q_norm)
            k = self._heads(k.view(b, 1, lay.kv_heads, lay.head_dim), lay.k_norm)
            apply_rope_(q, k, *rope[lay.rope])
            k_cache = k_cache[:b]
            v_cache = v_cache[:b]
            k_cache.index_copy_(2, slot, k)
            v_cache.index_copy_(2, slot, v.view(b, lay.kv_heads, 1, lay.head_dim))
            # grouped-query attention without repeating K/V: each KV head's query heads form the
            # query "sequence" of that head (one query token per head)
            group = lay.heads // lay.kv_heads
            qg = q.reshape(b, lay.kv_heads, group, lay.head_dim)
            o = _attention(qg, k_cache, v_cache, masks[lay.window], lay.scaling, lay.softcap)
            (o,) = lay.o(o.reshape(b, lay.heads * lay.head_dim))
            x = _residual(x, o, lay.attn_out_norm)
            g, u = lay.gate_up(lay.ffn_norm(x))
            (d,) = lay.down(_gated(g, u, lay.act))
            x = _residual(x, d, lay.ffn_out_norm)
        logits = self._logits(x)
        positions.add_(1)
        slot.add_(1)
        return logits

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up ``_step(b)`` on a side stream, then capture it into one graph (shared pool).

        The warm-up runs really execute: they write cache slot 0 and advance the state, which the
        caller (prefill, before it writes the prompt) overwrites afterwards.
        """
        self._slot.zero_()
        self._positions.zero_()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(b)
                self._slot.zero_()
                self._positions.zero_()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(b)
        return graph, out
