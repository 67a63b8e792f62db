"""Chat templates, ShareGPT conversion and responses-only loss, under Unsloth's names.

``get_chat_template(tokenizer, chat_template="llama-3")`` sets a named template on the tokenizer (a
named template wins over the tokenizer's own); with no name the tokenizer's own template is kept and
ours only fill the gap. ``standardize_sharegpt`` turns ``from``/``value`` turns into ``role``/``content``;
``train_on_responses_only`` masks every label outside the assistant turns to -100.

The Jinja templates are generated here from each family's turn markers (one generator, one table), so
every family handles a system message, multi-turn rows and ``add_generation_prompt`` the same way.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any

from .errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATES",
    "Family",
    "get_chat_template",
    "response_mask",
    "standardize_data_formats",
    "standardize_sharegpt",
    "template_parts",
    "train_on_responses_only",
]

BOS, EOS = object(), object()  # stand for ``bos_token`` / ``eos_token`` inside a marker


@dataclass(frozen=True)
class Family:
    """The turn markers of one chat format.

    Each marker is a tuple of literal strings and the BOS/EOS sentinels. ``system_into_user`` folds
    the system message into the first user turn (formats with no system role), followed by
    ``system_sep``. ``end`` is the marker that closes an assistant turn (trained with it).
    """

    user: tuple
    user_end: tuple
    assistant: tuple
    assistant_end: tuple
    system: tuple = ()
    system_end: tuple = ()
    start: tuple = (BOS,)
    system_into_user: bool = False
    system_sep: str = "\n\n"
    default_system: str | None = None
    markers: tuple[str, str] | None = None  # (instruction_part, response_part) when not user/assistant

    @property
    def instruction_part(self) -> str:
        return self.markers[0] if self.markers else _literal(self.user)

    @property
    def response_part(self) -> str:
        return self.markers[1] if self.markers else _literal(self.assistant)

    def end_part(self, eos: str = "") -> str:
        """The text that closes an assistant turn (``eos`` stands in for the EOS sentinel)."""
        return _literal(self.assistant_end, eos=eos).strip()

    @classmethod
    def role_tagged(cls, header: str, end: tuple, start: tuple = ()) -> Family:
        """A format whose system, user and assistant turns each open with ``header`` naming the role
        (``{role}`` in it) and all close with the same ``end``."""
        return cls(
            start=start,
            system=(header.format(role="system"),),
            system_end=end,
            user=(header.format(role="user"),),
            user_end=end,
            assistant=(header.format(role="assistant"),),
            assistant_end=end,
        )


_LLAMA3 = Family.role_tagged("<|start_header_id|>{role}<|end_header_id|>\n\n", ("<|eot_id|>",), start=(BOS,))
_CHATML = Family.role_tagged("<|im_start|>{role}\n", ("<|im_end|>\n",))
_QWEN25 = Family(
    **{
        **_CHATML.__dict__,
        "default_system": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    }
)
_GEMMA = Family(
    start=(BOS,),
    user=("<start_of_turn>user\n",),
    user_end=("<end_of_turn>\n",),
    assistant=("<start_of_turn>model\n",),
    assistant_end=("<end_of_turn>\n",),
    system_into_user=True,
)
_MISTRAL = Family(
    start=(BOS,),
    user=("[INST] ",),
    user_end=(" [/INST]",),
    assistant=(),
    assistant_end=(EOS,),
    system_into_user=True,
    markers=("[INST]", "[/INST]"),
)
_PHI3 = Family.role_tagged("<|{role}|>\n", ("<|end|>\n",))
_PHI4 = Family.role_tagged("<|im_start|>{role}<|im_sep|>", ("<|im_end|>",))
_ZEPHYR = Family.role_tagged("<|{role}|>\n", (EOS, "\n"))
_ALPACA = Family(
    start=(BOS,),
    system=(),
    system_end=("\n\n",),
    user=("### Instruction:\n",),
    user_end=("\n\n",),
    assistant=("### Response:\n",),
    assistant_end=(EOS, "\n\n"),
    default_system="Below are some instructions that describe some tasks. "
    "Write responses that appropriately complete each request.",
)
_VICUNA = Family(
    start=(BOS,),
    system=(),
    system_end=(" ",),
    user=("USER: ",),
    user_end=(" ",),
    assistant=("ASSISTANT: ",),
    assistant_end=(EOS,),
    default_system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
)

# Unsloth's user-facing names (and their aliases) -> format.
_FAMILIES: dict[str, Family] = {
    **dict.fromkeys(["llama-3", "llama3", "llama-3.1", "llama-31", "llama-3.2", "llama-3.3"], _LLAMA3),
    **dict.fromkeys(["chatml", "qwen-3", "qwen3"], _CHATML),
    **dict.fromkeys(["qwen-2.5", "qwen-25", "qwen25", "qwen2.5"], _QWEN25),
    **dict.fromkeys(["gemma", "gemma2", "gemma-2", "gemma-3", "gemma3"], _GEMMA),
    **dict.fromkeys(["mistral"], _MISTRAL),
    **dict.fromkeys(["phi-3", "phi-35", "phi-3.5"], _PHI3),
    **dict.fromkeys(["phi-4"], _PHI4),
    **dict.fromkeys(["zephyr"], _ZEPHYR),
    **dict.fromkeys(["alpaca"], _ALPACA),
    **dict.fromkeys(["vicuna"], _VICUNA),
}

_DEFAULT_MAPPING = {
    "role": "role",
    "content": "content",
    "user": "user",
    "assistant": "assistant",
    "system": "system",
}


# ----------------------------------------------------------------------------- Jinja generation


def _literal(marker: tuple, bos: str = "", eos: str = "") -> str:
    return "".join(bos if p is BOS else eos if p is EOS else p for p in marker)


def _expr(marker: tuple) -> str:
    """A marker as a Jinja expression (``''`` when empty)."""
    parts = [
        "bos_token" if p is BOS else "eos_token" if p is EOS else json.dumps(p, ensure_ascii=False)
        for p in marker
    ]
    return " + ".join(parts) or "''"


def build_template(family: Family, mapping: dict[str, str] | None = None) -> str:
    """The Jinja chat template of ``family``; ``mapping`` renames message keys and role values."""
    m = {**_DEFAULT_MAPPING, **(mapping or {})}
    role, content = f"message[{json.dumps(m['role'])}]", f"message[{json.dumps(m['content'])}]"
    first_role = f"messages[0][{json.dumps(m['role'])}]"
    first_content = f"messages[0][{json.dumps(m['content'])}]"
    default = json.dumps(family.default_system or "")
    fold = "true" if family.system_into_user else "false"
    # Content may be a string or a list of parts ({"type": "text", "text": ...}), as multimodal
    # chat formats (Gemma 3's notebooks) write it; text parts are joined, others skipped.
    content, first_content = f"_text({content})", f"_text({first_content})"
    return (
        "{%- macro _text(c) -%}{%- if c is string -%}{{- c -}}{%- else -%}"
        "{%- for p in c -%}{%- if p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}"
        "{%- endif -%}{%- endmacro -%}"
        "{{- " + _expr(family.start) + " -}}"
        f"{{%- if messages and {first_role} == {json.dumps(m['system'])} -%}}"
        f"{{%- set system = {first_content} -%}}{{%- set loop_messages = messages[1:] -%}}"
        f"{{%- else -%}}{{%- set system = {default} -%}}{{%- set loop_messages = messages -%}}{{%- endif -%}}"
        f"{{%- if system and not {fold} -%}}"
        "{{- " + _expr(family.system) + " + system + " + _expr(family.system_end) + " -}}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        f"{{%- if {role} == {json.dumps(m['user'])} -%}}"
        "{{- " + _expr(family.user) + " -}}"
        f"{{%- if {fold} and loop.first and system -%}}{{{{- system + {json.dumps(family.system_sep)} -}}}}{{%- endif -%}}"
        "{{- " + content + " + " + _expr(family.user_end) + " -}}"
        f"{{%- elif {role} == {json.dumps(m['assistant'])} -%}}"
        "{{- " + _expr(family.assistant) + " + " + content + " + " + _expr(family.assistant_end) + " -}}"
        "{%- else -%}"
        "{{- raise_exception('chat template: role ' ~ "
        + role
        + " ~ ' is not user, assistant or a leading system') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + _expr(family.assistant) + " -}}{%- endif -%}"
    )


CHAT_TEMPLATES: dict[str, str] = {name: build_template(f) for name, f in _FAMILIES.items()}


# ----------------------------------------------------------------------------- get_chat_template


def _family_for_vocab(tokenizer) -> str:
    """The family whose turn markers are single tokens of this vocabulary (chatml when none are)."""
    vocab = tokenizer.get_vocab()
    for token, name in [
        ("<|start_header_id|>", "llama-3"),
        ("<start_of_turn>", "gemma"),
        ("<|im_sep|>", "phi-4"),
        ("<|im_start|>", "chatml"),
        ("<|assistant|>", "phi-3"),
        ("[INST]", "mistral"),
    ]:
        if token in vocab:
            return name
    return "chatml"


def get_chat_template(
    tokenizer,
    chat_template: str | tuple[str, str] | None = None,
    mapping: dict[str, str] | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
):
    """Set a chat template on ``tokenizer`` and return it.

    Args:
        chat_template: one of :data:`CHAT_TEMPLATES` (Unsloth's names, e.g. ``"llama-3"``,
            ``"chatml"``, ``"gemma-3"``), a ``(jinja, stop_token)`` pair, or ``None`` to keep the
            tokenizer's own template (ours fill the gap when it has none).
        mapping: message keys and role names of the data, e.g. ShareGPT's
            ``{"role": "from", "content": "value", "user": "human", "assistant": "gpt"}``.
        map_eos_token: make the token that closes an assistant turn (``<|eot_id|>``, ``<|im_end|>``,
            ``<end_of_turn>``...) the tokenizer's EOS when the vocabulary has it as one token, so that
            generation stops at the end of a turn.
        system_message: replaces the family's default system message.
    """
    if chat_template is None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer
        chat_template = _family_for_vocab(tokenizer)
        logger.info("tokenizer has no chat template; using the %r template", chat_template)
    if isinstance(chat_template, (tuple, list)):
        if len(chat_template) != 2:
            raise DataError(
                f"chat_template tuple must be (jinja_template, stop_token), got {len(chat_template)} items"
            )
        tokenizer.chat_template, stop = chat_template
        _set_eos(tokenizer, stop, map_eos_token)
        return tokenizer
    key = str(chat_template).lower()
    if key not in _FAMILIES:
        raise DataError(
            f"unknown chat template {chat_template!r}; known: {', '.join(sorted(_FAMILIES))}",
        )
    family = _FAMILIES[key]
    if system_message is not None:
        family = Family(**{**family.__dict__, "default_system": system_message})
    tokenizer.chat_template = build_template(family, mapping)
    _set_eos(tokenizer, family.end_part(), map_eos_token)
    return tokenizer


def _set_eos(tokenizer, stop: str, map_eos_token: bool) -> None:
    if not (map_eos_token and stop) or stop == tokenizer.eos_token:
        return
    if stop in tokenizer.get_vocab():
        logger.info("EOS token %r -> %r (the end of an assistant turn)", tokenizer.eos_token, stop)
        tokenizer.eos_token = stop


def template_parts(tokenizer) -> tuple[str, str, str]:
    """``(instruction_part, response_part, end_part)`` of the tokenizer's template, when one of ours.

    Found by rendering a probe conversation and looking for each family's markers in it.
    """
    probe = [{"role": "user", "content": "\x01"}, {"role": "assistant", "content": "\x02"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - any template failure means "cannot guess"
        raise DataError(f"cannot render the tokenizer's chat template: {exc}") from exc
    for family in dict.fromkeys(_FAMILIES.values()):
        inst, resp, end = (
            family.instruction_part,
            family.response_part,
            family.end_part(tokenizer.eos_token or ""),
        )
        order = [text.find(inst), text.find("\x01"), text.find(resp, text.find("\x01")), text.find("\x02")]
        if inst and resp and min(order) >= 0 and order == sorted(order) and end in text:
            return inst, resp, end
    raise DataError(
        "cannot tell the turn markers of this chat template; pass instruction_part= and response_part="
    )


# ----------------------------------------------------------------------------- ShareGPT


_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "system": "system"}  # fmt: skip


def normalize_messages(turns: Any, where: str = "row") -> list[dict[str, str]]:
    """OpenAI (``role``/``content``) or ShareGPT (``from``/``value``) turns as ``role``/``content``."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected a non-empty list of messages, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: message {i} is {type(turn).__name__}, expected an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            raise DataError(
                f"{where}: message {i} has keys {sorted(turn)}; expected role/content (OpenAI) or from/value (ShareGPT)"
            )
        if str(role).lower() not in _ROLE_ALIASES:
            raise DataError(
                f"{where}: message {i} has role {role!r}; expected one of {sorted(_ROLE_ALIASES)}"
            )
        out.append({"role": _ROLE_ALIASES[str(role).lower()], "content": str(content)})
    return out


def standardize_sharegpt(dataset, aliases_for_system=None, aliases_for_user=None, aliases_for_assistant=None):
    """Convert ShareGPT rows (``conversations`` of ``{"from", "value"}``) to ``role``/``content``.

    Works on a ``datasets.Dataset`` (returns a new one, via ``map``) or a list of dicts (returns a new
    list). The conversation column keeps its name; ``human``/``gpt`` become ``user``/``assistant``.
    """
    extra = {a: "system" for a in aliases_for_system or ()}
    extra.update({a: "user" for a in aliases_for_user or ()})
    extra.update({a: "assistant" for a in aliases_for_assistant or ()})

    def convert(row: dict) -> dict:
        out = dict(row)
        for key in ("conversations", "messages"):
            if key in row:
                turns = [
                    {**t, "from": extra.get(t.get("from"), t.get("from"))}
                    if isinstance(t, dict) and "from" in t
                    else t
                    for t in row[key]
                ]
                out[key] = normalize_messages(turns, f"row with {key}")
        return out

    if hasattr(dataset, "map") and hasattr(dataset, "column_names"):
        return dataset.map(convert)
    return [convert(r) for r in dataset]


def standardize_data_formats(
    dataset, aliases_for_system=None, aliases_for_user=None, aliases_for_assistant=None
):
    """Unsloth's newer name for :func:`standardize_sharegpt` (Gemma 3 notebooks call it).

    Rows in ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) form both come out as
    ``role``/``content``, so it is safe on data already in the second form.
    """
    return standardize_sharegpt(dataset, aliases_for_system, aliases_for_user, aliases_for_assistant)


# ----------------------------------------------------------------------------- responses-only loss


class _Decoder:
    """Per-token text with a cache (markers are found in text, then mapped back to tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def pieces(self, ids) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i not in self.cache:
                self.cache[i] = self.tokenizer.decode([i], skip_special_tokens=False)
            out.append(self.cache[i])
        return out


def response_mask(
    pieces: list[str], instruction_part: str, response_part: str, end_part: str = ""
) -> list[bool]:
    """Which tokens (given as their text pieces) are inside an assistant response.

    A response starts after each ``response_part`` and runs up to the next ``instruction_part`` or
    through the first ``end_part`` after it (so packed rows' system turns stay masked). A token is
    trained when it holds any response text (one that also holds the end of the response marker,
    where the tokenizer merged them, is trained, so no response text is lost).
    """
    text = "".join(pieces)
    spans, pos = [], 0
    while response_part:
        start = text.find(response_part, pos)
        if start < 0:
            break
        begin = start + len(response_part)
        stop = len(text)
        nxt = text.find(instruction_part, begin) if instruction_part else -1
        if nxt >= 0:
            stop = nxt
        if end_part:
            end = text.find(end_part, begin)
            if 0 <= end < stop:
                stop = end + len(end_part)
        spans.append((begin, stop))
        pos = max(stop, begin + 1)
    mask, offset, k = [], 0, 0
    for piece in pieces:
        end = offset + len(piece)
        while k < len(spans) and spans[k][1] <= offset:
            k += 1
        mask.append(k < len(spans) and offset < spans[k][1] and end > spans[k][0])
        offset = end
    return mask


def train_on_responses_only(
    trainer,
    instruction_part: str | None = None,
    response_part: str | None = None,
    end_part: str | None = None,
    tokenizer=None,
):
    """Train only on assistant turns: every other label becomes -100. Returns ``trainer``.

    Wraps the trainer's data collator (so it holds with packing and multi-turn rows) and checks the
    training rows up front: rows whose every token would be masked are listed in a warning; when no
    row keeps a trainable token it raises :class:`~rslora_fast.errors.DataError`.

    Args:
        instruction_part / response_part: the text that opens a user / assistant turn, e.g.
            ``"<|start_header_id|>user<|end_header_id|>\\n\\n"`` and
            ``"<|start_header_id|>assistant<|end_header_id|>\\n\\n"`` for llama-3; guessed from the
            tokenizer's template when it is one of ours.
        end_part: closes an assistant turn (trained with it); guessed the same way, else none.
    """
    tok = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tok is None:
        raise DataError("train_on_responses_only: the trainer has no tokenizer; pass tokenizer=")
    if instruction_part is None or response_part is None:
        inst, resp, end = template_parts(tok)
        instruction_part = inst if instruction_part is None else instruction_part
        response_part = resp if response_part is None else response_part
        end_part = end if end_part is None else end_part
    elif end_part is None:
        try:
            end_part = template_parts(tok)[2]
        except DataError:
            end_part = ""  # responses then run up to the next instruction_part
    decoder = _Decoder(tok)
    parts = (instruction_part, response_part, end_part or "")

    def mask_row(ids) -> list[bool]:
        return response_mask(decoder.pieces(ids), *parts)

    _check_rows(getattr(trainer, "train_dataset", None), mask_row)
    inner = trainer.data_collator

    def collate(features):
        import torch

        batch = inner(features)
        ids = batch["input_ids"]
        labels = batch.get("labels", ids.clone()).clone()
        keep = torch.tensor([mask_row(row.tolist()) for row in ids], dtype=torch.bool, device=ids.device)
        labels[~keep] = -100
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch

    trainer.data_collator = collate
    return trainer  # the collator is read when train() builds the dataloader


def _check_rows(dataset, mask_row) -> None:
    if dataset is None:
        return
    try:
        rows = [dataset[i]["input_ids"] for i in range(len(dataset))]
    except (KeyError, TypeError, IndexError):
        return  # not tokenized yet: the collator still masks every batch
    empty = [i for i, ids in enumerate(rows) if not any(mask_row(ids))]
    if empty and len(empty) == len(rows):
        raise DataError(
            f"train_on_responses_only: no row keeps a trainable token ({len(rows)} rows); "
            "check instruction_part / response_part against the rendered rows"
        )
    if empty:
        shown = ", ".join(map(str, empty[:20])) + (" ..." if len(empty) > 20 else "")
        msg = f"train_on_responses_only: {len(empty)} of {len(rows)} rows have no trainable token (rows {shown})"
        logger.warning(msg)
        warnings.warn(msg, stacklevel=3)
