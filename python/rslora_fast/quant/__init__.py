"""4-bit (NF4 / FP4) quantized weights: the functional API and the ``Linear4bit`` module."""

from .functional import QuantState, dequantize_4bit, quantize_4bit

__all__ = ["QuantState", "dequantize_4bit", "quantize_4bit"]
from .linear4bit import Linear4bit, is_4bit_linear  # noqa: E402, F401  (re-exported)
