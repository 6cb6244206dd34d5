"""prefkit.data.tokenize: rendering, special tokens, EOS, truncation, datasets, TRL parity.

Byte tokenizer ids (prefkit.models.tiny): pad 0, bos 1, eos 2, unk 3, then the 256 GPT-2
byte-level characters in sorted order. Printable ASCII other than space (bytes 33..126) therefore
has id ``byte - 29`` ("a" = 97 - 29 = 68); space is 224 and newline 202.
"""

import logging
from types import SimpleNamespace

import pytest

from prefkit.data.records import PairwiseRecord, RatedRecord, UnpairedRecord
from prefkit.data.tokenize import (
    ChatTemplateError,
    OverlongPromptError,
    TokenizationStats,
    render_prompt_completion,
    tokenize_pairwise,
    tokenize_records,
    tokenize_unpaired,
)
from prefkit.models.tiny import build_byte_tokenizer

BOS, EOS, SPACE, NEWLINE = 1, 2, 224, 202


def ascii_ids(text: str) -> list[int]:
    """Hand-checkable ids for printable ASCII without spaces: byte value - 29."""
    assert all(33 <= ord(c) <= 126 for c in text), text
    return [ord(c) - 29 for c in text]


def fresh_tokenizer(chat_template="default"):
    tok = build_byte_tokenizer()
    if chat_template != "default":
        tok.chat_template = chat_template
    return tok


USER_HI = [{"role": "user", "content": "hi"}]
ASSISTANT_YO = [{"role": "assistant", "content": "yo"}]


# ------------------------------------------------------------------------------------------
# exact ids, special tokens, EOS
# ------------------------------------------------------------------------------------------


def test_byte_ids_are_what_the_docstring_says(tokenizer):
    assert tokenizer("Hi", add_special_tokens=False)["input_ids"] == [43, 76]
    assert ascii_ids("Hi") == [43, 76]
    assert tokenizer(" \n", add_special_tokens=False)["input_ids"] == [SPACE, NEWLINE]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_pairwise_plain_text_exact_ids(tokenizer):
    record = PairwiseRecord(prompt="Q: x?", chosen=" yes", rejected=" no")
    out = tokenize_pairwise(record, tokenizer)
    assert out == {
        "prompt_input_ids": [52, 29, SPACE, 91, 34],  # Q : ␠ x ?
        "chosen_input_ids": [SPACE, 92, 72, 86, EOS],  # ␠ y e s </s>
        "rejected_input_ids": [SPACE, 81, 82, EOS],  # ␠ n o </s>
        "weight": 1.0,
        "margin": 0.0,
        "truncated": False,
    }


def test_weight_and_margin_pass_through(tokenizer):
    record = PairwiseRecord(prompt="p", chosen="a", rejected="b", weight=0.25, margin=1.5)
    out = tokenize_pairwise(record, tokenizer)
    assert (out["weight"], out["margin"]) == (0.25, 1.5)


def test_eos_is_not_doubled_when_text_already_ends_with_it(tokenizer):
    record = PairwiseRecord(prompt="p", chosen="ok</s>", rejected="ok")
    out = tokenize_pairwise(record, tokenizer)
    assert out["chosen_input_ids"] == ascii_ids("ok") + [EOS]
    assert out["rejected_input_ids"] == ascii_ids("ok") + [EOS]


def test_plain_text_eos_followed_by_text_gets_a_final_eos(tokenizer):
    # Plain text is taken literally (as TRL does): only a final EOS counts as "already there".
    out = tokenize_pairwise(PairwiseRecord(prompt="p", chosen="a</s>\n", rejected="b"), tokenizer)
    assert out["chosen_input_ids"] == ascii_ids("a") + [EOS, NEWLINE, EOS]


def test_prompt_gets_leading_special_tokens_completion_does_not():
    # A tokenizer whose post-processor adds BOS in front of a text (Llama style).
    from tokenizers import processors

    tok = fresh_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    assert tok("ab")["input_ids"] == [BOS] + ascii_ids("ab")  # the processor is active
    out = tokenize_pairwise(PairwiseRecord(prompt="ab", chosen="c", rejected="d"), tok)
    assert out["prompt_input_ids"] == [BOS] + ascii_ids("ab")
    assert out["chosen_input_ids"] == ascii_ids("c") + [EOS]
    assert out["rejected_input_ids"] == ascii_ids("d") + [EOS]


def test_trailing_special_tokens_of_the_post_processor_are_not_put_on_the_prompt():
    from tokenizers import processors

    tok = fresh_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)]
    )
    out = tokenize_pairwise(PairwiseRecord(prompt="ab", chosen="c", rejected="d"), tok)
    assert out["prompt_input_ids"] == [BOS] + ascii_ids("ab")
    assert out["chosen_input_ids"] == ascii_ids("c") + [EOS]


def test_unpaired_exact_ids(tokenizer):
    out = tokenize_unpaired(UnpairedRecord(prompt="Hi", completion="ok", label=False, weight=2.0), tokenizer)
    assert out == {
        "prompt_input_ids": [43, 76],
        "completion_input_ids": [82, 78, EOS],
        "label": False,
        "weight": 2.0,
        "truncated": False,
    }


def test_unpaired_bad_label(tokenizer):
    with pytest.raises(TypeError, match="label"):
        tokenize_unpaired(UnpairedRecord(prompt="p", completion="c", label="yes"), tokenizer)


def test_tokenizer_without_eos_is_an_error():
    tok = fresh_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_pairwise(PairwiseRecord(prompt="p", chosen="a", rejected="b"), tok)


# ------------------------------------------------------------------------------------------
# chat rendering
# ------------------------------------------------------------------------------------------


def test_render_plain_strings_pass_through(tokenizer):
    assert render_prompt_completion("Q?", " A", tokenizer) == ("Q?", " A")


def test_render_chat_split_point(tokenizer):
    prompt_text, completion_text = render_prompt_completion(USER_HI, ASSISTANT_YO, tokenizer)
    assert prompt_text == "<|user|>\nhi</s>\n<|assistant|>\n"
    assert completion_text == "yo</s>\n"


def test_chat_pairwise_tokens(tokenizer):
    record = PairwiseRecord(prompt=USER_HI, chosen=ASSISTANT_YO, rejected=[{"role": "assistant", "content": "no"}])
    out = tokenize_pairwise(record, tokenizer)
    full = tokenizer.apply_chat_template(USER_HI + ASSISTANT_YO, tokenize=True)["input_ids"]
    gen_prompt = tokenizer.apply_chat_template(USER_HI, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert out["prompt_input_ids"] == gen_prompt
    assert out["prompt_input_ids"] + out["chosen_input_ids"] == full
    # The template closes the turn with "</s>\n": that EOS counts, no second EOS is appended.
    assert out["chosen_input_ids"] == ascii_ids("yo") + [EOS, NEWLINE]
    assert tokenizer.decode(out["chosen_input_ids"]) == "yo</s>\n"
    assert tokenizer.decode(out["rejected_input_ids"]) == "no</s>\n"
    assert out["chosen_input_ids"].count(EOS) == 1


def test_chat_template_without_eos_gets_an_eos_appended():
    tok = fresh_tokenizer(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    out = tokenize_pairwise(PairwiseRecord(prompt=USER_HI, chosen=ASSISTANT_YO, rejected=ASSISTANT_YO), tok)
    assert tok.decode(out["prompt_input_ids"]) == "[user]hi\n[assistant]"
    assert out["chosen_input_ids"] == ascii_ids("yo") + [NEWLINE, EOS]


def test_message_prompt_with_string_completion(tokenizer):
    prompt_text, completion_text = render_prompt_completion(USER_HI, "yo", tokenizer)
    assert (prompt_text, completion_text) == ("<|user|>\nhi</s>\n<|assistant|>\n", "yo")
    out = tokenize_unpaired(UnpairedRecord(prompt=USER_HI, completion="yo", label=True), tokenizer)
    assert tokenizer.decode(out["prompt_input_ids"]) == prompt_text
    assert out["completion_input_ids"] == ascii_ids("yo") + [EOS]


def test_string_prompt_with_message_completion_is_an_error(tokenizer):
    with pytest.raises(TypeError, match="plain-text prompt"):
        render_prompt_completion("hi", ASSISTANT_YO, tokenizer)


def test_messages_without_chat_template_is_an_error():
    tok = fresh_tokenizer(chat_template=None)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_prompt_completion(USER_HI, ASSISTANT_YO, tok)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenize_pairwise(PairwiseRecord(prompt=USER_HI, chosen="a", rejected="b"), tok)


def test_template_that_is_not_prefix_stable_is_an_error():
    # The generation prompt opens a thinking block that the rendered conversation does not have.
    tok = fresh_tokenizer(
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="not prefix-stable"):
        render_prompt_completion(USER_HI, ASSISTANT_YO, tok)


def test_bad_text_type(tokenizer):
    with pytest.raises(TypeError, match="prompt must be"):
        render_prompt_completion(3, "a", tokenizer)


# ------------------------------------------------------------------------------------------
# truncation
# ------------------------------------------------------------------------------------------


def test_prompt_truncation_keep_end_and_keep_start(tokenizer):
    record = PairwiseRecord(prompt="abcdefgh", chosen="x", rejected="y")
    end = tokenize_pairwise(record, tokenizer, max_prompt_length=3)
    assert end["prompt_input_ids"] == ascii_ids("fgh")
    assert end["truncated"] is True
    assert end["chosen_input_ids"] == ascii_ids("x") + [EOS]  # completions untouched
    start = tokenize_pairwise(record, tokenizer, max_prompt_length=3, prompt_truncation="keep_start")
    assert start["prompt_input_ids"] == ascii_ids("abc")
    exact = tokenize_pairwise(record, tokenizer, max_prompt_length=8)
    assert exact["prompt_input_ids"] == ascii_ids("abcdefgh") and exact["truncated"] is False


def test_prompt_keep_end_keeps_a_leading_bos():
    tok = fresh_tokenizer(
        "<s>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    out = tokenize_pairwise(PairwiseRecord(prompt=USER_HI, chosen="a", rejected="b"), tok, max_prompt_length=4)
    assert out["prompt_input_ids"] == [BOS] + ascii_ids("t|>")  # BOS + the last 3 tokens of "...<|assistant|>"


def test_completion_truncation_keep_start_drops_eos(tokenizer):
    record = PairwiseRecord(prompt="abc", chosen="defgh", rejected="z")
    out = tokenize_pairwise(record, tokenizer, max_length=5)
    assert out["prompt_input_ids"] == ascii_ids("abc")
    assert out["chosen_input_ids"] == ascii_ids("de")  # cut to 5 - 3 = 2 tokens; the EOS is gone
    assert out["rejected_input_ids"] == ascii_ids("z") + [EOS]  # 2 tokens: fits
    assert out["truncated"] is True


def test_completion_truncation_keep_end_keeps_eos(tokenizer):
    record = PairwiseRecord(prompt="abc", chosen="defgh", rejected="z")
    out = tokenize_pairwise(record, tokenizer, max_length=5, completion_truncation="keep_end")
    assert out["chosen_input_ids"] == ascii_ids("h") + [EOS]


def test_prompt_then_completion_truncation(tokenizer):
    record = UnpairedRecord(prompt="abcdefgh", completion="ijklmn", label=True)
    out = tokenize_unpaired(record, tokenizer, max_prompt_length=4, max_length=7)
    assert out["prompt_input_ids"] == ascii_ids("efgh")
    assert out["completion_input_ids"] == ascii_ids("ijk")
    assert out["truncated"] is True


def test_no_truncation_when_it_fits(tokenizer):
    out = tokenize_pairwise(
        PairwiseRecord(prompt="ab", chosen="c", rejected="d"), tokenizer, max_length=4, max_prompt_length=2
    )
    assert out["truncated"] is False
    assert out["chosen_input_ids"] == ascii_ids("c") + [EOS]


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"max_length": 8, "max_prompt_length": 8}, "must be smaller than max_length"),
        ({"max_length": 8, "max_prompt_length": 9}, "must be smaller than max_length"),
        ({"max_length": 0}, "positive int"),
        ({"max_prompt_length": -1}, "positive int"),
        ({"max_length": True}, "positive int"),
        ({"max_length": 8.0}, "positive int"),
        ({"prompt_truncation": "left"}, "prompt_truncation must be one of"),
        ({"completion_truncation": "keep_middle"}, "completion_truncation must be one of"),
    ],
)
def test_bad_settings(tokenizer, settings, match):
    record = PairwiseRecord(prompt="p", chosen="a", rejected="b")
    with pytest.raises(ValueError, match=match):
        tokenize_pairwise(record, tokenizer, **settings)
    with pytest.raises(ValueError, match=match):
        tokenize_records([record], tokenizer, progress=False, **settings)


def test_overlong_prompt_without_max_prompt_length(tokenizer):
    record = PairwiseRecord(prompt="abcd", chosen="e", rejected="f")
    with pytest.raises(OverlongPromptError, match="4 tokens, max_length is 4"):
        tokenize_pairwise(record, tokenizer, max_length=4)
    assert tokenize_pairwise(record, tokenizer, max_length=5)["chosen_input_ids"] == ascii_ids("e")


# ------------------------------------------------------------------------------------------
# tokenize_records
# ------------------------------------------------------------------------------------------


def test_tokenize_records_pairwise_dataset_and_stats(tokenizer, caplog):
    records = [
        PairwiseRecord(prompt="ab", chosen="c", rejected="d", weight=2.0, user_id="u1"),
        PairwiseRecord(prompt="abcdefgh", chosen="x", rejected="y"),  # prompt cut
        PairwiseRecord(prompt="ab", chosen="cdefghij", rejected="d", margin=0.5, user_id="u2"),  # chosen cut
    ]
    with caplog.at_level(logging.INFO, logger="prefkit.data"):
        ds, stats = tokenize_records(records, tokenizer, max_length=6, max_prompt_length=4, progress=False)
    assert stats == TokenizationStats(
        kind="pairwise", n_records=3, n_rows=3, n_truncated=2, n_prompt_truncated=1, n_completion_truncated=1
    )
    assert ds.column_names == [
        "prompt_input_ids",
        "chosen_input_ids",
        "rejected_input_ids",
        "weight",
        "margin",
        "truncated",
        "user_id",
    ]
    assert ds["prompt_input_ids"] == [ascii_ids("ab"), ascii_ids("efgh"), ascii_ids("ab")]
    assert ds["chosen_input_ids"] == [ascii_ids("c") + [EOS], ascii_ids("x") + [EOS], ascii_ids("cdef")]
    assert ds["weight"] == [2.0, 1.0, 1.0]
    assert ds["margin"] == [0.0, 0.0, 0.5]
    assert ds["truncated"] == [False, True, True]
    assert ds["user_id"] == ["u1", None, "u2"]
    warnings = [r for r in caplog.records if r.name == "prefkit.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "3 rows: 2 truncated (1 with the prompt cut" in warnings[0].getMessage()
    assert "1 with a completion cut by max_length=6" in warnings[0].getMessage()


def test_tokenize_records_logs_info_when_nothing_is_cut(tokenizer, caplog):
    records = [UnpairedRecord(prompt="ab", completion="c", label=True)]
    with caplog.at_level(logging.INFO, logger="prefkit.data"):
        ds, stats = tokenize_records(records, tokenizer, progress=False)
    assert stats.n_truncated == 0 and stats.n_rows == 1
    assert "user_id" not in ds.column_names  # no record had one
    assert ds.column_names == ["prompt_input_ids", "completion_input_ids", "label", "weight", "truncated"]
    assert ds[0] == {
        "prompt_input_ids": ascii_ids("ab"),
        "completion_input_ids": ascii_ids("c") + [EOS],
        "label": True,
        "weight": 1.0,
        "truncated": False,
    }
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "prefkit.data"]
    assert messages == [(logging.INFO, messages[0][1])]
    assert "0 truncated" in messages[0][1] and "0 dropped" in messages[0][1]


def test_tokenize_records_drops_overlong_prompts_and_says_so(tokenizer, caplog):
    records = [
        UnpairedRecord(prompt="ab", completion="c", label=True),
        UnpairedRecord(prompt="abcdef", completion="c", label=False),
        UnpairedRecord(prompt="abc", completion="c", label=False),
    ]
    with caplog.at_level(logging.WARNING, logger="prefkit.data"):
        ds, stats = tokenize_records(records, tokenizer, max_length=4, progress=False)
    assert (stats.n_rows, stats.n_dropped, stats.dropped_indices) == (2, 1, [1])
    assert ds["prompt_input_ids"] == [ascii_ids("ab"), ascii_ids("abc")]
    assert ds["completion_input_ids"] == [ascii_ids("c") + [EOS], ascii_ids("c")]  # second one cut: EOS lost
    message = caplog.records[-1].getMessage()
    assert "1 dropped" in message and "record indices 1" in message
    with pytest.raises(OverlongPromptError, match="record 1"):
        tokenize_records(records, tokenizer, max_length=4, drop_overlong_prompts=False, progress=False)


def test_tokenize_records_chat_errors_name_the_record():
    tok = fresh_tokenizer(chat_template=None)
    records = [
        PairwiseRecord(prompt="p", chosen="a", rejected="b"),
        PairwiseRecord(prompt=USER_HI, chosen=ASSISTANT_YO, rejected=ASSISTANT_YO),
    ]
    with pytest.raises(ChatTemplateError, match="record 1: .*no chat template"):
        tokenize_records(records, tok, progress=False)


def test_tokenize_records_rejects_mixed_empty_and_other_kinds(tokenizer):
    pair = PairwiseRecord(prompt="p", chosen="a", rejected="b")
    single = UnpairedRecord(prompt="p", completion="a", label=True)
    with pytest.raises(ValueError, match="mixed record kinds: pairwise .*index 0.*unpaired .*index 1"):
        tokenize_records([pair, single], tokenizer, progress=False)
    with pytest.raises(ValueError, match="no records"):
        tokenize_records([], tokenizer, progress=False)
    with pytest.raises(TypeError, match="record 1 is a RatedRecord"):
        tokenize_records([pair, RatedRecord(prompt="p", completion="a", ratings={"x": 1.0})], tokenizer)


def test_tokenize_records_progress_bar(tokenizer, capsys):
    records = [PairwiseRecord(prompt="p", chosen="a", rejected="b")]
    tokenize_records(records, tokenizer, progress=False)
    assert "Tokenizing" not in capsys.readouterr().err
    tokenize_records(records, tokenizer, progress=True)
    assert "Tokenizing pairwise records" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# TRL parity (plain text): the same tokenizer and settings give the same token ids
# ------------------------------------------------------------------------------------------

PARITY_ROWS = {
    "prompt": ["Q: x?", "Translate: chat ->", "ab", "a long prompt that fills max_length", "", "naïve é"],
    "chosen": [" yes", " cat</s>", "cdefghijklmnopqrstuvwxyz", " fine", "solo", " 日本"],
    "rejected": [" no", " dog", "c", " bad", "x</s>", " ok"],
}


def _trl_prepare(trainer_cls, config, dataset, tok, **self_attrs):
    """Run TRL's own dataset preparation (tokenization) without building a whole trainer."""
    fake_self = SimpleNamespace(_tokenizer=tok, **self_attrs)
    return trainer_cls._prepare_dataset(fake_self, dataset, tok, config, "train")


def test_trl_dpo_token_id_parity(tokenizer, tmp_path):
    pytest.importorskip("trl")
    import datasets
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    from prefkit.data.collators import PairwiseCollator

    datasets.disable_progress_bars()
    records = [PairwiseRecord(prompt=p, chosen=c, rejected=r) for p, c, r in zip(*PARITY_ROWS.values())]
    raw = datasets.Dataset.from_dict(PARITY_ROWS)

    # 1. Without truncation: identical prompt / chosen / rejected ids, row for row.
    config = DPOConfig(output_dir=str(tmp_path), max_length=None, bf16=False, report_to=[])
    trl_ds = _trl_prepare(DPOTrainer, config, raw, tokenizer)
    ours, _ = tokenize_records(records, tokenizer, progress=False)
    assert trl_ds["prompt_ids"] == ours["prompt_input_ids"]
    assert trl_ds["chosen_ids"] == ours["chosen_input_ids"]
    assert trl_ds["rejected_ids"] == ours["rejected_input_ids"]

    # 2. With max_length: TRL drops rows whose prompt fills max_length and cuts prompt+completion
    # to its first max_length tokens in its collator; prefkit does both at tokenization. The
    # collated batches must be identical.
    max_length = 20
    config = DPOConfig(output_dir=str(tmp_path), max_length=max_length, bf16=False, report_to=[])
    trl_ds = _trl_prepare(DPOTrainer, config, raw, tokenizer)
    ours, stats = tokenize_records(records, tokenizer, max_length=max_length, progress=False)
    assert stats.dropped_indices == [3] and len(trl_ds) == len(ours) == 5
    assert stats.n_completion_truncated >= 1
    trl_batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)(
        [trl_ds[i] for i in range(len(trl_ds))]
    )
    our_batch = PairwiseCollator(tokenizer.pad_token_id)([ours[i] for i in range(len(ours))])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert our_batch[key].tolist() == trl_batch[key].tolist(), key


def test_trl_kto_token_id_parity(tokenizer, tmp_path):
    pytest.importorskip("trl")
    import datasets
    from trl import KTOConfig
    from trl.trainer.kto_trainer import KTOTrainer

    datasets.disable_progress_bars()
    rows = {
        "prompt": PARITY_ROWS["prompt"],
        "completion": PARITY_ROWS["chosen"],
        "label": [True, False, True, False, True, False],
    }
    records = [UnpairedRecord(prompt=p, completion=c, label=l) for p, c, l in zip(*rows.values())]
    config = KTOConfig(output_dir=str(tmp_path), max_length=None, bf16=False, report_to=[])
    trl_ds = _trl_prepare(KTOTrainer, config, datasets.Dataset.from_dict(rows), tokenizer, calculate_KL=False)
    ours, _ = tokenize_records(records, tokenizer, progress=False)
    assert trl_ds["prompt_ids"] == ours["prompt_input_ids"]
    assert trl_ds["completion_ids"] == ours["completion_input_ids"]
    assert trl_ds["label"] == ours["label"]
