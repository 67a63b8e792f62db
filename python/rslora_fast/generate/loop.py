"""The generate loop: HF ``generate``'s keywords turned into engine calls.

The loop resolves a call exactly as HF ``generate`` does (generation config merged from the model's
and the keywords, lengths, special tokens, logits processors and stopping criteria built by
transformers itself), then decodes through an :class:`~rslora_fast.generate.base.Engine`. Greedy
search and sampling are ours; anything else (beams, assistant models, attentions or hidden states in
the output, extra model inputs) goes to HF ``generate`` unchanged, with one INFO line naming why.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import select

log = logging.getLogger(__name__)

#: Environment switch: ``auto`` (default: the fast path on CUDA), ``off`` (always HF ``generate``),
#: ``force`` (the fast path on any device, CPU included: tests).
ENV = "RSLORA_FAST_GENERATE"
MODES = ("auto", "off", "force")

#: ``generate`` keywords the loop handles itself (the rest must be generation-config fields).
_OWN_KEYWORDS = (
    "attention_mask", "streamer", "tokenizer", "logits_processor", "stopping_criteria",
    "prefix_allowed_tokens_fn", "synced_gpus", "disable_compile", "generation_config",
)  # fmt: skip
#: ``generate`` parameters of decoding methods the loop does not run (HF ``generate`` when given).
_HF_ONLY = ("assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")
_FAST_MODES = ("greedy_search", "sample")


def mode() -> str:
    """The value of ``RSLORA_FAST_GENERATE`` (``auto`` when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r} is not understood; accepted: {', '.join(MODES)}")
    return value


@dataclass
class _Plan:
    """One call, resolved: the rows to decode and transformers' own processors and criteria."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    config: Any
    processors: Any
    criteria: Any
    streamer: Any


def fast_generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """HF ``generate`` on ``model`` (a transformers causal LM, adapters injected) through a decode engine.

    Same keywords and result as ``model.generate``: a ``LongTensor [B, T + new]`` (rows that
    finished early padded with ``pad_token_id``), or a ``GenerateDecoderOnlyOutput`` with
    ``return_dict_in_generate=True`` (``sequences``, ``scores``, ``logits``; no cache). Prompts
    must be left-padded. Calls the fast path does not cover go to HF ``generate``.
    """
    try:
        plan = _plan(model, args, kwargs)
    except (TypeError, AttributeError) as exc:  # transformers' generate helpers changed, or a bad call
        plan = f"the call could not be planned ({type(exc).__name__}: {exc})"
    if isinstance(plan, str):
        if plan:
            select.log_once("generate: transformers' generate is used: %s", plan)
        return type(model).generate(model, *args, **kwargs)
    with torch.no_grad():
        return _decode(model, plan)


def _named(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` with the positional arguments of HF ``generate`` put under their names."""
    names = list(inspect.signature(type(model).generate).parameters)[1:]  # after self
    if len(args) > len(names) or any(names[i] in kwargs for i in range(len(args))):
        raise TypeError(f"generate() got {len(args)} positional arguments for parameters {names}")
    return {**dict(zip(names, args)), **kwargs}


def _plan(model: nn.Module, args: tuple, kwargs: dict) -> _Plan | str:
    """The resolved call, or why it goes to HF ``generate`` ("" when no line should be logged)."""
    run_mode = mode()
    if run_mode == "off":
        return ""
    param = next(model.parameters(), None)
    if param is None or (param.device.type != "cuda" and run_mode != "force"):
        return ""  # on CPU the plain path is as fast; the fast path runs there only when forced
    kw = _named(model, args, kwargs)
    inputs = kw.pop("inputs", None)
    ids = inputs if inputs is not None else kw.pop("input_ids", None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        return "the prompt is not an input_ids LongTensor [batch, length] (inputs_embeds or other inputs)"
    given = [k for k in _HF_ONLY if kw.pop(k, None) is not None]
    if given:
        return f"{', '.join(given)} given"
    own = {k: kw.pop(k) for k in _OWN_KEYWORDS if k in kw}
    if own.get("synced_gpus"):
        return "synced_gpus=True"
    cfg, leftover = model._prepare_generation_config(own.get("generation_config"), **kw)
    leftover.pop("use_cache", None)
    if leftover:
        return f"keyword(s) {sorted(leftover)} are not handled by the fast loop"
    reason = _unsupported(cfg)
    if reason:
        return reason
    return _resolve(model, ids, cfg, own, kwargs)


def _unsupported(cfg: Any) -> str:
    """Why the resolved generation config needs HF ``generate`` ("" when the loop covers it)."""
    generation_mode = str(getattr(cfg.get_generation_mode(), "value", cfg.get_generation_mode()))
    if generation_mode not in _FAST_MODES:
        return f"{generation_mode} (num_beams={cfg.num_beams}) is not greedy search or sampling"
    if cfg.num_return_sequences and cfg.num_return_sequences > 1 and not cfg.do_sample:
        return f"num_return_sequences={cfg.num_return_sequences} with greedy search"
    if cfg.return_dict_in_generate and (cfg.output_attentions or cfg.output_hidden_states):
        return "output_attentions / output_hidden_states"
    if cfg.guidance_scale not in (None, 1, 1.0):
        return f"guidance_scale={cfg.guidance_scale} (classifier-free guidance runs the model twice)"
    if cfg.token_healing:
        return "token_healing=True"
    return ""


def _resolve(model: nn.Module, ids: torch.Tensor, cfg: Any, own: dict, kwargs: dict) -> _Plan | str:
    """Lengths, special tokens, mask, processors and criteria, as HF ``generate`` builds them."""
    from transformers.generation import LogitsProcessorList, StoppingCriteriaList

    given = own.get("generation_config")
    own_cfg = model.generation_config

    def defaulted(name: str) -> bool:
        return (
            kwargs.get(name) is None and getattr(given, name, None) is None and getattr(own_cfg, name) is None
        )

    mask = own.get("attention_mask")
    model._prepare_special_tokens(cfg, mask is not None, device=ids.device, batch_size=ids.shape[0])
    if mask is None:
        mask = model._prepare_attention_mask_for_generation(ids, cfg, {})
    reason = _padding_problem(ids, mask)
    if reason:
        return reason
    prompt = ids
    if cfg.num_return_sequences and cfg.num_return_sequences > 1:
        ids = ids.repeat_interleave(cfg.num_return_sequences, dim=0)
        mask = mask.repeat_interleave(cfg.num_return_sequences, dim=0)
    length = ids.shape[1]
    cfg = model._prepare_generated_length(
        cfg, defaulted("max_length"), defaulted("min_length"), "input_ids", length, ids
    )  # fmt: skip
    model._validate_generated_length(cfg, length, defaulted("max_length"))
    cap = getattr(model, "max_seq_length", None)
    if cap and cfg.max_length > cap:
        return f"prompt + new tokens = {cfg.max_length} exceeds the model's max_seq_length {cap}"
    processors = model._get_logits_processor(
        generation_config=cfg, input_ids_seq_length=length, encoder_input_ids=prompt,
        prefix_allowed_tokens_fn=own.get("prefix_allowed_tokens_fn"),
        logits_processor=own.get("logits_processor") or LogitsProcessorList(), device=ids.device,
        model_kwargs={"attention_mask": mask},
    )  # fmt: skip
    criteria = model._get_stopping_criteria(
        cfg, own.get("stopping_criteria") or StoppingCriteriaList(), own.get("tokenizer")
    )
    return _Plan(ids, mask, cfg, processors, criteria, own.get("streamer"))


def _padding_problem(ids: torch.Tensor, mask: torch.Tensor) -> str:
    """Why ``mask`` is not a left-padding mask for ``ids`` ("" when it is)."""
    if mask.shape != ids.shape:
        return f"attention_mask of shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}"
    if mask.shape[1] > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
        return "the attention_mask is not left padding (pads after real tokens); pad on the left"
    if bool((mask[:, -1] == 0).any()):
        return "a prompt row has no real token"
    return ""


def _decode(model: nn.Module, plan: _Plan) -> Any:
    """Open an engine (adapters refreshed), run the loop, shape the result like HF ``generate``."""
    cfg, ids = plan.config, plan.input_ids
    if plan.streamer is not None:
        plan.streamer.put(ids.cpu())
    cap = getattr(model, "max_seq_length", None)
    with select.open_engine(model, ids.shape[0], cfg.max_length, cap) as engine:
        refresh = getattr(engine, "refresh_adapters", None)
        if refresh is not None:
            refresh()  # adapters trained since the last call
        ids, scores, raw = _loop(engine, plan)
    if plan.streamer is not None:
        plan.streamer.end()
    if not cfg.return_dict_in_generate:
        return ids
    from transformers.generation import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=ids, scores=scores, logits=raw)


def _loop(engine: Any, plan: _Plan) -> tuple[torch.Tensor, tuple | None, tuple | None]:
    """Prefill, then one engine step per token until every row has stopped (HF's sampling loop).

    The host learns that every row stopped one step late: the next step is queued before the flag
    is read, so the device never waits for the host; that step's logits are then dropped.
    """
    cfg, ids = plan.config, plan.input_ids
    scores: tuple | None = () if cfg.return_dict_in_generate and cfg.output_scores else None
    raw: tuple | None = () if cfg.return_dict_in_generate and cfg.output_logits else None
    pad = cfg._pad_token_tensor
    pads_finished = any(hasattr(c, "eos_token_id") for c in plan.criteria)
    unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
    stopped = _StopFlag(ids.device)
    logits = engine.prefill(ids, plan.attention_mask)
    while True:
        processed = plan.processors(ids, logits)
        scores = scores + (processed,) if scores is not None else None
        raw = raw + (logits,) if raw is not None else None
        tokens = _pick(processed, cfg.do_sample)
        if pads_finished:
            tokens = tokens * unfinished + pad.to(ids.device) * (1 - unfinished)
        ids = torch.cat([ids, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~plan.criteria(ids, processed)
        if plan.streamer is not None:
            plan.streamer.put(tokens.cpu())
        if ids.shape[1] >= cfg.max_length:  # what HF's MaxLengthCriteria decides, known without the device
            return ids, scores, raw
        stopped.post(unfinished)
        logits = engine.step(tokens)
        if stopped.read():
            return ids, scores, raw


class _StopFlag:
    """Whether every row has stopped, copied to the host without waiting for later queued work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.on_cuda)
        self.event = None

    def post(self, unfinished: torch.Tensor) -> None:
        self.host.copy_(unfinished.max() == 0, non_blocking=self.on_cuda)
        if self.on_cuda:
            self.event = torch.cuda.current_stream(self.device).record_event()

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


def _pick(scores: torch.Tensor, sample: bool) -> torch.Tensor:
    """The next token of each row: sampled from ``softmax(scores)`` (torch's RNG) or the argmax."""
    if sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)
