"""Ranked (listwise) records -> tokenized examples -> ListCollator batches."""

import pytest
import torch

from prefkit.data.collators import ListCollator
from prefkit.data.records import PairwiseRecord, RankedRecord
from prefkit.data.tokenize import tokenize_ranked, tokenize_records

EOS = 2


def test_tokenize_ranked_from_ranking_and_from_scores(tokenizer):
    record = RankedRecord(prompt="Hi", completions=["a", "bb", "c"], ranking=[2, 0, 1])
    ex = tokenize_ranked(record, tokenizer)
    a, b, c = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a", "bb", "c"))
    assert ex["prompt_input_ids"] == tokenizer("Hi")["input_ids"]
    assert ex["completions_input_ids"] == [a + [EOS], b + [EOS], c + [EOS]]
    assert ex["ranking"] == [2, 0, 1] and ex["levels"] == [1, 2, 0] and ex["weight"] == 1.0
    # scores: higher is better; equal scores share a level (ties) and keep index order in the ranking
    tied = tokenize_ranked(RankedRecord(prompt="Hi", completions=["a", "b", "c"], scores=[1.0, 3.0, 1.0]), tokenizer)
    assert tied["ranking"] == [1, 0, 2] and tied["levels"] == [1, 0, 1]
    # graded scores travel with the example (LiPO's labels, PRO's temperatures); none -> []
    assert tied["scores"] == [1.0, 3.0, 1.0] and ex["scores"] == []


def test_tokenize_ranked_truncates_every_completion_to_one_budget(tokenizer):
    record = RankedRecord(prompt="abcd", completions=["x" * 10, "y"], ranking=[0, 1])
    ex = tokenize_ranked(record, tokenizer, max_length=8)
    assert [len(c) for c in ex["completions_input_ids"]] == [4, 2]  # 8 - 4 prompt tokens; "y" + EOS fits
    assert ex["truncated"]


def test_tokenize_records_accepts_ranked_records_and_rejects_mixed(tokenizer):
    records = [
        RankedRecord(prompt="p", completions=["a", "b"], ranking=[1, 0], user_id="u1"),
        RankedRecord(prompt="q", completions=["a", "b", "c"], scores=[0.1, 0.2, 0.3]),
    ]
    dataset, stats = tokenize_records(records, tokenizer, progress=False)
    assert stats.kind == "ranked" and stats.n_rows == 2
    assert dataset[1]["ranking"] == [2, 1, 0] and dataset["user_id"] == ["u1", None]
    with pytest.raises(ValueError, match="mixed record kinds"):
        tokenize_records([records[0], PairwiseRecord(prompt="p", chosen="a", rejected="b")], tokenizer)
    with pytest.raises(ValueError, match="record 0: ranking"):
        tokenize_records([RankedRecord(prompt="p", completions=["a", "b"], ranking=[0, 0])], tokenizer)


def test_list_collator_rows_are_record_major_with_padding():
    examples = [
        {"prompt_input_ids": [5, 6], "completions_input_ids": [[7], [8, 9], [10]], "ranking": [1, 2, 0]},
        {
            "prompt_input_ids": [11],
            "completions_input_ids": [[12, 13], [14]],
            "ranking": [0, 1],
            "levels": [0, 0],
            "weight": 2.0,
        },
    ]
    batch = ListCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 0],
        [5, 6, 8, 9],
        [5, 6, 10, 0],
        [11, 12, 13, 0],
        [11, 14, 0, 0],
        [11, 12, 13, 0],  # the spare row repeats completion 0; ranking/levels mark it absent
    ]
    assert batch["completion_mask"][1].tolist() == [0, 0, 1, 1]
    assert batch["attention_mask"][4].tolist() == [1, 1, 0, 0]
    assert batch["ranking"].tolist() == [[1, 2, 0], [0, 1, -1]]
    assert batch["levels"].tolist() == [[2, 0, 1], [0, 0, -1]]  # row 1 from its ranking; row 2 given (a tie)
    assert batch["weight"].tolist() == [1.0, 2.0]
    assert "scores" not in batch  # no example has graded scores


def test_list_collator_carries_graded_scores_with_nan_where_absent():
    examples = [
        {"prompt_input_ids": [5], "completions_input_ids": [[7], [8], [9]], "ranking": [1, 2, 0], "scores": [1, 3, 2]},
        {"prompt_input_ids": [5], "completions_input_ids": [[7], [8]], "ranking": [0, 1], "scores": []},
    ]
    scores = ListCollator(pad_token_id=0)(examples)["scores"]
    assert scores[0].tolist() == [1.0, 3.0, 2.0] and torch.isnan(scores[1]).all()
    with pytest.raises(ValueError, match="example 0: 2 scores for its 3 completions"):
        ListCollator(pad_token_id=0)([dict(examples[0], scores=[1, 2])])


def test_list_collator_errors():
    collate = ListCollator(pad_token_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(KeyError, match="completions_input_ids"):
        collate([{"prompt_input_ids": [1], "ranking": [0]}])
    with pytest.raises(ValueError, match="not a permutation"):
        collate([{"prompt_input_ids": [1], "completions_input_ids": [[2], [3]], "ranking": [0, 2]}])
    with pytest.raises(TypeError, match="pad_token_id"):
        ListCollator(pad_token_id=None)


def test_list_collator_accepts_tensors(tokenizer):
    records = [RankedRecord(prompt="p", completions=["a", "bc"], ranking=[1, 0])]
    dataset, _ = tokenize_records(records, tokenizer, progress=False)
    batch = ListCollator(0)([dataset.with_format("torch")[0]])
    assert batch["input_ids"].shape == (2, 4) and batch["ranking"].tolist() == [[1, 0]]
    assert torch.equal(batch["levels"], torch.tensor([[1, 0]]))
