"""The dequantize scratch of ``Linear4bit`` is per thread, per stream and per inference mode.

Two 4-bit models run in two threads give the logits they give alone; a forward under
``torch.inference_mode()`` does not break later training; on CUDA, two models on two streams.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from rslora_fast.quant.linear4bit import Linear4bit, clear_scratch


def _model_4bit(seed: int, width: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(3):
        lin = nn.Linear(width, width, bias=True)
        layers.append(Linear4bit.from_linear(lin, compute_dtype=dtype, device=device))
    return nn.Sequential(*layers).eval()


def _run_many(model: nn.Module, x: torch.Tensor, times: int, out: list, barrier: threading.Barrier) -> None:
    barrier.wait()
    with torch.no_grad():
        for _ in range(times):
            out.append(model(x))


def test_two_4bit_models_in_two_threads_give_their_single_thread_logits():
    # Different widths and weights: a shared buffer would be overwritten by the other model.
    models = [_model_4bit(0, 384), _model_4bit(1, 256)]
    inputs = [torch.randn(4, 384, generator=torch.Generator().manual_seed(2)),
              torch.randn(4, 256, generator=torch.Generator().manual_seed(3))]  # fmt: skip
    with torch.no_grad():
        expected = [m(x) for m, x in zip(models, inputs)]
    results: list[list] = [[], []]
    barrier = threading.Barrier(2)
    threads = [
        threading.Thread(target=_run_many, args=(m, x, 60, r, barrier))
        for m, x, r in zip(models, inputs, results)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrong = sum(not torch.equal(y, exp) for r, exp in zip(results, expected) for y in r)
    assert len(results[0]) == len(results[1]) == 60
    assert wrong == 0, f"{wrong} of 120 threaded forwards differ from the single-thread logits"


def test_inference_mode_forward_in_bf16_does_not_break_later_training():
    clear_scratch()  # the first buffer of this key is created under inference mode below
    torch.manual_seed(0)
    adapter = nn.Linear(64, 64, dtype=torch.bfloat16)
    frozen = Linear4bit.from_linear(nn.Linear(64, 64), compute_dtype=torch.bfloat16)
    model = nn.Sequential(adapter, frozen)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        generated = model(x)
    assert generated.is_inference()
    # Training afterwards: forward and backward outside inference mode, twice.
    for _ in range(2):
        loss = model(x).float().pow(2).mean()
        loss.backward()
    assert adapter.weight.grad is not None and torch.isfinite(adapter.weight.grad).all()
    # and inference mode again still works
    with torch.inference_mode():
        torch.testing.assert_close(model(x), generated)


def test_clear_scratch_releases_other_threads_buffers():
    model = _model_4bit(0, 64)
    done = threading.Event()

    def work():
        with torch.no_grad():
            model(torch.randn(1, 64))
        done.set()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert done.is_set()
    from rslora_fast.quant import linear4bit

    assert any(s.bufs for s in list(linear4bit._ALL_SCRATCH))
    clear_scratch()
    assert not any(s.bufs for s in list(linear4bit._ALL_SCRATCH))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_two_models_on_two_streams_give_their_single_stream_logits():
    dev = "cuda"
    models = [_model_4bit(0, 1536, torch.bfloat16, dev), _model_4bit(1, 1024, torch.bfloat16, dev)]
    inputs = [torch.randn(8, 1536, device=dev, dtype=torch.bfloat16),
              torch.randn(8, 1024, device=dev, dtype=torch.bfloat16)]  # fmt: skip
    with torch.no_grad():
        expected = [m(x) for m, x in zip(models, inputs)]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs: list[list] = [[], []]
    with torch.no_grad():
        for _ in range(50):  # interleave launches on the two streams
            for m, x, s, o in zip(models, inputs, streams, outs):
                with torch.cuda.stream(s):
                    o.append(m(x))
    torch.cuda.synchronize()
    wrong = sum(not torch.equal(y, exp) for o, exp in zip(outs, expected) for y in o)
    assert wrong == 0, f"{wrong} of 100 two-stream forwards differ from the single-stream logits"
