"""``FastLanguageModel`` / ``FastModel``: the Unsloth-style entry points."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from .checkpointing import apply_gradient_checkpointing, validate_mode
from .loading import CheckpointError, CheckpointNotFoundError
from .peft import get_peft_model as _get_peft_model
from .peft.inference_merge import merge_for_inference, unmerge_after_inference

log = logging.getLogger(__name__)

#: Unsloth keywords that only size or tune its vLLM-backed fast inference: accepted, logged.
VLLM_ONLY_KEYWORDS = ("max_lora_rank", "gpu_memory_utilization", "float8_kv_cache", "disable_log_stats",
                      "unsloth_vllm_standby")  # fmt: skip
#: Unsloth keywords accepted without effect (names are used as given, tokenizers as saved).
NO_EFFECT_KEYWORDS = ("use_exact_model_name", "fix_tokenizer", "random_state")
_OWN_KEYWORDS = ("full_finetuning", "use_gradient_checkpointing", "load_in_16bit", "fast_inference")


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside a :class:`~rslora_fast.PeftModel` (or ``model`` itself)."""
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        return model.base_model.model
    return model


def _take_unsloth_keywords(kwargs: dict, fast_inference: bool) -> None:
    """Check ``kwargs`` against what the loader accepts; remove (and log) Unsloth's vLLM-only and no-effect ones."""
    from .loading import ACCEPTED_KEYWORDS

    unknown = sorted(set(kwargs) - set(ACCEPTED_KEYWORDS) - set(VLLM_ONLY_KEYWORDS) - set(NO_EFFECT_KEYWORDS))
    if unknown:
        accepted = sorted({*ACCEPTED_KEYWORDS, *_OWN_KEYWORDS, *VLLM_ONLY_KEYWORDS, *NO_EFFECT_KEYWORDS})
        raise TypeError(f"from_pretrained got unexpected keyword argument(s) {unknown}; accepted: {accepted}")
    if fast_inference:
        log.warning(
            "from_pretrained: fast_inference=True: generate() runs no separate inference engine and keeps the standard "
            "transformers API (after FastLanguageModel.for_inference, through rslora_fast's decode path on CUDA)"
        )
    vllm_only = [k for k in VLLM_ONLY_KEYWORDS if kwargs.pop(k, None) is not None]
    if vllm_only:
        log.info(
            "from_pretrained: %s only matter for vLLM-style fast inference; ignored", ", ".join(vllm_only)
        )
    for k in NO_EFFECT_KEYWORDS:
        kwargs.pop(k, None)


def _adapter_and_base(model_name: str, kwargs: dict) -> tuple[Path | None, str]:
    """``(adapter folder, base model name)`` when ``model_name`` is a LoRA adapter, else ``(None, model_name)``."""
    from .loading import _resolve

    if kwargs.get("gguf_file") is not None or str(model_name).lower().endswith(".gguf"):
        return None, model_name  # a GGUF checkpoint is never an adapter folder
    root = _resolve(model_name, kwargs.get("token"), kwargs.get("revision"), kwargs.get("cache_dir"))
    if not (root / "adapter_config.json").is_file() or (root / "config.json").is_file():
        return None, str(root)
    try:
        base = json.loads((root / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError) as exc:
        raise CheckpointNotFoundError(
            f"{root / 'adapter_config.json'} is not a valid adapter config ({exc})"
        ) from exc
    if not base:
        raise CheckpointNotFoundError(
            f"the adapter in {str(root)!r} does not name its base model (no base_model_name_or_path in "
            "adapter_config.json): load the base with from_pretrained(base) and the adapter with "
            f"PeftModel.from_pretrained(model, {str(root)!r})"
        )
    # A relative base path was relative to where training ran; failing that, to the adapter folder.
    beside = root / base
    if not Path(base).is_absolute() and not Path(base).exists() and beside.is_dir():
        return root, str(beside)
    return root, str(base)


def _attach_adapter(model: nn.Module, tokenizer: Any, adapter: Path, kwargs: dict) -> tuple[nn.Module, Any]:
    """The adapter in ``adapter`` on ``model``, trainable; the tokenizer saved with it when there is one."""
    from .loading import _load_tokenizer
    from .peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if (adapter / "tokenizer_config.json").is_file():  # may carry a chat template set for training
        try:
            tokenizer = _load_tokenizer(adapter, kwargs.get("token"), bool(kwargs.get("trust_remote_code")))
        except CheckpointError as exc:
            log.warning("from_pretrained: using the base model's tokenizer: %s", exc)
    return model, tokenizer


def _install_checkpointing(model: nn.Module, mode: Any, max_seq_length: int) -> None:
    """Install the checkpointing mode on ``model`` (or the model inside a PeftModel); kept for ``for_training``."""
    mode = apply_gradient_checkpointing(_inner(model), mode, max_seq_length)
    model.__dict__["_gradient_checkpointing"] = {
        "mode": mode,
        "max_seq_length": max_seq_length,
        "use_reentrant": False,
    }


def _set_use_cache(model: nn.Module, value: bool) -> None:
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = value


def _offload_embedding(model: nn.Module, value: Any, full_finetuning: bool) -> None:
    from .models.host_embedding import offload_embedding

    if value is not True:
        raise ValueError(f"offload_embedding must be a bool, got {value!r}")
    if full_finetuning:
        raise ValueError(
            "offload_embedding=True and full_finetuning=True contradict each other: the embedding "
            "trains, so its table stays on the GPU; drop one of them"
        )
    inner = _inner(model)
    inner.get_input_embeddings().weight.requires_grad_(False)  # frozen, as get_peft_model leaves it
    offload_embedding(inner)


class FastLanguageModel:
    """Load a causal LM (optionally 4-bit) and add LoRA adapters to it."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int | None = None,
        dtype: Any = None,
        load_in_4bit: bool | None = None,
        *,
        full_finetuning: bool = False,
        use_gradient_checkpointing: Any = None,
        load_in_16bit: bool = False,
        fast_inference: bool = False,
        offload_embedding: bool = False,
        **kwargs: Any,
    ):
        """Load ``(model, tokenizer)``; see :func:`rslora_fast.loading.from_pretrained` for the options.

        ``offload_embedding=True`` keeps the frozen input embedding table in pinned host memory
        (the GPU reads only each step's rows; :mod:`rslora_fast.models.host_embedding`); refused
        with ``full_finetuning=True`` (the table trains) and for tied embeddings. Default False:
        it saves the table's GPU memory (0.98 GiB for Llama-3-8B) at the cost of reading the
        step's rows over PCIe every forward and of page-locked host memory; worth it when GPU
        memory is what limits the run. :func:`get_peft_model` takes the same option.

        Also accepts, as Unsloth does:

        * a LoRA adapter folder or hub id (``adapter_config.json``, no ``config.json``): the base
          named in its ``base_model_name_or_path`` is loaded with the other arguments, then the
          adapter, trainable (:meth:`rslora_fast.PeftModel.from_pretrained` with
          ``is_trainable=True``); the tokenizer saved with the adapter is preferred;
        * ``full_finetuning=True``: 16-bit weights, all trainable, and ``use_gradient_checkpointing``
          (default ``"unsloth"``, as in Unsloth) installed on the model. Without full fine-tuning
          the checkpointing mode is :func:`get_peft_model`'s argument;
        * ``load_in_16bit=True`` (same as ``load_in_4bit=False``);
        * ``fast_inference=True``: a warning that generation uses the standard transformers path;
        * ``max_lora_rank``, ``gpu_memory_utilization``, ``float8_kv_cache``, ``disable_log_stats``,
          ``unsloth_vllm_standby``: only meaningful for a vLLM-backed fast inference; accepted with
          one log line;
        * ``use_exact_model_name``, ``fix_tokenizer``, ``random_state``: accepted, no effect (names
          are always used as given; the tokenizer is used as saved, with a pad token set).

        Raises:
            TypeError: an unknown keyword (the message lists the accepted ones).
            CheckpointNotFoundError: an adapter whose base model cannot be found (names both).
        """
        from .loading import from_pretrained

        _take_unsloth_keywords(kwargs, fast_inference)
        if use_gradient_checkpointing is not None:
            use_gradient_checkpointing = validate_mode(use_gradient_checkpointing)
        if load_in_16bit:
            if load_in_4bit:
                raise ValueError("load_in_16bit=True and load_in_4bit=True contradict each other; pass one")
            load_in_4bit = False
        adapter, base = _adapter_and_base(model_name, kwargs)
        try:
            model, tokenizer = from_pretrained(
                base, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                full_finetuning=full_finetuning, **kwargs,
            )  # fmt: skip
        except CheckpointNotFoundError as exc:
            if adapter is None:
                raise
            raise CheckpointNotFoundError(
                f"the adapter in {str(adapter)!r} names base model {base!r} (base_model_name_or_path in "
                f"adapter_config.json), which cannot be loaded: {exc}"
            ) from exc
        if adapter is not None:
            model, tokenizer = _attach_adapter(model, tokenizer, adapter, kwargs)
        if offload_embedding is not False:
            _offload_embedding(model, offload_embedding, full_finetuning)
        if full_finetuning and use_gradient_checkpointing is None:
            use_gradient_checkpointing = "unsloth"  # Unsloth's default
        if full_finetuning or (adapter is not None and use_gradient_checkpointing is not None):
            _install_checkpointing(model, use_gradient_checkpointing, _inner(model).max_seq_length)
        elif use_gradient_checkpointing is not None:
            log.info(
                "from_pretrained: use_gradient_checkpointing=%r takes effect through get_peft_model "
                "(or with full_finetuning=True); pass it there",
                use_gradient_checkpointing,
            )
        return model, tokenizer

    #: :func:`rslora_fast.get_peft_model`, with its full signature and docstring.
    get_peft_model = staticmethod(_get_peft_model)

    @staticmethod
    def for_inference(model: nn.Module, merge_lora: bool = False) -> nn.Module:
        """Switch a model to generation: checkpointing off, dropout off, KV cache on, fast generate.

        Gradient checkpointing is removed (it only costs time without a backward pass and
        transformers turns the cache off under it), ``model.eval()`` disables every dropout (LoRA's
        included), and ``use_cache`` is set to True on the config and the generation config.
        ``model.generate`` then goes through the fast decode path (same API; LoRA stays unmerged;
        ``RSLORA_FAST_GENERATE=off`` keeps HF's; see docs/generation.md).
        :meth:`for_training` restores the checkpointing mode that was configured and HF's generate.

        ``merge_lora=True`` folds every enabled adapter into its 16-bit base for the time of
        generation (each step then reads the base weights only), keeping the original weights in
        host memory; :meth:`for_training` (or ``for_inference(model)``) restores them bit for bit.
        A training forward while merged raises. 4-bit bases are refused (merging would requantize
        them).

        Args:
            model: a :class:`~rslora_fast.PeftModel` or a transformers model.
            merge_lora: merge the adapters into their bases until :meth:`for_training`.

        Returns:
            ``model`` itself (changed in place), for chaining.

        Raises:
            TypeError: ``merge_lora`` is not a bool.
            ValueError: ``merge_lora=True`` with a 4-bit base (nothing is changed).
        """
        if not isinstance(merge_lora, bool):
            raise TypeError(f"for_inference: merge_lora must be True or False, got {merge_lora!r}")
        inner = _inner(model)
        if merge_lora:
            merge_for_inference(inner)
        else:
            unmerge_after_inference(inner)
        was_on = bool(getattr(inner, "is_gradient_checkpointing", False))
        if was_on:
            # The configured mode is kept by get_peft_model; for other models remember that it was on.
            if getattr(model, "_gradient_checkpointing", None) is None:
                model.__dict__["_gradient_checkpointing"] = {"mode": True, "use_reentrant": False}
            apply_gradient_checkpointing(inner, False)
        _set_use_cache(inner, True)
        model.eval()
        from . import generate

        generate.enable(inner)
        return model

    @staticmethod
    def for_training(model: nn.Module) -> nn.Module:
        """Switch a model back to training: configured checkpointing on, dropout on, KV cache off.

        The checkpointing mode is the one given to :func:`~rslora_fast.get_peft_model` (or enabled
        later through ``gradient_checkpointing_enable``); ``model.train()`` re-enables dropout, and
        ``use_cache`` is set to False (a cache is useless in training and conflicts with
        checkpointing). The fast generate path is switched off and its KV cache freed, and
        adapters merged by ``for_inference(model, merge_lora=True)`` are unmerged (the original
        base weights restored bit for bit).

        Args:
            model: a :class:`~rslora_fast.PeftModel` or a transformers model.

        Returns:
            ``model`` itself (changed in place), for chaining.
        """
        inner = _inner(model)
        unmerge_after_inference(inner)
        cfg = getattr(model, "_gradient_checkpointing", None) or {}
        mode = cfg.get("mode", False)
        if mode is not False and not getattr(inner, "is_gradient_checkpointing", False):
            apply_gradient_checkpointing(
                inner,
                mode,
                cfg.get("max_seq_length", 2048),
                use_reentrant=bool(cfg.get("use_reentrant", False)),
                max_memory_gb=cfg.get("max_memory_gb"),
                save_policy=cfg.get("save_policy", "never"),
            )
        _set_use_cache(inner, False)
        model.train()
        from . import generate

        generate.disable(inner)
        return model


#: Target modules that Unsloth's FastModel flags stand for, in the language model.
_ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]


def _targets_from_finetune_flags(kwargs: dict) -> list[str] | None:
    """``target_modules`` from Unsloth's ``finetune_*`` flags (popped from ``kwargs``); None: not given."""
    flags = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("finetune_")}
    unknown = sorted(set(flags) - {"finetune_vision_layers", "finetune_language_layers",
                                   "finetune_attention_modules", "finetune_mlp_modules"})  # fmt: skip
    if unknown:
        raise TypeError(f"get_peft_model() got unexpected keyword argument(s) {unknown}")
    if not flags:
        return None
    if flags.get("finetune_vision_layers"):
        log.info("get_peft_model: finetune_vision_layers=True: text models have no vision layers")
    if not flags.get("finetune_language_layers", True):
        raise ValueError("finetune_language_layers=False leaves nothing to train in a text model; pass True")
    targets = _ATTENTION_MODULES if flags.get("finetune_attention_modules", True) else []
    targets = targets + (_MLP_MODULES if flags.get("finetune_mlp_modules", True) else [])
    if not targets:
        raise ValueError(
            "finetune_attention_modules=False and finetune_mlp_modules=False select no layer; "
            "set one of them to True (or pass target_modules=)"
        )
    return targets


class FastModel(FastLanguageModel):
    """:class:`FastLanguageModel` under the name Unsloth uses for any model family.

    Its ``get_peft_model`` also takes Unsloth's ``finetune_vision_layers`` /
    ``finetune_language_layers`` / ``finetune_attention_modules`` / ``finetune_mlp_modules`` flags:
    attention means ``q/k/v/o_proj``, MLP ``gate/up/down_proj``; an explicit ``target_modules`` wins.
    """

    @staticmethod
    @functools.wraps(_get_peft_model)
    def get_peft_model(model: nn.Module, *args: Any, **kwargs: Any):
        targets = _targets_from_finetune_flags(kwargs)
        if targets is not None and "target_modules" not in kwargs and len(args) < 2:
            kwargs["target_modules"] = targets
        return _get_peft_model(model, *args, **kwargs)
