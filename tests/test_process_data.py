"""Stepwise data for process supervision: the public layouts on their tiny example files, bad rows as one
clear error, stepwise tokenization and the step collator."""

import json
from pathlib import Path

import pytest
import torch

from prefkit.data.collators import StepCollator
from prefkit.data.loaders import load_records
from prefkit.data.records import DataError, StepwiseRecord
from prefkit.data.tokenize import OverlongPromptError, tokenize_records, tokenize_stepwise

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


def test_prmbench_layout():
    records = load_records(DATA / "steps_prmbench.jsonl", layout="prmbench")
    assert [r.labels for r in records] == [[True, False, False], [True, False, True], [True, True]]
    assert records[0].prompt == "What is 2 + 3 * 4?" and records[0].completions[1] == "2. Add: 2 + 12 = 15."
    assert [r.id for r in records] == ["counterfactual_tiny_0", "circular_tiny_1", "multi_solutions_tiny_2"]


def test_prmbench_layout_ignores_error_indices_past_the_end_and_drops_empty_steps(tmp_path):
    row = json.loads((DATA / "steps_prmbench.jsonl").read_text().splitlines()[0])
    row["error_steps"] = [2, 9]
    row["modified_process"] = ["a", "", "b", "c"]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (record,) = load_records(path, layout="prmbench")
    assert record.completions == ["a", "b", "c"] and record.labels == [
        True,
        True,
        True,
    ]  # the empty step 2 was the error


def test_processbench_layout_keeps_the_steps_up_to_the_first_error():
    records = load_records(DATA / "steps_processbench.jsonl", layout="processbench")
    assert [r.labels for r in records] == [[True, False], [True, True], [False]]  # label 1, -1, 0
    assert len(records[0].completions) == 2 and records[1].completions[-1] == "The answer is 42."


def test_math_shepherd_prm800k_and_joined_layouts():
    shepherd = load_records(DATA / "steps_math_shepherd.jsonl", layout="math_shepherd")
    assert shepherd[0].prompt == "Sam has 5 coins and finds 3. How many coins?"
    assert shepherd[0].completions == ["Step 1: 5 + 3 = 8.", "Step 2: The answer is 8."]
    assert [r.labels for r in shepherd] == [[True, True], [False, False]]
    prm800k = load_records(DATA / "steps_prm800k.jsonl", layout="prm800k")
    assert prm800k[0].completions == ["4 + 4 = 8.", "So the answer is 9."] and prm800k[0].labels == [True, False]
    assert prm800k[1].labels == [True, True]  # rating 0 (neutral) counts as correct
    joined = load_records(DATA / "steps_joined.jsonl", layout="joined")
    assert joined[0].completions == ["6 + 7 = 13.", "The answer is 13."]


def test_joined_layout_with_another_separator(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completions": "a\nb\nc", "labels": [1, 0, 1]}) + "\n")
    (record,) = load_records(path, layout="joined:\\n")
    assert record.completions == ["a", "b", "c"] and record.labels == [1, 0, 1]
    with pytest.raises(ValueError, match="unknown layout 'joind'"):
        load_records(path, layout="joind")


@pytest.mark.parametrize(
    "layout,row,match",
    [
        (
            "prmbench",
            {"modified_question": "q", "modified_process": ["a"], "error_steps": [0], "classification": "x"},
            r"p.jsonl:1: field 'error_steps': expected a list of 1-based step numbers",
        ),
        (
            "processbench",
            {"problem": "q", "steps": ["a", "b"], "label": 2},
            r"p.jsonl:1: field 'label': expected the index of the first wrong step, -1 to 1",
        ),
        (
            "math_shepherd",
            {"input": "q Step 1: a ки", "label": "q Step 1: a ?"},
            r"p.jsonl:1: field 'label': expected '\+' or '-' where 'input' has step tag 1",
        ),
        (
            "prm800k",
            {"question": {"problem": "q"}, "label": {"steps": [{"completions": [{"text": "a", "rating": 3}]}]}},
            r"p.jsonl:1: field 'label.steps\[1\]': expected a completion with a 'text' and a 'rating' of -1, 0 or 1",
        ),
        (
            "joined",
            {"prompt": "q", "completions": "a\n\nb", "labels": [True]},
            r"p.jsonl:1: field 'labels': expected 2 labels",
        ),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, layout, row, match):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n")
    with pytest.raises(DataError, match=match):
        load_records(path, layout=layout)


def test_tokenize_stepwise_ends_every_step_with_the_separator(tokenizer):
    record = StepwiseRecord(prompt="Q", completions=["ab", "c"], labels=[True, 0.25])
    ex = tokenize_stepwise(record, tokenizer, step_separator=";")
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ex["steps_input_ids"] == [enc("ab;"), enc("c;")]
    assert ex["prompt_input_ids"][-len(enc("Q;")) :] == enc("Q;")
    assert ex["step_labels"] == [1.0, 0.25] and not ex["truncated"]
    # max_length keeps whole steps only; no room for the first step is an overlong prompt
    n_prompt = len(ex["prompt_input_ids"])
    cut = tokenize_stepwise(record, tokenizer, step_separator=";", max_length=n_prompt + len(enc("ab;")) + 1)
    assert cut["steps_input_ids"] == [enc("ab;")] and cut["step_labels"] == [1.0] and cut["truncated"]
    with pytest.raises(OverlongPromptError):
        tokenize_stepwise(record, tokenizer, step_separator=";", max_length=n_prompt + 1)
    dataset, stats = tokenize_records([record, record], tokenizer, step_separator=";", progress=False)
    assert stats.kind == "stepwise" and dataset[1]["step_labels"] == [1.0, 0.25]


def test_step_collator_points_at_each_steps_last_token():
    examples = [
        {"prompt_input_ids": [1, 2], "steps_input_ids": [[5, 6, 9], [7, 9]], "step_labels": [1.0, 0.0]},
        {"prompt_input_ids": [1], "steps_input_ids": [[8, 9]], "step_labels": [0.5], "weight": 2.0},
    ]
    batch = StepCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 5, 6, 9, 7, 9], [1, 8, 9, 0, 0, 0, 0]]
    assert batch["step_rows"].tolist() == [0, 0, 1] and batch["step_positions"].tolist() == [4, 6, 2]
    assert batch["input_ids"][batch["step_rows"], batch["step_positions"]].tolist() == [9, 9, 9]
    assert batch["step_labels"].tolist() == [1.0, 0.0, 0.5] and batch["weight"].tolist() == [1.0, 2.0]
    assert batch["completion_mask"].tolist()[1] == [0, 1, 1, 0, 0, 0, 0]


def test_step_preference_pairs_mined_from_shared_correct_prefixes():
    from prefkit.data.convert import step_preference_pairs

    records = [
        StepwiseRecord(prompt="P", completions=["a", "b", "c"], labels=[True, True, True]),
        StepwiseRecord(prompt="P", completions=["a", "x", "y"], labels=[True, False, False]),
        StepwiseRecord(prompt="P", completions=["z"], labels=[0.2]),  # soft label: wrong
        StepwiseRecord(prompt="P", completions=["a", "x"], labels=[True, False]),  # the same pair again
        StepwiseRecord(prompt="Q", completions=["a", "q"], labels=[True, False]),  # no correct alternative
    ]
    pairs = step_preference_pairs(records, separator=" ;", prompt_separator=" ")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("P ", "a", "z"), ("P a ;", "b", "x")]
    from prefkit.losses import PairLogps, get_loss

    b = PairLogps(
        policy_chosen=torch.tensor([-1.0]),
        policy_rejected=torch.tensor([-2.0]),
        chosen_len=torch.ones(1),
        rejected_len=torch.ones(1),
        ref_chosen=torch.tensor([-1.5]),
        ref_rejected=torch.tensor([-1.5]),
    )
    assert torch.allclose(get_loss("step_dpo")(b, beta=0.4).loss, get_loss("dpo")(b, beta=0.4).loss)
