"""PEFT-format adapter files: ``adapter_model.safetensors`` keys and their mapping onto a model."""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from .config import LoraConfig
from .layer import LoraLinear, ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
# The files an adapter folder owns (a re-save drops a stale ``.bin`` next to the new safetensors).
ADAPTER_FILES = (WEIGHTS_NAME, "adapter_model.bin", "adapter_config.json")
PREFIX = "base_model.model."


def peft_named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the adapted model under its PEFT checkpoint key.

    The key is ``base_model.model.<name>`` where modules_to_save copies appear under the name of the
    module they replace and the originals they keep are left out.

    Args:
        model: the transformers model with adapters injected.

    Returns:
        ``{peft_key: live tensor}``.
    """
    wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        for w in wrappers:
            if name.startswith(w + ".original_module."):
                name = ""
                break
            if name.startswith(w + ".modules_to_save."):
                name = w + "." + name[len(w + ".modules_to_save.") :]
                break
        if name:
            out[PREFIX + name] = t
    return out


def adapter_state_dict(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes, under PEFT's key names.

    LoRA ``A``/``B`` weights, the modules_to_save copies, and biases according to ``config.bias``
    (``"all"``: every bias; ``"lora_only"``: the biases of adapted layers).

    Args:
        model: the transformers model with adapters injected.
        config: its adapter config.

    Returns:
        ``{peft_key: detached tensor}``.
    """
    named = peft_named_tensors(model)
    keep: set[str] = set()
    wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            keep.add(f"{PREFIX}{name}.lora_A.weight")
            keep.add(f"{PREFIX}{name}.lora_B.weight")
            if config.bias == "lora_only" and module.bias is not None:
                keep.add(f"{PREFIX}{name}.base_layer.bias")
    for w in wrappers:
        keep.update(k for k in named if k.startswith(f"{PREFIX}{w}."))
    if config.bias == "all":
        keep.update(k for k in named if k.endswith(".bias"))
    return {k: named[k].detach() for k in named if k in keep}


def save_adapter(model: nn.Module, config: LoraConfig, save_directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), atomically.

    Args:
        model: the transformers model with adapters injected.
        config: its adapter config (written with ``inference_mode: true``).
        save_directory: output folder, created if missing.
    """
    from safetensors.torch import save_file

    from ..atomic import atomic_dir

    tensors = {k: v.to("cpu").contiguous().clone() for k, v in adapter_state_dict(model, config).items()}
    to_save = dataclasses.replace(config, inference_mode=True)
    if to_save.init_lora_weights == "loftq":
        # the LoftQ starting point lives in the saved A/B (and the modified base weights); a loader
        # must not run LoftQ again
        to_save.init_lora_weights = True
    # Both files appear together or not at all; other files in the folder (tokenizer, trainer
    # state) are kept.
    with atomic_dir(save_directory, owned=ADAPTER_FILES) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        to_save.save_pretrained(tmp)


def weights_file(directory: str | os.PathLike) -> str:
    """``adapter_model.safetensors`` in ``directory``, else PeftModel's ``adapter_model.bin``.

    Raises:
        FileNotFoundError: if neither exists.
    """
    for name in (WEIGHTS_NAME, "adapter_model.bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {os.fspath(directory)!r}")


def read_adapter_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` (or PEFT's ``adapter_model.bin``), on the CPU.

    Raises:
        FileNotFoundError: if no weights file is found.
        ValueError: naming the file, if it is empty, truncated or not a weights file.
    """
    path = weights_file(directory)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the adapter weights file is empty")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle errors carry no path
        raise ValueError(f"{path}: unreadable adapter weights ({type(exc).__name__}: {exc})") from None


def check_adapter_state(named: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> None:
    """Validate every tensor of an adapter file against the model's before any is copied.

    Keys must exist in the model, every LoRA weight must be present, shapes must agree, values
    must be floating point (integer dtypes are refused) and finite.

    Raises:
        ValueError: naming ``where`` and the first offending key.
    """
    unexpected = sorted(k for k in state if k not in named)
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} keys the model lacks, e.g. {unexpected[:5]}")
    lora_keys = {k for k in named if ".lora_A." in k or ".lora_B." in k}
    missing = sorted(lora_keys - set(state))
    if missing:
        raise ValueError(f"{where}: misses {len(missing)} LoRA weights, e.g. {missing[:5]}")
    for key, value in state.items():
        target = named[key]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"{where}: shape of {key}: file {tuple(value.shape)}, model {tuple(target.shape)}"
            )
        if not value.is_floating_point():
            raise ValueError(
                f"{where}: {key} has dtype {value.dtype}; adapter weights must be floating point"
            )
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{where}: {key} holds {bad} NaN/inf value(s)")


def load_adapter_weights(
    model: nn.Module, directory: str | os.PathLike, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Copy the tensors of ``adapter_model.safetensors`` into an adapted model, all or none.

    Every tensor is validated (:func:`check_adapter_state`) before the first is copied, so a bad
    file leaves the model's weights as they were.

    Args:
        model: the transformers model with adapters injected for the same config.
        directory: folder holding ``adapter_model.safetensors`` (or PEFT's ``adapter_model.bin``).
        state: the file's tensors when the caller already read them (:func:`read_adapter_state`).

    Raises:
        FileNotFoundError: if no weights file is found.
        ValueError: naming the file, if it is unreadable, has keys the model lacks, misses LoRA
            weights the model has, or a tensor has another shape, an integer dtype or NaN/inf.
    """
    if state is None:
        state = read_adapter_state(directory)
    named = peft_named_tensors(model)
    check_adapter_state(named, state, weights_file(directory))
    with torch.no_grad():
        for key, value in state.items():
            target = named[key]
            target.copy_(value.to(target.device, target.dtype))
