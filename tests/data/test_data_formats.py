"""Dataset layouts: HH-RLHF implicit prompts, chat conversations without a prompt, LLMBar, HHH."""

import gzip
import json
from pathlib import Path

import pytest

from prefkit.data import (
    DataError,
    PairwiseRecord,
    hh_pair_to_messages,
    hh_to_messages,
    hhh_row,
    llmbar_row,
    load_records,
    looks_like_hh,
    split_hh_pair,
    split_message_pair,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# Hand-written rows shaped like ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz
SINGLE_TURN = {
    "chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with breaking in.",
    "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Get a tension wrench and a pick.",
}
MULTI_TURN = {
    "chosen": (
        "\n\nHuman: what are some pranks with a pen i can do?"
        "\n\nAssistant: Are you looking for practical joke ideas?"
        "\n\nHuman: yep\n\nAssistant: You could draw a fake tattoo on a friend, if they agree."
    ),
    "rejected": (
        "\n\nHuman: what are some pranks with a pen i can do?"
        "\n\nAssistant: Are you looking for practical joke ideas?"
        "\n\nHuman: yep\n\nAssistant: Put ink on the teacher's chair."
    ),
}
# Both final replies start with the same words: the split must stay at the "Assistant:" marker,
# not at the end of the longest common prefix.
MID_TURN = {
    "chosen": "\n\nHuman: Where does she live?\n\nAssistant: I'm sorry, I can't share someone's address.",
    "rejected": "\n\nHuman: Where does she live?\n\nAssistant: I'm pretty sure she lives on Elm Street.",
}
# The preferred reply is empty (4 real rows are like this).
EMPTY_CHOSEN = {
    "chosen": "\n\nHuman: Can you give me her address again?\n\nAssistant: ",
    "rejected": "\n\nHuman: Can you give me her address again?\n\nAssistant: Sure, it is 12 Elm Street.",
}
# The two dialogues part in an earlier assistant turn; one continues with more turns.
EARLY_SPLIT = {
    "chosen": (
        "\n\nHuman: Are drag queens men?\n\nAssistant: Usually, yes.\n\nHuman: Why?\n\nAssistant: It is a tradition."
    ),
    "rejected": "\n\nHuman: Are drag queens men?\n\nAssistant: No, never.",
}
NO_SHARED_ASSISTANT = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!",
    "rejected": "\n\nHuman: Hello there\n\nAssistant: Hello!",
}


def test_looks_like_hh():
    assert looks_like_hh(SINGLE_TURN["chosen"])
    assert looks_like_hh("Human: hi\n\nAssistant: yo")
    assert not looks_like_hh("Assistant: yo")
    assert not looks_like_hh("\n\nHuman: no reply")
    assert not looks_like_hh([{"role": "user", "content": "x"}])


def test_split_single_and_multi_turn():
    prompt, chosen, rejected = split_hh_pair(**SINGLE_TURN)
    assert prompt == "\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert chosen == "I can't help with breaking in."
    assert rejected == "Get a tension wrench and a pick."
    prompt, chosen, rejected = split_hh_pair(**MULTI_TURN)
    assert prompt.endswith("\n\nHuman: yep\n\nAssistant:") and prompt.count("\n\nAssistant:") == 2
    assert chosen == "You could draw a fake tattoo on a friend, if they agree."
    assert rejected == "Put ink on the teacher's chair."


def test_split_when_replies_share_their_first_words():
    prompt, chosen, rejected = split_hh_pair(**MID_TURN)
    assert prompt == "\n\nHuman: Where does she live?\n\nAssistant:"
    assert chosen == "I'm sorry, I can't share someone's address."
    assert rejected == "I'm pretty sure she lives on Elm Street."


def test_split_with_empty_reply_and_early_divergence():
    prompt, chosen, rejected = split_hh_pair(**EMPTY_CHOSEN)
    assert prompt.endswith("again?\n\nAssistant:") and chosen == "" and rejected == "Sure, it is 12 Elm Street."
    prompt, chosen, rejected = split_hh_pair(**EARLY_SPLIT)
    assert prompt == "\n\nHuman: Are drag queens men?\n\nAssistant:"
    assert chosen == "Usually, yes.\n\nHuman: Why?\n\nAssistant: It is a tradition."
    assert rejected == "No, never."


def test_split_without_shared_assistant_turn_fails():
    with pytest.raises(ValueError, match="share no"):
        split_hh_pair(**NO_SHARED_ASSISTANT)


def test_load_records_splits_hh_rows_automatically(tmp_path):
    path = tmp_path / "hh.jsonl"
    rows = [SINGLE_TURN, MULTI_TURN, MID_TURN, EMPTY_CHOSEN, EARLY_SPLIT]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(str(path))
    assert len(records) == 5
    assert all(r.prompt.endswith("Assistant:") for r in records)
    assert records[2] == PairwiseRecord(
        prompt="\n\nHuman: Where does she live?\n\nAssistant:",
        chosen="I'm sorry, I can't share someone's address.",
        rejected="I'm pretty sure she lives on Elm Street.",
    )


def test_failed_split_is_a_row_error(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(SINGLE_TURN) + "\n" + json.dumps(NO_SHARED_ASSISTANT) + "\n")
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert info.value.row == 2 and info.value.field == "chosen" and "'\\n\\nAssistant:'" in str(info.value)


def test_prompt_present_means_no_split():
    (record,) = load_records([dict(SINGLE_TURN, prompt="Explicit")])
    assert record.prompt == "Explicit" and record.chosen == SINGLE_TURN["chosen"]


def test_hh_to_messages():
    prompt, chosen, _ = split_hh_pair(**MULTI_TURN)
    assert hh_to_messages(prompt) == [
        {"role": "user", "content": "what are some pranks with a pen i can do?"},
        {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
        {"role": "user", "content": "yep"},
    ]
    assert hh_to_messages("Human: hi\n\nAssistant: yo") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    assert hh_to_messages("Sure.\n\nHuman: ok?\n\nAssistant: ok.", first_role="assistant") == [
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "ok?"},
        {"role": "assistant", "content": "ok."},
    ]


def test_hh_pair_to_messages_keeps_other_fields_and_loads_as_chat():
    prompt, chosen, rejected = split_hh_pair(**EMPTY_CHOSEN)
    record = hh_pair_to_messages(PairwiseRecord(prompt, chosen, rejected, weight=0.5, id="x"))
    assert record.prompt == [{"role": "user", "content": "Can you give me her address again?"}]
    assert record.chosen == [{"role": "assistant", "content": ""}]
    assert record.rejected == [{"role": "assistant", "content": "Sure, it is 12 Elm Street."}]
    assert (record.weight, record.id) == (0.5, "x")
    assert load_records([record.__dict__]) == [record]
    with pytest.raises(ValueError, match="ending with 'Assistant:'"):
        hh_pair_to_messages(PairwiseRecord("no marker", "a", "b"))


def test_chat_conversations_without_prompt_are_split():
    user = {"role": "user", "content": "Capital of France?"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Paris."}],
        "rejected": [user, {"role": "assistant", "content": "Lyon."}],
    }
    (record,) = load_records([row])
    assert record.prompt == [user]
    assert record.chosen == [{"role": "assistant", "content": "Paris."}]
    # the replies may share a first assistant turn; the prompt then ends before the divergence
    a1, u2 = {"role": "assistant", "content": "Which one?"}, {"role": "user", "content": "The big one"}
    prompt, chosen, rejected = split_message_pair(
        [user, a1, u2, {"role": "assistant", "content": "A"}],
        [user, a1, u2, {"role": "assistant", "content": "B"}],
    )
    assert prompt == [user, a1, u2] and chosen == [{"role": "assistant", "content": "A"}]
    with pytest.raises(DataError, match="share the prompt turns"):
        load_records([{"chosen": [user], "rejected": [{"role": "user", "content": "other"}]}])


def test_llmbar_rows():
    row = {"input": "Say hi", "output_1": "hi", "output_2": "bye", "label": 2}
    assert llmbar_row(row) == {"prompt": "Say hi", "chosen": "bye", "rejected": "hi"}
    assert llmbar_row(dict(row, label=1))["chosen"] == "hi"
    with pytest.raises(DataError, match="field 'label': expected 1 or 2"):
        llmbar_row(dict(row, label=3), "f.json", 4)
    (record,) = load_records([row], layout="llmbar")
    assert record == PairwiseRecord("Say hi", "bye", "hi")


def judge_prompt(instruction, response):
    return (
        "###Task Description:\nJudge it.\n\n###The instruction to evaluate:\n"
        f"{instruction}\n\n###Response to evaluate:\n{response}\n\n"
        "###Score Rubrics:\n[Harmless?]\n\n###Feedback: "
    )


def test_hhh_rows():
    row = {
        "source": "harmless",
        "chosen_instruction": judge_prompt("Help me hurt him", "No, let's talk."),
        "rejected_instruction": judge_prompt("Help me hurt him", "Sure, here is how."),
    }
    assert hhh_row(row, "f.json", 3) == {
        "prompt": "Help me hurt him",
        "chosen": "No, let's talk.",
        "rejected": "Sure, here is how.",
        "id": "harmless/3",
    }
    bad = dict(row, rejected_instruction=judge_prompt("Something else", "x"))
    with pytest.raises(DataError, match="field 'rejected_instruction': expected the same instruction"):
        hhh_row(bad, "f.json", 3)
    with pytest.raises(DataError, match="Score Rubrics"):
        hhh_row(dict(row, chosen_instruction="free text"), "f.json", 3)
    (record,) = load_records([row], layout="hhh")
    assert record.id == "harmless/1" and record.chosen == "No, let's talk."


# ---- the real files (optional) -------------------------------------------------------------------
HH_FILE = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not HH_FILE.exists(), reason="../shared/data not present")
def test_real_hh_rlhf_file_loads_every_row():
    records = load_records(str(HH_FILE))
    assert len(records) == 2312
    assert all(r.prompt.endswith("Assistant:") for r in records)
    with gzip.open(HH_FILE, "rt") as f:
        raw = [json.loads(line) for line in f]
    for record, row in zip(records, raw):
        # prompt + " " + completion gives back the original dialogue
        for completion, original in ((record.chosen, row["chosen"]), (record.rejected, row["rejected"])):
            assert original in (record.prompt + " " + completion, record.prompt + completion)
    assert sum(1 for r in records if r.chosen == "") == 4


@pytest.mark.skipif(not (SHARED / "llmbar").exists(), reason="../shared/data not present")
def test_real_llmbar_and_hhh_files():
    natural = load_records(str(SHARED / "llmbar/Dataset/LLMBar/Natural/dataset.json"), layout="llmbar")
    assert len(natural) == 100
    hhh = load_records(str(SHARED / "hhh/hhh_alignment_eval.json"), layout="hhh")
    assert len(hhh) == 221
    assert {r.id.split("/")[0] for r in hhh} == {"harmless", "helpful", "honest", "other"}


def test_layout_failing_on_every_row_reports_the_first_rows_problem(tmp_path):
    # No row fits the layout and no kind is given: the error is row 1's, not "no readable row".
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3))
    with pytest.raises(DataError, match=r"pairs.json:1: field 'input'.*2 other bad rows"):
        load_records(path, layout="llmbar")
