"""Nothing reachable from Python crashes the process: sizes are checked in Rust before any pointer
arithmetic, and every Rust error surfaces as a class of the ``RsloraError`` hierarchy."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rslora_fast
from rslora_fast import errors
from rslora_fast.quant.functional import QuantState, dequantize_4bit, quantize_4bit

core = pytest.importorskip("rslora_fast._core")

HERE = Path(__file__).parent
STUBS = Path(rslora_fast.__file__).parent / "_core.pyi"


def _run_fuzz(seed: int, seconds: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(rslora_fast.__file__).parent.parent))
    return subprocess.run(
        [sys.executable, str(HERE / "_fuzz_core.py"), str(seed), str(seconds)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _pointer_length_shape_functions() -> set[str]:
    """Every function or method of ``_core.pyi`` with an ``int``, ``bytes``, list or tuple parameter."""
    tree = ast.parse(STUBS.read_text())
    names = set()

    def takes_sizes(fn: ast.FunctionDef) -> bool:
        params = [a for a in fn.args.args if a.arg not in ("self", "cls")]
        return any(
            a.annotation is not None
            and any(t in ast.unparse(a.annotation) for t in ("int", "bytes", "list", "tuple"))
            for a in params
        )

    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and takes_sizes(node):
            names.add(node.name)
        if isinstance(node, ast.ClassDef) and node.name == "OffloadScheduler":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and takes_sizes(item):
                    names.add("OffloadScheduler" if item.name == "__new__" else item.name)
    return names


def test_fuzz_covers_every_core_function_taking_a_pointer_length_or_shape():
    sys.path.insert(0, str(HERE))
    try:
        import _fuzz_core
    finally:
        sys.path.remove(str(HERE))
    wanted = _pointer_length_shape_functions()
    assert len(wanted) >= 25  # the stub parser found them (kernels, quant, offload, devices)
    assert wanted <= set(_fuzz_core.FUZZED), f"not fuzzed: {sorted(wanted - set(_fuzz_core.FUZZED))}"


@pytest.mark.parametrize("seed", [0, 1])
def test_random_wrong_arguments_raise_and_never_crash(seed):
    res = _run_fuzz(seed, 2.0)
    assert res.returncode == 0, (
        f"exit status {res.returncode} (negative: killed by a signal)\n{res.stdout}{res.stderr[-2000:]}"
    )
    assert int(res.stdout.split()[-1]) > 500  # it really ran


# ------------------------------------------------------------------------- targeted cases
def test_dequantize_with_a_short_absmax_raises_in_python_and_in_rust():
    packed, state = quantize_4bit(torch.randn(64, 64), 64, "nf4", compress_statistics=False)
    short = QuantState(**{**state.__dict__, "absmax": state.absmax[:3].clone()})
    with pytest.raises(errors.QuantFormatError, match="absmax has 3 entries"):
        dequantize_4bit(packed, short)
    out = torch.empty(64 * 64)
    a = short.absmax
    with pytest.raises(errors.InvalidArgumentError, match="absmax buffer has 3 elements, expected 64"):
        core.nf4_dequantize_cpu(packed.data_ptr(), packed.numel(), a.data_ptr(), a.numel(), 64, "nf4",
                                out.data_ptr(), out.numel())  # fmt: skip


def test_offload_of_an_impossible_size_raises():
    sched = core.OffloadScheduler()
    t = torch.zeros(16, dtype=torch.uint8)
    for n in (2**64 - 1, 2**63, 2**63 - 1):
        with pytest.raises(errors.InvalidArgumentError, match="out of range"):
            sched.offload(t.data_ptr(), n)
    assert sched.stats()["in_use_bytes"] == 0
    h = sched.offload(t.data_ptr(), 16)  # still usable
    assert sched.nbytes(h) == 16
    sched.release(h)


def test_quant_state_json_escapes_the_dtype():
    raw = core.quant_state_json("nf4", 64, 'float16", "blocksize": 4096, "x": "', [2, 3])
    parsed = json.loads(raw)
    assert parsed["blocksize"] == 64 and "x" not in parsed
    assert parsed["dtype"] == 'float16", "blocksize": 4096, "x": "'
    # the bitsandbytes bytes for ordinary states are unchanged
    assert core.quant_state_json("nf4", 64, "bfloat16", [2, 3]) == (
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 3]}'
    )


# ------------------------------------------------------------------------- error classes
def test_invalid_argument_maps_to_invalid_argument_error():
    with pytest.raises(errors.InvalidArgumentError) as info:
        core.nf4_quantize_cpu(0, 8, 64, "nf4", 0, 4, 0, 1)
    assert type(info.value) is errors.InvalidArgumentError is core.InvalidArgumentError
    assert isinstance(info.value, errors.RsloraError)
    assert isinstance(info.value, ValueError)  # kept for `except ValueError` callers
    assert "null" in str(info.value)


def test_host_memory_maps_to_host_memory_error():
    sched = core.OffloadScheduler(None, 1, 8192)
    t = torch.zeros(100_000, dtype=torch.uint8)
    with pytest.raises(errors.HostMemoryError, match="cap") as info:
        sched.offload(t.data_ptr(), t.numel())
    assert type(info.value) is errors.HostMemoryError is core.HostMemoryError
    assert isinstance(info.value, errors.RsloraError)
    assert isinstance(info.value, MemoryError)


def test_other_variants_keep_their_classes():
    with pytest.raises(errors.QuantFormatError):
        core.parse_quant_state(b"{not json")
    with pytest.raises(errors.OffloadError):
        core.OffloadScheduler().release(12345)
    assert issubclass(errors.QuantFormatError, errors.RsloraError)
    assert issubclass(errors.OffloadError, errors.RsloraError)
    assert not issubclass(errors.OffloadError, errors.HostMemoryError)
