"""The frozen input embedding table in pinned host memory, with only the step's rows read by the GPU.

``offload_embedding(model)`` moves ``model.get_input_embeddings().weight`` (Llama-3-8B: 128256 x
4096 bf16 = 0.98 GiB) to page-locked host memory and keeps it there as a buffer of the same name
(``state_dict`` keys do not change; it is no longer a parameter, so ``model.device`` and
``parameters()`` see only what stays on the GPU). The embedding's forward then gathers the rows of
the step's token ids straight from that host memory:

* Pinned host memory is mapped into the GPU's address space (unified addressing), so a CUDA tensor
  can alias it. The table is exposed to torch as such a tensor (``__cuda_array_interface__`` over
  the pinned pointer) and ``F.embedding`` runs torch's own gather kernel on it: the GPU reads the
  needed rows over PCIe (tokens x hidden x 2 bytes: 32 MiB for 2 x 2048 tokens at hidden 4096),
  the host does nothing, nothing synchronizes. The alias is verified once (two rows compared with
  the host copy); where it cannot be made the rows are gathered on the host instead (the ids are
  copied to the host: one synchronization per forward; a warning says so).
* The values are the table's: forward (training and ``generate``) is bit-identical, and the table
  gets no gradient (it is frozen; a trainable embedding, e.g. in ``modules_to_save``, is refused).

Tied embeddings (``lm_head.weight is embed_tokens.weight``) are refused: the head reads the whole
table every step, so it must stay on the GPU and offloading would save nothing.
``model.to(dtype)`` converts the table where it is; ``model.to(device)`` (trainers move models)
leaves it on the host. ``restore_embedding(model)`` puts it back as a parameter on its device.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_STATE = "_rslora_host_embedding"  # on the embedding module: (the emptied parameter, its device)
_VIEWS = "_rslora_host_views"  # device -> CUDA alias of the pinned table (or None: no alias)


class HostEmbeddingWarning(UserWarning):
    """The pinned embedding table could not be read by the GPU directly: rows go through the host."""


def offload_embedding(model: nn.Module) -> int:
    """Move the frozen input embedding table of ``model`` to pinned host memory; returns the bytes freed
    on the GPU (0 when the table is on the CPU already or was offloaded before).

    Raises:
        ValueError: the embedding is not a plain ``nn.Embedding``, its table is tied to the output
            head, it trains (requires grad), or it renormalizes rows (``max_norm``).
    """
    emb = check_offloadable(model)
    if _STATE in emb.__dict__:
        return 0
    w = emb.weight
    if w.requires_grad:
        raise ValueError(
            "offload_embedding=True: the input embedding trains (its weight requires grad, e.g. "
            "'embed_tokens' in modules_to_save or full fine-tuning); only a frozen table can live on "
            "the host. Freeze it or pass offload_embedding=False"
        )
    if w.device.type != "cuda":
        logger.info("offload_embedding: the embedding table is on %s already; nothing to move", w.device)
        return 0
    freed = _move_to_host(emb, pin=True)
    logger.info(
        "offload_embedding: %s table (%.2f GiB) moved to pinned host memory; the GPU reads the step's rows",
        tuple(emb.weight.shape),
        freed / 2**30,
    )
    return freed


def _move_to_host(emb: nn.Embedding, pin: bool) -> int:
    """Replace the table parameter by a host buffer of the same name and route the forward through
    :func:`_host_embedding_forward`; returns the bytes the table held on its device."""
    w = emb.weight
    host = w.detach().to("cpu")
    host = host.pin_memory() if pin else host.clone() if host.data_ptr() == w.data_ptr() else host
    nbytes = w.numel() * w.element_size()
    # The parameter object survives, emptied (whoever holds it, e.g. a saved requires_grad list,
    # still finds it after restore_embedding); the module's `weight` is the host buffer meanwhile.
    device = w.device
    w.data = torch.empty(0, dtype=w.dtype, device=device)
    del emb._parameters["weight"]
    emb.register_buffer("weight", host)
    emb.__dict__[_STATE] = (w, device)
    emb.__dict__[_VIEWS] = {}
    emb.forward = functools.partial(_host_embedding_forward, emb)
    emb._apply = functools.partial(_apply_on_host, emb)
    return nbytes


def restore_embedding(model: nn.Module) -> None:
    """Undo :func:`offload_embedding`: the table goes back to its device as a (frozen) parameter."""
    emb = _input_embedding(model)
    if emb is None or _STATE not in emb.__dict__:
        return
    param, device = emb.__dict__.pop(_STATE)
    emb.__dict__.pop(_VIEWS, None)
    emb.__dict__.pop("forward", None)
    emb.__dict__.pop("_apply", None)
    param.data = emb._buffers.pop("weight").to(device)
    emb.weight = param


def is_offloaded(model: nn.Module) -> bool:
    """Whether ``model``'s input embedding table lives in pinned host memory (this module's doing)."""
    emb = _input_embedding(model)
    return emb is not None and _STATE in emb.__dict__


def check_offloadable(model: nn.Module) -> nn.Embedding:
    """The input embedding of ``model`` if its table may move to the host (before anything changes),
    else a ValueError naming why: not a plain ``nn.Embedding``, ``max_norm`` set, or tied to the head."""
    emb = _input_embedding(model)
    if type(emb) is not nn.Embedding:
        raise ValueError(
            f"offload_embedding=True needs a plain nn.Embedding as the input embedding, got "
            f"{type(emb).__name__}; pass offload_embedding=False for this model"
        )
    if emb.max_norm is not None:
        raise ValueError(
            "offload_embedding=True: an embedding with max_norm rewrites its table; not offloaded"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(getattr(head, "weight", None), torch.Tensor) and _same_storage(head.weight, emb.weight):
        raise ValueError(
            "offload_embedding=True: the input embedding is tied to the output head (lm_head), which "
            "reads the whole table every step, so it stays on the GPU and offloading would save "
            "nothing; pass offload_embedding=False for this model"
        )
    return emb


def _input_embedding(model: nn.Module) -> nn.Module | None:
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # a transformers model class that does not say
        return None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def _apply_on_host(self: nn.Embedding, fn, recurse: bool = True) -> nn.Embedding:
    """``nn.Module._apply`` for the offloaded embedding: ``model.to(dtype)`` converts the table,
    a device move (``model.to("cuda")``, as trainers do) leaves it in pinned host memory."""
    host = self._buffers["weight"]
    # What `fn` does, learnt on an empty tensor: a device move would copy the whole table to the
    # GPU first (and leave that block in the allocator's cache), so only its dtype is applied.
    dtype = fn(torch.empty(0, dtype=host.dtype, device=host.device)).dtype
    new = host if dtype == host.dtype else host.to(dtype)
    if new is not host and host.is_pinned():
        new = new.pin_memory()
    self._buffers["weight"] = new
    self.__dict__[_VIEWS] = {}  # aliases of the old table
    return self


def _host_embedding_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    host = self.weight
    if input.device == host.device:
        return F.embedding(input, host, self.padding_idx)
    view = _device_view(self, host, input.device)
    if view is not None:
        return F.embedding(input, view, self.padding_idx)
    # No alias of the host table on this device: gather on the host (the ids' copy synchronizes).
    rows = host.index_select(0, input.reshape(-1).to("cpu"))
    return rows.view(*input.shape, host.shape[1]).to(input.device, non_blocking=True)


def device_table(emb: nn.Embedding, device: torch.device) -> torch.Tensor | None:
    """The table as a tensor on ``device``: itself when it lives there, else the CUDA alias of the
    pinned host table (None when the GPU cannot read it directly). For code that indexes the
    table without calling the module (the decode engine's captured step)."""
    if emb.weight.device == device:
        return emb.weight
    return _device_view(emb, emb.weight, device)


def _device_view(self: nn.Embedding, host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor aliasing the pinned table on ``device`` (cached), or None where none can be made."""
    views = self.__dict__.setdefault(_VIEWS, {})
    if device not in views:
        views[device] = _make_view(host, device)
    return views[device]


class _CudaArray:
    """``__cuda_array_interface__`` over a pinned host tensor (mapped, so valid on the device)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._keep = t
        typestr = {2: "<i2", 4: "<f4"}[t.element_size()]
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "typestr": typestr,
            "data": (t.data_ptr(), False),  # torch accepts only writable arrays; we never write
            "version": 2,
            "strides": None,
        }


def _make_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        if device.type != "cuda" or not host.is_pinned() or host.element_size() not in (2, 4):
            raise RuntimeError(f"no mapped alias for a {host.dtype} table on {device}")
        raw = host.view(torch.int16) if host.element_size() == 2 else host.view(torch.float32)
        with torch.cuda.device(device):
            view = torch.as_tensor(_CudaArray(raw), device=device).view(host.dtype)
        # an alias, not a copy (a copy would put the whole table back on the GPU), and readable
        if view.device != device or view.data_ptr() != host.data_ptr():
            raise RuntimeError("torch copied the table instead of aliasing it")
        idx = torch.tensor([0, host.shape[0] - 1])
        if not torch.equal(view[idx.to(device)].cpu(), host[idx]):
            raise RuntimeError("the GPU read different values through the alias")
        return view
    except (RuntimeError, TypeError, ValueError) as exc:
        warnings.warn(
            f"offload_embedding: the GPU cannot read the pinned embedding table directly ({exc}); the "
            "step's rows are gathered on the host instead, which waits for the token ids every forward",
            HostEmbeddingWarning,
            stacklevel=4,
        )
        return None
