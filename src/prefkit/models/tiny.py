"""Tiny models and tokenizers built locally, with no download.

Used by `prefkit demo`, the tests and the examples: a byte-level tokenizer made with the
`tokenizers` library (every UTF-8 string round-trips) and a randomly initialised
Llama-architecture causal LM from a `LlamaConfig`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# The byte tokenizer is data's (tokenization); re-exported here beside the tiny model it goes with.
from prefkit.data.byte_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_byte_tokenizer  # noqa: F401


def build_tiny_llama(
    vocab_size: int = 260,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    **config_kwargs,
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM (float32, eval mode off), seeded."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_tiny_model(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny model and its tokenizer to ``path`` (a local "hub" checkpoint)."""
    path = Path(path)
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer), seed=seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
