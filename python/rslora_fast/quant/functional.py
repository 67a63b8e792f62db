"""NF4 / FP4 blockwise quantization, byte-compatible with bitsandbytes.

Format (``docs/formats.md``): the weight is flattened row-major, split into blocks of
``blocksize`` consecutive elements (the last block may be partial), each block is scaled by its
absolute maximum and every element is replaced by the index of the nearest of 16 code values
(ties go to the lower code). Two codes share a byte, the first element in the high nibble.
With double quantization ("compress_statistics") the float32 block scales are themselves
quantized to 8 bits (blockwise 256, signed dynamic map) around their mean.

Paths: CUDA tensors go through our kernels (``kernels/nf4.cu``), CPU tensors through the Rust core
(``src/quant``); ``quantize_4bit_reference`` / ``dequantize_4bit_reference`` are plain-torch
versions of the same arithmetic, used by the tests and as the fallback when the extension is
not built.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .. import _native
from .._device import KERNEL_DTYPES, device_index, on_gpu, raw_stream, stream_of, use_kernels
from ..errors import QuantFormatError

__all__ = [
    "DequantPlan",
    "QuantState",
    "check_finite_scales",
    "dequantize_4bit",
    "dequantize_4bit_reference",
    "dynamic_map",
    "NF4_CODE",
    "get_4bit_code",
    "quantize_4bit",
    "quantize_4bit_reference",
]

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256

# Code values (float32), index = the 4-bit code. FP4: bit 3 is the sign, magnitudes /12.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
_FP4_MAG = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
_FP4 = tuple(m / 12.0 for m in _FP4_MAG) + tuple(-m / 12.0 for m in _FP4_MAG)
# Ascending order of the FP4 codes; the two zeros (+0 at 0, -0 at 8) keep index order, which is
# what bitsandbytes' encoder uses (a value in (0, first midpoint] encodes as code 8, i.e. -0).
_FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

_NAME_DTYPES = {v: k for k, v in KERNEL_DTYPES.items()}


def _check(blocksize: int, quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantFormatError(f"unknown 4-bit quant type {quant_type!r}; expected 'nf4' or 'fp4'")
    if (
        isinstance(blocksize, bool)
        or not isinstance(blocksize, int)
        or not 32 <= blocksize <= 4096
        or blocksize & (blocksize - 1)
    ):
        raise QuantFormatError(f"blocksize {blocksize!r} not allowed; expected a power of two in 32..4096")


def get_4bit_code(quant_type: str = "nf4", device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 code values of ``quant_type`` (bitsandbytes' ``quant_map``)."""
    if quant_type not in QUANT_TYPES:
        raise QuantFormatError(f"unknown 4-bit quant type {quant_type!r}; expected 'nf4' or 'fp4'")
    return torch.tensor(NF4_CODE if quant_type == "nf4" else _FP4, dtype=torch.float32, device=device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic map, 7 exponent bits, 8 bits total: for exponent step i (0..6) the means of
    # the 2**i + 1 evenly spaced float32 points of [0.1, 1], scaled by 10**(i - 6), with both
    # signs; plus 0 and 1: 254 + 2 = 256 sorted values. The points follow torch.linspace's
    # float32 arithmetic (a fused multiply-add from the nearer end), as bitsandbytes builds them.
    f32 = torch.float32
    vals: list[torch.Tensor] = []
    for i in range(7):
        k = 2**i + 1
        start, end = torch.tensor(0.1, dtype=f32), torch.tensor(1.0, dtype=f32)
        step = (end - start) / (k - 1)
        j = torch.arange(k, dtype=torch.float64)
        lo = start.double() + step.double() * j  # exact product: one rounding, like an fma
        hi = end.double() - step.double() * (k - 1 - j)
        pts = torch.where(j < k // 2, lo, hi).to(f32)
        means = (pts[:-1] + pts[1:]) / 2.0
        scale = torch.tensor(10.0 ** (i - 6), dtype=f32)
        vals += [means * scale, -(means * scale)]
    vals += [torch.zeros(1, dtype=f32), torch.ones(1, dtype=f32)]
    return torch.sort(torch.cat(vals)).values


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted float32 values, -0.99296875 .. 1.0)."""
    return _dynamic_map_cpu().to(device)


@functools.cache
def _dynamic_lut_cpu() -> torch.Tensor:
    # bitsandbytes' CPU blockwise quantizer: [-1, 1] is cut into 65536 evenly spaced points and
    # each point gets the index of the nearest code (count of float32 midpoints below it).
    code = _dynamic_map_cpu()
    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(65536, dtype=torch.float32)
    pts = -1.0 + (2.0 * i) / 65535.0
    return torch.bucketize(pts, mids, right=False).to(torch.uint8)


# ---------------------------------------------------------------------------------- state
@dataclass
class QuantState:
    """Everything needed to dequantize one 4-bit weight (the packed bytes live beside it).

    ``absmax`` is float32 ``[nblocks]``, or uint8 ``[nblocks]`` with double quantization, in
    which case ``nested_absmax`` (float32 ``[ceil(nblocks / 256)]``), ``nested_code`` (float32
    ``[256]``) and ``nested_offset`` are set.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        """True when the block scales are double-quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original weight."""
        return math.prod(self.shape)

    def to(self, device) -> QuantState:
        """A copy with every tensor on ``device``."""

        def mv(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            absmax=self.absmax.to(device),
            code=mv(self.code),
            nested_absmax=mv(self.nested_absmax),
            nested_code=mv(self.nested_code),
        )

    def block_scales(self) -> torch.Tensor:
        """The float32 per-block scales (undoing double quantization when present)."""
        if not self.nested:
            return self.absmax.float()
        code = self.nested_code if self.nested_code is not None else dynamic_map(self.absmax.device)
        nb = self.absmax.numel()
        nested = self.nested_absmax.to(self.absmax.device).float()
        idx = torch.arange(nb, device=self.absmax.device) // self.nested_blocksize
        scales = code.to(self.absmax.device)[self.absmax.long()] * nested[idx]
        return scales + torch.tensor(self.nested_offset, dtype=torch.float32, device=scales.device)

    def json_dict(self) -> dict:
        """The ``quant_state`` JSON object bitsandbytes stores (keys in its order)."""
        d = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": KERNEL_DTYPES.get(self.dtype, str(self.dtype).removeprefix("torch.")),
            "shape": list(self.shape),
        }
        if self.nested:
            d["nested_blocksize"] = self.nested_blocksize
            d["nested_dtype"] = "float32"
            d["nested_offset"] = float(self.nested_offset)
        return d

    def as_bnb_dict(self, prefix: str, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors in bitsandbytes' serialized layout, under module prefix ``prefix``.

        Keys: ``{prefix}.weight`` (the packed bytes), ``.weight.absmax``, ``.weight.quant_map``,
        with double quantization ``.weight.nested_absmax`` and ``.weight.nested_quant_map``, and
        ``.weight.quant_state.bitsandbytes__<quant_type>`` (uint8 bytes of the JSON state).
        An empty ``prefix`` gives keys starting at ``weight``.
        """
        base = f"{prefix.rstrip('.')}.weight" if prefix else "weight"
        code = self.code if self.code is not None else get_4bit_code(self.quant_type)
        out = {base: packed, f"{base}.absmax": self.absmax, f"{base}.quant_map": code.to(torch.float32)}
        if self.nested:
            nc = self.nested_code if self.nested_code is not None else dynamic_map()
            out[f"{base}.nested_absmax"] = self.nested_absmax
            out[f"{base}.nested_quant_map"] = nc
        raw = json.dumps(self.json_dict()).encode("utf-8")
        out[f"{base}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(raw), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_bnb_dict(
        cls, prefix: str, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, QuantState]:
        """Read ``(packed, state)`` from bitsandbytes' layout (see :meth:`as_bnb_dict`).

        ``prefix`` is the module prefix (keys ``{prefix}.weight...``); the weight key itself
        (``{prefix}`` ending in ``.weight``) is accepted too. Raises :class:`QuantFormatError`
        naming the key when something is missing or malformed.
        """
        p = prefix.rstrip(".")
        base = f"{p}.weight" if p else "weight"
        if base not in tensors and p in tensors:
            base = p
        if base not in tensors:
            raise QuantFormatError(f"missing packed 4-bit weight {base!r}")
        packed = tensors[base]
        qs_keys = [k for k in tensors if k.startswith(f"{base}.quant_state.")]
        if len(qs_keys) != 1:
            raise QuantFormatError(
                f"expected exactly one {base}.quant_state.bitsandbytes__nf4/fp4 entry, found {qs_keys}"
            )
        qkey = qs_keys[0]
        suffix = qkey.rsplit(".", 1)[-1]
        if suffix not in ("bitsandbytes__nf4", "bitsandbytes__fp4"):
            raise QuantFormatError(f"unknown quant_state key {qkey!r}")
        meta = parse_quant_state(bytes(tensors[qkey].to(torch.uint8).flatten().tolist()), qkey)
        if meta["quant_type"] != suffix.removeprefix("bitsandbytes__"):
            raise QuantFormatError(f"{qkey}: key says {suffix} but the JSON says {meta['quant_type']!r}")

        def need(name):
            key = f"{base}.{name}"
            if key not in tensors:
                raise QuantFormatError(f"missing {key!r} (needed by {qkey})")
            return tensors[key]

        shape = torch.Size(meta["shape"])
        n = math.prod(shape)
        nblocks = -(-n // meta["blocksize"])
        if packed.dtype != torch.uint8:
            packed = packed.contiguous().view(torch.uint8)
        if packed.numel() != (n + 1) // 2:
            raise QuantFormatError(
                f"{base}: packed weight has {packed.numel()} bytes, shape {list(shape)} needs {(n + 1) // 2}"
            )
        absmax = need("absmax")
        if absmax.numel() != nblocks:
            raise QuantFormatError(f"{base}.absmax has {absmax.numel()} entries, expected {nblocks}")
        code = tensors.get(f"{base}.quant_map")
        # Like bitsandbytes, values come from the built-in table; the stored map must still be one.
        if code is not None and code.numel() != 16:
            raise QuantFormatError(f"{base}.quant_map has {code.numel()} entries, expected 16")
        state = cls(
            absmax=absmax,
            shape=shape,
            dtype=_NAME_DTYPES[meta["dtype"]],
            blocksize=meta["blocksize"],
            quant_type=meta["quant_type"],
            code=code.float() if code is not None else get_4bit_code(meta["quant_type"], packed.device),
        )
        if "nested_offset" in meta:
            if absmax.dtype != torch.uint8:
                raise QuantFormatError(
                    f"{base}.absmax must be uint8 with double quantization, got {absmax.dtype}"
                )
            nested = need("nested_absmax")
            nb2 = -(-nblocks // meta["nested_blocksize"])
            if nested.numel() != nb2:
                raise QuantFormatError(f"{base}.nested_absmax has {nested.numel()} entries, expected {nb2}")
            state.nested_absmax = nested.float()
            nested_code = need("nested_quant_map")
            if nested_code.numel() != 256:  # the dequantize kernel reads exactly 256 entries
                raise QuantFormatError(
                    f"{base}.nested_quant_map has {nested_code.numel()} entries, expected 256"
                )
            state.nested_code = nested_code.float()
            state.nested_offset = float(meta["nested_offset"])
            state.nested_blocksize = meta["nested_blocksize"]
        elif absmax.dtype != torch.float32:
            raise QuantFormatError(
                f"{base}.absmax must be float32 without double quantization, got {absmax.dtype}"
            )
        check_finite_scales(state, base)
        return packed.reshape(-1, 1), state


def check_finite_scales(state: QuantState, what: str) -> None:
    """Raise :class:`QuantFormatError` naming ``what`` if a block scale is NaN or infinite.

    A NaN or infinite weight makes its block's scale NaN/inf (the quantizer keeps NaN, as
    bitsandbytes does), and a corrupted file can hold one directly; either way every value of
    the block would dequantize to NaN, so loaders refuse it instead of training on it.
    """
    if state.nested:
        bad = (~torch.isfinite(state.nested_absmax.float())).sum().item()
        if bad or not math.isfinite(float(state.nested_offset)):
            raise QuantFormatError(
                f"{what}: {bad} non-finite nested_absmax value(s) (offset {state.nested_offset}); "
                "the weight holds NaN/inf or the file is corrupted"
            )
    elif state.absmax.is_floating_point():
        bad = (~torch.isfinite(state.absmax)).sum().item()
        if bad:
            raise QuantFormatError(
                f"{what}: {bad} non-finite absmax value(s); the weight holds NaN/inf or the file is corrupted"
            )


def parse_quant_state(raw: bytes, what: str = "quant_state") -> dict:
    """Parse and check bitsandbytes' ``quant_state`` JSON; :class:`QuantFormatError` if malformed."""
    core = _native.core_or_none()
    if core is not None:
        return core.parse_quant_state(raw)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantFormatError(f"{what}: not valid UTF-8 JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise QuantFormatError(f"{what}: expected a JSON object")
    for key, typ in (("quant_type", str), ("blocksize", int), ("dtype", str), ("shape", list)):
        if not isinstance(meta.get(key), typ):
            raise QuantFormatError(f"{what}: missing or mistyped {key!r}")
    _check(meta["blocksize"], meta["quant_type"])
    if meta["dtype"] not in _NAME_DTYPES:
        raise QuantFormatError(f"{what}: unsupported dtype {meta['dtype']!r}")
    if not all(isinstance(s, int) and s >= 0 for s in meta["shape"]):
        raise QuantFormatError(f"{what}: bad shape {meta['shape']!r}")
    nested = [k for k in ("nested_blocksize", "nested_dtype", "nested_offset") if k in meta]
    if nested and len(nested) != 3:
        raise QuantFormatError(f"{what}: incomplete nested statistics (have {nested})")
    if nested:
        if meta["nested_dtype"] != "float32" or not isinstance(meta["nested_blocksize"], int):
            raise QuantFormatError(f"{what}: bad nested_dtype / nested_blocksize")
        if not isinstance(meta["nested_offset"], (int, float)):
            raise QuantFormatError(f"{what}: bad nested_offset")
    return meta


# ----------------------------------------------------------------------- plain-torch reference
def _encode_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    code = get_4bit_code(quant_type, scaled.device)
    if quant_type == "nf4":
        order = torch.arange(16, device=scaled.device)
    else:
        order = torch.tensor(_FP4_ORDER, device=scaled.device)
    srt = code[order]
    mids = (srt[:-1] + srt[1:]) / 2
    return order[torch.bucketize(scaled, mids, right=False)].to(torch.uint8)


def _blockwise_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Mirrors bitsandbytes' arithmetic exactly: full blocks multiply by the float32 reciprocal
    # of the (clamped) absmax, the partial last block divides by it.
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_zeros(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return scaled, absmax


def _double_quant_reference(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    offset = absmax.mean()
    x = absmax - offset
    n = x.numel()
    nb = -(-n // NESTED_BLOCKSIZE)
    pad = nb * NESTED_BLOCKSIZE - n
    xb = torch.nn.functional.pad(x, (0, pad)).view(nb, NESTED_BLOCKSIZE)
    nested = xb.abs().amax(dim=1)
    zero = (nested == 0).view(-1, 1)
    inv = 1.0 / torch.where(nested == 0, torch.ones_like(nested), nested)
    v = torch.clamp(xb * inv.view(-1, 1), -1, 1)
    idx = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)  # truncates (v >= -1)
    q = _dynamic_lut_cpu().to(x.device)[idx]
    q = torch.where(zero, torch.zeros_like(q), q)  # an all-zero block encodes as code 0
    return q.reshape(-1)[:n].contiguous(), nested, float(offset.item())


def quantize_4bit_reference(
    weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Plain-torch 4-bit quantization with bitsandbytes' exact arithmetic (test reference)."""
    _check(blocksize, quant_type)
    flat = weight.detach().reshape(-1).float()
    scaled, absmax = _blockwise_scaled(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _encode_4bit(scaled, quant_type)
    packed = ((q[0::2] << 4) | q[1::2]).view(-1, 1)
    state = _new_state(weight, absmax, blocksize, quant_type)
    if compress_statistics:
        _nest(state, *_double_quant_reference(absmax), weight.device)
    return packed, state


def _new_state(weight: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str) -> QuantState:
    """The state of a just-quantized ``weight``, its block scales ``absmax`` not yet double-quantized."""
    return QuantState(
        absmax=absmax,
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=get_4bit_code(quant_type, weight.device),
    )


def _nest(state: QuantState, q8: torch.Tensor, nested: torch.Tensor, offset: float, device) -> None:
    """Stores double-quantized scales: 8-bit codes ``q8``, their block scales ``nested`` and ``offset``."""
    state.absmax, state.nested_absmax, state.nested_offset = q8, nested, offset
    state.nested_code = dynamic_map(device)


def dequantize_4bit_reference(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Plain-torch dequantization: ``code[nibble] * scale`` in float32, then cast (test reference)."""
    n = state.numel
    b = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    nib = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
    code = get_4bit_code(state.quant_type, b.device)
    scales = state.block_scales().to(b.device)
    idx = torch.arange(n, device=b.device) // state.blocksize
    vals = code[nib] * scales[idx]
    return vals.to(dtype or state.dtype).reshape(state.shape)


# ----------------------------------------------------------------------------- public API
def _quantize_rust(
    weight: torch.Tensor, blocksize: int, quant_type: str, compress_statistics: bool, core
) -> tuple[torch.Tensor, QuantState]:
    n = weight.numel()
    dev = weight.device
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=dev)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=dev)
    if on_gpu(weight):
        src = weight.detach().contiguous()
        index, stream = stream_of(src)
        core.nf4_quantize_cuda(
            src.data_ptr(), KERNEL_DTYPES[src.dtype], n, blocksize, quant_type,
            packed.data_ptr(), absmax.data_ptr(), index, stream,
        )  # fmt: skip
    else:
        src = weight.detach().reshape(-1).to(torch.float32).contiguous()
        core.nf4_quantize_cpu(
            src.data_ptr(), n, blocksize, quant_type,
            packed.data_ptr(), packed.numel(), absmax.data_ptr(), absmax.numel(),
        )  # fmt: skip
    state = _new_state(weight, absmax, blocksize, quant_type)
    if compress_statistics and n:
        # The offset is torch's float32 mean, exactly as bitsandbytes computes it.
        offset = absmax.mean()
        if dev.type == "cuda":
            # Scales are small (1/blocksize of the weight): the plain-torch path on the GPU does
            # the same float32 arithmetic as the CPU path.
            q8, nested, off = _double_quant_reference(absmax)
        else:
            q8 = torch.empty(absmax.numel(), dtype=torch.uint8)
            nested = torch.empty(-(-absmax.numel() // NESTED_BLOCKSIZE), dtype=torch.float32)
            off = float(offset.item())
            core.double_quant_cpu(
                absmax.data_ptr(), absmax.numel(), off, q8.data_ptr(), q8.numel(),
                nested.data_ptr(), nested.numel(),
            )  # fmt: skip
        _nest(state, q8, nested, off, dev)
    return packed, state


def quantize_4bit(
    weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` to packed 4-bit codes; returns ``(packed uint8 [(n+1)//2, 1], state)``.

    Byte-identical to ``bitsandbytes.functional.quantize_4bit`` with the same arguments (CPU).
    Runs our CUDA kernel when ``weight`` is on a GPU, the Rust CPU path otherwise (the
    plain-torch reference when the extension is not built).
    """
    _check(blocksize, quant_type)
    if weight.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"quantize_4bit: unsupported dtype {weight.dtype}; expected float32/float16/bfloat16"
        )
    core = _native.core_or_none()
    if not _native_path(core, weight):
        return quantize_4bit_reference(weight, blocksize, quant_type, compress_statistics)
    return _quantize_rust(weight, blocksize, quant_type, compress_statistics, core)


def _native_path(core, t: torch.Tensor) -> bool:
    """Whether ``t`` goes through the Rust core: on CPU when it is built, on a GPU when our kernels
    load there (else the plain-torch reference, after ``use_kernels``' one warning)."""
    if core is None:
        return False
    return use_kernels(t) if on_gpu(t) else t.device.type == "cpu"


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize to ``state.shape`` in ``dtype`` (default: ``out``'s dtype, else ``state.dtype``).

    When ``out`` is given (contiguous, ``state.numel`` elements, on ``packed``'s device) the
    result is written into it and ``out`` is returned.
    """
    dtype = dtype or (out.dtype if out is not None else state.dtype)
    if out is not None:
        _check_out(out, state, dtype, packed.device)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"dequantize_4bit: unsupported dtype {dtype}")
    plan = DequantPlan(packed, state)
    res = out if out is not None else torch.empty(state.shape, dtype=dtype, device=packed.device)
    plan.run(res, plan.stream())
    return res


class DequantPlan:
    """One weight's dequantize with every check and conversion done once.

    Built from the packed bytes and their :class:`QuantState` (checked here: byte count, scale
    counts, blocksize, quant type); keeps the converted byte and scale tensors, so :meth:`run` is
    ONE native call on a GPU (the dequantize kernel) with no per-call validation, ``.to()`` or
    ``.contiguous()``. Addresses are read from the kept tensors at each run (a few
    ``data_ptr()``), so a storage re-allocated under them (FSDP2 frees and re-gathers the packed
    bytes around every forward and backward) is followed. Callers that dequantize the same weight
    many times (each forward, recompute and backward of a 4-bit layer) build it once and drop it
    when the bytes, the state or the device change (``Linear4bit.dequant_plan`` does).
    """

    __slots__ = ("_core", "_keep", "_kind", "_sizes", "device", "index", "numel", "offset", "shape")

    def __init__(self, packed: torch.Tensor, state: QuantState) -> None:
        n = state.numel
        if packed.numel() * packed.element_size() != (n + 1) // 2:
            raise QuantFormatError(
                f"dequantize_4bit: packed has {packed.numel() * packed.element_size()} bytes, "
                f"shape {list(state.shape)} needs {(n + 1) // 2}"
            )
        _check_scales(state)
        self.shape, self.numel, self.device = torch.Size(state.shape), n, packed.device
        self.index = 0
        self._sizes = (n, state.blocksize, state.quant_type)
        self.offset = float(state.nested_offset) if state.nested else 0.0
        self._core = core = _native.core_or_none()
        if n == 0 or not _native_path(core, packed):
            self._kind, self._keep = "reference", (packed, state)
            return
        p = packed.contiguous().view(-1).view(torch.uint8)
        dev = p.device
        if on_gpu(p):
            self.index = device_index(p)
            self._kind = "cuda"
            if state.nested:
                code = state.nested_code if state.nested_code is not None else dynamic_map()
                self._keep = (
                    p,
                    state.absmax.to(dev, torch.uint8).contiguous(),
                    state.nested_absmax.to(dev, torch.float32).contiguous(),
                    code.to(dev, torch.float32).contiguous(),
                )
            else:
                self._keep = (p, state.absmax.to(dev, torch.float32).contiguous())
            return
        # CPU: float32 scales (double quantization undone in Rust), float32 values, then a cast.
        self._kind = "cpu"
        if state.nested:
            nested = state.nested_absmax.to(torch.float32).contiguous()
            self._keep = (p, state.absmax.to(torch.uint8).contiguous(), nested)
        else:
            self._keep = (p, state.absmax.to(torch.float32).contiguous())

    def stream(self) -> int:
        """The raw handle of torch's current stream on the plan's GPU (0 on the CPU)."""
        return raw_stream(self.index) if self._kind == "cuda" else 0

    def run(self, out: torch.Tensor, stream: int) -> None:
        """Write the dense weight into ``out`` (contiguous, ``numel`` elements of float32/16/bf16 on
        the plan's device; the caller guarantees it) on ``stream`` (from :meth:`stream`)."""
        keep = self._keep
        if self._kind == "cuda":
            # nf4_dequantize_cuda(packed, absmax, absmax_q, nested, nested_code, offset, out, n,
            # blocksize, quant_type, out_dtype, device, stream)
            if len(keep) == 4:
                p, q, nested, code = keep
                ins = (p.data_ptr(), 0, q.data_ptr(), nested.data_ptr(), code.data_ptr(), self.offset)
            else:
                ins = (keep[0].data_ptr(), keep[1].data_ptr(), 0, 0, 0, 0.0)
            self._core.nf4_dequantize_cuda(
                *ins, out.data_ptr(), *self._sizes, KERNEL_DTYPES[out.dtype], self.index, stream
            )
        elif self._kind == "cpu":
            self._run_cpu(out)
        else:
            packed, state = keep
            out.view(self.shape).copy_(dequantize_4bit_reference(packed, state, dtype=out.dtype))

    def _run_cpu(self, out: torch.Tensor) -> None:
        core, keep = self._core, self._keep
        p = keep[0]
        if len(keep) == 3:
            q, nested = keep[1], keep[2]
            scales = torch.empty(q.numel(), dtype=torch.float32)
            core.dequant_scales_cpu(
                q.data_ptr(), q.numel(), nested.data_ptr(), nested.numel(), self.offset,
                scales.data_ptr(), scales.numel(),
            )  # fmt: skip
        else:
            scales = keep[1]
        n, blocksize, quant_type = self._sizes
        f32 = out if out.dtype == torch.float32 else torch.empty(n, dtype=torch.float32)
        core.nf4_dequantize_cpu(
            p.data_ptr(), p.numel(), scales.data_ptr(), scales.numel(), blocksize, quant_type,
            f32.data_ptr(), f32.numel(),
        )  # fmt: skip
        if f32 is not out:
            out.view(-1).copy_(f32)


def _check_scales(state: QuantState) -> None:
    """The block scales must have one entry per block (the kernels read exactly that many)."""
    _check(state.blocksize, state.quant_type)
    nblocks = -(-state.numel // state.blocksize)
    if state.absmax.numel() != nblocks:
        raise QuantFormatError(
            f"dequantize_4bit: absmax has {state.absmax.numel()} entries, shape {list(state.shape)} with "
            f"blocksize {state.blocksize} needs {nblocks}"
        )
    if state.nested:
        nested = -(-nblocks // state.nested_blocksize)
        if state.nested_absmax.numel() != nested:
            raise QuantFormatError(
                f"dequantize_4bit: nested_absmax has {state.nested_absmax.numel()} entries, expected {nested}"
            )
        if state.nested_code is not None and state.nested_code.numel() != 256:
            raise QuantFormatError(
                f"dequantize_4bit: nested_code has {state.nested_code.numel()} entries, expected 256"
            )


def _check_out(out: torch.Tensor, state: QuantState, dtype: torch.dtype, device: torch.device) -> None:
    if out.numel() != state.numel or out.dtype != dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(
            f"dequantize_4bit: out must be a contiguous {dtype} tensor of {state.numel} elements on "
            f"{device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
