"""The embedded demo model: a small llama-architecture model built locally (random weights, a byte-level
BPE tokenizer trained on the bundled sample text) so that ``rslora-fast finetune`` runs with no download.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_DATA = "demo.jsonl"
# A plain-text chat template (role headers), so apply_chat_template works on the demo tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '### ' + m['role'] | capitalize }}{{ ':\n' + m['content'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def demo_data_path() -> Path:
    """Path of the bundled demo dataset (JSONL with ``instruction`` / ``response`` fields)."""
    return Path(str(resources.files("rslora_fast") / "data" / DEMO_DATA))


def default_cache_dir() -> Path:
    """Where the demo model is built: ``$RSLORA_FAST_CACHE`` or ``~/.cache/rslora_fast``."""
    root = os.environ.get("RSLORA_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rslora_fast"
    )
    return Path(root)


def _demo_texts() -> list[str]:
    rows = [json.loads(line) for line in demo_data_path().read_text().splitlines() if line.strip()]
    return [f"{r['instruction']}\n{r['response']}" for r in rows]


def build_demo_tokenizer(vocab_size: int = 512):
    """Train a small byte-level BPE tokenizer on the demo text; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|pad|>", "<|bos|>", "<|eos|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = _demo_texts() + ["### User:\n### Assistant:\n"]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_demo_model(
    path: str | os.PathLike | None = None,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build (once) and save the demo llama model + tokenizer; returns the folder.

    Args:
        path: target folder; default ``default_cache_dir() / "demo-llama"``.
        hidden_size: model width (heads of 32 dims, 2 KV heads, MLP 2.75x wide).
        num_layers: decoder layers.
        seed: seed of the random weights.
        overwrite: rebuild even if the folder already holds a model.

    Returns:
        The folder, loadable by ``FastLanguageModel.from_pretrained`` and by plain transformers.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(path) if path is not None else default_cache_dir() / "demo-llama"
    if (folder / "config.json").exists() and not overwrite:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer()
    heads = max(1, hidden_size // 32)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 2.75) // 8 * 8,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    logger.info("built demo model (%d parameters) in %s", sum(p.numel() for p in model.parameters()), folder)
    return folder
