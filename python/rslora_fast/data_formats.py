"""Training data for ``rslora-fast finetune``: read, check, render and tokenize, before any model loads.

Formats, told apart by the fields of the rows (all rows must agree):

==================  ====================================  ===================================
format              fields                                trained tokens (``--responses-only``)
==================  ====================================  ===================================
text                ``text`` (or ``--text-field``)        all
chat                ``messages`` / ``conversations`` (or  assistant turns
                    ``--messages-field``), OpenAI
                    ``role``/``content`` or ShareGPT
                    ``from``/``value`` turns
alpaca              ``instruction``, optional ``input``,  the ``output``
                    ``output`` (or ``response``)
prompt/completion   ``prompt``, ``completion``            the completion
==================  ====================================  ===================================

Chat and alpaca rows go through the tokenizer's chat template. Every training row ends with EOS. A
``.txt``/``.md`` file is one text row per blank-line paragraph (``--txt-split paragraph``) or per
non-empty line (``--txt-split line``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat_templates import normalize_messages
from .errors import DataError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
FORMATS = ("text", "chat", "alpaca", "prompt-completion")


@dataclass
class Record:
    """One row of the data file and where it came from (for error messages)."""

    data: dict[str, Any]
    where: str  # "file:line" (JSONL, text) or "file: row N" (other formats)


@dataclass
class Example:
    """A rendered training row: text segments, each trained or not, and the sample prompt."""

    segments: list[tuple[str, bool]] = field(default_factory=list)
    prompt: str = ""  # the row's prompt part, rendered once for generation

    @property
    def text(self) -> str:
        return "".join(s for s, _ in self.segments)


# ----------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike, txt_split: str = "paragraph") -> list[Record]:
    """The rows of a data file; stops with a :class:`DataError` naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data: no such file {str(path)!r}")
    if path.is_dir():
        raise DataError(
            f"--data: {str(path)!r} is a folder; pass a .jsonl, .json, .txt, .csv or .parquet file"
        )
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _read_jsonl(path)
    elif suffix in TEXT_SUFFIXES:
        records = _read_text(path, txt_split)
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix in {".csv", ".parquet"}:
        records = _read_table(path, suffix)
    else:
        raise DataError(
            f"--data: unsupported file type {suffix!r} ({path}); use .jsonl, .json, .txt, .csv or .parquet"
        )
    if not records:
        raise DataError(f"{path}: no rows (the file is empty); expected at least one training row")
    return records


def _parse_json(text: str, path: Path, expected: str, line: int | None = None) -> Any:
    """``json.loads``, a syntax error raised as DataError at ``path:line`` and column (a JSON Lines
    row, ``line`` given) or at the line within the document."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if line is None:
            where = f"{path}:{exc.lineno}: not valid JSON ({exc.msg})"
        else:
            where = f"{path}:{line}: not valid JSON ({exc.msg} at column {exc.colno})"
        raise DataError(f"{where}; expected {expected}") from None


def _read_jsonl(path: Path) -> list[Record]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = _parse_json(line, path, "one JSON object per line", line=i)
            out.append(_as_record(row, f"{path}:{i}"))
    return out


def _read_json(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    data = _parse_json(text, path, "a list of objects (JSON Lines files end in .jsonl)")
    if isinstance(data, dict):
        data = data.get("data", data.get("train"))
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
    return [_as_record(row, f"{path}: row {i}") for i, row in enumerate(data, 1)]


def _read_table(path: Path, suffix: str) -> list[Record]:
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as f:
            # header is line 1, so row i is on line i + 1 (for rows without embedded newlines)
            return [_as_record(dict(r), f"{path}:{i + 1}") for i, r in enumerate(csv.DictReader(f), 1)]
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{path}: reading parquet needs the `datasets` package (pip install datasets)"
        ) from exc
    rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    return [_as_record(dict(r), f"{path}: row {i}") for i, r in enumerate(rows, 1)]


def _read_text(path: Path, txt_split: str) -> list[Record]:
    if txt_split not in ("paragraph", "line"):
        raise DataError(f"--txt-split {txt_split!r}: expected 'paragraph' or 'line'")
    out: list[Record] = []
    block: list[str] = []
    start = 0
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if txt_split == "line":
            if line.strip():
                out.append(Record({"text": line}, f"{path}:{i}"))
            continue
        if line.strip():
            start = start or i
            block.append(line)
        elif block:
            out.append(Record({"text": "\n".join(block)}, f"{path}:{start}"))
            block, start = [], 0
    if block:
        out.append(Record({"text": "\n".join(block)}, f"{path}:{start}"))
    return out


def _as_record(row: Any, where: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with named fields, got {type(row).__name__}")
    return Record(row, where)


# ----------------------------------------------------------------------------- format


def detect_format(rec: Record, text_field: str | None, messages_field: str | None) -> tuple[str, str | None]:
    """``(format, field)`` of a row, from the flags first, then its fields."""
    keys = rec.data
    if text_field:
        if text_field not in keys:
            raise DataError(
                f"{rec.where}: no field {text_field!r} (--text-field); the row has {sorted(keys)}"
            )
        return "text", text_field
    if messages_field:
        if messages_field not in keys:
            raise DataError(
                f"{rec.where}: no field {messages_field!r} (--messages-field); the row has {sorted(keys)}"
            )
        return "chat", messages_field
    for name in ("messages", "conversations"):
        if name in keys:
            return "chat", name
    if "instruction" in keys:
        return "alpaca", None
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion", None
    if "text" in keys:
        return "text", "text"
    raise DataError(
        f"{rec.where}: cannot tell the format from fields {sorted(keys)}; expected text, messages or "
        "conversations, instruction/input/output, or prompt/completion; or pass --text-field / --messages-field"
    )


# ----------------------------------------------------------------------------- rendering


def render_all(
    records: list[Record], tokenizer, text_field=None, messages_field=None
) -> tuple[str, list[Example]]:
    """Render every row; returns the format and the examples. Rows must share one format."""
    fmt, fld = detect_format(records[0], text_field, messages_field)
    out = []
    for rec in records:
        got, _ = detect_format(rec, text_field, messages_field)
        if got != fmt:
            raise DataError(
                f"{rec.where}: row is {got} data but the first row ({records[0].where}) is {fmt}; use one format per file"
            )
        ex = _render(fmt, fld, rec, tokenizer)
        if not ex.text.strip() or not any(t and s.strip() for s, t in ex.segments):
            raise DataError(
                f"{rec.where}: the row renders to no trainable text ({fmt} format); remove it or fill its fields"
            )
        _append_eos(ex, tokenizer)
        out.append(ex)
    return fmt, out


def _render(fmt: str, fld: str | None, rec: Record, tokenizer) -> Example:
    d = rec.data
    bos = tokenizer.bos_token or ""
    if fmt == "text":
        value = d[fld]
        if not isinstance(value, str):
            raise DataError(f"{rec.where}: field {fld!r} is {type(value).__name__}, expected text")
        return Example([(bos, False), (value, True)], prompt=bos + value[: max(1, len(value) // 4)])
    if fmt == "prompt-completion":
        prompt, completion = d["prompt"], d["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(
                f"{rec.where}: prompt and completion must be text (got {type(prompt).__name__}, {type(completion).__name__})"
            )
        return Example([(bos + prompt, False), (completion, True)], prompt=bos + prompt)
    if fmt == "alpaca":
        messages = _alpaca_messages(rec)
    else:
        messages = normalize_messages(d[fld], f"{rec.where}: field {fld!r}")
    return _render_chat(messages, tokenizer, rec.where)


def _alpaca_messages(rec: Record) -> list[dict[str, str]]:
    d = rec.data
    answer = d.get("output", d.get("response"))
    if answer is None:
        raise DataError(f"{rec.where}: alpaca row without 'output' (or 'response'); the row has {sorted(d)}")
    user = str(d["instruction"])
    if str(d.get("input") or "").strip():
        user = f"{user}\n\n{d['input']}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(answer)}]
    if str(d.get("system") or "").strip():
        messages.insert(0, {"role": "system", "content": str(d["system"])})
    return messages


def _render_chat(messages: list[dict[str, str]], tokenizer, where: str) -> Example:
    """Split the templated row into prompt and response segments by rendering its prefixes.

    The text of assistant turn i is what ``messages[:i+1]`` adds to ``messages[:i]`` rendered with the
    generation prompt; the rest (system, user turns, generation headers) is prompt.
    """
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        raise DataError(f"{where}: conversation has no assistant turn; expected at least one to train on")
    if not any(a.strip() for a in answers):
        raise DataError(f"{where}: every assistant turn is empty; expected text to train on")

    def render(msgs, gen=False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as exc:  # noqa: BLE001 - a template error is a data/template problem
            raise DataError(
                f"{where}: the chat template cannot render this row ({exc}); try --chat-template NAME"
            ) from None

    full = render(messages)
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (after.startswith(before) and full.startswith(after) and len(before) >= done):
            logger.warning("%s: chat template is not prefix-stable; training on the whole row", where)
            return Example([(full, True)], prompt=render(messages[:first], gen=True))
        segments += [(full[done : len(before)], False), (after[len(before) :], True)]
        done = len(after)
    segments.append((full[done:], False))
    return Example([s for s in segments if s[0]], prompt=render(messages[:first], gen=True))


def _append_eos(ex: Example, tokenizer) -> None:
    eos = tokenizer.eos_token or ""
    if eos and not ex.text.rstrip().endswith(eos):
        ex.segments.append((eos, True))
    elif eos and ex.segments and not ex.segments[-1][1]:
        # the template closes the row with EOS outside a response span: train on that EOS too
        text, _ = ex.segments.pop()
        head, sep, tail = text.rpartition(eos)
        ex.segments += [(head, False), (sep, True), (tail, False)]
        ex.segments = [s for s in ex.segments if s[0]]


# ----------------------------------------------------------------------------- tokenizing


def tokenize_examples(
    examples: list[Example], tokenizer, max_len: int, packing: bool, responses_only: bool
) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` per row (labels -100 outside trained spans when responses-only).

    Segments are tokenized one by one, so a trained span starts exactly where the prompt ends (as at
    generation, where the prompt is tokenized alone). Packing concatenates rows and cuts them into
    rows of exactly ``max_len`` tokens, labels travelling with their tokens.
    """
    texts = [text for ex in examples for text, _ in ex.segments]
    tokenized = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    rows = []
    for ex in examples:
        ids: list[int] = []
        labels: list[int] = []
        for (_, trained), part in zip(ex.segments, tokenized):
            ids += part
            labels += part if (trained or not responses_only) else [-100] * len(part)
        rows.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    if packing:
        flat_ids = [t for r in rows for t in r["input_ids"]]
        flat_labels = [t for r in rows for t in r["labels"]]
        rows = [
            {"input_ids": flat_ids[i : i + max_len], "labels": flat_labels[i : i + max_len]}
            for i in range(0, len(flat_ids) - max_len + 1, max_len)
        ]
    return rows


def untrained_rows(rows: list[dict[str, list[int]]]) -> list[int]:
    """Indices of rows whose every label is -100 (nothing to learn from)."""
    return [i for i, r in enumerate(rows) if all(x == -100 for x in r["labels"])]


def describe(ex: Example, fmt: str, rows: list[dict[str, list[int]]], responses_only: bool) -> str:
    """The first example with its trained text between ``[[`` and ``]]``, and the counts."""
    marked = "".join(f"[[{s}]]" if (t or not responses_only) else s for s, t in ex.segments)
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    n_trained = sum(sum(1 for x in r["labels"] if x != -100) for r in rows)
    return (
        f"data format: {fmt}; responses-only loss: {'on' if responses_only else 'off'}\n"
        f"first example (trained text between [[ and ]]):\n{marked}\n"
        f"{len(rows)} training rows, {n_tokens} tokens ({n_trained} trained)"
    )
