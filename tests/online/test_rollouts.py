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


def test_one_token_stops_end_inside_generate_and_the_others_by_text(rollouts, tokenizer):
    # a byte that no other token's text holds ends generation like EOS; "a" is also in the text of "<pad>",
    # and "e " / "th" span two tokens: those go through generate's stop-string criteria and are cut by text
    single, text = rollouts._stop_tokens(tuple("etoihrl "))
    assert text == () and len(single) == 8
    stops = ("e ", "a", "th", "o")
    single, text = rollouts._stop_tokens(stops)
    assert text == ("e ", "a", "th") and single == set(tokenizer("o", add_special_tokens=False)["input_ids"])
    out = rollouts.generate(_prompts(tokenizer), SamplingSettings(n=4, max_new_tokens=40, stop=stops, seed=5))
    stopped = [r for r in out if r.finish_reason == "stop"]
    assert stopped
    for r in stopped:
        assert any(r.text.endswith(s) for s in stops) or r.completion_ids[-1] in single  # the stop is kept
        assert not any(s in tokenizer.decode(r.completion_ids[:-1]) for s in stops)


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


def test_a_completion_does_not_depend_on_its_batch(tiny_model, tokenizer):
    """Seeded per completion: the same prompt (same seed key) gets the same completions whatever else shares its
    batch and whatever the batch size, which is what lets processes split a batch of prompts."""
    prompts = _prompts(tokenizer) + [tokenizer("third one")["input_ids"]]
    settings = SamplingSettings(n=3, max_new_tokens=6, seed=5)
    whole = HFRollouts(tiny_model, tokenizer, batch_size=64).generate(prompts, settings)
    one_by_one = HFRollouts(tiny_model, tokenizer, batch_size=1).generate(prompts, settings)
    split = HFRollouts(tiny_model, tokenizer, batch_size=64).generate(prompts[1:], settings, prompt_seeds=[1, 2])
    assert [r.completion_ids for r in whole] == [r.completion_ids for r in one_by_one]
    assert [r.completion_ids for r in whole[3:]] == [r.completion_ids for r in split]
    for a, b in zip(whole, one_by_one):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert len({tuple(r.completion_ids) for r in whole[:3]}) > 1  # the n completions of a prompt differ


def test_the_shared_prefill_gives_the_unshared_distribution(tiny_model, tokenizer, monkeypatch):
    prompts = _prompts(tokenizer)
    settings = SamplingSettings(n=2, max_new_tokens=5, seed=2)
    shared = HFRollouts(tiny_model, tokenizer).generate(prompts, settings)
    monkeypatch.setattr(HFRollouts, "_prefill", lambda self, ids, mask, n: None)
    unshared = HFRollouts(tiny_model, tokenizer).generate(prompts, settings)
    assert [r.completion_ids for r in shared] == [r.completion_ids for r in unshared]
    for a, b in zip(shared, unshared):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_sampling_follows_the_softmax(tiny_model, tokenizer):
    """The Gumbel-max draw is a sample of the (tempered) distribution: over 4,000 first tokens, the frequency of
    the likeliest tokens and the mean log-prob (whose expectation is minus the entropy) match the softmax."""
    prompt = tokenizer("hello")["input_ids"]
    settings = SamplingSettings(n=4000, max_new_tokens=1, temperature=0.05, seed=1)
    out = HFRollouts(tiny_model, tokenizer, batch_size=1000).generate([prompt], settings)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(input_ids=torch.tensor([prompt])).logits[0, -1].float() / 0.05, -1)
    tokens = torch.tensor([r.completion_ids[0] for r in out])
    freq = torch.bincount(tokens, minlength=logp.numel()).float() / len(out)
    top = logp.topk(3).indices
    assert torch.allclose(freq[top], logp.exp()[top], atol=0.03), (freq[top], logp.exp()[top])
    sampled = logp[tokens]
    assert torch.allclose(torch.tensor([r.logprobs[0] for r in out]), sampled, atol=1e-4)
    entropy = -(logp.exp() * logp).sum()
    assert abs(float(sampled.mean() + entropy)) < 4 * float(sampled.std()) / len(out) ** 0.5 + 1e-3


def test_min_new_tokens_forces_the_length(rollouts, tokenizer):
    out = rollouts.generate(_prompts(tokenizer), SamplingSettings(n=2, max_new_tokens=7, min_new_tokens=7))
    assert all(len(r) == 7 and r.finish_reason in ("length", "eos") for r in out)
    with pytest.raises(ValueError, match="min_new_tokens: expected an integer from 0 to max_new_tokens"):
        SamplingSettings(max_new_tokens=3, min_new_tokens=4)
