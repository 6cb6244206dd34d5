"""Joint preference pairs (JPO): the rejected completion answers its own prompt."""

import json

import pytest
import torch

from prefkit.data import joint_pairs, load_records, validate_record
from prefkit.data.collators import PairwiseCollator
from prefkit.data.records import PairwiseRecord, UnpairedRecord
from prefkit.data.tokenize import tokenize_pairwise, tokenize_records


def test_a_joint_pair_validates_loads_and_may_repeat_a_text(tmp_path):
    row = {"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "4", "rejected_prompt": "Add 2 and 3."}
    assert validate_record(row, "pairwise") == []  # the same answer is right for one prompt, wrong for the other
    assert any(e.field == "rejected" for e in validate_record({**row, "rejected_prompt": None}, "pairwise"))
    errors = validate_record({"chosen": "a", "rejected": "b", "rejected_prompt": "q"}, "pairwise")
    assert [e.field for e in errors] == ["prompt"] and "names both prompts" in str(errors[0])
    path = tmp_path / "joint.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (record,) = load_records(str(path))
    assert record.rejected_prompt == "Add 2 and 3."


def test_tokenization_and_collation_give_the_rejected_row_its_own_prompt(tokenizer):
    joint = PairwiseRecord("Hi", "yes", "no", rejected_prompt="Bye")
    plain = PairwiseRecord("Hi", "yes", "no")
    ex = tokenize_pairwise(joint, tokenizer)
    assert ex["rejected_prompt_input_ids"] == tokenizer("Bye")["input_ids"]
    assert "rejected_prompt_input_ids" not in tokenize_pairwise(plain, tokenizer)
    dataset, _ = tokenize_records([plain, joint], tokenizer, progress=False)
    assert dataset["rejected_prompt_input_ids"] == [[], ex["rejected_prompt_input_ids"]]
    batch = PairwiseCollator(0)([dataset[0], dataset[1]])
    hi, bye = tokenizer("Hi")["input_ids"], tokenizer("Bye")["input_ids"]
    rows = [r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    no = tokenizer("no", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rows[2] == hi + no and rows[3] == bye + no  # plain pair: its prompt; joint pair: the other prompt
    with pytest.raises(ValueError, match="joint pair"):
        PairwiseCollator(0, share_prompt=True)([dataset[1]])
    # packing keeps the two prompts apart too
    packed = PairwiseCollator(0, packing=True)([dataset[1]])
    assert packed["input_ids"].numel() >= len(hi) + len(bye)


def test_joint_pairs_from_thumbs_feedback():
    records = [
        UnpairedRecord("q1", "good 1", True, id="a"),
        UnpairedRecord("q1", "bad 1", False, id="b"),
        UnpairedRecord("q2", "good 2", True, id="c", weight=2.0),
        UnpairedRecord("q3", "bad 3", False, id="d"),
    ]
    pairs = joint_pairs(records, seed=0)
    assert len(pairs) == 2
    for p in pairs:
        assert p.prompt != p.rejected_prompt  # never two answers to one prompt
        assert p.chosen.startswith("good") and p.rejected.startswith("bad")
    by_id = {p.id: p for p in pairs}
    assert set(by_id) == {"a~d", "c~b"} and by_id["c~b"].weight == 2.0
    with pytest.raises(TypeError, match="UnpairedRecord"):
        joint_pairs([PairwiseRecord("q", "a", "b")])


def test_the_trainer_scores_a_joint_pairs_rejected_completion_after_its_own_prompt(tokenizer, tiny_model, pref_args):
    from prefkit.train.logps import completion_logps
    from prefkit.train.trainer import PreferenceTrainer

    records = [PairwiseRecord("Hi there", "yes", "no", rejected_prompt="Bye now")] * 2
    trainer = PreferenceTrainer(
        tiny_model, pref_args(loss="jpo", per_device_train_batch_size=2), train_dataset=records,
        processing_class=tokenizer,
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        _, metrics, _ = trainer.compute_preference_loss(trainer.model, batch, train=True)
        bye = tokenizer("Bye now")["input_ids"]
        no = tokenizer("no", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([bye + no])
        comp = torch.tensor([[0] * len(bye) + [1] * len(no)])
        direct = completion_logps(trainer.model, ids, torch.ones_like(ids), comp).sum
    assert metrics["logps/rejected"][0].item() == pytest.approx(direct.item(), abs=1e-5)


def test_convert_thumbs_feedback_to_joint_pairs_from_the_command_line(tmp_path, capsys):
    from prefkit.cli import main
    from prefkit.data import write_records

    src, out = tmp_path / "thumbs.jsonl", tmp_path / "joint.jsonl"
    write_records([UnpairedRecord("q1", "good", True), UnpairedRecord("q2", "bad", False)], src)
    assert main(["data", "convert", str(src), str(out), "--to", "pairwise"]) == 0
    (pair,) = load_records(str(out))
    assert (pair.prompt, pair.chosen, pair.rejected, pair.rejected_prompt) == ("q1", "good", "bad", "q2")
