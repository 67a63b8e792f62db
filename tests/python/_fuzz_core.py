"""Fuzz driver for ``rslora_fast._core`` (run in a subprocess by ``test_reliability_ffi.py``).

Calls every ``_core`` function that takes a pointer, a length or a shape with random wrong
arguments. Buffers are real CPU tensors and every length passed is the buffer's true element count
(or less): a length larger than the buffer is a lie no callee can detect from an address. Each call
must return or raise one of the accepted exceptions; a crash kills this process, which the test
sees as a signal exit status. Usage: ``python _fuzz_core.py SEED SECONDS``; prints the call count.
"""

from __future__ import annotations

import random
import sys
import time

import torch

from rslora_fast import _core
from rslora_fast.errors import RsloraError

ACCEPTED = (RsloraError, ValueError, TypeError, OverflowError, MemoryError)
BAD_PTRS = (0, 1, 3, 2**64 - 1, 2**64 - 16, -1, 2**64)
BAD_INTS = (0, 1, -1, 3, 31, 48, 2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**64 - 1, 2**64)
DTYPES = ("float32", "float16", "bfloat16", "int8", "", "float32\x00")
QTYPES = ("nf4", "fp4", "int4", "NF4", "")

_keep: list[torch.Tensor] = []  # buffers stay alive until the round's copies have run


def buf(rng: random.Random, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """A fresh buffer of a random small size: ``(address, true element count)``."""
    t = torch.zeros(rng.choice((0, 1, 2, 3, 7, 64, 100, 257)), dtype=dtype)
    _keep.append(t)
    return t.data_ptr(), t.numel()


def ptr_len(rng: random.Random, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """A pointer and a length that is true or shorter, or a bad pointer with any length."""
    p, n = buf(rng, dtype)
    r = rng.random()
    if r < 0.25:
        return bad_ptr_len(rng)
    if r < 0.35 and n:
        return p + 1, n - 1  # misaligned for wider than a byte, and inside the buffer anyway
    return p, rng.randint(0, n)


def bad_ptr_len(rng: random.Random) -> tuple[int, int]:
    """An address no length makes valid: null, one whose range wraps, or not a machine word.
    (Any other wild address with a small length cannot be told from a real one.)"""
    return rng.choice(((0, rng.choice((1, 64))), (2**64 - 16, 2**40), (-1, 8), (2**64, 8)))


def some_int(rng: random.Random) -> int:
    return rng.choice(BAD_INTS) if rng.random() < 0.5 else rng.randint(0, 300)


def dev_ptr(rng: random.Random) -> int:
    return rng.choice(BAD_PTRS + (buf(rng)[0],))


# Device-pointer functions: every call carries one defect that must be caught before a launch
# (null or wrapping pointer, overflowing size, unknown dtype), so no kernel runs on host memory.
def _defect(rng: random.Random, args: list, ptr_slots: list[int], size_slots: list[int], dtype_slot: int):
    kind = rng.randrange(3)
    if kind == 0:
        args[rng.choice(ptr_slots)] = rng.choice((0, 2**64 - 16))
        for s in size_slots:
            args[s] = max(args[s], 1)
    elif kind == 1:
        args[rng.choice(size_slots)] = rng.choice((2**62, 2**63 - 1, 2**64 - 1))
    else:
        args[dtype_slot] = rng.choice(("int8", "", "float64"))
    return args


def f_swiglu_fwd(rng):
    a = [dev_ptr(rng), dev_ptr(rng), dev_ptr(rng), some_int(rng), "bfloat16", 0, 0]
    _core.swiglu_fwd(*_defect(rng, a, [0, 1, 2], [3], 4))


def f_swiglu_bwd(rng):
    a = [dev_ptr(rng) for _ in range(5)] + [some_int(rng), "float16", 0, 0]
    _core.swiglu_bwd(*_defect(rng, a, [0, 1, 2, 3, 4], [5], 6))


def f_geglu_fwd(rng):
    a = [dev_ptr(rng), dev_ptr(rng), dev_ptr(rng), some_int(rng), "bfloat16", "tanh", 0, 0]
    _core.geglu_fwd(*_defect(rng, a, [0, 1, 2], [3], 4))


def f_geglu_bwd(rng):
    a = [dev_ptr(rng) for _ in range(5)] + [some_int(rng), "float32", "none", 0, 0]
    _core.geglu_bwd(*_defect(rng, a, [0, 1, 2, 3, 4], [5], 6))


def f_cross_entropy_fwd(rng):
    a = [dev_ptr(rng), some_int(rng), dev_ptr(rng), dev_ptr(rng), dev_ptr(rng)]
    a += [some_int(rng), some_int(rng), -100, "bfloat16", 0, 0]
    _core.cross_entropy_fwd(*_defect(rng, a, [0, 2, 3, 4], [5, 6], 8))


def f_cross_entropy_bwd(rng):
    a = [dev_ptr(rng), some_int(rng), dev_ptr(rng), dev_ptr(rng), dev_ptr(rng)]
    a += [some_int(rng), some_int(rng), -100, "float32", 0, 0]
    _core.cross_entropy_bwd(*_defect(rng, a, [0, 2, 3, 4], [5, 6], 8))


def f_rms_norm_fwd(rng):
    a = [dev_ptr(rng) for _ in range(4)] + [some_int(rng), some_int(rng), 1e-6, False, "bfloat16", 0, 0]
    _core.rms_norm_fwd(*_defect(rng, a, [0, 1, 2, 3], [4, 5], 8))


def f_rms_norm_bwd_partial_rows(rng):
    _core.rms_norm_bwd_partial_rows(some_int(rng), some_int(rng), rng.choice(DTYPES), rng.choice((0, -1, 99)))


def f_rms_norm_bwd(rng):
    a = [dev_ptr(rng) for _ in range(6)] + [
        some_int(rng),
        some_int(rng),
        some_int(rng),
        True,
        "float16",
        0,
        0,
    ]
    _core.rms_norm_bwd(*_defect(rng, a, [0, 1, 2, 3, 4, 5], [7, 8], 10))


def f_rms_norm_bwd_dx(rng):
    a = [dev_ptr(rng) for _ in range(5)] + [some_int(rng), some_int(rng), False, "bfloat16", 0, 0]
    _core.rms_norm_bwd_dx(*_defect(rng, a, [0, 1, 2, 3, 4], [5, 6], 8))


def f_add_rms_norm_fwd(rng):
    a = [dev_ptr(rng) for _ in range(6)] + [some_int(rng), some_int(rng), 1e-6, False, "bfloat16", 0, 0]
    _core.add_rms_norm_fwd(*_defect(rng, a, [0, 1, 2, 3, 4, 5], [6, 7], 10))


def f_add_rms_norm_bwd_dx(rng):
    a = [dev_ptr(rng) for _ in range(6)] + [some_int(rng), some_int(rng), False, "float16", 0, 0]
    _core.add_rms_norm_bwd_dx(*_defect(rng, a, [0, 1, 2, 3, 4, 5], [6, 7], 9))


def f_rope_apply(rng):
    # No stride-extent check exists for rope: only calls with a pre-launch defect (dtype, null).
    a = [dev_ptr(rng) for _ in range(4)] + [some_int(rng) for _ in range(5)]
    a += [(1, 1, 1), (1, 1, 1), (1, 1), (1, 1), False, "bfloat16", 0, 0]
    if rng.random() < 0.5:
        a[14] = rng.choice(("int8", "", "float64"))
    else:
        a[rng.randrange(4)] = 0
        a[4:9] = [max(x % 64, 1) for x in a[4:9]]
    _core.rope_apply(*a)


def f_nf4_quantize_cpu(rng):
    src, sn = ptr_len(rng)
    packed, pn = ptr_len(rng, torch.uint8)
    absmax, an = ptr_len(rng)
    bs = rng.choice((64, 64, 32, 4096, 0, 48, 2**40))
    _core.nf4_quantize_cpu(src, sn, bs, rng.choice(QTYPES), packed, pn, absmax, an)


def f_nf4_dequantize_cpu(rng):
    packed, pn = ptr_len(rng, torch.uint8)
    absmax, an = ptr_len(rng)
    out, on = ptr_len(rng)
    bs = rng.choice((64, 64, 32, 0, 48, 2**40))
    _core.nf4_dequantize_cpu(packed, pn, absmax, an, bs, rng.choice(QTYPES), out, on)


def f_double_quant_cpu(rng):
    a, an = ptr_len(rng)
    c, cn = ptr_len(rng, torch.uint8)
    n, nn = ptr_len(rng)
    _core.double_quant_cpu(a, an, rng.choice((0.0, 1.5, float("nan"))), c, cn, n, nn)


def f_dequant_scales_cpu(rng):
    c, cn = ptr_len(rng, torch.uint8)
    n, nn = ptr_len(rng)
    o, on = ptr_len(rng)
    _core.dequant_scales_cpu(c, cn, n, nn, rng.choice((0.0, -2.0)), o, on)


def f_parse_quant_state(rng):
    raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
    if rng.random() < 0.5:
        shape = [rng.choice(BAD_INTS) for _ in range(rng.randrange(0, 4))]
        raw = (
            f'{{"quant_type": "{rng.choice(QTYPES)}", "blocksize": {rng.choice(BAD_INTS)}, '
            f'"dtype": "{rng.choice(DTYPES)}", "shape": {shape}}}'
        ).encode()
    _core.parse_quant_state(raw)


def f_quant_state_json(rng):
    shape = [rng.choice(BAD_INTS) for _ in range(rng.randrange(0, 4))]
    dtype = rng.choice(DTYPES + ('"', '\\", "x": "', "\u00e9"))
    out = _core.quant_state_json(rng.choice(QTYPES), rng.choice((64, 0, 48, 2**40)), dtype, shape)
    import json

    assert json.loads(out)["dtype"] == dtype  # escaped, whatever the text


def f_regex_fullmatch(rng):
    pattern = rng.choice(("(.*)*X", "(a+)+$", "(?=a)b", "(", "x" * 5000, "a{1000}{1000}", ".*q_proj"))
    names = ["model.layers.0." + "a" * rng.randrange(0, 200) for _ in range(rng.randrange(0, 4))]
    _core.regex_fullmatch(pattern, names)


def f_nf4_dequantize_cuda(rng):
    a = [dev_ptr(rng) for _ in range(5)] + [0.0, dev_ptr(rng), some_int(rng), 64, "nf4", "bfloat16", 0, 0]
    if rng.random() < 0.3:
        a[8] = rng.choice((0, 48, 2**40))  # bad blocksize is a pre-launch defect too
        _core.nf4_dequantize_cuda(*a)
        return
    _core.nf4_dequantize_cuda(*_defect(rng, a, [0, 6], [7], 10))


def f_nf4_quantize_cuda(rng):
    a = [dev_ptr(rng), "float32", some_int(rng), 64, "nf4", dev_ptr(rng), dev_ptr(rng), 0, 0]
    _core.nf4_quantize_cuda(*_defect(rng, a, [0, 5, 6], [2], 1))


def f_decode_matvec_4bit(rng):
    def member():
        return {
            "n": some_int(rng),
            "packed": dev_ptr(rng),
            "absmax": dev_ptr(rng),
            "absmax_q": rng.choice((0, dev_ptr(rng))),
            "nested_absmax": dev_ptr(rng),
            "nested_code": dev_ptr(rng),
            "offset": 0.5,
            "blocksize": rng.choice((64, 32, 48, 0, 2**40)),
            "quant_type": rng.choice(QTYPES),
            "bias": rng.choice((0, dev_ptr(rng))),
            "lora_b": rng.choice((0, dev_ptr(rng))),
            "rank": rng.choice((0, 16, 2**40, 2**64 - 1)),
            "scaling": 2.0,
            "xa_col": some_int(rng),
        }

    members = [member() for _ in range(rng.choice((0, 1, 2, 3, 4, 5)))]
    a = [members, dev_ptr(rng), dev_ptr(rng), dev_ptr(rng), some_int(rng), some_int(rng), some_int(rng)]
    a += [rng.choice(("bfloat16", "float16")), 0, 0]
    _core.decode_matvec_4bit(*_defect(rng, a, [1, 2], [5, 6], 7))


def f_decode_lora_a(rng):
    a = [dev_ptr(rng), dev_ptr(rng), dev_ptr(rng), some_int(rng), some_int(rng), some_int(rng), some_int(rng)]
    a += [rng.choice(("bfloat16", "float16")), 0, 0]
    _core.decode_lora_a(*_defect(rng, a, [0, 1, 2], [5, 6], 7))


def f_decode_lora_b(rng):
    def member():
        rank = rng.choice((0, 16, 2**40, 2**64 - 1))
        return (some_int(rng), rng.choice((0, dev_ptr(rng))), rank, 2.0, some_int(rng))

    members = [member() for _ in range(rng.choice((0, 1, 2, 3, 4, 5)))]
    a = [members, dev_ptr(rng), dev_ptr(rng), some_int(rng), some_int(rng)]
    a += [rng.choice(("bfloat16", "float16")), 0, 0]
    _core.decode_lora_b(*_defect(rng, a, [1, 2], [3, 4], 5))


def f_device_info(rng):
    _core.device_info(rng.choice((-1, 99, 2**31 - 1)))


def f_load_kernels(rng):
    _core.load_kernels(rng.choice((-1, 99, 2**31 - 1)))


_SCHED = _core.OffloadScheduler(None, 1, 1 << 20)


def f_OffloadScheduler(rng):
    _core.OffloadScheduler(rng.choice((None, -1, 99)), some_int(rng), rng.choice((None, 0, 2**64 - 1)))


def f_offload(rng):
    p, n = buf(rng, torch.uint8)
    p, n = bad_ptr_len(rng) if rng.random() < 0.3 else (p, rng.randint(0, n))
    if rng.random() < 0.3:
        n = rng.choice((2**64 - 1, 2**63, 2**62, 2**48))  # wrapped size classes before the fix
    h = _SCHED.offload(p, n, 0)
    _SCHED.release(h)


def f_prefetch(rng):
    # dst's size cannot be checked from an address: only unknown handles and bad addresses.
    p, n = buf(rng, torch.uint8)
    h = _SCHED.offload(p, max(n, 1), 0) if n else None
    if h is not None and rng.random() < 0.5:
        try:
            _SCHED.prefetch(h, rng.choice((0, 2**64 - 1)), 0)
        finally:
            _SCHED.release(h)
    else:
        if h is not None:
            _SCHED.release(h)
        _SCHED.prefetch(rng.choice(BAD_INTS), p, 0)


def f_wait(rng):
    _SCHED.wait(rng.choice(BAD_INTS), some_int(rng))


def f_release(rng):
    _SCHED.release(rng.choice(BAD_INTS))


def f_nbytes(rng):
    _SCHED.nbytes(rng.choice(BAD_INTS))


def f_state(rng):
    _SCHED.state(rng.choice(BAD_INTS))


def some_tensor(rng: random.Random):
    """A tensor the layer schedule may or may not take: strided, empty, of another dtype, or not
    a tensor at all."""
    t = torch.zeros(
        rng.choice((0, 1, 7, 64)), rng.choice((1, 3, 5)), dtype=rng.choice((torch.float32, torch.int8))
    )
    _keep.append(t)
    return rng.choice((t, t.t(), t[:, ::2], t.expand(2, *t.shape), 3, "x", None))


def f_begin_layer(rng):
    _SCHED.begin_layer(some_int(rng), some_int(rng), rng.random() < 0.5)


def f_offload_layer(rng):
    h = _SCHED.offload_layer(some_int(rng), some_tensor(rng), 0)
    _SCHED.release(h)


def f_pack_tensor(rng):
    h = _SCHED.pack_tensor(some_int(rng), some_tensor(rng), 0)
    if h is not None:
        _SCHED.release(h)


def f_fetch_layer(rng):
    _SCHED.fetch_layer(some_int(rng), some_int(rng), rng.choice((None, *BAD_INTS)), 0)


def f_record_layer_cost(rng):
    seconds = rng.choice((0.0, -1.0, float("nan"), float("inf"), 1e-3))
    _SCHED.record_layer_cost(some_int(rng), some_int(rng), seconds, some_int(rng))


def f_wants_measure(rng):
    _SCHED.wants_measure(some_int(rng))


def f_set_budget(rng):
    _SCHED.set_budget(rng.choice((None, *BAD_INTS)))


FUZZED = {name[2:]: fn for name, fn in globals().items() if name.startswith("f_")}


def main(seed: int, seconds: float) -> int:
    rng = random.Random(seed)
    calls = 0
    deadline = time.monotonic() + seconds
    names = sorted(FUZZED)
    while time.monotonic() < deadline:
        for name in names:
            try:
                FUZZED[name](rng)
            except ACCEPTED:
                pass
            except BaseException as exc:  # a panic crossing FFI, or any other surprise
                print(f"{name}: unexpected {type(exc).__name__}: {exc}", flush=True)
                return 3
            calls += 1
        _SCHED.trim()  # the copies queued from this round's buffers have run: they may go
        _keep.clear()
    print(calls, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), float(sys.argv[2])))
