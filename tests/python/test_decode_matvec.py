"""Decode projections (``generate/matvec.py``, ``kernels/decode_matvec.cu``).

The GPU tests compare the fast path (one kernel launch for the 4-bit members, torch matmuls for
16-bit ones, the LoRA term fused) with the plain-torch reference on fresh random data: dtypes,
NF4/FP4, nested and plain scales, odd shapes that take the generic kernel or leave partial tiles,
batches 1..8 and one above the kernel's 8, with and without bias and LoRA, and a CUDA-graph replay.
The CPU tests cover planning, the reference path and the argument checks of the ``_core`` entry.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rslora_fast import _core
from rslora_fast.errors import InvalidArgumentError, QuantFormatError
from rslora_fast.generate.matvec import ProjectionGroup, reference
from rslora_fast.ops._launch import use_kernels
from rslora_fast.peft.layer import LoraLinear
from rslora_fast.quant.functional import dequantize_4bit_reference
from rslora_fast.quant.linear4bit import Linear4bit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _layer(k, n, *, quant, bias, rank, dtype, device, quant_type="nf4", nested=True, seed=0, blocksize=64):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    lin = lin.to(device, dtype)
    base = (
        Linear4bit.from_linear(
            lin, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested, compute_dtype=dtype
        )
        if quant
        else lin
    )
    if not rank:
        return base
    layer = LoraLinear(base, r=rank, lora_alpha=2 * rank)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(rank, k, generator=g) * 0.05)
        layer.lora_B.weight.copy_(torch.randn(n, rank, generator=g) * 0.05)
    return layer


def _group(k, ns, **kw):
    seeds = range(len(ns))
    return [_layer(k, n, seed=s, **kw) for n, s in zip(ns, seeds)]


def _close(out, ref, dtype):
    """Max error relative to the reference's largest value: the kernel rounds the weight once
    more (code and scale in the model dtype) and sums in another order, never by O(1)."""
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol * scale, f"max error {err} vs reference scale {scale}"


# --------------------------------------------------------------------------------- CPU (CI)
def test_cpu_group_is_the_reference_and_stays_off_the_kernel():
    layers = _group(96, [40, 24], quant=True, bias=True, rank=4, dtype=torch.float32, device="cpu")
    group = ProjectionGroup.from_modules(layers, torch.float32)
    assert not group.uses_kernel
    x = torch.randn(3, 96)
    outs = group(x)
    for layer, out in zip(layers, outs):
        base = layer.base_layer
        w = dequantize_4bit_reference(base.weight, base.quant_state, torch.float32)
        want = x @ w.t() + base.bias + layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("members", "text"),
    [([(8, 4096, 4, 1.0, 6)], "exceed xa's width 8"), ([(8, 4096, 0, 1.0, 0)], "rank 0"), ([], "0 members")],
)
def test_core_lora_b_entry_rejects_bad_arguments(members, text):
    with pytest.raises(InvalidArgumentError, match=text):
        _core.decode_lora_b(members, 1 << 20, 2 << 20, 8, 1, "bfloat16", 0, 0)


def test_lora_a_is_one_matrix_and_refresh_updates_it():
    layers = _group(64, [16, 8, 8], quant=False, bias=False, rank=4, dtype=torch.float32, device="cpu")
    layers[1] = layers[1].base_layer  # a member without LoRA keeps no rows
    group = ProjectionGroup.from_modules(layers, torch.float32)
    assert group.lora_a.shape == (8, 64)
    assert [group.projections[i].a_row for i in (0, 2)] == [0, 4]
    assert group.projections[2].a.data_ptr() == group.lora_a[4:].data_ptr()  # a view
    with torch.no_grad():
        layers[2].lora_A.weight.add_(1.0)
    group.refresh_adapters()
    torch.testing.assert_close(group.lora_a[4:], layers[2].lora_A.weight)
    x = torch.randn(2, 64)
    want = layers[2](x)
    torch.testing.assert_close(group(x)[2], want, atol=1e-5, rtol=1e-5)


def _member(**kw):
    m = dict(n=8, packed=4096, absmax=8192, absmax_q=0, nested_absmax=0, nested_code=0, offset=0.0)
    m.update(blocksize=64, quant_type="nf4", bias=0, lora_b=0, rank=0, scaling=0.0, xa_col=0)
    m.update(kw)
    return m


@pytest.mark.parametrize(
    ("members", "xa", "xa_ld", "batch", "k", "dtype", "error", "text"),
    [
        ([], 0, 0, 1, 64, "bfloat16", InvalidArgumentError, "0 members"),
        ([_member()] * 5, 0, 0, 1, 64, "bfloat16", InvalidArgumentError, "5 members"),
        ([_member()], 0, 0, 1, 64, "float32", InvalidArgumentError, "float32"),
        ([_member(quant_type="int4")], 0, 0, 1, 64, "float16", QuantFormatError, "int4"),
        ([_member(blocksize=48)], 0, 0, 1, 64, "float16", QuantFormatError, "blocksize 48"),
        ([_member(n=0)], 0, 0, 1, 64, "float16", InvalidArgumentError, "0 output rows"),
        ([_member(rank=4, lora_b=12288)], 16384, 2, 1, 64, "float16", InvalidArgumentError, "xa's width 2"),
        ([_member(packed=0)], 0, 0, 1, 64, "float16", InvalidArgumentError, "packed: null"),
        ([_member(n=2**40)], 0, 0, 1, 2**30, "float16", InvalidArgumentError, "overflow"),
        ([_member()], 0, 0, 1, 0, "float16", InvalidArgumentError, "k = 0"),
    ],
)
def test_core_entry_rejects_bad_arguments_before_launching(members, xa, xa_ld, batch, k, dtype, error, text):
    with pytest.raises(error, match=text):
        _core.decode_matvec_4bit(members, 1 << 20, 2 << 20, xa, xa_ld, batch, k, dtype, 0, 0)


@pytest.mark.parametrize(
    ("rows", "xa_ld", "k", "dtype", "text"),
    [
        (49, 48, 64, "bfloat16", "49 LoRA rows"),
        (4, 4, 0, "float16", "k = 0"),
        (4, 4, 64, "float32", "float32"),
    ],
)
def test_core_lora_a_entry_rejects_bad_arguments(rows, xa_ld, k, dtype, text):
    with pytest.raises(InvalidArgumentError, match=text):
        _core.decode_lora_a(1 << 20, 2 << 20, 3 << 20, rows, xa_ld, 1, k, dtype, 0, 0)


# --------------------------------------------------------------------------------------- GPU
# (K, member widths): the fast kernel with whole and partial 16-row tiles, tiles split over 1..8
# warps, a K that is a multiple of 32 but not of 64 or 128 (a k-step's last chunks past K), and one
# of 33 chunks (one lane of the last k-step busy); the generic kernel for a K that is not a
# multiple of 32 (37 x 3 elements: an odd count, the last byte half padding).
SHAPES = [
    (256, (64, 32, 32)),
    (96, (37, 5, 21)),
    (100, (19, 8)),
    (37, (3, 6)),
    (4096, (48,)),
    (1056, (13, 6, 4, 9)),
]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize(("k", "ns"), SHAPES)
def test_kernel_matches_reference(dtype, quant_type, nested, k, ns):
    for rank, bias in ((0, False), (16, True)):
        layers = _group(
            k, ns, quant=True, bias=bias, rank=rank, dtype=dtype, device="cuda",
            quant_type=quant_type, nested=nested,
        )  # fmt: skip
        group = ProjectionGroup.from_modules(layers, dtype)
        assert group.uses_kernel and use_kernels(layers[0].weight)  # not the reference twice
        for batch in (1, 2, 3, 5, 8, 11):
            x = torch.randn(batch, k, device="cuda", dtype=dtype)
            outs, refs = group(x), reference(x, group)
            assert [tuple(o.shape) for o in outs] == [(batch, n) for n in ns]
            for out, ref in zip(outs, refs):
                _close(out, ref, dtype)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize(("k", "ns"), [(256, (40, 24)), (100, (9,))])
def test_kernel_block_sizes(blocksize, k, ns):
    # 4096-element blocks span several rows; 32 is one chunk of the fast kernel.
    dtype = torch.bfloat16
    layers = _group(k, ns, quant=True, bias=False, rank=4, dtype=dtype, device="cuda", blocksize=blocksize)
    group = ProjectionGroup.from_modules(layers, dtype)
    assert group.uses_kernel and use_kernels(layers[0].weight)
    x = torch.randn(3, k, device="cuda", dtype=dtype)
    for out, ref in zip(group(x), reference(x, group)):
        _close(out, ref, dtype)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("widths", [(4000, 2400), (9000, 3800), (30000, 10001, 7)])
def test_fast_kernel_splits_tiles_by_group_size(widths):
    # On an H200 (2,112 resident warps) these groups' 400, 800 and 2,502 tiles take 4, 2 and 1
    # warps per tile (the last: more tiles than resident warps, blocks crossing members); K = 256
    # has 2 k-steps, so with 4 warps per tile two of them have none.
    dtype = torch.bfloat16
    layers = _group(256, widths, quant=True, bias=True, rank=4, dtype=dtype, device="cuda")
    group = ProjectionGroup.from_modules(layers, dtype)
    assert group.uses_kernel and use_kernels(layers[0].weight)
    for batch in (1, 8):
        x = torch.randn(batch, 256, device="cuda", dtype=dtype)
        for out, ref in zip(group(x), reference(x, group)):
            _close(out, ref, dtype)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 3])
def test_group_of_nf4_and_fp4_members(batch):
    # The fast kernel's code table serves one type: a mixed group takes the generic kernel.
    dtype = torch.float16
    layers = [
        _layer(256, 40, quant=True, bias=False, rank=0, dtype=dtype, device="cuda", quant_type=qt, seed=i)
        for i, qt in enumerate(("nf4", "fp4"))
    ]
    group = ProjectionGroup.from_modules(layers, dtype)
    assert group.uses_kernel and use_kernels(layers[0].weight)
    x = torch.randn(batch, 256, device="cuda", dtype=dtype)
    for out, ref in zip(group(x), reference(x, group)):
        _close(out, ref, dtype)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_and_16bit_groups_match_reference(dtype):
    layers = [
        _layer(128, 64, quant=True, bias=True, rank=8, dtype=dtype, device="cuda", seed=1),
        _layer(128, 32, quant=False, bias=True, rank=8, dtype=dtype, device="cuda", seed=2),
        _layer(128, 16, quant=False, bias=False, rank=0, dtype=dtype, device="cuda", seed=3),
    ]
    for members in (layers, layers[1:]):
        group = ProjectionGroup.from_modules(members, dtype)
        assert group.uses_kernel and use_kernels(members[0].weight)
        # One launch adds the 16-bit members' LoRA terms (the one without LoRA left alone).
        assert group._plan.dense_lora is not None and group._plan.dense_lora[-1][2] == 0
        for batch in (1, 4, 11):
            x = torch.randn(batch, 128, device="cuda", dtype=dtype)
            for out, ref in zip(group(x), reference(x, group)):
                _close(out, ref, dtype)


def _capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up: kernels loaded, cuBLAS handles made
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@cuda
@pytest.mark.cuda
def test_graph_replay_equals_eager():
    dtype = torch.bfloat16
    layers = _group(4096, (512, 128, 128), quant=True, bias=True, rank=0, dtype=dtype, device="cuda")
    group = ProjectionGroup.from_modules(layers, dtype)
    x = torch.randn(4, 4096, device="cuda", dtype=dtype)
    graph, captured = _capture(lambda: group(x))
    x.copy_(torch.randn_like(x))
    graph.replay()
    for got, want in zip(captured, group(x)):
        assert torch.equal(got, want)  # the same kernel on the same input: bit for bit


@cuda
@pytest.mark.cuda
def test_graph_replay_sees_new_input_and_refreshed_adapters():
    dtype = torch.bfloat16
    layers = _group(4096, (512, 128, 128), quant=True, bias=False, rank=16, dtype=dtype, device="cuda")
    group = ProjectionGroup.from_modules(layers, dtype)
    x = torch.randn(4, 4096, device="cuda", dtype=dtype)
    graph, captured = _capture(lambda: group(x))
    x.copy_(torch.randn_like(x))
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.weight.mul_(-2.0)
    group.refresh_adapters()
    graph.replay()
    for got, want in zip(captured, reference(x, group)):
        _close(got, want, dtype)


@cuda
@pytest.mark.cuda
def test_call_allocates_only_its_output_buffer():
    # The 4-bit weight is never materialized in 16 bits: the call's peak is its one output
    # buffer (outputs and the LoRA down-projection), whatever the weight's size.
    dtype = torch.bfloat16
    layers = _group(4096, (1024, 512), quant=True, bias=True, rank=16, dtype=dtype, device="cuda")
    group = ProjectionGroup.from_modules(layers, dtype)
    x = torch.randn(2, 4096, device="cuda", dtype=dtype)
    group(x)  # warm-up (cuBLAS workspace)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = group(x)
    torch.cuda.synchronize()
    flat_bytes = 2 * (2 * (1024 + 512) + 2 * 32)
    assert torch.cuda.max_memory_allocated() - before <= -(-flat_bytes // 512) * 512
    assert len(outs) == 2
