"""ImplicitReward: beta * (log pi(y|x) - log ref(y|x)) over the response tokens."""

import pytest
import torch

from prefkit.eval.implicit import ImplicitReward
from prefkit.models.base import RewardScorer
from prefkit.models.tiny import build_tiny_llama

SIZES = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def _batch():
    # two rows, right-padded with 0; the response starts at position 3 in row 0 and 2 in row 1
    input_ids = torch.tensor([[1, 70, 71, 72, 73, 2], [1, 80, 81, 82, 2, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    return input_ids, attention_mask, completion_mask


def _plain_logps(model, input_ids, attention_mask, completion_mask):
    """Summed response log-probs from a plain forward and log_softmax over the full vocabulary."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    token = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token * completion_mask[:, 1:]).sum(-1)


def test_same_policy_and_reference_give_zero(tokenizer):
    model = build_tiny_llama(vocab_size=len(tokenizer), seed=0, **SIZES)
    reward = ImplicitReward(model, model, beta=0.1)
    assert isinstance(reward, RewardScorer)
    assert torch.equal(reward.score(*_batch()), torch.zeros(2))


def test_matches_beta_times_log_ratio_of_a_plain_forward(tokenizer):
    policy = build_tiny_llama(vocab_size=len(tokenizer), seed=1, **SIZES)
    reference = build_tiny_llama(vocab_size=len(tokenizer), seed=2, **SIZES)
    batch = _batch()
    expected = 0.5 * (_plain_logps(policy, *batch) - _plain_logps(reference, *batch))
    reward = ImplicitReward(policy, reference, beta=0.5, chunk_size=4)
    torch.testing.assert_close(reward.score(*batch), expected, rtol=1e-5, atol=1e-5)
    pi, ref = reward.log_likelihoods(*batch)
    torch.testing.assert_close(pi, _plain_logps(policy, *batch), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in reference.parameters())


def test_needs_completion_mask_and_positive_beta(tokenizer):
    model = build_tiny_llama(vocab_size=len(tokenizer), seed=0, **SIZES)
    input_ids, attention_mask, _ = _batch()
    with pytest.raises(ValueError, match="completion_mask"):
        ImplicitReward(model, model, beta=0.1).score(input_ids, attention_mask)
    with pytest.raises(ValueError, match="beta"):
        ImplicitReward(model, model, beta=0.0)
