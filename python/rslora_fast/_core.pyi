"""Type stubs for ``rslora_fast._core``, the compiled Rust extension.

Kept in step with ``src/python/*.rs`` by ``scripts/check_stubs.py`` (run in CI). Pointers are plain
integers (``tensor.data_ptr()``), streams are ``torch.cuda.current_stream().cuda_stream`` integers,
dtypes are strings (``"float32"``, ``"float16"``, ``"bfloat16"``). Errors are the classes of
``rslora_fast.errors`` (the extension imports and raises them; it defines none of its own and
re-exports these, the same class objects).
"""

from typing import Any

from rslora_fast.errors import CudaError as CudaError
from rslora_fast.errors import HostMemoryError as HostMemoryError
from rslora_fast.errors import InvalidArgumentError as InvalidArgumentError
from rslora_fast.errors import KernelsUnavailableError as KernelsUnavailableError
from rslora_fast.errors import OffloadError as OffloadError
from rslora_fast.errors import QuantFormatError as QuantFormatError
from rslora_fast.errors import RsloraError as RsloraError

# ---------------------------------------------------------------------------- CUDA bridge
def cuda_info() -> dict[str, Any]:
    """Driver version, device count, embedded kernel modules, their targets, PTX ISA, ptxas release, driver floor."""

def device_info(device: int) -> tuple[str, int, int]:
    """Name and compute capability ``(major, minor)`` of CUDA device ``device``."""

def load_kernels(device: int) -> list[str]:
    """Load every embedded kernel module on ``device``; returns ``"module:target"`` (``sm_90`` or ``compute_90``)."""

# ---------------------------------------------------------------------------- kernels
def swiglu_fwd(g: int, u: int, h: int, n: int, dtype: str, device: int, stream: int) -> None:
    """``h = silu(g) * u`` over ``n`` contiguous elements (CUDA device pointers)."""

def swiglu_bwd(
    dh: int, g: int, u: int, dg: int, du: int, n: int, dtype: str, device: int, stream: int
) -> None:
    """Gradients of SwiGLU into ``dg`` and ``du``."""

def cross_entropy_fwd(
    logits: int,
    ld: int,
    targets: int,
    lse: int,
    loss: int,
    rows: int,
    cols: int,
    ignore_index: int,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """Per-row float32 log-sum-exp and ``lse - logits[i, targets[i]]`` (0 for ignored rows)."""

def cross_entropy_bwd(
    logits: int,
    ld: int,
    lse: int,
    targets: int,
    scale: int,
    rows: int,
    cols: int,
    ignore_index: int,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """In place: ``logits[i, j] = (exp(logits[i, j] - lse[i]) - [j == targets[i]]) * scale[i]``."""

def rope_apply(
    q: int,
    k: int,
    cos: int,
    sin: int,
    batch: int,
    seq: int,
    q_heads: int,
    k_heads: int,
    head_dim: int,
    q_strides: tuple[int, int, int],
    k_strides: tuple[int, int, int],
    cos_strides: tuple[int, int],
    sin_strides: tuple[int, int],
    backward: bool,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """Rotate q ``[b, hq, s, d]`` and k ``[b, hk, s, d]`` in place by cos/sin ``[b, s, d]`` (element
    strides ``(batch, head, seq)`` / ``(batch, seq)``); ``backward`` applies the transposed rotation."""

def geglu_fwd(g: int, u: int, h: int, n: int, dtype: str, approximate: str, device: int, stream: int) -> None:
    """``h = gelu(g, approximate) * u`` over ``n`` contiguous elements; ``approximate`` is "tanh" or "none"."""

def geglu_bwd(
    dh: int, g: int, u: int, dg: int, du: int, n: int, dtype: str, approximate: str, device: int, stream: int
) -> None:
    """Gradients of GeGLU into ``dg`` and ``du``."""

def rms_norm_fwd(
    x: int,
    w: int,
    y: int,
    rstd: int,
    rows: int,
    cols: int,
    eps: float,
    gemma: bool,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """RMSNorm of ``rows`` contiguous rows of ``cols`` elements into ``y`` and float32 ``rstd``."""

def rms_norm_bwd_partial_rows(rows: int, cols: int, dtype: str, device: int) -> int:
    """Rows of the float32 ``[n, cols]`` partial-``dw`` buffer that ``rms_norm_bwd`` fills."""

def rms_norm_bwd(
    dy: int,
    x: int,
    w: int,
    rstd: int,
    dx: int,
    partial: int,
    partial_rows: int,
    rows: int,
    cols: int,
    gemma: bool,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """Gradient of RMSNorm into ``dx`` and partial sums of ``dw`` into ``partial``."""

def rms_norm_bwd_dx(
    dy: int,
    x: int,
    w: int,
    rstd: int,
    dx: int,
    rows: int,
    cols: int,
    gemma: bool,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """Input gradient of RMSNorm only (frozen weight) into ``dx``: one pass, no ``dw`` partials."""

def add_rms_norm_fwd(
    x: int,
    residual: int,
    w: int,
    s: int,
    y: int,
    rstd: int,
    rows: int,
    cols: int,
    eps: float,
    gemma: bool,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """Residual add + RMSNorm in one pass: ``s = x + residual`` and ``y``, float32 ``rstd`` of ``s``."""

def add_rms_norm_bwd_dx(
    dy: int,
    ds: int,
    s: int,
    w: int,
    rstd: int,
    dx: int,
    rows: int,
    cols: int,
    gemma: bool,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """Gradient of both inputs of ``add_rms_norm_fwd`` (frozen weight): ``ds`` + the norm's input gradient."""

# ---------------------------------------------------------------------------- 4-bit quantization
def nf4_quantize_cpu(
    src: int,
    src_len: int,
    blocksize: int,
    quant_type: str,
    packed: int,
    packed_len: int,
    absmax: int,
    absmax_len: int,
) -> None:
    """Quantize ``src_len`` float32 host values into packed bytes and float32 block scales
    (each ``*_len`` is the element count of the buffer passed; a wrong one raises)."""

def nf4_dequantize_cpu(
    packed: int,
    packed_len: int,
    absmax: int,
    absmax_len: int,
    blocksize: int,
    quant_type: str,
    out: int,
    out_len: int,
) -> None:
    """Dequantize ``out_len`` elements into the float32 host buffer ``out``."""

def double_quant_cpu(
    absmax: int,
    absmax_len: int,
    offset: float,
    codes: int,
    codes_len: int,
    nested_absmax: int,
    nested_len: int,
) -> None:
    """Double-quantize ``absmax_len`` block scales (minus ``offset``) to uint8 codes + nested scales."""

def dequant_scales_cpu(
    codes: int, codes_len: int, nested_absmax: int, nested_len: int, offset: float, out: int, out_len: int
) -> None:
    """Undo double quantization of ``codes_len`` block scales into float32 ``out``."""

def dynamic_map() -> list[float]:
    """The signed 8-bit dynamic map (256 sorted float32 values) used for double quantization."""

def parse_quant_state(raw: bytes) -> dict[str, Any]:
    """Parse and validate bitsandbytes' ``quant_state`` JSON."""

def quant_state_json(
    quant_type: str, blocksize: int, dtype: str, shape: list[int], nested_offset: float | None = None
) -> bytes:
    """The ``quant_state`` JSON bytes bitsandbytes writes."""

def nf4_dequantize_cuda(
    packed: int,
    absmax: int,
    absmax_q: int,
    nested_absmax: int,
    nested_code: int,
    offset: float,
    out: int,
    n: int,
    blocksize: int,
    quant_type: str,
    out_dtype: str,
    device: int,
    stream: int,
) -> None:
    """Dequantize on the GPU (plain or double-quantized scales) into ``out`` of ``out_dtype``."""

def decode_matvec_4bit(
    members: list[dict[str, int | float | str]],
    x: int,
    out: int,
    xa: int,
    xa_ld: int,
    batch: int,
    k: int,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """One decode step's projections sharing ``x`` ``[batch, k]`` from 4-bit weights, with bias and
    the LoRA up-projection fused, into ``out`` (members one after the other, each ``[batch, n]``).

    Each member dict: ``n``, ``packed``, ``absmax`` (or 0), ``absmax_q``, ``nested_absmax``,
    ``nested_code``, ``offset`` (double quantization; 0 without), ``blocksize``, ``quant_type``,
    ``bias`` (0: none), ``lora_b`` (0: none), ``rank``, ``scaling``, ``xa_col``; ``xa`` is the LoRA
    down-projection ``[batch, xa_ld]`` (0 when no member has LoRA). Device addresses.
    """

def decode_lora_b(
    members: list[tuple[int, int, int, float, int]],
    out: int,
    xa: int,
    xa_ld: int,
    batch: int,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """Add each member's LoRA term ``scaling * xa[:, xa_col:xa_col+rank] lora_b^T`` in place to its
    ``[batch, n]`` output in ``out`` (members ``(n, lora_b, rank, scaling, xa_col)`` one after the
    other; lora_b 0 and rank 0: none), in one launch. Device addresses.
    """

def decode_lora_a(
    x: int,
    a: int,
    xa: int,
    rows: int,
    xa_ld: int,
    batch: int,
    k: int,
    dtype: str,
    device: int,
    stream: int,
) -> None:
    """``xa[:, :rows] = x a^T`` for ``x`` ``[batch, k]`` and ``a`` ``[rows, k]`` (a group's stacked
    LoRA A matrices) into ``xa`` ``[batch, xa_ld]``, float16/bfloat16, in one launch. Device addresses.
    """

def nf4_quantize_cuda(
    src: int,
    src_dtype: str,
    n: int,
    blocksize: int,
    quant_type: str,
    packed: int,
    absmax: int,
    device: int,
    stream: int,
) -> None:
    """Quantize on the GPU; the same bytes as :func:`nf4_quantize_cpu`."""

# ---------------------------------------------------------------------------- patterns
def regex_fullmatch(pattern: str, names: list[str]) -> list[bool]:
    """Whether each name matches ``pattern`` entirely, with the linear-time ``regex`` crate."""

# ---------------------------------------------------------------------------- offload
class OffloadScheduler:
    """The offload schedule (policy, pinned host-memory pool, copies) of one device."""

    def __new__(
        cls,
        device: int | None = None,
        lookahead: int = 1,
        host_cap_bytes: int | None = None,
        *,
        min_tokens: int = 0,
        last_layer: int | None = None,
        budget_bytes: int | None = None,
        save: str = "never",
        link_bytes_per_s: float | None = None,
        min_parked_bytes: int | None = None,
    ) -> OffloadScheduler: ...
    @property
    def device(self) -> int | None:
        """The CUDA device index, or ``None`` for the host transport."""

    @property
    def copy_stream(self) -> int:
        """The scheduler's copy stream as an integer (``0`` for the host transport)."""

    @property
    def lookahead(self) -> int:
        """The prefetch depth given at construction."""

    def offload(self, src_ptr: int, nbytes: int, stream: int = 0) -> int:
        """Copy ``nbytes`` at ``src_ptr`` to a host block after the work queued on ``stream``."""

    def prefetch(self, handle: int, dst_ptr: int, stream: int = 0) -> None:
        """Copy a handle's data back to ``dst_ptr`` after the work queued on ``stream``."""

    def wait(self, handle: int, stream: int = 0) -> None:
        """Make ``stream`` wait for the handle's copy back."""

    def release(self, handle: int) -> None:
        """Return a handle's host block to the pool."""

    def release_all(self) -> int:
        """Release every live handle; returns how many there were."""

    def begin_layer(self, layer: int, tokens: int, offloadable: bool = True) -> tuple[int, str]:
        """Forward reaches ``layer``: its pass and plan (keep, save, offload, last, short, unsupported)."""

    def offload_layer(self, layer: int, tensor: Any, stream: int = 0) -> int:
        """Park ``layer``'s input in host memory (held until ``stream`` waited for the copy)."""

    def pack_tensor(self, layer: int, tensor: Any, stream: int = 0) -> int | None:
        """A tensor a ``"save"`` layer saves: ``None`` (kept) or the handle of its host copy."""

    def fetch_layer(self, pass_: int, layer: int, handle: int | None = None, stream: int = 0) -> Any | None:
        """Backward reaches ``layer``: start the planned copies back; return its own input."""

    def wants_measure(self, layer: int) -> bool:
        """Whether ``layer``'s saved bytes should be measured (budget mode)."""

    def record_layer_cost(self, layer: int, nbytes: int, seconds: float, tokens: int) -> None:
        """``layer``'s measured saved bytes and forward seconds at ``tokens`` tokens."""

    def set_budget(self, budget_bytes: int | None) -> None:
        """Change the device budget (from the next pass on)."""

    def budget_stats(self) -> dict[str, int | None]:
        """What the budget and the save policy did in the latest pass."""

    def set_trace(self, on: bool) -> None:
        """Start (clearing) or stop recording the schedule's actions."""

    def trace(self) -> list[tuple[str, int, int]]:
        """The recorded actions: ``(kind, pass, layer)``."""

    def nbytes(self, handle: int) -> int:
        """Size of a live handle's data."""

    def state(self, handle: int) -> str:
        """``"offloaded"``, ``"prefetched"`` or ``"ready"``."""

    def take_warning(self) -> str | None:
        """The pageable-memory fallback warning, returned once."""

    def trim(self) -> None:
        """Wait for copies in flight and free every idle host block."""

    def stats(self) -> dict[str, int]:
        """Pool and transfer counters."""
