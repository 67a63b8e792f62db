"""The offload schedule is the Rust scheduler's: the Python path only marks layer boundaries, and
the order in which layer inputs come back (read from the scheduler's own trace) follows the Rust
policy's lookahead."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("rslora_fast._core")

from rslora_fast.offload import install_offloaded_checkpointing  # noqa: E402

LAYERS = 5


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=61,
        max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("q_proj.weight"))
    return model.train()


def traced_step(lookahead: int) -> list[tuple[str, int]]:
    model = tiny_llama()
    handle = install_offloaded_checkpointing(model, lookahead=lookahead, min_tokens=0)
    sched = handle.scheduler(torch.device("cpu"))
    sched.set_trace(True)
    ids = torch.randint(0, 61, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    trace = sched.trace()
    assert {p for _, p, _ in trace} == {1}, "one forward pass"
    assert handle.stats()["live_handles"] == 0
    return [(kind[0].upper(), layer) for kind, _, layer in trace]


OUT = [("O", i) for i in range(LAYERS - 1)]  # the last layer keeps its input


@pytest.mark.parametrize(
    ("lookahead", "backward"),
    [
        # P: copy back started, R: the layer takes its input (compute waits for the copy).
        (0, [("P", 3), ("R", 3), ("P", 2), ("R", 2), ("P", 1), ("R", 1), ("P", 0), ("R", 0)]),
        (1, [("P", 3), ("P", 2), ("R", 3), ("P", 1), ("R", 2), ("P", 0), ("R", 1), ("R", 0)]),
        (2, [("P", 3), ("P", 2), ("P", 1), ("R", 3), ("P", 0), ("R", 2), ("R", 1), ("R", 0)]),
    ],
)
def test_prefetch_order_is_the_rust_policys(lookahead, backward):
    assert traced_step(lookahead) == OUT + backward
