"""prefkit.data.collators: shapes, masks, padding, KL rows, round trips through the byte tokenizer."""

import logging

import pytest
import torch

from prefkit.data.collators import PairwiseCollator, UnpairedCollator
from prefkit.data.records import PairwiseRecord, UnpairedRecord
from prefkit.data.tokenize import tokenize_records

EOS = 2

PAIR_EXAMPLES = [
    {
        "prompt_input_ids": [5, 6, 7],
        "chosen_input_ids": [8, 9],
        "rejected_input_ids": [10],
        "weight": 2.0,
        "margin": 0.5,
    },
    {
        "prompt_input_ids": [11],
        "chosen_input_ids": [12],
        "rejected_input_ids": [13, 14, 15, 16],
        "weight": 1.0,
        "margin": 0.0,
    },
]

UNPAIRED_EXAMPLES = [
    {"prompt_input_ids": [5, 6], "completion_input_ids": [7], "label": True, "weight": 1.0},
    {"prompt_input_ids": [8], "completion_input_ids": [9, 10, 11], "label": False, "weight": 0.5},
    {"prompt_input_ids": [12, 13, 14], "completion_input_ids": [15, 16], "label": True, "weight": 2.0},
]


# ------------------------------------------------------------------------------------------
# PairwiseCollator
# ------------------------------------------------------------------------------------------


def test_pairwise_batch_exact():
    batch = PairwiseCollator(pad_token_id=0)(PAIR_EXAMPLES)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],  # prompt 0 + chosen 0
        [11, 12, 0, 0, 0],  # prompt 1 + chosen 1
        [5, 6, 7, 10, 0],  # prompt 0 + rejected 0
        [11, 13, 14, 15, 16],  # prompt 1 + rejected 1
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1],
        [0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 1, 1, 1, 1],
    ]
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert batch[key].dtype == torch.long
    assert batch["weight"].dtype == torch.float32 and batch["weight"].tolist() == [2.0, 1.0]
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [0.5, 0.0]
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "weight", "margin"}


def test_pairwise_pad_value_and_multiple():
    batch = PairwiseCollator(pad_token_id=99, pad_to_multiple_of=8)(PAIR_EXAMPLES)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][1].tolist() == [11, 12] + [99] * 6
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 99).all()
    assert batch["attention_mask"].sum(1).tolist() == [5, 2, 4, 5]
    # completion tokens are always real tokens
    assert ((batch["completion_mask"] == 1) <= (batch["attention_mask"] == 1)).all()


def test_pairwise_ignores_extra_keys_defaults_and_passes_user_id():
    examples = [
        {
            "prompt_input_ids": [5],
            "chosen_input_ids": [6],
            "rejected_input_ids": [7],
            "truncated": False,
            "user_id": "alice",
            "id": "r0",
            "chosen_score": 3.0,
        },
        {
            "prompt_input_ids": [8],
            "chosen_input_ids": [9],
            "rejected_input_ids": [10],
            "truncated": True,
            "user_id": None,
            "id": "r1",
            "chosen_score": 1.0,
        },
    ]
    batch = PairwiseCollator(pad_token_id=0)(examples)
    assert batch["user_id"] == ["alice", None]
    assert batch["weight"].tolist() == [1.0, 1.0] and batch["margin"].tolist() == [0.0, 0.0]
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "weight", "margin", "user_id"}


def test_pairwise_accepts_tensor_rows():
    examples = [{k: torch.tensor(v) for k, v in ex.items()} for ex in PAIR_EXAMPLES]
    assert (
        PairwiseCollator(0)(examples)["input_ids"].tolist() == PairwiseCollator(0)(PAIR_EXAMPLES)["input_ids"].tolist()
    )


def test_pairwise_errors():
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        PairwiseCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PairwiseCollator(pad_token_id=0, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="empty batch"):
        PairwiseCollator(0)([])
    with pytest.raises(KeyError, match="example 0 has no 'rejected_input_ids'"):
        PairwiseCollator(0)([{"prompt_input_ids": [1], "chosen_input_ids": [2]}])


def test_pairwise_round_trip_through_dataset_and_dataloader(tokenizer):
    records = [
        PairwiseRecord(prompt="Q: 2+2?", chosen=" 4", rejected=" five", user_id="u"),
        PairwiseRecord(prompt="Say hi", chosen=" hi there", rejected=" no", user_id="v"),
        PairwiseRecord(prompt="naïve?", chosen=" é ok", rejected=" 日本"),
    ]
    ds, _ = tokenize_records(records, tokenizer, progress=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=PairwiseCollator(tokenizer.pad_token_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 6
    assert batch["user_id"] == ["u", "v", None]
    texts = [r.chosen for r in records] + [r.rejected for r in records]
    prompts = [r.prompt for r in records] * 2
    for row in range(6):
        ids, mask = batch["input_ids"][row], batch["completion_mask"][row].bool()
        prompt_mask = batch["attention_mask"][row].bool() & ~mask
        assert tokenizer.decode(ids[mask].tolist()) == texts[row] + "</s>"
        assert tokenizer.decode(ids[prompt_mask].tolist()) == prompts[row]
        assert ids[mask].tolist()[-1] == EOS


# ------------------------------------------------------------------------------------------
# UnpairedCollator
# ------------------------------------------------------------------------------------------


def test_unpaired_batch_exact():
    batch = UnpairedCollator(pad_token_id=0)(UNPAIRED_EXAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 0], [12, 13, 14, 15, 16]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [True, False, True]
    assert batch["weight"].dtype == torch.float32 and batch["weight"].tolist() == [1.0, 0.5, 2.0]


def test_unpaired_kl_rows_pair_prompt_i_with_completion_i_minus_1():
    """TRL 1.16's KTO pairing: prompt i + the completion of example (i - 1) % B."""
    batch = UnpairedCollator(pad_token_id=0)(UNPAIRED_EXAMPLES)
    assert batch["kl_input_ids"].tolist() == [
        [5, 6, 15, 16, 0, 0],  # prompt 0 + completion 2 (wraps around)
        [8, 7, 0, 0, 0, 0],  # prompt 1 + completion 0
        [12, 13, 14, 9, 10, 11],  # prompt 2 + completion 1 (the longest KL row sets T_kl = 6)
    ]
    assert batch["kl_attention_mask"].tolist() == [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert batch["kl_completion_mask"].tolist() == [
        [0, 0, 1, 1, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1],
    ]


def test_unpaired_kl_rows_are_padded_on_their_own():
    examples = [
        {"prompt_input_ids": [5], "completion_input_ids": [6, 7, 8, 9], "label": True},
        {"prompt_input_ids": [10, 11, 12, 13], "completion_input_ids": [14], "label": False},
    ]
    batch = UnpairedCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (2, 5)
    # B = 2: completion (i - 1) % 2 is the other example's, so each KL row swaps completions
    assert batch["kl_input_ids"].tolist() == [[5, 14, 0, 0, 0, 0, 0, 0], [10, 11, 12, 13, 6, 7, 8, 9]]
    batch = UnpairedCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)
    assert batch["input_ids"].shape == (2, 8) and batch["kl_input_ids"].shape == (2, 8)


def test_unpaired_kl_rows_cut_to_max_length():
    examples = [
        {"prompt_input_ids": [5], "completion_input_ids": [6, 7, 8, 9], "label": True},
        {"prompt_input_ids": [10, 11, 12, 13], "completion_input_ids": [14], "label": False},
    ]
    batch = UnpairedCollator(pad_token_id=0, max_length=5)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]  # matched rows untouched
    assert batch["kl_input_ids"].tolist() == [[5, 14, 0, 0, 0], [10, 11, 12, 13, 6]]
    assert batch["kl_completion_mask"].tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]]
    with pytest.raises(ValueError, match="prompts of max_length=4 tokens or more"):
        UnpairedCollator(pad_token_id=0, max_length=4)(examples)


def test_unpaired_batch_of_one_kl_row_is_the_matched_row(caplog):
    collator = UnpairedCollator(pad_token_id=0)
    with caplog.at_level(logging.WARNING, logger="prefkit.data"):
        batch = collator(UNPAIRED_EXAMPLES[:1])
        collator(UNPAIRED_EXAMPLES[1:2])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert batch[f"kl_{key}"].tolist() == batch[key].tolist()
    warnings = [r for r in caplog.records if r.name == "prefkit.data"]
    assert len(warnings) == 1 and "batch of 1" in warnings[0].getMessage()


def test_unpaired_without_kl_rows_and_with_user_id():
    examples = [dict(ex, user_id=f"u{i}", truncated=False) for i, ex in enumerate(UNPAIRED_EXAMPLES)]
    batch = UnpairedCollator(pad_token_id=0, kl_rows=False)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "label", "weight", "user_id"}
    assert batch["user_id"] == ["u0", "u1", "u2"]


def test_unpaired_errors():
    with pytest.raises(ValueError, match="max_length"):
        UnpairedCollator(pad_token_id=0, max_length=0)
    with pytest.raises(KeyError, match="example 0 has no 'label'"):
        UnpairedCollator(0)([{"prompt_input_ids": [1], "completion_input_ids": [2]}])
    with pytest.raises(ValueError, match="empty batch"):
        UnpairedCollator(0)([])


def test_unpaired_round_trip_with_chat_records(tokenizer):
    prompt = [{"role": "user", "content": "hi"}]
    records = [
        UnpairedRecord(prompt=prompt, completion=[{"role": "assistant", "content": "hello"}], label=True),
        UnpairedRecord(prompt=prompt, completion=[{"role": "assistant", "content": "go away"}], label=False),
    ]
    ds, _ = tokenize_records(records, tokenizer, progress=False)
    batch = UnpairedCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    # The chat template closes each turn with "</s>\n"; that is the completion, with its one EOS.
    decoded = [tokenizer.decode(batch["input_ids"][i][batch["completion_mask"][i].bool()].tolist()) for i in range(2)]
    assert decoded == ["hello</s>\n", "go away</s>\n"]
    kl = [  # B = 2: each KL row carries the other example's completion
        tokenizer.decode(batch["kl_input_ids"][i][batch["kl_completion_mask"][i].bool()].tolist()) for i in range(2)
    ]
    assert kl == ["go away</s>\n", "hello</s>\n"]
    full = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist())
    assert full == tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "hello"}], tokenize=False)
