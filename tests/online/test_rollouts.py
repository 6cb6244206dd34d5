"""HF-generate rollouts: seeded, per-token log-probs of the sampling distribution, finish reasons."""

import pytest
import torch

from prefkit.online.rollouts import HFRollouts, SamplingSettings


@pytest.fixture
def rollouts(tiny_model, tokenizer):
    return HFRollouts(tiny_model, tokenizer, batch_size=4)


def _prompts(tokenizer):
    return [tokenizer("hello")["input_ids"], tokenizer("a longer prompt")["input_ids"]]


def test_seeded_and_prompt_major(rollouts, tokenizer):
    settings = SamplingSettings(n=3, max_new_tokens=6, seed=1)
    a = rollouts.generate(_prompts(tokenizer), settings)
    b = rollouts.generate(_prompts(tokenizer), settings)
    c = rollouts.generate(_prompts(tokenizer), SamplingSettings(n=3, max_new_tokens=6, seed=2))
    assert [r.prompt_index for r in a] == [0, 0, 0, 1, 1, 1]
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]
    assert all(len(r.logprobs) == len(r.completion_ids) for r in a)


def test_logprobs_are_the_models_at_the_temperature(rollouts, tiny_model, tokenizer):
    temperature = 0.7
    for r in rollouts.generate(_prompts(tokenizer), SamplingSettings(n=2, max_new_tokens=5, temperature=temperature)):
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = tiny_model(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].float() / temperature
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(r.completion_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(r.logprobs), expected, atol=1e-4), (r.logprobs, expected.tolist())


def test_top_k_one_is_greedy_with_log_prob_zero(rollouts, tiny_model, tokenizer):
    r = rollouts.generate(_prompts(tokenizer)[:1], SamplingSettings(n=1, max_new_tokens=4, top_k=1))[0]
    assert r.logprobs == pytest.approx([0.0] * len(r.completion_ids))
    ids = list(r.prompt_ids)
    for token in r.completion_ids:
        with torch.no_grad():
            assert int(tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == token
        ids.append(token)


def test_finish_reasons(rollouts, tokenizer):
    out = rollouts.generate(_prompts(tokenizer), SamplingSettings(n=4, max_new_tokens=3))
    assert {r.finish_reason for r in out} <= {"eos", "length"}
    assert all(len(r) == 3 for r in out if r.finish_reason == "length")
    # a stop string every byte-level sample hits quickly: any of the common letters
    stops = tuple("etaoinshrdlu ")
    out = rollouts.generate(_prompts(tokenizer), SamplingSettings(n=4, max_new_tokens=40, stop=stops, seed=3))
    stopped = [r for r in out if r.finish_reason == "stop"]
    assert stopped and all(any(s in r.text for s in stops) for r in stopped)
    assert all(not any(s in tokenizer.decode(r.completion_ids[:-1]) for s in stops) for r in stopped)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n: expected an integer >= 1"),
        ({"temperature": 0}, "temperature: expected a finite number > 0"),
        ({"top_p": 1.5}, "top_p: expected a number in"),
        ({"top_k": -1}, "top_k: expected an integer >= 0"),
        ({"stop": ("",)}, "stop: expected non-empty strings"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**kwargs)


def test_a_prompt_longer_than_the_context_is_named(tiny_model, tokenizer):
    rollouts = HFRollouts(tiny_model, tokenizer, max_context=8)
    with pytest.raises(ValueError, match="prompt 1 has 15 tokens; with max_new_tokens 4 it exceeds"):
        rollouts.generate([[1, 2], list(range(4, 19))], SamplingSettings(max_new_tokens=4))
