"""Curry-DPO's curriculum: ``curriculum: margin`` trains on the pairs from the largest margin to the smallest."""

import json
from pathlib import Path

import pytest

from prefkit.cli import main
from prefkit.data.convert import ranked_to_pairwise
from prefkit.data.records import PairwiseRecord, RankedRecord
from prefkit.train.config import ConfigError, PreferenceConfig
from prefkit.train.curriculum import order_by_margin
from prefkit.train.trainer import PreferenceTrainer


def _pair(i, margin=None, scores=None):
    chosen, rejected = scores or (None, None)
    return PairwiseRecord(
        prompt=f"q{i}", chosen="good", rejected="bad", margin=margin, chosen_score=chosen, rejected_score=rejected,
        id=f"p{i}",
    )  # fmt: skip


def test_order_by_margin_is_largest_first_stable_and_reads_scores():
    records = [_pair(0, 0.5), _pair(1, scores=(3.0, 0.0)), _pair(2, 0.5), _pair(3, 2.0)]
    assert [r.id for r in order_by_margin(records)] == ["p1", "p3", "p0", "p2"]
    with pytest.raises(ValueError, match=r"training record 2 \(id p1\) has neither 'margin'"):
        order_by_margin([_pair(0, 1.0), _pair(1)])


def test_curry_dpo_pairs_from_a_ranked_list_come_easy_to_hard():
    """The paper's recipe: best vs each other response of a scored list, the widest score gap first."""
    ranked = RankedRecord("q", ["a", "b", "c", "d"], scores=[4.0, 1.0, 3.0, 2.0], id="q")
    pairs = order_by_margin(ranked_to_pairwise([ranked], mode="best"))
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [("a", "b", 3.0), ("a", "d", 2.0), ("a", "c", 1.0)]


def test_trainer_reads_the_pairs_in_curriculum_order(tokenizer, tiny_model, pref_args):
    records = [_pair(i, margin=float(m)) for i, m in enumerate([0.1, 3.0, 1.0, 2.0, 0.5, 4.0])]
    args = pref_args(curriculum="margin", per_device_train_batch_size=2)
    assert args.train_sampling_strategy == "sequential"
    trainer = PreferenceTrainer(tiny_model, args, train_dataset=records, processing_class=tokenizer)
    seen = [m for batch in trainer.get_train_dataloader() for m in batch["margin"].tolist()]
    assert seen == pytest.approx([4.0, 3.0, 2.0, 1.0, 0.5, 0.1])


def test_curriculum_settings_are_checked(pref_args):
    with pytest.raises(ConfigError, match="curriculum: expected one of none, margin"):
        pref_args(curriculum="hard_first")
    with pytest.raises(ConfigError, match="curriculum: margin orders preference pairs"):
        pref_args(curriculum="margin", loss="kto")
    with pytest.raises(ConfigError, match="train_sampling_strategy 'group_by_length' would reorder"):
        pref_args(curriculum="margin", train_sampling_strategy="group_by_length")
    assert isinstance(pref_args(), PreferenceConfig)


def test_prefkit_train_with_a_curriculum(tmp_path, monkeypatch, capsys):
    """From the command line: bad values are refused before torch loads; a pair without a margin is named by
    file, row and field; pairs with margins train."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "Sure, here.", "rejected": "No.", "margin": float(i)} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["train", "examples/dpo_tiny.yaml", f"train_file={data}", "eval_fraction=0", "eval_strategy=no"]
    base += ["max_steps=2", "save_strategy=no"]
    assert main([*base, "curriculum=margin", f"output_dir={tmp_path / 'ok'}"]) == 0
    capsys.readouterr()
    assert main([*base, "curriculum=easy", f"output_dir={tmp_path / 'bad'}"]) == 2
    assert "curriculum: expected one of none, margin, got 'easy'" in capsys.readouterr().err
    del rows[3]["margin"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*base, "curriculum=margin", f"output_dir={tmp_path / 'm'}"]) != 0
    assert "pairs.jsonl:4: field 'margin'" in capsys.readouterr().err
