"""Length-grouped batching: ``train_sampling_strategy="group_by_length"`` batches examples of similar
padded width together, so less of each batch is padding."""

import math

import pytest

from prefkit.data.records import PairwiseRecord, UnpairedRecord
from prefkit.train.trainer import PreferenceTrainer


def _varied_pairs(n=32):
    # byte tokenizer: one token per character (+ EOS on completions), so lengths are easy to count
    return [
        PairwiseRecord(
            prompt="Q" * (1 + i % 7), chosen="a" * (1 + (5 * i) % 31), rejected="b" * (1 + (5 * i) % 31 + i % 2)
        )
        for i in range(n)
    ]


def _padding_share(loader) -> float:
    """Share of the chosen/rejected rows' positions that are padding, over one pass of ``loader``."""
    pad = total = 0
    for batch in loader:
        mask = batch["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
    return pad / total


def test_length_column_is_prompt_plus_longest_completion(tokenizer, tiny_model, pref_args):
    records = _varied_pairs(8)
    args = pref_args(train_sampling_strategy="group_by_length")
    trainer = PreferenceTrainer(tiny_model, args, train_dataset=records, processing_class=tokenizer)
    lengths = trainer.train_dataset["length"]
    bos = len(tokenizer("", add_special_tokens=True)["input_ids"])
    for record, length in zip(records, lengths):
        # prompt tokens (+ any BOS) + the longer completion + its EOS
        assert length == bos + len(record.prompt) + max(len(record.chosen), len(record.rejected)) + 1


def test_no_length_column_without_grouping(tokenizer, tiny_model, pref_args):
    trainer = PreferenceTrainer(tiny_model, pref_args(), train_dataset=_varied_pairs(8), processing_class=tokenizer)
    assert "length" not in trainer.train_dataset.column_names


def test_grouped_batches_hold_less_padding_and_train(tokenizer, tiny_model, pref_args):
    records = _varied_pairs(160)
    shares = {}
    for strategy in ("random", "group_by_length"):
        args = pref_args(train_sampling_strategy=strategy, per_device_train_batch_size=4)
        trainer = PreferenceTrainer(tiny_model, args, train_dataset=records, processing_class=tokenizer)
        shares[strategy] = _padding_share(trainer.get_train_dataloader())
    # transformers' sampler sorts megabatches of min(160 // 16, 50) x 4 = 40 shuffled examples by length,
    # so each batch holds neighbours in length and pads far less than random batches
    assert shares["group_by_length"] < 0.6 * shares["random"], shares
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("loss", ["kto", "bco"])
def test_unpaired_length_column(tokenizer, tiny_model, pref_args, loss):
    records = [
        UnpairedRecord(prompt="Q" * (1 + i % 5), completion="c" * (1 + (7 * i) % 13), label=i % 2 == 0)
        for i in range(8)
    ]
    args = pref_args(loss=loss, train_sampling_strategy="group_by_length")
    trainer = PreferenceTrainer(tiny_model, args, train_dataset=records, processing_class=tokenizer)
    bos = len(tokenizer("", add_special_tokens=True)["input_ids"])
    assert trainer.train_dataset["length"] == [bos + len(r.prompt) + len(r.completion) + 1 for r in records]
