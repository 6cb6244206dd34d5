"""Shared fixtures: a byte-level tokenizer and tiny random Llama models, built locally."""

import pytest
import torch

from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama


@pytest.fixture(scope="session")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh tiny Llama (float32, seed 0) for each test."""
    return build_tiny_llama(vocab_size=len(tokenizer), seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
