"""embed_pairs: pooled backbone states of pairwise records, and the on-disk cache keyed by data,
backbone weights and pooling."""

import os

import pytest
import torch

from prefkit.data.records import PairwiseRecord, UnpairedRecord
from prefkit.data.tokenize import tokenize_pairwise
from prefkit.models import embeddings
from prefkit.models.embeddings import CACHE_FILE, StaleEmbeddingCacheError, embed_pairs
from prefkit.models.tiny import build_tiny_llama


@pytest.fixture
def backbone(tokenizer):
    return build_tiny_llama(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, seed=0)


def records():
    return [
        PairwiseRecord(prompt="Hi", chosen=" hello", rejected=" go away", user_id="bob"),
        PairwiseRecord(prompt="Hi", chosen=" go away", rejected=" hello", user_id="amy"),  # same texts, swapped
        PairwiseRecord(prompt="2+2?", chosen=" 4", rejected=" five"),  # no user
    ]


def hidden_of(model, ids):
    with torch.no_grad():
        return model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_last_and_mean_pooling_match_a_direct_forward(backbone, tokenizer):
    recs = records()
    last = embed_pairs(recs, backbone, tokenizer, pooling="last", progress=False)
    mean = embed_pairs(recs, backbone, tokenizer, pooling="mean", progress=False)
    assert last.chosen.shape == (3, 16) and last.prompt.shape == (3, 16)
    assert last.users == ["amy", "bob"] and last.user_index.tolist() == [1, 0, -1]
    for i, record in enumerate(recs):
        ex = tokenize_pairwise(record, tokenizer)
        prompt = ex["prompt_input_ids"]
        for field in ("chosen", "rejected"):
            states = hidden_of(backbone, prompt + ex[f"{field}_input_ids"])
            # last: the EOS token's state; mean: the mean over the response tokens only
            torch.testing.assert_close(getattr(last, field)[i], states[-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(getattr(mean, field)[i], states[len(prompt) :].mean(0), atol=1e-5, rtol=1e-5)
        states = hidden_of(backbone, prompt)
        torch.testing.assert_close(last.prompt[i], states[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean.prompt[i], states.mean(0), atol=1e-5, rtol=1e-5)
    # one (prompt, response) gives one vector wherever it appears
    assert torch.equal(last.chosen[0], last.rejected[1]) and torch.equal(last.prompt[0], last.prompt[1])
    assert backbone.training  # the backbone's mode is restored


def test_cache_is_written_then_loaded_without_running_the_backbone(backbone, tokenizer, tmp_path, monkeypatch):
    first = embed_pairs(records(), backbone, tokenizer, cache_dir=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == [CACHE_FILE]  # no temporary file left behind

    def fail(*args, **kwargs):
        raise AssertionError("the backbone ran although the cache matches")

    monkeypatch.setattr(embeddings, "_embed_rows", fail)
    second = embed_pairs(records(), backbone, tokenizer, cache_dir=str(tmp_path), progress=False)
    for field in ("chosen", "rejected", "prompt", "user_index"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert second.users == first.users and second.meta["cache"].endswith(CACHE_FILE)


def test_stale_cache_is_refused_naming_what_differs(backbone, tokenizer, tmp_path):
    embed_pairs(records(), backbone, tokenizer, cache_dir=str(tmp_path), progress=False)
    changed = records()
    changed[2] = PairwiseRecord(prompt="2+2?", chosen=" 4", rejected=" five", user_id="amy")  # user only
    with pytest.raises(StaleEmbeddingCacheError, match=r"data: .*1 of 3 records .*records 2\)"):
        embed_pairs(changed, backbone, tokenizer, cache_dir=str(tmp_path), progress=False)
    with pytest.raises(StaleEmbeddingCacheError, match="cache holds 3 pairs, the records are 2"):
        embed_pairs(records()[:2], backbone, tokenizer, cache_dir=str(tmp_path), progress=False)
    other = build_tiny_llama(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, seed=1)
    with pytest.raises(StaleEmbeddingCacheError, match="backbone: ") as err:
        embed_pairs(records(), other, tokenizer, cache_dir=str(tmp_path), progress=False)
    assert "data:" not in str(err.value) and f"Delete {tmp_path}" in str(err.value)
    with pytest.raises(StaleEmbeddingCacheError, match="pooling: the cache holds 'last' pooling, 'mean' was asked"):
        embed_pairs(records(), backbone, tokenizer, pooling="mean", cache_dir=str(tmp_path), progress=False)
    # max_length changes the token ids, hence the data
    with pytest.raises(StaleEmbeddingCacheError, match="data: "):
        embed_pairs(records(), backbone, tokenizer, max_length=6, cache_dir=str(tmp_path), progress=False)


def test_unreadable_cache_is_refused(backbone, tokenizer, tmp_path):
    (tmp_path / CACHE_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(StaleEmbeddingCacheError, match="not a readable prefkit embedding cache"):
        embed_pairs(records(), backbone, tokenizer, cache_dir=str(tmp_path), progress=False)


def test_bad_input_is_refused(backbone, tokenizer):
    with pytest.raises(TypeError, match="record 1 is a UnpairedRecord"):
        embed_pairs([records()[0], UnpairedRecord("p", "c", True)], backbone, tokenizer, progress=False)
    with pytest.raises(ValueError, match="pooling must be one of"):
        embed_pairs(records(), backbone, tokenizer, pooling="max", progress=False)
    with pytest.raises(ValueError, match="no records"):
        embed_pairs([], backbone, tokenizer, progress=False)


def test_sum_pooling_is_the_mean_times_the_response_length(backbone, tokenizer):
    recs = records()
    mean = embed_pairs(recs, backbone, tokenizer, pooling="mean", progress=False)
    total = embed_pairs(recs, backbone, tokenizer, pooling="sum", progress=False)
    for i, record in enumerate(recs):
        n = len(tokenize_pairwise(record, tokenizer)["chosen_input_ids"])  # response tokens, EOS included
        torch.testing.assert_close(total.chosen[i], n * mean.chosen[i], atol=1e-5, rtol=1e-5)


def test_truncated_backbone_keeps_the_first_layers(tokenizer):
    model = build_tiny_llama(vocab_size=len(tokenizer), hidden_size=16, num_layers=2, num_heads=2, seed=0)
    assert embeddings.truncated_backbone(model, None) is model
    zero = embeddings.truncated_backbone(model, 0)
    assert len(model.model.layers) == 2 and len(zero.model.layers) == 0  # a copy; the model is unchanged
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        # no decoder layer: the final norm of the token embeddings
        expected = model.model.norm(model.model.embed_tokens(ids))
        torch.testing.assert_close(zero.model(input_ids=ids).last_hidden_state, expected)
        one = embeddings.truncated_backbone(model, 1)
        full = model.model(input_ids=ids, output_hidden_states=True).hidden_states
        # hidden_states[1] is after layer 1, before the final norm
        torch.testing.assert_close(one.model(input_ids=ids).last_hidden_state, model.model.norm(full[1]))
    with pytest.raises(ValueError, match=r"backbone_layers must be in \[0, 2\]"):
        embeddings.truncated_backbone(model, 3)
