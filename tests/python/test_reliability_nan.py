"""NaN and Inf in weights: kept by the quantizer as bitsandbytes keeps them, refused at load."""

from __future__ import annotations

import pytest
import torch

from rslora_fast.errors import QuantFormatError
from rslora_fast.quant.functional import QuantState, dequantize_4bit, quantize_4bit

bnbf = pytest.importorskip("bitsandbytes.functional")


def _weight_with_nonfinite() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(4, 48)  # 192 values: 3 blocks of 64
    flat = w.view(-1)
    flat[3] = float("nan")  # block 0: NaN
    flat[70] = float("inf")  # block 1: +inf
    flat[130] = -float("inf")  # block 2: -inf and a NaN
    flat[150] = float("nan")
    return w


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n", [192, 150])  # whole blocks, and a partial last block
def test_nan_and_inf_quantize_to_the_bytes_bitsandbytes_writes(quant_type, n):
    w = _weight_with_nonfinite().view(-1)[:n].clone()
    ours, st = quantize_4bit(w, 64, quant_type, compress_statistics=False)
    ref, rst = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    assert torch.equal(ours.view(-1), ref.view(-1))
    torch.testing.assert_close(st.absmax, rst.absmax, equal_nan=True)
    assert torch.isnan(st.absmax[0])  # f32::max used to skip the NaN and store a finite scale
    deq = dequantize_4bit(ours, st)
    assert torch.isnan(deq[:64]).all()  # the NaN block stays NaN, never a finite value
    assert deq[70] == float("inf") and not torch.isfinite(deq[64:128]).any()


def _bnb_state(nested_absmax_nan: bool) -> tuple[torch.Tensor, QuantState]:
    packed, st = quantize_4bit(torch.randn(64, 64), 64, "nf4", compress_statistics=True)
    if nested_absmax_nan:
        st.nested_absmax = st.nested_absmax.clone()
        st.nested_absmax[0] = float("nan")
    return packed, st


def test_nan_in_prequantized_nested_absmax_is_refused_with_the_tensor_name():
    packed, st = _bnb_state(nested_absmax_nan=True)
    tensors = st.as_bnb_dict("model.layers.0.mlp.up_proj", packed)
    with pytest.raises(
        QuantFormatError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*non-finite nested_absmax"
    ):
        QuantState.from_bnb_dict("model.layers.0.mlp.up_proj", tensors)
    good_packed, good = _bnb_state(nested_absmax_nan=False)
    QuantState.from_bnb_dict("m", good.as_bnb_dict("m", good_packed))  # a finite state still loads


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_nan_weight_is_refused_at_4bit_load_naming_the_tensor(tmp_path, device):
    import transformers
    from safetensors.torch import load_file, save_file

    from rslora_fast.loading import from_pretrained

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.q_proj.weight"][5, 7] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(QuantFormatError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*non-finite"):
        from_pretrained(str(tmp_path), load_in_4bit=True, device_map=device, progress=False)
