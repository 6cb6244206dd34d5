"""prefkit.data.scoring: length-sorted batches, outputs back in input order."""

import pytest
import torch
from torch import nn

from prefkit.data.batching import batches_by_length
from prefkit.data.scoring import judge_pairs, score_items, tokenize_items


class SumScorer(nn.Module):
    """Reward = sum of the response's token ids; records every batch width it saw."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.widths = []

    def score(self, input_ids, attention_mask, completion_mask=None):
        self.widths.append(input_ids.shape[1])
        return (input_ids * completion_mask).sum(1).float()

    def compare(self, ids_a, mask_a, ids_b, mask_b, completion_mask_a=None, completion_mask_b=None):
        return self.score(ids_a, mask_a, completion_mask_a) - self.score(ids_b, mask_b, completion_mask_b)


ITEMS = [("p", "a"), ("p", "aaaaaaaa"), ("p", "aaa"), ("p", ""), ("p", "aaaaa")]


def test_batches_by_length_longest_first():
    assert batches_by_length([1, 8, 3, 0, 5], 2) == [[1, 4], [2, 0], [3]]
    with pytest.raises(ValueError):
        batches_by_length([1], 0)


def test_scores_come_back_in_input_order(tokenizer):
    items = tokenize_items(ITEMS, tokenizer)
    # byte tokenizer: 'a' is one token; every response also gets EOS (id 2)
    assert items.response_lengths == [2, 9, 4, 1, 6]
    a = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    expected = torch.tensor([1 * a + 2, 8 * a + 2, 3 * a + 2, 2, 5 * a + 2], dtype=torch.float32)
    model = SumScorer()
    scores = score_items(
        model.score, items, model=model, pad_token_id=tokenizer.pad_token_id, batch_size=2, progress=False
    )
    assert torch.equal(scores, expected)
    # batches by length: {8, 5} then {3, 1} then {0} 'a's; width = prompt ('p': 1 token, the byte
    # tokenizer adds no BOS) + the batch's longest response
    assert model.widths == [1 + 9, 1 + 4, 1 + 1]


def test_judge_pairs_in_input_order(tokenizer):
    first = tokenize_items(ITEMS, tokenizer)
    second = tokenize_items(list(reversed(ITEMS)), tokenizer)
    model = SumScorer()
    logits = judge_pairs(model, first, second, pad_token_id=tokenizer.pad_token_id, batch_size=2, progress=False)
    s = score_items(model.score, first, model=model, pad_token_id=tokenizer.pad_token_id, progress=False)
    assert torch.equal(logits, s - s.flip(0))


def test_overlong_prompt_names_the_item(tokenizer):
    with pytest.raises(ValueError, match="record 1 \\(chosen\\)"):
        tokenize_items([("x" * 20, "y")], tokenizer, max_length=10, names=["record 1 (chosen)"])
