"""Trainer keywords of Unsloth-era notebooks, mapped onto the configs of the installed TRL.

Notebooks written for Unsloth build TRL trainers the way TRL accepted them in 2024::

    SFTTrainer(model=, tokenizer=, train_dataset=, dataset_text_field=, max_seq_length=,
               dataset_num_proc=, packing=, args=TrainingArguments(...))
    DPOTrainer(model=, ref_model=None, args=, beta=, train_dataset=, tokenizer=, max_length=,
               max_prompt_length=)

Current TRL takes the tokenizer as ``processing_class`` and the data options as fields of
``SFTConfig`` / ``DPOConfig``. :func:`install` wraps the two trainers' ``__init__`` so that such a
call is rewritten before TRL sees it: the tokenizer goes to ``processing_class``, the options go
into a copy of ``args`` converted to the trainer's config class. It is version-guarded per keyword:
a keyword the installed ``__init__`` still accepts is left alone, one that maps to no field of the
installed config is passed through (TRL then raises its own ``TypeError``), and a call without any
of these keywords reaches TRL unchanged. One INFO line per trainer class says what was mapped.

``warmup_ratio=`` (removed from ``TrainingArguments`` in transformers 5, whose ``warmup_steps``
takes a ratio as a float in [0, 1)) is mapped the same way on ``TrainingArguments`` and TRL's
configs.

Importing :mod:`rslora_fast` installs a post-import hook, so the wrapping happens whenever TRL's
trainer modules load, in either import order; set ``RSLORA_FAST_NO_TRL_COMPAT=1`` to turn it off.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import importlib.machinery
import inspect
import logging
import os
import sys
from typing import Any

log = logging.getLogger("rslora_fast.trl_compat")

#: Legacy keyword -> field of the trainer's config (``None``: the trainer's ``processing_class``).
SFT_KEYWORDS: dict[str, str | None] = {
    "tokenizer": None,
    "dataset_text_field": "dataset_text_field",
    "max_seq_length": "max_length",
    "dataset_num_proc": "dataset_num_proc",
    "packing": "packing",
    "dataset_kwargs": "dataset_kwargs",
}
DPO_KEYWORDS: dict[str, str | None] = {
    "tokenizer": None,
    "beta": "beta",
    "max_length": "max_length",
    "loss_type": "loss_type",
    "label_smoothing": "label_smoothing",
    "dataset_num_proc": "dataset_num_proc",
}
#: Legacy keywords that the installed TRL no longer has at all, with what replaced them.
DPO_DROPPED: dict[str, str] = {
    "max_prompt_length": "TRL >= 1.0 truncates prompt + completion together to max_length "
    "(DPOConfig.truncation_mode)",
    "max_completion_length": "TRL >= 1.0 truncates prompt + completion together to max_length",
}

#: Training-argument keywords that transformers 5 removed, and the field that now carries them.
#: ``warmup_steps`` takes a float in [0, 1) as a ratio of the total steps since transformers 5.
ARG_KEYWORDS: dict[str, str] = {"warmup_ratio": "warmup_steps"}
_ARG_CLASSES = {
    "transformers.training_args": ("TrainingArguments",),
    "trl.trainer.sft_config": ("SFTConfig",),
    "trl.trainer.dpo_config": ("DPOConfig",),
    "trl.trainer.grpo_config": ("GRPOConfig",),
}

_TARGETS = {
    "trl.trainer.sft_trainer": ("SFTTrainer", "SFTConfig", SFT_KEYWORDS, {}),
    "trl.trainer.dpo_trainer": ("DPOTrainer", "DPOConfig", DPO_KEYWORDS, DPO_DROPPED),
}
_logged: set[str] = set()


def _as_config(args: Any, config_cls: type) -> Any:
    """``args`` as an instance of ``config_cls`` (a copy; ``None`` gives the config's defaults)."""
    if isinstance(args, config_cls):
        return args
    if args is None:
        return config_cls()
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and hasattr(args, f.name)
    }
    return config_cls(**values)


def _split(kwargs: dict[str, Any], accepted: set[str], table: dict[str, str | None], fields: set[str]):
    """The keywords to move (into the config or ``processing_class``), leaving the rest in ``kwargs``."""
    moved: dict[str, tuple[str | None, Any]] = {}
    for key in list(kwargs):
        if key in accepted or key not in table:
            continue
        target = table[key]
        if target is not None and target not in fields:
            continue  # not in this TRL either: let TRL name it
        moved[key] = (target, kwargs.pop(key))
    return moved


def _rewrite(cls_name: str, config_cls: type, accepted: set[str], table, dropped, kwargs: dict) -> dict:
    fields = {f.name for f in dataclasses.fields(config_cls)}
    gone = {k: kwargs.pop(k) for k in list(kwargs) if k in dropped and k not in accepted and k not in fields}
    moved = _split(kwargs, accepted, table, fields)
    if not moved and not gone:
        return kwargs
    updates = {t: v for t, v in moved.values() if t is not None}
    if updates:
        kwargs["args"] = dataclasses.replace(_as_config(kwargs.get("args"), config_cls), **updates)
    if "tokenizer" in moved:
        if kwargs.get("processing_class") is not None:
            raise TypeError(f"{cls_name}: pass the tokenizer as tokenizer= or processing_class=, not both")
        kwargs["processing_class"] = moved["tokenizer"][1]
    _log_once(cls_name, config_cls.__name__, moved, gone, dropped)
    return kwargs


def _log_once(cls_name: str, config_name: str, moved: dict, gone: dict, dropped: dict[str, str]) -> None:
    key = f"{cls_name}:{sorted(moved)}:{sorted(gone)}"
    if key in _logged:
        return
    _logged.add(key)
    parts = [
        f"{k} -> {'processing_class' if t is None else f'{config_name}.{t}'}" for k, (t, _) in moved.items()
    ]
    parts += [f"{k} ignored ({dropped[k]})" for k in gone]
    log.info(
        "rslora_fast mapped %s arguments of an older TRL or transformers API: %s", cls_name, "; ".join(parts)
    )


def _wrap(trainer_cls: type, config_cls: type, table: dict, dropped: dict) -> None:
    original = trainer_cls.__init__
    if getattr(original, "__rslora_compat__", False):
        return
    params = inspect.signature(original).parameters
    accepted = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD}

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs = _rewrite(trainer_cls.__name__, config_cls, accepted, table, dropped, kwargs)
        original(self, *args, **kwargs)

    __init__.__rslora_compat__ = True  # type: ignore[attr-defined]
    trainer_cls.__init__ = __init__


def _wrap_args_class(cls: type) -> None:
    """Let ``cls(warmup_ratio=r)`` mean ``warmup_steps=r`` where the field is gone (transformers 5)."""
    original = cls.__init__
    fields = {f.name for f in dataclasses.fields(cls)}
    table = {k: v for k, v in ARG_KEYWORDS.items() if k not in fields and v in fields}
    if getattr(original, "__rslora_compat__", False) or not table:
        return

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for old, new in table.items():
            if old in kwargs:
                value = kwargs.pop(old)
                if kwargs.get(new):  # both given: the current name wins, as it would in transformers 4
                    continue
                kwargs[new] = value
                _log_once(cls.__name__, cls.__name__, {old: (new, value)}, {}, {})
        original(self, *args, **kwargs)

    __init__.__rslora_compat__ = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


def _patch_module(module: Any) -> None:
    for name in _ARG_CLASSES.get(module.__name__, ()):
        cls = getattr(module, name, None)
        if cls is not None and dataclasses.is_dataclass(cls):
            _wrap_args_class(cls)
    if module.__name__ not in _TARGETS:
        return
    trainer_name, config_name, table, dropped = _TARGETS[module.__name__]
    trainer_cls, config_cls = getattr(module, trainer_name, None), getattr(module, config_name, None)
    if trainer_cls is None or config_cls is None:
        log.debug("trl_compat: %s lacks %s/%s; nothing wrapped", module.__name__, trainer_name, config_name)
        return
    _wrap(trainer_cls, config_cls, table, dropped)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`_patch_module` right after one of TRL's trainer modules has executed."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in _TARGETS and fullname not in _ARG_CLASSES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patch_module(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Wrap TRL's SFT/DPO trainers now if loaded, else as soon as they load. Idempotent."""
    if os.environ.get("RSLORA_FAST_NO_TRL_COMPAT", "") not in ("", "0"):
        return
    for name in [*_ARG_CLASSES, *_TARGETS]:
        if name in sys.modules:
            _patch_module(sys.modules[name])
    if not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())
