"""``rslora-fast finetune`` data: every format read and rendered right, every bad input stopped with one
line (file, line, what was expected, which flag) before any model loads."""

from __future__ import annotations

import json

import pytest

from rslora_fast.__main__ import main
from rslora_fast.data_formats import read_records, render_all, tokenize_examples
from rslora_fast.demo import build_demo_model, build_demo_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo-llama")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the CLI gets as far as loading a model."""
    import rslora_fast

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(rslora_fast.FastLanguageModel, "from_pretrained", boom)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _render(tok, path, **kw):
    fmt, examples = render_all(read_records(path), tok, kw.get("text_field"), kw.get("messages_field"))
    rows = tokenize_examples(examples, tok, 512, packing=False, responses_only=fmt != "text")
    return fmt, examples, rows


def _trained_text(tok, row):
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])


def _masked_text(tok, row):
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab == -100])


# ----------------------------------------------------------------------------- formats


def test_text_rows_get_eos_and_train_everything(tok, tmp_path):
    fmt, ex, rows = _render(tok, _jsonl(tmp_path / "d.jsonl", [{"text": "coal is black"}]))
    assert fmt == "text"
    assert rows[0]["input_ids"][-1] == tok.eos_token_id
    assert rows[0]["input_ids"][0] == tok.bos_token_id
    assert _trained_text(tok, rows[0]) == "<|bos|>coal is black<|eos|>"


def test_sharegpt_conversations_render_their_values(tok, tmp_path):
    conv = [{"from": "human", "value": "What colour is coal?"}, {"from": "gpt", "value": "Black."}]
    fmt, ex, rows = _render(tok, _jsonl(tmp_path / "d.jsonl", [{"conversations": conv}]))
    assert fmt == "chat"
    want = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is coal?"}, {"role": "assistant", "content": "Black."}],
        tokenize=False,
    )
    assert ex[0].text == want
    assert _trained_text(tok, rows[0]) == "Black.\n<|eos|>"
    assert "What colour is coal?" in _masked_text(tok, rows[0])


def test_multi_turn_openai_messages_train_every_assistant_turn(tok, tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "Three?"},
        {"role": "assistant", "content": "Four."},
    ]
    _, _, rows = _render(tok, _jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]))
    assert _trained_text(tok, rows[0]) == "Two.\n<|eos|>Four.\n<|eos|>"
    masked = _masked_text(tok, rows[0])
    assert "Be brief." in masked and "One?" in masked and "Three?" in masked


def test_alpaca_keeps_its_input(tok, tmp_path):
    row = {"instruction": "Add the numbers.", "input": "6 and 2", "output": "8"}
    fmt, ex, rows = _render(tok, _jsonl(tmp_path / "d.jsonl", [row]))
    assert fmt == "alpaca"
    assert "Add the numbers.\n\n6 and 2" in _masked_text(tok, rows[0])
    assert _trained_text(tok, rows[0]) == "8\n<|eos|>"
    # the sample prompt is the row's prompt part, templated once with the generation prompt
    user = {"role": "user", "content": "Add the numbers.\n\n6 and 2"}
    assert ex[0].prompt == tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)


def test_prompt_completion_masks_exactly_the_prompt(tok, tmp_path):
    fmt, ex, rows = _render(
        tok, _jsonl(tmp_path / "d.jsonl", [{"prompt": "Coal is", "completion": " black."}])
    )
    assert fmt == "prompt-completion"
    n_prompt = len(tok("<|bos|>Coal is", add_special_tokens=False)["input_ids"])
    assert rows[0]["labels"][:n_prompt] == [-100] * n_prompt
    assert rows[0]["labels"][n_prompt:] == tok(" black.<|eos|>", add_special_tokens=False)["input_ids"]
    assert ex[0].prompt == "<|bos|>Coal is"


@pytest.mark.parametrize(
    ("split", "want"), [("paragraph", ["a b\nc d", "e f"]), ("line", ["a b", "c d", "e f"])]
)
def test_txt_file_by_paragraph_or_line(tmp_path, split, want):
    path = tmp_path / "d.txt"
    path.write_text("a b\nc d\n\n\ne f\n")
    assert [r.data["text"] for r in read_records(path, txt_split=split)] == want


# ----------------------------------------------------------------------------- bad input, via the CLI


def _cli(demo_model, data, *extra):
    return main(["finetune", "--model", str(demo_model), "--data", str(data), "--max-steps", "1", *extra])


BAD = [
    ("missing", None, "no such file"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2: not valid JSON"),
    ("empty.jsonl", "\n\n", r"empty.jsonl: no rows \(the file is empty\)"),
    ("fields.jsonl", '{"question": "q", "answer": "a"}\n', r"fields.jsonl:1: cannot tell the format.*--text-field"),
    ("alpaca.jsonl", '{"instruction": "i", "output": "o"}\n{"instruction": "i"}\n', r"alpaca.jsonl:2: alpaca row without 'output'"),
    ("emptyrow.jsonl", '{"text": "ok"}\n{"text": "   "}\n', r"emptyrow.jsonl:2: the row renders to no trainable text"),
    ("mixed.jsonl", '{"text": "ok"}\n{"prompt": "p", "completion": "c"}\n', r"mixed.jsonl:2: row is prompt-completion data"),
    ("turns.jsonl", '{"messages": [{"speaker": "u", "text": "hi"}]}\n', r"turns.jsonl:1: .*expected role/content \(OpenAI\) or from/value"),
    ("emptyturns.jsonl", '{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": " "}]}\n', r"emptyturns.jsonl:1: every assistant turn is empty"),
    ("emptyout.jsonl", '{"instruction": "i", "input": "", "output": ""}\n', r"emptyout.jsonl:1: every assistant turn is empty"),
    ("noanswer.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', r"noanswer.jsonl:1: conversation has no assistant turn"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_data_stops_with_one_line_before_the_model_loads(
    demo_model, no_model_load, tmp_path, capsys, name, content, message
):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert _cli(demo_model, path, "--output-dir", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("rslora-fast finetune: error:")]
    assert len(lines) == 1, err
    assert pytest.importorskip("re").search(message, lines[0]), lines[0]
    assert "Traceback" not in err


def test_wrong_field_flags_name_the_flag_and_the_fields(demo_model, no_model_load, tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    assert _cli(demo_model, path, "--text-field", "body") == 2
    err = capsys.readouterr().err
    assert "d.jsonl:1: no field 'body' (--text-field); the row has ['text']" in err
    assert _cli(demo_model, path, "--messages-field", "chat") == 2
    assert "no field 'chat' (--messages-field)" in capsys.readouterr().err


def test_first_example_is_shown_with_its_trained_span_and_counts(demo_model, tmp_path, capsys, monkeypatch):
    import rslora_fast.finetune as ft

    monkeypatch.setattr(ft, "_train", lambda *a, **k: {"exit_code": 0})  # stop after the data step
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Coal is", "completion": " black."}] * 3)
    assert _cli(demo_model, path, "--output-dir", str(tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "data format: prompt-completion; responses-only loss: on" in out
    assert "<|bos|>Coal is[[ black.]][[<|eos|>]]" in out
    assert "3 training rows" in out
    assert _cli(demo_model, path, "--output-dir", str(tmp_path / "run"), "--no-responses-only") == 0
    assert "[[<|bos|>Coal is]]" in capsys.readouterr().out


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "3 ", "130", "143"):
        assert f"\n  {code}" in out


def test_known_errors_give_one_line_and_exit_2_unexpected_ones_keep_their_traceback(monkeypatch, capsys):
    import rslora_fast.finetune as ft
    from rslora_fast.loading import CheckpointNotFoundError

    def missing(args):
        raise CheckpointNotFoundError("model directory '/nope' does not exist")

    monkeypatch.setattr(ft, "run", missing)
    assert main(["finetune"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "rslora-fast finetune: error: model directory '/nope' does not exist"
    assert err[1].startswith("hint: ") and len(err) == 2

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ft, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["finetune"])


def test_chat_template_flag_renders_sharegpt_rows_with_the_named_template(
    demo_model, tmp_path, capsys, monkeypatch
):
    import rslora_fast.finetune as ft

    monkeypatch.setattr(ft, "_train", lambda *a, **k: {"exit_code": 0})
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi?"},
        {"from": "gpt", "value": "Yo."},
    ]
    path = _jsonl(tmp_path / "d.jsonl", [{"conversations": conv}])
    assert _cli(demo_model, path, "--output-dir", str(tmp_path / "run"), "--chat-template", "chatml") == 0
    out = capsys.readouterr().out
    want = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        "<|im_start|>assistant\n[[Yo.<|im_end|>\n]][[<|eos|>]]"
    )
    assert want in out
