"""``rslora_fast.chat_templates``: named templates, ShareGPT conversion, responses-only masks.

Expected texts are written here from each family's published turn format; expected masks come from
tokenizing the prompt and response parts separately (not from the code under test).
"""

from __future__ import annotations

import re
import types
import warnings

import pytest

from rslora_fast.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only
from rslora_fast.demo import CHAT_TEMPLATE, build_demo_tokenizer
from rslora_fast.errors import DataError
from rslora_fast.finetune import PadCollator

SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
            "<start_of_turn>", "<end_of_turn>"]  # fmt: skip

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What colour is coal?"},
    {"role": "assistant", "content": "Coal is black."},
    {"role": "user", "content": "And snow?"},
    {"role": "assistant", "content": "Snow is white."},
]


@pytest.fixture(scope="module")
def base_tok():
    tok = build_demo_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tok


def _fresh(base_tok):
    import copy

    return copy.deepcopy(base_tok)


# (prompt, response) pieces of CONVO in each format, from the formats' documentation.
PIECES = {
    "llama-3": [
        ("<|bos|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nWhat colour is coal?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", "Coal is black.<|eot_id|>"),
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd snow?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", "Snow is white.<|eot_id|>"),
    ],
    "chatml": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat colour is coal?<|im_end|>\n"
         "<|im_start|>assistant\n", "Coal is black.<|im_end|>"),
        ("\n<|im_start|>user\nAnd snow?<|im_end|>\n<|im_start|>assistant\n", "Snow is white.<|im_end|>"),
    ],
    "gemma": [
        ("<|bos|><start_of_turn>user\nBe brief.\n\nWhat colour is coal?<end_of_turn>\n"
         "<start_of_turn>model\n", "Coal is black.<end_of_turn>"),
        ("\n<start_of_turn>user\nAnd snow?<end_of_turn>\n<start_of_turn>model\n", "Snow is white.<end_of_turn>"),
    ],
}  # fmt: skip
TAIL = {"llama-3": "", "chatml": "\n", "gemma": "\n"}
INSTRUCTION = {"llama-3": "<|start_header_id|>user<|end_header_id|>\n\n", "chatml": "<|im_start|>user\n",
               "gemma": "<start_of_turn>user\n"}  # fmt: skip
RESPONSE = {"llama-3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "chatml": "<|im_start|>assistant\n",
            "gemma": "<start_of_turn>model\n"}  # fmt: skip


def _expected_row(tok, name):
    """input_ids and labels built piece by piece: prompt pieces -100, response pieces trained."""
    ids, labels = [], []
    for prompt, response in PIECES[name]:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        ids += p + r
        labels += [-100] * len(p) + r
    tail = tok(TAIL[name], add_special_tokens=False)["input_ids"] if TAIL[name] else []
    return ids + tail, labels + [-100] * len(tail)


@pytest.mark.parametrize("name", ["llama-3", "chatml", "gemma"])
def test_named_template_renders_the_family_format(base_tok, name):
    tok = get_chat_template(_fresh(base_tok), chat_template=name)
    assert tok.chat_template != CHAT_TEMPLATE  # the name won over the tokenizer's own template
    want = "".join(p + r for p, r in PIECES[name]) + TAIL[name]
    assert tok.apply_chat_template(CONVO, tokenize=False) == want
    gen = tok.apply_chat_template(CONVO[:2], tokenize=False, add_generation_prompt=True)
    assert gen == PIECES[name][0][0]


@pytest.mark.parametrize("name", ["llama-3", "chatml", "gemma-3"])
def test_content_as_a_list_of_parts_renders_like_a_string(base_tok, name):
    """Gemma 3's notebooks write ``content`` as ``[{"type": "text", "text": ...}]``."""
    tok = get_chat_template(_fresh(base_tok), chat_template=name)
    parts = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}, {"type": "image"}]}
        for m in CONVO
    ]
    assert tok.apply_chat_template(parts, tokenize=False) == tok.apply_chat_template(CONVO, tokenize=False)


def test_no_name_keeps_the_tokenizers_template_and_fills_a_gap(base_tok):
    tok = get_chat_template(_fresh(base_tok))
    assert tok.chat_template == CHAT_TEMPLATE
    bare = _fresh(base_tok)
    bare.chat_template = None
    get_chat_template(bare)  # vocabulary has <|start_header_id|>: llama-3 fills the gap
    assert bare.apply_chat_template(CONVO[1:3], tokenize=False).startswith("<|bos|><|start_header_id|>user")


def test_unknown_template_name_lists_the_known_ones(base_tok):
    with pytest.raises(DataError, match="unknown chat template 'llama-9'.*chatml.*llama-3"):
        get_chat_template(_fresh(base_tok), chat_template="llama-9")


def test_map_eos_token_and_sharegpt_mapping(base_tok):
    tok = get_chat_template(
        _fresh(base_tok),
        chat_template="chatml",
        mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"},
    )
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


@pytest.mark.parametrize(
    "name", ["llama-3.1", "zephyr", "alpaca", "vicuna", "gemma-3", "qwen-2.5", "phi-3", "mistral"]
)
def test_other_unsloth_names_render_a_multi_turn_chat(base_tok, name):
    tok = get_chat_template(_fresh(base_tok), chat_template=name)
    text = tok.apply_chat_template(CONVO, tokenize=False)
    for m in CONVO:
        assert m["content"] in text
    assert text.index("Coal is black.") < text.index("And snow?") < text.index("Snow is white.")


SHAREGPT = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "id": 1}]
OPENAI = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_standardize_sharegpt_on_a_list():
    out = standardize_sharegpt(SHAREGPT)
    assert out == [{"conversations": OPENAI, "id": 1}]


def test_standardize_sharegpt_on_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = standardize_sharegpt(datasets.Dataset.from_list(SHAREGPT))
    assert ds[0]["conversations"] == OPENAI and ds[0]["id"] == 1


def _trainer(tok, rows):
    return types.SimpleNamespace(
        train_dataset=rows, data_collator=PadCollator(tok.pad_token_id), processing_class=tok
    )


@pytest.mark.filterwarnings("ignore:train_on_responses_only")  # the short row is all prompt, on purpose
@pytest.mark.parametrize("name", ["llama-3", "chatml", "gemma"])
def test_responses_only_masks_exactly_the_prompt_tokens(base_tok, name):
    tok = get_chat_template(_fresh(base_tok), chat_template=name, map_eos_token=False)
    ids, labels = _expected_row(tok, name)
    short = [{"input_ids": ids[:5]}]  # padding must stay masked too
    trainer = train_on_responses_only(
        _trainer(tok, [{"input_ids": ids}, *short]),
        instruction_part=INSTRUCTION[name],
        response_part=RESPONSE[name],
    )
    batch = trainer.data_collator([{"input_ids": ids}, *short])
    assert batch["labels"][0].tolist() == labels
    assert batch["labels"][1].tolist() == [-100] * len(ids)


@pytest.mark.parametrize("name", ["llama-3", "chatml", "gemma"])
def test_responses_only_with_packing_and_guessed_parts(base_tok, name):
    """Two rows packed into one: both rows' system/user turns masked, both assistant turns trained."""
    tok = get_chat_template(_fresh(base_tok), chat_template=name, map_eos_token=False)
    ids, labels = _expected_row(tok, name)
    trainer = train_on_responses_only(_trainer(tok, [{"input_ids": ids + ids}]))  # parts guessed
    batch = trainer.data_collator([{"input_ids": ids + ids}])
    assert batch["labels"][0].tolist() == labels + labels


def test_rows_losing_every_token_are_listed(base_tok):
    tok = get_chat_template(_fresh(base_tok), chat_template="llama-3", map_eos_token=False)
    ids, _ = _expected_row(tok, "llama-3")
    prompt_only = tok(PIECES["llama-3"][0][0], add_special_tokens=False)["input_ids"]
    rows = [{"input_ids": ids}, {"input_ids": prompt_only}, {"input_ids": ids}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_on_responses_only(_trainer(tok, rows), INSTRUCTION["llama-3"], RESPONSE["llama-3"])
    assert any("1 of 3 rows have no trainable token (rows 1)" in str(w.message) for w in caught)
    with pytest.raises(DataError, match="no row keeps a trainable token"):
        train_on_responses_only(
            _trainer(tok, [{"input_ids": prompt_only}]), INSTRUCTION["llama-3"], RESPONSE["llama-3"]
        )


def test_quickstart_flow_with_hf_trainer(tmp_path, base_tok):
    """The quickstart's Python chat fine-tune: the labels Trainer trains on are the assistant turns."""
    import torch
    from transformers import Trainer, TrainingArguments

    from rslora_fast import FastLanguageModel
    from rslora_fast.demo import build_demo_model

    folder = build_demo_model(tmp_path / "demo")
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=128, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3")
    rows = standardize_sharegpt(
        [
            {
                "conversations": [
                    {"from": "human", "value": "What colour is coal?"},
                    {"from": "gpt", "value": "Black."},
                ]
            }
        ]
        * 4
    )
    texts = [tokenizer.apply_chat_template(r["conversations"], tokenize=False) for r in rows]
    train = [{"input_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                             remove_unused_columns=False, report_to=[], use_cpu=True)  # fmt: skip
    trainer = Trainer(
        model=model,
        train_dataset=train,
        data_collator=PadCollator(tokenizer.pad_token_id),
        args=args,
        processing_class=tokenizer,
    )
    trainer = train_on_responses_only(
        trainer, instruction_part=INSTRUCTION["llama-3"], response_part=RESPONSE["llama-3"]
    )
    batch = next(iter(trainer.get_train_dataloader()))
    prompt = tokenizer.apply_chat_template(
        rows[0]["conversations"][:1], tokenize=False, add_generation_prompt=True
    )
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels = batch["labels"][0].tolist()
    assert labels[:n_prompt] == [-100] * n_prompt
    assert tokenizer.decode(labels[n_prompt:]) == "Black.<|eot_id|>"
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_trl_sft_trainer_with_packing_trains_only_the_answers(tmp_path):
    """Unsloth's notebook flow: SFTTrainer on templated text, then train_on_responses_only (parts guessed)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from rslora_fast import FastLanguageModel
    from rslora_fast.demo import build_demo_model

    model, tokenizer = FastLanguageModel.from_pretrained(
        str(build_demo_model(tmp_path / "demo")), load_in_4bit=False
    )
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3")
    convos = [[{"role": "user", "content": f"What is {i} plus 2?"}, {"role": "assistant", "content": f"It is {i + 2}."}]
              for i in range(8)]  # fmt: skip
    data = datasets.Dataset.from_list(
        [{"text": tokenizer.apply_chat_template(c, tokenize=False)} for c in convos]
    )
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, packing=True,
                         max_length=128, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model.get_base_model(), args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer = train_on_responses_only(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    trained = [
        t
        for t, lab in zip(batch["input_ids"].flatten().tolist(), batch["labels"].flatten().tolist())
        if lab != -100
    ]
    text = tokenizer.decode(trained)
    # every answer in the packed batch, in order, and nothing else
    answers = re.findall(r"It is \d+\.<\|eot_id\|>", tokenizer.decode(batch["input_ids"].flatten().tolist()))
    assert answers and text == "".join(answers), text
    trainer.train()
