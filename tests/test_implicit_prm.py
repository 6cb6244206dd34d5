"""Implicit process rewards (Yuan et al. 2024): step rewards are beta times the summed log-ratio of the step's
tokens, they add up to the whole solution's implicit reward, and the outcome cross-entropy loss by hand."""

import copy
import math

import pytest
import torch

from prefkit.data.collators import StepCollator
from prefkit.data.records import StepwiseRecord
from prefkit.data.tokenize import tokenize_stepwise
from prefkit.eval.implicit import ImplicitPRM, ImplicitReward
from prefkit.losses import UnpairedLogps, get_loss
from prefkit.models.tiny import build_tiny_llama

RECORDS = [
    StepwiseRecord(prompt="Add 2 and 3", completions=["2 + 3 = 5", "so 5"], labels=[True, True]),
    StepwiseRecord(prompt="Q", completions=["one step"], labels=[False]),
]


def _pair(tokenizer):
    reference = build_tiny_llama(vocab_size=len(tokenizer), seed=0)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def test_step_rewards_sum_to_the_solution_reward(tokenizer):
    policy, reference = _pair(tokenizer)
    prm = ImplicitPRM(policy, reference, tokenizer, beta=0.5, separator=";", batch_size=1)
    steps = prm.score(RECORDS)
    assert [len(s) for s in steps] == [2, 1]
    # the whole solution (every step token, the prompt as the policy sees it) under ImplicitReward
    batch = StepCollator(tokenizer.pad_token_id)(
        [tokenize_stepwise(r, tokenizer, step_separator=";", prompt_separator=False) for r in RECORDS]
    )
    whole = ImplicitReward(policy, reference, beta=0.5).score(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    )
    assert [sum(s) for s in steps] == pytest.approx(whole.tolist(), abs=1e-4)
    cumulative = ImplicitPRM(policy, reference, tokenizer, beta=0.5, separator=";", cumulative=True).score(RECORDS)
    assert cumulative[0] == pytest.approx([steps[0][0], steps[0][0] + steps[0][1]], abs=1e-5)
    # batching does not change a record's rewards
    together = ImplicitPRM(policy, reference, tokenizer, beta=0.5, separator=";", batch_size=8).score(RECORDS)
    for a, b in zip(together, steps):
        assert a == pytest.approx(b, abs=1e-5)


def test_the_reference_itself_gives_zero_rewards(tokenizer):
    _, reference = _pair(tokenizer)
    prm = ImplicitPRM(copy.deepcopy(reference), reference, tokenizer, beta=1.0, separator=";")
    assert all(v == pytest.approx(0.0, abs=1e-6) for row in prm.score(RECORDS) for v in row)


def test_implicit_prm_ce_by_hand():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    batch = UnpairedLogps(
        policy=policy, ref=torch.tensor([-4.0, -4.0]), label=torch.tensor([True, False]), length=torch.ones(2)
    )
    out = get_loss("implicit_prm_ce")(batch, beta=0.5)
    # r = 0.5 * (1, -1): desirable -log sigma(0.5), undesirable -log sigma(0.5)
    assert out.loss.tolist() == pytest.approx([math.log1p(math.exp(-0.5))] * 2)
    assert out.metrics["rewards"].tolist() == [0.5, -0.5]
    out.loss.sum().backward()
    # d/dpolicy: -beta * (1 - sigma(r)) for the desirable, +beta * sigma(r) for the undesirable
    s = 1 / (1 + math.exp(-0.5))
    assert policy.grad.tolist() == pytest.approx([-0.5 * (1 - s), 0.5 * (1 - s)])
    with pytest.raises(ValueError):
        get_loss("implicit_prm_ce")(UnpairedLogps(policy=policy, ref=None, label=batch.label, length=batch.length))
