"""Multi-GPU training through ``torch.distributed``: DDP and FSDP2 helpers (16-bit and 4-bit bases).

Nothing here distributes anything by itself: PyTorch's DDP / FSDP2 do the work. These helpers pick
the options that fit a LoRA model, so that under ``torchrun --nproc-per-node N`` a training script
reads::

    from rslora_fast import FastLanguageModel
    from rslora_fast.distributed import init_distributed, prepare_ddp, save_adapter_rank0

    device = init_distributed()                      # process group + this rank's device
    model, tok = FastLanguageModel.from_pretrained(path, load_in_4bit=True, device_map=device)
    model = FastLanguageModel.get_peft_model(model, r=16)
    ddp = prepare_ddp(model)                         # only the LoRA weights are synchronized
    ... loop: ddp(input_ids=..., labels=...).loss.backward(); opt.step() ...
    save_adapter_rank0(ddp, "out/adapter")

or, sharding instead of replicating, ``fully_shard_lora(model)`` in place of ``prepare_ddp`` (then
build the optimizer, and call the model itself).

Why these choices:

* DDP: each rank loads (and quantizes, on its own GPU) the whole frozen base; it is deterministic,
  so every rank holds the same bytes and nothing frozen ever crosses the wire. DDP is told to
  ignore every parameter and buffer that does not require grad: its start-up broadcast then only
  covers the trainable (LoRA) weights instead of the whole model, and its reducer never saw frozen
  weights anyway.
* ``static_graph=True`` by default: a LoRA step uses the same parameters every iteration, and a
  static graph is what lets DDP accept gradients produced inside a recompute (reentrant
  checkpointing, the offloaded "unsloth" mode) without "marked ready twice" errors.
  ``find_unused_parameters`` stays ``False`` (every LoRA weight gets a gradient each step).
* FSDP2: one ``fully_shard`` unit per decoder layer plus the root, so one layer's weights are
  gathered at a time. For a 4-bit base the packed codes and the block scales (``absmax``; with
  double quantization the uint8 ``absmax`` and the float32 ``nested_absmax``) are sharded too:
  FSDP2 shards only floating Parameters and swaps them for the gathered ones around forward and
  backward, so each ``Linear4bit`` first carries its storage bytes in frozen Parameters of a
  floating dtype (the mixed-precision ``param_dtype`` when given, so FSDP2 casts nothing) and reads
  its quantization state from whatever Parameters it holds when it runs. The code tables and the
  nested offset (a few hundred bytes) stay replicated.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "dist_env",
    "frozen_state_names",
    "fully_shard_lora",
    "init_distributed",
    "local_device",
    "prepare_ddp",
    "save_adapter_rank0",
    "unwrap",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as a launcher (``torchrun``, ``accelerate``) describes it.

    Attributes:
        rank: global rank (``RANK``), 0 without a launcher.
        local_rank: rank on this host (``LOCAL_RANK``), 0 without a launcher.
        world_size: number of processes (``WORLD_SIZE``), 1 without a launcher.
    """

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that saves and logs)."""
        return self.rank == 0


def dist_env() -> DistEnv:
    """Read rank, local rank and world size from the process group, else from the launcher's env."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistEnv(dist.get_rank(), local, dist.get_world_size())
    return DistEnv(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (made current) when CUDA is available, else the CPU.

    Pass it as ``device_map`` to :func:`rslora_fast.FastLanguageModel.from_pretrained` so each rank
    loads and quantizes the base on its own GPU.

    Raises:
        RuntimeError: if ``LOCAL_RANK`` names a GPU this host does not have.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = dist_env().local_rank
    if local >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "launch at most one process per GPU"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> torch.device:
    """Join the process group the launcher described (if any) and return this rank's device.

    Without a launcher (``WORLD_SIZE`` unset or 1) no group is created and the single device is
    returned, so the same script runs on one GPU unchanged. Calling it again is harmless.

    Args:
        backend: ``None`` picks ``"nccl"`` on GPUs and ``"gloo"`` on the CPU.
        timeout_s: collective timeout in seconds (PyTorch's default when ``None``).

    Returns:
        The device this rank should load its model on (see :func:`local_device`).
    """
    device = local_device()
    if dist_env().world_size > 1 and not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend or ("nccl" if device.type == "cuda" else "gloo")}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this GPU eagerly (no guessing in barrier)
        dist.init_process_group(**kwargs)
    return device


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / ``torch.compile`` wrappers: returns the :class:`~rslora_fast.PeftModel` inside."""
    while True:
        inner = model.__dict__.get("_modules", {}).get("module")  # DDP keeps the model as .module
        if not isinstance(inner, nn.Module):
            inner = model.__dict__.get("_modules", {}).get("_orig_mod")  # torch.compile's wrapper
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def frozen_state_names(model: nn.Module) -> list[str]:
    """Names (as in ``named_parameters`` / ``named_buffers``) of everything that does not train."""
    names = [n for n, p in model.named_parameters() if not p.requires_grad]
    names += [n for n, _ in model.named_buffers()]
    return names


def prepare_ddp(
    model: nn.Module,
    device_ids: list[int] | None = None,
    *,
    static_graph: bool = True,
    find_unused_parameters: bool = False,
    **ddp_kwargs: Any,
) -> nn.parallel.DistributedDataParallel:
    """Wrap a LoRA model in ``DistributedDataParallel`` so only its trainable weights are synchronized.

    Call it after ``get_peft_model`` (checkpointing already installed) and before building the
    optimizer's view of the weights changes nothing: the wrapped parameters are the same objects.

    Args:
        model: a :class:`~rslora_fast.PeftModel` (or any module) already on this rank's device.
        device_ids: ``None`` picks ``[local rank]`` on a GPU and nothing on the CPU.
        static_graph: see the module docstring; set ``False`` only for a step whose set of used
            trainable parameters changes between iterations.
        find_unused_parameters: passed to DDP (``False``: every LoRA weight is used each step).
        **ddp_kwargs: other DDP options (``gradient_as_bucket_view``, ``bucket_cap_mb`` ...).

    Returns:
        The DDP module; ``unwrap(ddp)`` gives ``model`` back.

    Raises:
        RuntimeError: if no process group is initialized (see :func:`init_distributed`).
        ValueError: if the model has no trainable parameter.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("prepare_ddp needs an initialized process group: call init_distributed() first")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("prepare_ddp: the model has no trainable parameter (call get_peft_model first)")
    dev = next(p.device for p in model.parameters() if p.requires_grad)
    if device_ids is None and dev.type == "cuda":
        device_ids = [dev.index]
    # Frozen weights are loaded identically on every rank; keep DDP from broadcasting them.
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen_state_names(model)
    )
    ddp_kwargs.setdefault("broadcast_buffers", False)
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=device_ids,
        static_graph=static_graph,
        find_unused_parameters=find_unused_parameters,
        **ddp_kwargs,
    )


def save_adapter_rank0(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save the adapter in PEFT format from global rank 0; every rank waits until it is written.

    Under DDP every rank holds the same LoRA weights, so rank 0's copy is the adapter. Under FSDP2
    the weights are sharded: they are gathered (a collective every rank takes part in) first.

    Args:
        model: the DDP / FSDP2 / plain :class:`~rslora_fast.PeftModel`.
        save_directory: target folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        **kwargs: passed to ``PeftModel.save_pretrained``.
    """
    peft = unwrap(model)
    in_group = dist.is_available() and dist.is_initialized()
    sharded = _has_dtensor(peft)
    if sharded:
        from torch.distributed.tensor import DTensor

        # Gather the trainable shards into plain tensors on every rank (a collective), swap them in
        # for the save on rank 0, then put the shards back.
        full = {
            n: p.full_tensor().detach()
            for n, p in peft.named_parameters()
            if p.requires_grad and isinstance(p, DTensor)
        }
        if dist_env().is_main:
            _save_with_plain_params(peft, full, save_directory, **kwargs)
    elif not in_group or dist.get_rank() == 0:
        peft.save_pretrained(save_directory, **kwargs)
    if in_group:
        dist.barrier()


def _has_dtensor(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _save_with_plain_params(peft: nn.Module, full: dict[str, torch.Tensor], save_directory, **kwargs) -> None:
    saved = {}
    try:
        for name, tensor in full.items():
            owner, _, leaf = name.rpartition(".")
            mod = peft.get_submodule(owner)
            saved[name] = (mod, leaf, mod._parameters[leaf])
            mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=True)
        peft.save_pretrained(save_directory, **kwargs)
    finally:
        for mod, leaf, param in saved.values():
            mod._parameters[leaf] = param


def fully_shard_lora(
    model: nn.Module, *, reshard_after_forward: bool = True, **fsdp_kwargs: Any
) -> nn.Module:
    """Shard a LoRA model (16-bit or 4-bit base) with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Every decoder layer becomes one FSDP unit: its frozen base weights, its LoRA weights and its
    norms are sharded 1/N across ranks and all-gathered just before the layer's forward (and again
    for its backward / recompute); the root unit takes the embeddings, the final norm and the head.

    4-bit bases: each ``Linear4bit`` first gets its packed codes and block scales (``absmax``, and
    with double quantization the uint8 ``absmax`` plus the float32 ``nested_absmax``) as frozen
    Parameters of a floating carrier dtype holding the same bytes (FSDP2 shards only floating
    Parameters); the layer then dequantizes from the gathered bytes. The carrier is the
    ``mp_policy``'s ``param_dtype`` when one is given, so FSDP2 has nothing to cast (a cast would
    destroy the bytes), else each layer's compute dtype. The 16-entry code table, the 256-entry
    nested table and the nested offset stay replicated (a few hundred bytes per layer).

    Args:
        model: a :class:`~rslora_fast.PeftModel` over a transformers decoder model, on this rank's
            device (each rank loaded the whole base; the parts it does not own are freed here).
        reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3 style).
        **fsdp_kwargs: other ``fully_shard`` options (``mp_policy``, ``mesh`` ...).

    Returns:
        ``model``, now sharded in place (FSDP2 does not wrap).

    Raises:
        RuntimeError: if no process group is initialized.
        NotImplementedError: for a 4-bit layer type that cannot expose its storage.
        TypeError: if ``mp_policy.param_dtype`` is not a floating dtype.
    """
    from torch.distributed.fsdp import fully_shard

    from .offload import find_decoder_layers
    from .quant.linear4bit import is_4bit_linear

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "fully_shard_lora needs an initialized process group: call init_distributed() first"
        )
    mp = fsdp_kwargs.get("mp_policy")
    carrier = getattr(mp, "param_dtype", None)
    for module in model.modules():
        if not is_4bit_linear(module):
            continue
        expose = getattr(module, "_expose_storage_as_params", None)
        if expose is None:
            raise NotImplementedError(
                f"FSDP2: {type(module).__name__} cannot expose its 4-bit storage as parameters; use DDP"
            )
        expose(carrier)
    for layer in find_decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    return model
