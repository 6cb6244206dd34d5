"""Ancestral sampling from a causal LM and log-probs of sampled completions."""

import pytest
import torch

from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama
from prefkit.online import completion_log_probs, sample_completions


@pytest.fixture(scope="module")
def lm():
    tok = build_byte_tokenizer()
    model = build_tiny_llama(
        vocab_size=len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=3
    )
    return model, tok


def test_samples_are_prompt_major_and_reproducible(lm):
    model, tok = lm
    prompts = ["hi", "a longer prompt"]
    a = sample_completions(model, tok, prompts, n=3, max_new_tokens=5, seed=1, progress=False)
    b = sample_completions(model, tok, prompts, n=3, max_new_tokens=5, seed=1, progress=False)
    c = sample_completions(model, tok, prompts, n=3, max_new_tokens=5, seed=2, progress=False)
    assert [x.prompt for x in a] == ["hi"] * 3 + ["a longer prompt"] * 3
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    for x in a:
        assert x.prompt_ids == tok(x.prompt)["input_ids"]  # tokenized as training tokenizes a prompt
        assert 1 <= len(x.token_ids) <= 5
        assert x.finished == (x.token_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in x.token_ids[:-1]
        assert x.text == tok.decode(x.token_ids, skip_special_tokens=True)


def test_first_token_frequencies_follow_the_model(lm):
    # Plain ancestral sampling (no top-k / top-p): each token's frequency matches its probability.
    model, tok = lm
    n = 3000
    samples = sample_completions(model, tok, ["x"], n=n, max_new_tokens=1, seed=0, batch_size=1000, progress=False)
    with torch.no_grad():
        probs = model(torch.tensor([samples[0].prompt_ids])).logits[0, -1].softmax(-1)
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in samples]), minlength=len(probs)).float()
    top = probs.argsort(descending=True)[:5]
    for t in top:
        p = float(probs[t])
        se = (p * (1 - p) / n) ** 0.5
        assert abs(counts[t] / n - p) < 4 * se + 1e-3
    # the rare tail is sampled too (top-k would cut it): more distinct tokens than a top-50 filter allows
    assert int((counts > 0).sum()) > 50


def test_log_probs_are_of_the_sampled_ids(lm):
    model, tok = lm
    samples = sample_completions(model, tok, ["hello", "yo"], n=2, max_new_tokens=4, seed=0, progress=False)
    got = completion_log_probs(model, samples, tok.pad_token_id, batch_size=3, progress=False)
    for s, value in zip(samples, got):
        ids = torch.tensor([s.prompt_ids + s.token_ids])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        expected = logp[torch.arange(len(targets)), targets][len(s.prompt_ids) - 1 :].sum()
        assert float(value) == pytest.approx(float(expected), abs=1e-4)


def test_bad_arguments(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="temperature"):
        sample_completions(model, tok, ["a"], temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="n must be"):
        sample_completions(model, tok, ["a"], n=0, progress=False)
    with pytest.raises(ValueError, match="no completions"):
        completion_log_probs(model, [], tok.pad_token_id)
