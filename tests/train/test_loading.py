"""prefkit.models.loading: the built-in tiny model, local folders, pad tokens, dtypes."""

import logging

import pytest
import torch
from transformers import LlamaForCausalLM

from prefkit.models.loading import (
    TinySpec,
    ensure_pad_token,
    load_policy,
    load_reference,
    load_tokenizer,
    resolve_dtype,
)
from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama, save_tiny_model


def test_tiny_by_name_matches_the_builder():
    tok = load_tokenizer("tiny")
    model = load_policy("tiny", tiny=TinySpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=5))
    direct = build_tiny_llama(
        vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=5
    )
    assert isinstance(model, LlamaForCausalLM) and model.config.hidden_size == 32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2


def test_local_folder_round_trip(tmp_path):
    path = save_tiny_model(tmp_path / "m", seed=3)
    model = load_policy(str(path))
    tok = load_tokenizer(str(path))
    expected = build_tiny_llama(vocab_size=len(tok), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert model.dtype == torch.float32
    assert load_policy(str(path), dtype="bfloat16").dtype == torch.bfloat16
    ref = load_reference(str(path))
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_missing_pad_token_becomes_eos_with_a_note(caplog):
    tok = build_byte_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    with caplog.at_level(logging.WARNING, logger="prefkit.models"):
        ensure_pad_token(tok, "byte")
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert "no pad token" in caplog.text


def test_no_pad_and_no_eos_is_an_error():
    tok = build_byte_tokenizer()
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        ensure_pad_token(tok, "byte")


def test_unknown_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
