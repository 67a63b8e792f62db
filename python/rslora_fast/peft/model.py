"""``get_peft_model`` and ``PeftModel``: inject LoRA adapters and drive them like HF PEFT."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._validate import boolean, int_or_none, is_int, positive_int
from ..checkpointing import apply_gradient_checkpointing, validate_mode, validate_save_policy
from ..quant.linear4bit import is_4bit_linear
from . import init as _init
from .config import DEFAULT_TARGET_MODULES, LoraConfig
from .inference_merge import unmerge_after_inference
from .io import (
    check_adapter_state,
    load_adapter_weights,
    peft_named_tensors,
    read_adapter_state,
    save_adapter,
    weights_file,
)
from .layer import Delegating, LoraLinear, ModulesToSaveWrapper
from .targets import find_targets, output_head_name, pattern_value, with_fused_projections

ACCEPTED_KWARGS = (
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "task_type",
    "use_reentrant",
    "max_memory_gb",
    "save_policy",
    "use_dora",
    "fan_in_fan_out",
    "lora_bias",
    "offload_embedding",
)

# target names that mean "train this embedding / head in full" (moved to modules_to_save)
_FULL_TRAIN_TARGETS = ("embed_tokens", "lm_head")


# ---------------------------------------------------------------------- injection helpers
def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _init_layer(layer: LoraLinear, init: bool | str, gen: torch.Generator, loftq_iter: int) -> None:
    if layer.lora_A.weight.is_meta:
        return
    r, fan_in, out = layer.r, layer.in_features, layer.out_features
    if init == "loftq":
        base = layer.base_layer
        if is_4bit_linear(base):
            warnings.warn(
                "LoftQ on a layer that is already 4-bit: its full-precision weight is gone, so the "
                "adapters can only fit the requantization error (close to zero); load the model in "
                "16 bits to get LoftQ's benefit",
                stacklevel=4,
            )
            dense = base.dequantize()
            deq, a, b = _init.loftq_init(dense, r, layer.scaling, loftq_iter)
            base.requantize_(deq.to(dense.dtype))
        else:
            deq, a, b = _init.loftq_init(base.weight, r, layer.scaling, loftq_iter)
            with torch.no_grad():
                base.weight.copy_(deq.to(base.weight.dtype))
    elif init is False:
        a = _init.kaiming_uniform_a_sqrt5((r, fan_in), gen)
        b = _init.kaiming_uniform_a_sqrt5((out, r), gen)
    else:
        if init == "gaussian":
            a = _init.gaussian((r, fan_in), 1.0 / r, gen)
        else:
            a = _init.kaiming_uniform_a_sqrt5((r, fan_in), gen)
        b = torch.zeros((out, r), dtype=torch.float32)
    layer.set_adapter_weights(a, b)


def _inject(model: nn.Module, config: LoraConfig, gen: torch.Generator) -> None:
    """Wrap every target in a :class:`LoraLinear`; everything is checked before the first module
    changes, so a bad config leaves ``model`` untouched."""
    config.target_modules = with_fused_projections(model, config.target_modules)
    targets = find_targets(model, config)
    ranks = _checked_ranks(model, config, targets)
    to_wrap = _modules_to_save(model, config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        # like PEFT >= 0.15: record the resolved full module paths so the saved config is explicit
        config.target_modules = list(targets)
    loftq_iter = int(config.loftq_config.get("loftq_iter", 1)) if config.loftq_config else 1
    init = "loftq" if config.uses_loftq else config.init_lora_weights
    for name in targets:
        parent, child = _parent_of(model, name)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        layer = LoraLinear(getattr(parent, child), ranks[name], alpha, config.lora_dropout, config.use_rslora)
        _init_layer(layer, init, gen, loftq_iter)
        setattr(parent, child, layer)
    for name in to_wrap:
        parent, child = _parent_of(model, name)
        setattr(parent, child, ModulesToSaveWrapper(getattr(parent, child)))


def _checked_ranks(model: nn.Module, config: LoraConfig, targets) -> dict[str, int]:
    """Each target's rank, refused before any allocation when it exceeds the layer's larger side
    (``A`` is ``[r, in]``, ``B`` ``[out, r]``: such a rank is a malformed config, not a choice)."""
    ranks = {}
    for name in targets:
        r = pattern_value(config.rank_pattern, name, config.r)
        base = model.get_submodule(name)
        limit = max(int(base.in_features), int(base.out_features))
        if not is_int(r) or not 0 < r <= limit:
            raise ValueError(
                f"LoRA rank r={r!r} for {name} ({base.in_features} -> {base.out_features}) is out of "
                f"range; expected an int in 1..{limit}"
            )
        ranks[name] = int(r)
    return ranks


def _modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules ``modules_to_save`` selects (outermost match of each entry)."""
    if not config.modules_to_save:
        return []
    found: list[str] = []
    for name, _ in model.named_modules():
        hit = next((m for m in config.modules_to_save if name == m or name.endswith("." + m)), None)
        if hit is None or any(name.startswith(f + ".") for f in found):
            continue
        found.append(name)
    missing = [m for m in config.modules_to_save if not any(f == m or f.endswith("." + m) for f in found)]
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of the model")
    return found


def _set_trainable(model: nn.Module, config: LoraConfig, trainable: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if not trainable:
        return
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.lora_A.weight.requires_grad_(True)
            module.lora_B.weight.requires_grad_(True)
            if config.bias == "lora_only" and module.bias is not None:
                module.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSaveWrapper):
            for p in module.modules_to_save.parameters():
                p.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if (name == "bias" or name.endswith(".bias")) and ".original_module." not in name:
                p.requires_grad_(True)


@torch.no_grad()
def _dense_linear(base: nn.Module, lora: LoraLinear | None) -> nn.Linear:
    """A dense ``nn.Linear`` (compute dtype, same device) holding a 4-bit layer's weight (+ LoRA update)."""
    if not callable(getattr(base, "dequantize", None)):
        raise TypeError(f"cannot dequantize {type(base).__name__}: it has no dequantize() method")
    w = base.dequantize(torch.float32)
    if lora is not None:
        w = w + lora.get_delta_weight().to(w.device)
    dtype = getattr(base, "compute_dtype", None) or torch.get_default_dtype()
    bias = getattr(base, "bias", None)
    lin = torch.nn.utils.skip_init(
        nn.Linear, base.in_features, base.out_features, bias=bias is not None, device=w.device, dtype=dtype
    )
    lin.weight.copy_(w.to(dtype))
    if bias is not None:
        lin.bias.copy_(bias.to(dtype))
    lin.requires_grad_(False)
    return lin


def _is_hf_peft_model(model: nn.Module) -> bool:
    """True for HF peft's ``PeftModel`` (or a subclass), recognised without importing peft.

    Ours derives from peft's class when peft is installed (so trainers recognise it): not counted.
    """
    if isinstance(model, PeftModel):
        return False
    return any(
        c.__name__ == "PeftModel" and c.__module__.split(".")[0] == "peft" for c in type(model).__mro__
    )


def _has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in model.modules())


class LoraModel(Delegating):
    """Holds the adapted transformers model as ``.model`` (so state-dict keys read ``base_model.model.*``).

    Args:
        model: the transformers model (adapters already injected).
    """

    _own_attrs = ("model",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _delegate(self) -> nn.Module:
        return self.model


class PeftModel(nn.Module):
    """A transformers model with LoRA adapters, behaving as the wrapped model.

    Attribute access, ``forward`` (with ``labels=`` returning the loss), ``generate``, ``config``
    and ``gradient_checkpointing_enable`` pass through to the transformers model, so HF ``Trainer``
    accepts it. The structure mirrors HF PEFT: ``peft_model.base_model.model`` is the transformers
    model, and adapter tensors are named ``base_model.model.<module>.lora_A.weight`` etc.

    One adapter (named ``"default"``) is supported per model.

    Build one with :func:`get_peft_model` or :meth:`from_pretrained`, not directly.

    Args:
        model: the transformers model.
        config: the adapter settings.
        random_state: seed of the private generator used for the adapter initialization.
        trainable: whether the adapter (and bias / modules_to_save settings) is trainable.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> PeftModel:
        # With peft installed, every instance is of the subclass that trainers recognise (see
        # _trainer_visible_class); PeftModel.__init__ then runs on it as usual.
        if cls is PeftModel:
            cls = _trainer_visible_class()
        return nn.Module.__new__(cls)

    def __init__(
        self, model: nn.Module, config: LoraConfig, random_state: int | None = 3407, trainable: bool = True
    ) -> None:
        nn.Module.__init__(self)  # not super(): with peft installed the next class is peft's PeftModel
        self._requires_grad_before = [(p, p.requires_grad) for p in model.parameters()]
        self._checkpointing_before = bool(getattr(model, "is_gradient_checkpointing", False))
        self._requested_settings = config.settings()
        _inject(model, config, _init.make_generator(random_state))
        _set_trainable(model, config, trainable)
        from ..models.fast_decoder import install_fast_decoder

        install_fast_decoder(model)
        self.base_model = LoraModel(model)
        self.__dict__["_peft_config"] = {"default": config}
        self.active_adapter = "default"
        # Training forward with labels computes the loss chunk by chunk without the full logits
        # (rslora_fast.models.causal_lm); set False to get transformers' own forward (and logits).
        self.fused_loss = True

    # ---------------------------------------------------------------- pass-through
    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in ("base_model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base_model.model, name)

    # ---------------------------------------------------------------- what trainers probe
    # HF Trainer, accelerate and TRL treat a model as a PEFT model by isinstance(model, peft.PeftModel)
    # and then use the members below (peft's PeftModel defines them as properties or methods).
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """``{"default": LoraConfig}``: the adapter's settings, keyed by adapter name as in HF PEFT."""
        return self.__dict__["_peft_config"]

    @peft_config.setter
    def peft_config(self, value: dict[str, LoraConfig]) -> None:
        self.__dict__["_peft_config"] = value

    @property
    def active_adapters(self) -> list[str]:
        """``["default"]`` (one adapter per model)."""
        return [self.active_adapter]

    @property
    def active_peft_config(self) -> LoraConfig:
        """The active adapter's config."""
        return self.peft_config[self.active_adapter]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether the adapter takes part in the forward (False inside :meth:`disable_adapter`)."""
        return not all(m.disabled for m in self._adapter_modules())

    @property
    def modules_to_save(self) -> set[str] | None:
        """Names of the modules trained in full, as in HF PEFT (``None`` when there are none)."""
        return set(self.active_peft_config.modules_to_save or []) or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        """The wrapped model's dtype."""
        return getattr(self.base_model.model, "dtype", None)

    def add_adapter(self, adapter_name: str, peft_config: Any = None, *args: Any, **kwargs: Any) -> None:
        """Keep a frozen copy of the adapter as it is now under ``adapter_name`` (for TRL's DPO reference).

        Only copies of the one trained adapter are supported: TRL's ``DPOTrainer`` without a
        ``ref_model`` calls ``add_adapter("ref", model.peft_config["default"])`` and computes the
        reference log-probs under ``set_adapter("ref")``. :meth:`set_adapter` swaps the weights in.

        Raises:
            ValueError: the name exists.
            NotImplementedError: ``peft_config`` differs from the trained adapter's (a second
                trainable adapter).
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        default = self.peft_config["default"]
        if peft_config is not None and getattr(peft_config, "settings", lambda: None)() != default.settings():
            raise NotImplementedError(
                f"add_adapter({adapter_name!r}): rslora_fast trains one adapter per model; only a frozen copy "
                "of it (same config) can be added"
            )
        self.__dict__.setdefault("_frozen_copies", {})[adapter_name] = {
            k: v.detach().clone() for k, v in self._live_adapter_tensors().items()
        }
        self.peft_config[adapter_name] = default

    def _live_adapter_tensors(self) -> dict[str, torch.Tensor]:
        from .io import adapter_state_dict

        return adapter_state_dict(self.base_model.model, self.peft_config["default"])

    @torch.no_grad()
    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` active: ``"default"`` or a frozen copy made by :meth:`add_adapter`.

        Activating a copy stashes the trained weights and loads the copy's; ``"default"`` restores
        them. Trainers call this around reference forwards (under ``no_grad``).
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have {sorted(self.peft_config)}")
        if adapter_name == self.active_adapter:
            return
        live = self._live_adapter_tensors()
        if self.active_adapter == "default":
            self.__dict__["_stash"] = {k: v.clone() for k, v in live.items()}
        source = self.__dict__["_stash"] if adapter_name == "default" else self._frozen_copies[adapter_name]
        for k, v in live.items():
            v.copy_(source[k])
        if adapter_name == "default":
            del self.__dict__["_stash"]
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove a frozen copy made by :meth:`add_adapter` (the trained adapter: use :meth:`unload`)."""
        if adapter_name == "default" or adapter_name not in self.peft_config:
            raise ValueError(
                f"delete_adapter({adapter_name!r}): only copies made by add_adapter can be deleted "
                f"(have {sorted(self.peft_config)}); use unload() to remove the adapter"
            )
        if self.active_adapter == adapter_name:
            self.set_adapter("default")
        del self.peft_config[adapter_name]
        del self._frozen_copies[adapter_name]

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad (what TRL calls with checkpointing on).

        Our checkpointing gives LoRA weights their gradients without it, so this only forwards to
        the transformers model's method.
        """
        self.base_model.model.enable_input_require_grads()

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        *args: Any,
        inputs_embeds: Any = None,
        labels: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Call the wrapped model (positional arguments in its order; ``labels=`` gives the loss).

        ``labels`` and ``inputs_embeds`` are named here so HF ``Trainer`` finds them in the signature;
        they (and trailing ``None`` positionals) are only passed on when given.
        """
        model = self.base_model.model
        # TRL's fused LM head (installed on the transformers model) asks for per-token log-probs
        # with fused_lm_head=True: that call goes to the model as it is, not to our fused loss.
        ours = self.fused_loss and not kwargs.get("fused_lm_head", False)
        if labels is not None and ours and not args and inputs_embeds is None:
            from ..models.causal_lm import fused_loss_forward, fused_loss_supported

            if fused_loss_supported(model, labels, kwargs) is None:
                return fused_loss_forward(model, input_ids, attention_mask, labels, **kwargs)
        pos = [input_ids, attention_mask, *args]
        while pos and pos[-1] is None:
            pos.pop()
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model.model(*pos, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the wrapped model (adapters active); the fast decode path when it applies.

        After ``for_inference``, or for a call made without gradients (TRL's ``GRPOTrainer``), the
        call goes to :func:`rslora_fast.generate.fast_generate` (HF's semantics; HF's ``generate``
        for what it does not cover); see docs/generation.md.
        """
        from ..generate import route

        return route(self.base_model.model, *args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """Return the wrapped transformers model (adapters still injected)."""
        return self.base_model.model

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **_: Any
    ) -> None:
        """Checkpoint every decoder layer (reentrant or not, LoRA weights still get gradients).

        This is what HF ``Trainer`` calls for ``gradient_checkpointing=True``. A model set up with
        ``use_gradient_checkpointing="unsloth"`` keeps its offloaded checkpointing (only the
        reentrant flavour is updated); otherwise plain per-layer checkpointing is installed.

        Args:
            gradient_checkpointing_kwargs: ``{"use_reentrant": bool}``; default non-reentrant.
        """
        kw = gradient_checkpointing_kwargs or {}
        reentrant = bool(kw.get("use_reentrant", False))
        prev = getattr(self, "_gradient_checkpointing", None) or {}
        wanted = "unsloth" if prev.get("mode") == "unsloth" else True
        mode = apply_gradient_checkpointing(
            self.base_model.model,
            wanted,
            prev.get("max_seq_length", 2048),
            use_reentrant=reentrant,
            max_memory_gb=prev.get("max_memory_gb"),
            save_policy=prev.get("save_policy", "never"),
        )
        self._gradient_checkpointing = {
            "mode": mode,
            "max_seq_length": prev.get("max_seq_length", 2048),
            "use_reentrant": reentrant,
            "max_memory_gb": prev.get("max_memory_gb"),
            "save_policy": prev.get("save_policy", "never"),
        }

    # ---------------------------------------------------------------- counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """Count parameters the way HF PEFT does.

        Packed 4-bit weights count as ``numel * 2 * element_size`` so "all params" matches the
        unquantized model; shared parameters are counted once.

        Returns:
            ``(trainable, all)``.
        """
        packed: dict[int, torch.Tensor] = {}
        for m in self.modules():
            w = getattr(m, "weight", None) if is_4bit_linear(m) else None
            if isinstance(w, torch.Tensor):
                packed[id(w)] = w
        trainable = total = 0
        seen: set[int] = set()
        for _, p in self.named_parameters():
            n = p.numel()
            if id(p) in packed:
                n *= 2 * p.element_size()
                seen.add(id(p))
            total += n
            if p.requires_grad:
                trainable += n
        for key, w in packed.items():
            if key not in seen:
                total += w.numel() * 2 * w.element_size()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: T || all params: A || trainable%: P`` exactly as HF PEFT does."""
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # ---------------------------------------------------------------- adapters on / off
    def _adapter_modules(self) -> Iterator[nn.Module]:
        for m in self.base_model.model.modules():
            if isinstance(m, (LoraLinear, ModulesToSaveWrapper)):
                yield m

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager running the base model alone (LoRA off, original modules_to_save)."""
        mods = list(self._adapter_modules())
        before = [m.disabled for m in mods]
        for m in mods:
            m.disabled = True
        try:
            yield
        finally:
            for m, b in zip(mods, before):
                m.disabled = b

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's layout, atomically.

        The trained (``"default"``) adapter is written even while a frozen copy is active. Other
        files in the folder (a tokenizer, a trainer's state) are kept. HF ``Trainer`` calls this
        for every checkpoint, so checkpoints hold the adapter, never the frozen base.

        Args:
            save_directory: output folder (created if missing).
            **kwargs: accepted for compatibility (``safe_serialization``, ``state_dict`` ...); ignored:
                the adapter is read from the live modules.
        """
        with self._default_weights_active():
            save_adapter(self.base_model.model, self.peft_config["default"], save_directory)

    @contextlib.contextmanager
    def _default_weights_active(self) -> Iterator[None]:
        active = self.active_adapter
        self.set_adapter("default")
        try:
            yield
        finally:
            self.set_adapter(active)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> str:
        """Upload the adapter (what :meth:`save_pretrained` writes) to a Hub model repository.

        Args:
            repo_id: ``"user/name"``; created if missing.
            private: visibility of a new repository.
            token: Hub token.
            commit_message: commit message.
            tokenizer: uploaded alongside when given.
            **kwargs: accepted for compatibility with HF PEFT (``safe_serialization`` ...); ignored.

        Returns:
            The commit URL.

        Raises:
            rslora_fast.hub.HubUnreachableError: offline; nothing uploaded.
            rslora_fast.hub.HubError: the Hub refused the upload.
        """
        import tempfile

        from ..hub import push_folder

        with tempfile.TemporaryDirectory(prefix="rslora_push_") as tmp:
            folder = os.path.join(tmp, "adapter")
            self.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    def push_to_hub_merged(
        self,
        repo_id: str,
        tokenizer: Any = None,
        save_method: str = "merged_16bit",
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        max_shard_size: int | str = "5GB",
        dtype: torch.dtype | None = None,
    ) -> str:
        """Upload what :meth:`save_pretrained_merged` writes (same ``save_method`` values).

        The folder is written to a temporary directory first, then uploaded in one commit.

        Returns:
            The commit URL.

        Raises:
            ValueError: unknown ``save_method`` (before anything is written or uploaded).
            rslora_fast.hub.HubUnreachableError: offline; nothing uploaded.
            rslora_fast.hub.HubError: the Hub refused the upload.
        """
        import tempfile

        from ..export import SAVE_METHODS
        from ..hub import push_folder

        if save_method not in SAVE_METHODS:
            raise ValueError(f"save_method must be one of {list(SAVE_METHODS)}, got {save_method!r}")
        with tempfile.TemporaryDirectory(prefix="rslora_push_") as tmp:
            folder = os.path.join(tmp, save_method)
            self.save_pretrained_merged(
                folder, tokenizer, save_method, max_shard_size=max_shard_size, dtype=dtype
            )
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a PEFT-format LoRA adapter (ours or HF PEFT's) from a local folder onto ``model``.

        Args:
            model: the transformers model the adapter was trained on.
            model_id: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
            adapter_name: only ``"default"`` is supported.
            is_trainable: keep the adapter trainable; by default it is frozen and the model is put in
                eval mode.
            config: use this config instead of the folder's.

        Returns:
            The :class:`PeftModel`.

        Raises:
            FileNotFoundError: if the folder lacks the files.
            ValueError: if the config uses unsupported PEFT features or the weights do not fit.
        """
        if adapter_name != "default":
            raise ValueError(f"only the adapter name 'default' is supported, got {adapter_name!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if _has_adapters(model):
            raise ValueError("model already has LoRA adapters; use PeftModel.load_adapter on its PeftModel")
        cfg = config if config is not None else LoraConfig.from_pretrained(model_id)
        cfg = dataclasses.replace(
            cfg,
            inference_mode=not is_trainable,
            init_lora_weights=True if cfg.uses_loftq else cfg.init_lora_weights,
            loftq_config={},
        )
        state = read_adapter_state(model_id)  # file errors before any module changes
        peft_model = cls(model, cfg, random_state=0, trainable=is_trainable)
        try:
            load_adapter_weights(peft_model.base_model.model, model_id, state)
        except BaseException:
            peft_model._remove_adapters(merge=False)  # all or nothing: the model is as it was
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> None:
        """Replace the adapter's weights (and scaling) with a saved adapter of the same structure.

        Args:
            model_id: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
            adapter_name: only ``"default"`` is supported (one adapter per model).
            is_trainable: leave the loaded adapter trainable.

        Raises:
            ValueError: if the saved adapter targets other modules or ranks.
        """
        if adapter_name != "default":
            raise ValueError(f"only one adapter ('default') is supported, got adapter_name={adapter_name!r}")
        cfg = LoraConfig.from_pretrained(model_id)
        model = self.base_model.model
        # Everything is read and checked first; the scalings and weights change only afterwards.
        alphas = {}
        for name, m in model.named_modules():
            if isinstance(m, LoraLinear):
                r = pattern_value(cfg.rank_pattern, name, cfg.r)
                if r != m.r:
                    raise ValueError(f"{name}: saved adapter has rank {r}, this model's adapter has {m.r}")
                alphas[m] = pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha)
        state = read_adapter_state(model_id)
        check_adapter_state(peft_named_tensors(model), state, weights_file(model_id))
        for m, alpha in alphas.items():
            m.lora_alpha = alpha
            m.use_rslora = cfg.use_rslora
            m.scaling = alpha / (m.r**0.5 if cfg.use_rslora else m.r)
        load_adapter_weights(model, model_id, state)
        cfg = dataclasses.replace(
            cfg,
            inference_mode=not is_trainable,
            loftq_config={},
            init_lora_weights=True if cfg.uses_loftq else cfg.init_lora_weights,
        )
        self.peft_config["default"] = cfg
        _set_trainable(model, cfg, is_trainable)

    # ---------------------------------------------------------------- removing adapters
    def _remove_adapters(self, merge: bool, dequantize: bool = False) -> nn.Module:
        from ..models.fast_decoder import uninstall_fast_decoder

        model = self.base_model.model
        unmerge_after_inference(model)  # from the original bases, whatever for_inference merged
        uninstall_fast_decoder(model)
        if self.__dict__.get("_offloaded_embedding"):
            from ..models.host_embedding import restore_embedding

            restore_embedding(model)
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLinear):
                parent, child = _parent_of(model, name)
                if merge and dequantize and module.is_4bit:
                    setattr(parent, child, _dense_linear(module.base_layer, module))
                    continue
                if merge:
                    module.merge()
                setattr(parent, child, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper):
                parent, child = _parent_of(model, name)
                setattr(parent, child, module.modules_to_save if merge else module.original_module)
        if merge and dequantize:
            for name, module in list(model.named_modules()):
                if is_4bit_linear(module):
                    parent, child = _parent_of(model, name)
                    setattr(parent, child, _dense_linear(module, None))
            cfg = getattr(model, "config", None)
            if cfg is not None and getattr(cfg, "quantization_config", None) is not None:
                del cfg.quantization_config
        for p, flag in self._requires_grad_before:
            p.requires_grad_(flag)
        if not self._checkpointing_before and getattr(model, "is_gradient_checkpointing", False):
            apply_gradient_checkpointing(model, False)
        return model

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Fold ``scaling * B @ A`` into every adapted weight and return the plain transformers model.

        modules_to_save copies replace the originals. By default 4-bit bases are dequantized,
        merged and requantized (lossy: the result stays 4-bit). With ``dequantize=True`` every 4-bit
        layer becomes a dense ``nn.Linear`` in its compute dtype instead, holding the dequantized
        weight plus the update (the accurate route: it computes what the trained model computes).

        Args:
            progressbar: accepted for HF PEFT compatibility; ignored.
            safe_merge: accepted for HF PEFT compatibility; ignored.
            adapter_names: accepted for HF PEFT compatibility (one adapter only); ignored.
            dequantize: replace 4-bit layers by dense ``nn.Linear`` (merged where adapted).

        Returns:
            The transformers model without adapter modules.

        Raises:
            TypeError: a 4-bit base layer without ``dequantize()`` / ``requantize_()``.
        """
        return self._remove_adapters(merge=True, dequantize=dequantize)

    def save_pretrained_merged(
        self,
        save_directory: str | os.PathLike,
        tokenizer: Any = None,
        save_method: str = "merged_16bit",
        max_shard_size: int | str = "5GB",
        dtype: torch.dtype | None = None,
    ) -> Any:
        """Save the adapter (``"lora"``), a merged 16-bit model (``"merged_16bit"``) or a merged
        bitsandbytes-layout 4-bit model (``"merged_4bit"``).

        The live model is left untouched; see :func:`rslora_fast.export.save_pretrained_merged` for
        the arguments.

        Returns:
            The output folder as a ``pathlib.Path``.
        """
        from ..export import save_pretrained_merged

        with self._default_weights_active():
            return save_pretrained_merged(
                self,
                save_directory,
                tokenizer,
                save_method=save_method,
                max_shard_size=max_shard_size,
                dtype=dtype,
            )

    def save_pretrained_gguf(
        self,
        save_directory: str | os.PathLike,
        tokenizer: Any = None,
        quantization_method: str = "q8_0",
        progress: bool = True,
        *,
        quantization_type: str | None = None,
    ) -> Any:
        """Write the merged model as one GGUF file (llama.cpp / Ollama); the live model is untouched.

        See :func:`rslora_fast.gguf_io.save_pretrained_gguf` for the arguments.

        Returns:
            The path of the ``.gguf`` file.
        """
        from ..gguf_io import save_pretrained_gguf

        return save_pretrained_gguf(
            self,
            save_directory,
            tokenizer,
            quantization_method,
            progress,
            quantization_type=quantization_type,
        )

    def push_to_hub_gguf(
        self, repo_id: str, tokenizer: Any = None, quantization_method: str = "q8_0", **kwargs
    ):
        """Upload the GGUF file :meth:`save_pretrained_gguf` writes; see
        :func:`rslora_fast.gguf_io.push_to_hub_gguf` (``private``, ``token``, ``commit_message``)."""
        from ..gguf_io import push_to_hub_gguf

        return push_to_hub_gguf(self, repo_id, tokenizer, quantization_method, **kwargs)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging: the base model comes back as it was.

        Returns:
            The transformers model with its original modules and ``requires_grad`` flags.
        """
        return self._remove_adapters(merge=False)


def _hf_peft_class() -> type | None:
    """HF peft's ``PeftModel`` when peft is installed (imported here, on first use), else None.

    peft imports bitsandbytes when that is installed, whose import logs warnings about its own
    optional CPU kernels; the user asked for neither, so bitsandbytes' logger is held at ERROR
    for the time of this import only."""
    import importlib.util
    import logging

    if importlib.util.find_spec("peft") is None:
        return None
    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        from peft import PeftModel as HFPeftModel
    except Exception:  # a broken peft install must not stop LoRA training
        return None
    finally:
        bnb_log.setLevel(level)
    return HFPeftModel


_VISIBLE: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # PeftModelForTrainers is created on first use; a process unpickling a model asks for it first.
    if name == "PeftModelForTrainers" and _trainer_visible_class() is not PeftModel:
        return _VISIBLE["cls"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _trainer_visible_class() -> type:
    """The class of new :class:`PeftModel` instances: recognised by trainers when peft is installed.

    HF ``Trainer`` (``_is_peft_model`` and ``_save``), accelerate's ``is_peft_model`` and TRL's
    trainers decide "PEFT model" with ``isinstance(model, peft.PeftModel)`` and nothing else (no
    attribute they probe would do). A model they do not recognise gets full-model checkpoints
    (the frozen 4-bit base included) and, in TRL, a fused LM head installed on our wrapper. So when
    peft is importable, instances are of ``PeftModelForTrainers(PeftModel, peft.PeftModel)``: ours
    first in the method order, so every member trainers use is ours (peft's ``__init__`` never runs;
    the members trainers use are defined above). Without peft nothing is changed, and trainers see
    a plain ``nn.Module``; peft is never a requirement of rslora_fast itself.
    """
    if "cls" not in _VISIBLE:
        hf = _hf_peft_class()
        if hf is None:
            import sys

            if "trl" in sys.modules or "transformers.trainer" in sys.modules:
                warnings.warn(
                    "peft is not installed, so HF Trainer and TRL will not recognise this PeftModel: their "
                    "checkpoints would hold the whole model and TRL's fused loss fails. Install it with "
                    "`pip install rslora-fast[trainers]` (peft is used only for that recognition)",
                    stacklevel=3,
                )
            _VISIBLE["cls"] = PeftModel
        else:
            cls = type(
                "PeftModelForTrainers",
                (PeftModel, hf),
                {"__module__": __name__, "__doc__": PeftModel.__doc__},
            )
            globals()["PeftModelForTrainers"] = cls  # importable by name, so instances pickle
            _VISIBLE["cls"] = cls
    return _VISIBLE["cls"]


def _checked_offload_embedding(model: nn.Module, value: Any, modules_to_save: list[str]) -> bool:
    """``offload_embedding`` validated before the model changes (the checks of host_embedding)."""
    if not isinstance(value, bool):
        raise ValueError(f"offload_embedding must be a bool, got {value!r}")
    from ..models.host_embedding import check_offloadable, is_offloaded

    if value:
        check_offloadable(model)
    if value or is_offloaded(model):
        emb = model.get_input_embeddings()
        names = {n for n, m in model.named_modules() if m is emb}
        if any(t == n or n.endswith("." + t) for t in modules_to_save for n in names):
            raise ValueError(
                "offload_embedding=True and the input embedding in modules_to_save contradict each "
                "other: a trained table stays on the GPU; drop one of them"
            )
    return value


# ---------------------------------------------------------------------- public entry point
def get_peft_model(
    model: nn.Module,
    r: int = 16,
    target_modules: list[str] | str = DEFAULT_TARGET_MODULES,
    lora_alpha: float = 16,
    lora_dropout: float = 0,
    bias: str = "none",
    use_gradient_checkpointing: bool | str = "unsloth",
    random_state: int = 3407,
    max_seq_length: int = 2048,
    use_rslora: bool = False,
    loftq_config: dict | None = None,
    **kwargs: Any,
) -> PeftModel:
    """Add LoRA adapters to a transformers model.

    Every targeted linear layer (``nn.Linear`` or 4-bit) becomes a :class:`LoraLinear`; the base
    model is frozen and only the adapters (plus biases per ``bias`` and ``modules_to_save``) train.

    The adapter initialization draws from a private ``torch.Generator`` seeded with
    ``random_state``: the same seed gives bit-identical adapters, and the global RNG state
    (``torch.manual_seed`` etc.) is left exactly as it was.

    Args:
        model: a transformers model (any ``torch.nn.Module`` with linear layers).
        r: LoRA rank, a positive int.
        target_modules: list of names (exact full name or ``"." + name`` suffix), a regex string
            (``re.fullmatch`` on the full module name) or ``"all-linear"`` (every linear layer except
            the output head). ``"embed_tokens"`` / ``"lm_head"`` in a list are trained in full
            (moved to ``modules_to_save``).
        lora_alpha: positive scaling numerator.
        lora_dropout: dropout on the LoRA branch, in ``[0, 1)``; 0 runs no dropout code.
        bias: ``"none"``, ``"all"`` or ``"lora_only"``.
        use_gradient_checkpointing: ``False``, ``True`` (checkpoint each decoder layer) or
            ``"unsloth"`` (checkpointing with the layer inputs offloaded to pinned host memory; see
            :mod:`rslora_fast.checkpointing`).
        random_state: seed of the adapter initialization (int, or None for a fresh random seed).
        max_seq_length: training sequence length (passed to the checkpointing mode).
        use_rslora: scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        loftq_config: ``{"loftq_bits": 4, "loftq_iter": T}`` to initialize with LoftQ (NF4).
        **kwargs: ``modules_to_save``, ``layers_to_transform``, ``layers_pattern``,
            ``exclude_modules``, ``init_lora_weights`` (True, False, "gaussian", "loftq"),
            ``rank_pattern``, ``alpha_pattern``, ``task_type`` (default ``"CAUSAL_LM"``),
            ``use_reentrant`` (checkpointing flavour, default False), ``max_memory_gb`` (with
            ``"unsloth"``: GPU budget for layer activations kept without recompute, or ``"auto"``),
            ``save_policy`` (with ``"unsloth"``: ``"never"`` (default), ``"auto"`` or ``"always"``:
            whether a layer may skip its recompute by parking its saved tensors in host memory; see
            docs/checkpointing.md),
            ``offload_embedding`` (default False: the frozen input embedding table in pinned host
            memory, the GPU reading only the step's rows; see
            :mod:`rslora_fast.models.host_embedding`), and ``use_dora``, ``fan_in_fan_out``,
            ``lora_bias`` (only False is supported).

    Returns:
        A :class:`PeftModel`. Called on a :class:`PeftModel` with the same settings, returns it
        unchanged (with a warning).

    Raises:
        TypeError: ``model`` is not a torch module, or an unknown keyword argument is given.
        ValueError: a setting is out of range or unknown (the message names it and what is
            accepted), ``target_modules`` matches nothing, ``layers_to_transform`` is out of range,
            or the model already has adapters with different settings.
    """
    _check_model_and_keywords(model, kwargs)
    mode, use_reentrant = _checked_training_options(
        use_gradient_checkpointing, random_state, max_seq_length, kwargs
    )
    target_modules, modules_to_save = _split_full_train_targets(
        model, target_modules, kwargs.get("modules_to_save")
    )
    init, loftq = _resolve_init(kwargs.get("init_lora_weights", True), loftq_config)
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    cfg_obj = getattr(inner, "config", None)
    config = LoraConfig(
        r=r,
        target_modules=target_modules,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias=bias,
        use_rslora=use_rslora,
        modules_to_save=modules_to_save or None,
        layers_to_transform=kwargs.get("layers_to_transform"),
        layers_pattern=kwargs.get("layers_pattern"),
        exclude_modules=kwargs.get("exclude_modules"),
        init_lora_weights=init,
        rank_pattern=kwargs.get("rank_pattern") or {},
        alpha_pattern=kwargs.get("alpha_pattern") or {},
        task_type=kwargs.get("task_type", "CAUSAL_LM"),
        loftq_config=loftq,
        base_model_name_or_path=getattr(cfg_obj, "_name_or_path", None)
        or getattr(inner, "name_or_path", None),
    )
    if isinstance(model, PeftModel):
        return _same_adapters_or_error(model, config)
    if _has_adapters(model):
        raise ValueError("the model already contains LoRA layers; pass its PeftModel instead")

    offload = _checked_offload_embedding(model, kwargs.get("offload_embedding", False), modules_to_save)
    peft_model = PeftModel(model, config, random_state=random_state)
    if offload:
        from ..models.host_embedding import offload_embedding

        peft_model._offloaded_embedding = offload_embedding(model) > 0
    _install_checkpointing(
        peft_model,
        model,
        mode,
        max_seq_length,
        use_reentrant,
        kwargs.get("max_memory_gb"),
        kwargs.get("save_policy", "never"),
    )
    return peft_model


def _check_model_and_keywords(model: Any, kwargs: dict) -> None:
    """A torch module not wrapped by HF peft, known keywords, unsupported flags left False."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if _is_hf_peft_model(model):
        raise TypeError(
            f"model is already wrapped by HF peft ({type(model).__module__}.{type(model).__name__}); pass "
            "the base model (peft_model.get_base_model(), or merge_and_unload() to keep its adapter)"
        )
    unknown = sorted(set(kwargs) - set(ACCEPTED_KWARGS))
    if unknown:
        raise TypeError(
            f"get_peft_model() got unexpected keyword argument(s) {unknown}; accepted extra keyword "
            f"arguments: {list(ACCEPTED_KWARGS)}"
        )
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if kwargs.get(flag, False):
            raise ValueError(
                f"{flag}={kwargs[flag]!r} is not supported by rslora_fast; only False is accepted"
            )


def _checked_training_options(use_gradient_checkpointing, random_state, max_seq_length, kwargs: dict):
    """``(checkpointing mode, use_reentrant)`` after checking the seed and the sequence length."""
    mode = validate_mode(use_gradient_checkpointing)
    int_or_none("random_state", random_state)
    positive_int("max_seq_length", max_seq_length)
    validate_save_policy(kwargs.get("save_policy", "never"))
    return mode, boolean("use_reentrant", kwargs.get("use_reentrant", False))


def _split_full_train_targets(model: nn.Module, target_modules, modules_to_save) -> tuple[Any, list[str]]:
    """Move embeddings and the output head named in a target list to ``modules_to_save``."""
    modules_to_save = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    if not isinstance(target_modules, (list, tuple, set)):
        return target_modules, modules_to_save
    tm = list(target_modules)
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    head = output_head_name(inner)
    full = [t for t in tm if t in _FULL_TRAIN_TARGETS or (head is not None and t == head)]
    for t in full:
        tm.remove(t)
        if t not in modules_to_save:
            modules_to_save.append(t)
    if full and not tm:
        raise ValueError(
            f"target_modules={list(target_modules)!r} names only modules trained in full ({full}); "
            "add at least one linear layer name"
        )
    return tm, modules_to_save


def _resolve_init(init: Any, loftq_config: dict | None) -> tuple[Any, dict]:
    """``(init_lora_weights, loftq settings)``: a LoftQ config implies ``"loftq"`` and vice versa."""
    loftq = dict(loftq_config or {})
    if loftq and init is True:
        init = "loftq"
    if init == "loftq" and not loftq:
        loftq = {"loftq_bits": 4, "loftq_iter": 1}
    if loftq and init != "loftq":
        raise ValueError(
            f"loftq_config is given but init_lora_weights={init!r}; use 'loftq' (or leave it True)"
        )
    return init, loftq


def _same_adapters_or_error(model: PeftModel, config: LoraConfig) -> PeftModel:
    """A PeftModel asked again with its own settings is returned (with a warning); else an error."""
    ours = config.settings()
    theirs = model._requested_settings
    if ours == theirs:
        warnings.warn(
            "the model already has LoRA adapters with these settings; returning it unchanged",
            stacklevel=3,
        )
        return model
    diff = sorted(k for k in ours if ours[k] != theirs.get(k))
    raise ValueError(
        f"the model already has LoRA adapters with different settings (differing: {diff}); call "
        "get_peft_model on the base model (peft_model.unload()) to start again"
    )


def _install_checkpointing(
    peft_model, model, mode, max_seq_length, use_reentrant, max_memory_gb, save_policy
) -> None:
    """Switch the checkpointing mode on and remember it (``FastLanguageModel.for_training`` re-applies it)."""
    if mode is not False:
        mode = apply_gradient_checkpointing(
            model,
            mode,
            max_seq_length,
            use_reentrant=use_reentrant,
            max_memory_gb=max_memory_gb,
            save_policy=save_policy,
        )
    peft_model._gradient_checkpointing = {
        "mode": mode,
        "max_seq_length": int(max_seq_length),
        "use_reentrant": use_reentrant,
        "max_memory_gb": max_memory_gb,
        "save_policy": save_policy,
    }
