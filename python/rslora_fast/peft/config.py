"""``LoraConfig``: the settings of one LoRA adapter, serializable to PEFT's ``adapter_config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from .._validate import boolean, is_int, positive_int

CONFIG_NAME = "adapter_config.json"

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ACCEPTED_BIAS = ("none", "all", "lora_only")
ACCEPTED_INIT = (True, False, "gaussian", "loftq")

# PEFT LoRA options that change the math in ways this package does not implement. Reading a config
# that turns one of them on must fail loudly rather than silently give different outputs.
_UNSUPPORTED_IF_SET = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "use_qalora": False,
}
_UNSUPPORTED_IF_NOT_EMPTY = ("target_parameters", "trainable_token_indices", "layer_replication")


def _check_positive_int(name: str, value: Any) -> None:
    positive_int(name, value)


def _check_positive_number(name: str, value: Any) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter, mirroring the fields of HF PEFT's ``LoraConfig``.

    Serializes to (and reads from) PEFT's ``adapter_config.json`` so adapters move freely between
    rslora_fast and PEFT.

    Args:
        r: LoRA rank, a positive int.
        target_modules: list of module names (a module matches when its full name equals an entry or
            ends with ``"." + entry``), a regex string matched with ``re.fullmatch`` against the full
            module name, or ``"all-linear"`` (every linear layer except the output head).
        lora_alpha: positive scaling numerator.
        lora_dropout: dropout probability on the LoRA branch, in ``[0, 1)``.
        bias: ``"none"``, ``"all"`` (every bias of the model is trained) or ``"lora_only"`` (only the
            biases of targeted layers).
        use_rslora: scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        modules_to_save: names of modules trained in full and saved with the adapter (e.g. ``lm_head``).
        layers_to_transform: decoder-layer index or indices to adapt (with a list ``target_modules``).
        layers_pattern: name(s) of the layer list (e.g. ``"layers"``) used to read layer indices.
        exclude_modules: names (list) or a regex (str) of modules never to adapt.
        init_lora_weights: ``True`` (A kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, (1/r)^2),
            B zero), ``"loftq"`` or ``False`` (A and B both random: the adapter is not a no-op).
        rank_pattern: ``{regex: rank}`` overrides per module (matched against the end of the name).
        alpha_pattern: ``{regex: alpha}`` overrides per module.
        task_type: PEFT task type written to the config, e.g. ``"CAUSAL_LM"``.
        loftq_config: ``{"loftq_bits": 4, "loftq_iter": T}`` for LoftQ initialization, or ``{}``.
        base_model_name_or_path: recorded in the saved config.
        inference_mode: whether the adapter is frozen (written as ``true`` by ``save_pretrained``).

    Raises:
        ValueError: on any out-of-range or unknown setting; the message names the value and what
            is accepted.
    """

    r: int = 16
    target_modules: list[str] | str | None = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = "CAUSAL_LM"
    loftq_config: dict[str, Any] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; see the class docstring for what is accepted.

        Raises:
            ValueError: naming the bad value and what is accepted.
        """
        _check_positive_int("r", self.r)
        _check_positive_number("lora_alpha", self.lora_alpha)
        d = self.lora_dropout
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not (0.0 <= d < 1.0):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {d!r}")
        if self.bias not in ACCEPTED_BIAS:
            raise ValueError(f"bias must be one of {list(ACCEPTED_BIAS)}, got {self.bias!r}")
        boolean("use_rslora", self.use_rslora)
        iw = self.init_lora_weights
        if not (isinstance(iw, bool) or (isinstance(iw, str) and iw in ("gaussian", "loftq"))):
            raise ValueError(
                f"init_lora_weights must be one of {list(ACCEPTED_INIT)}, got {self.init_lora_weights!r}"
            )
        tm = self.target_modules
        if isinstance(tm, (set, tuple)):
            self.target_modules = tm = sorted(tm) if isinstance(tm, set) else list(tm)
        if not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
            raise ValueError(
                f"target_modules must be a list of module names, a regex string or 'all-linear', got {tm!r}"
            )
        if isinstance(tm, list) and not tm:
            raise ValueError(
                "target_modules is empty; give at least one module name, a regex or 'all-linear'"
            )
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = list(self.modules_to_save)
        ltt = self.layers_to_transform
        if ltt is not None:
            items = [ltt] if not isinstance(ltt, (list, tuple)) else list(ltt)
            for i in items:
                if not is_int(i) or i < 0:
                    raise ValueError(
                        f"layers_to_transform must be a non-negative int or a list of them, got {ltt!r}"
                    )
            if isinstance(ltt, tuple):
                self.layers_to_transform = list(ltt)
        for name in ("rank_pattern", "alpha_pattern"):
            val = getattr(self, name)
            if val is None:
                setattr(self, name, {})
            elif not isinstance(val, dict):
                raise ValueError(f"{name} must be a dict {{regex: value}}, got {val!r}")
        for key, val in self.rank_pattern.items():
            _check_positive_int(f"rank_pattern[{key!r}]", val)
        for key, val in self.alpha_pattern.items():
            _check_positive_number(f"alpha_pattern[{key!r}]", val)
        if self.loftq_config is None:
            self.loftq_config = {}
        if not isinstance(self.loftq_config, dict):
            raise ValueError(
                f"loftq_config must be a dict like {{'loftq_bits': 4, 'loftq_iter': 1}}, "
                f"got {self.loftq_config!r}"
            )
        if self.loftq_config:
            bits = self.loftq_config.get("loftq_bits", 4)
            if bits != 4:
                raise ValueError(f"loftq_bits must be 4 (NF4 is the only LoftQ quantizer), got {bits!r}")
            _check_positive_int("loftq_iter", self.loftq_config.get("loftq_iter", 1))
            unknown = set(self.loftq_config) - {"loftq_bits", "loftq_iter"}
            if unknown:
                raise ValueError(
                    f"unknown loftq_config keys {sorted(unknown)}; accepted: loftq_bits, loftq_iter"
                )
        if self.peft_type != "LORA":
            raise ValueError(f"only peft_type 'LORA' is supported, got {self.peft_type!r}")

    # ------------------------------------------------------------------ helpers
    @property
    def uses_loftq(self) -> bool:
        """True when the adapter is initialized with LoftQ."""
        return self.init_lora_weights == "loftq" or bool(self.loftq_config)

    def settings(self) -> dict[str, Any]:
        """The fields that define the adapter's structure and math (for "same settings" checks)."""
        d = self.to_dict()
        for k in ("base_model_name_or_path", "inference_mode"):
            d.pop(k, None)
        return d

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """Return PEFT's ``adapter_config.json`` fields as a plain dict.

        Returns:
            A JSON-serializable dict including the fixed PEFT fields this package does not vary
            (``fan_in_fan_out``, ``use_dora``, ...).
        """
        d = dataclasses.asdict(self)
        d.update(
            {
                "fan_in_fan_out": False,
                "use_dora": False,
                "lora_bias": False,
                "revision": None,
                "auto_mapping": None,
                "megatron_config": None,
                "megatron_core": "megatron.core",
                "layer_replication": None,
                "target_parameters": None,
                "trainable_token_indices": None,
            }
        )
        return d

    def to_json_string(self) -> str:
        """Serialize like PEFT: JSON with indent 2 and sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``adapter_config.json`` into ``save_directory``.

        Args:
            save_directory: target folder (created if missing).

        Returns:
            The path of the written file.
        """
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build a config from a PEFT ``adapter_config.json`` dict, ignoring unknown keys.

        Args:
            data: the parsed JSON.

        Returns:
            The config.

        Raises:
            ValueError: if the config is not LoRA or turns on a PEFT feature this package does not
                implement (DoRA, ``fan_in_fan_out``, ``lora_bias``, ...).
        """
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"only LoRA adapters are supported, the config has peft_type={peft_type!r}")
        for key, ok in _UNSUPPORTED_IF_SET.items():
            if data.get(key, ok) not in (ok, None):
                raise ValueError(
                    f"adapter config sets {key}={data[key]!r}, which rslora_fast does not support"
                )
        for key in _UNSUPPORTED_IF_NOT_EMPTY:
            if data.get(key):
                raise ValueError(
                    f"adapter config sets {key}={data[key]!r}, which rslora_fast does not support"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("target_modules") is None:
            raise ValueError("adapter config has no target_modules")
        if kwargs.get("lora_dropout") is None:
            kwargs["lora_dropout"] = 0.0
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LoraConfig:
        """Read ``adapter_config.json`` from a local folder.

        Args:
            directory: folder holding ``adapter_config.json``.

        Returns:
            The config.

        Raises:
            FileNotFoundError: if the file is missing.
        """
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a valid JSON adapter config ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{path}: {exc}") from None
