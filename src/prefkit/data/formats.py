"""Layouts of public preference datasets and how to turn them into prefkit rows.

* HH-RLHF "implicit prompt" pairs (Anthropic/hh-rlhf): ``chosen`` and ``rejected`` are whole
  dialogues ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` sharing everything up to the final reply.
  `split_hh_pair` cuts them into prompt + two completions; `load_records` does it on its own when
  a pairwise row has no prompt. `hh_to_messages` / `hh_pair_to_messages` turn such text into chat
  messages.
* Chat-message pairs without a prompt (``chosen``/``rejected`` full conversations):
  `split_message_pair` cuts at the last shared turn before the two assistant replies.
* LLMBar ``{input, output_1, output_2, label}`` (`llmbar_row`) and the HHH alignment pairs wrapped
  in a Prometheus judge prompt ``{source, chosen_instruction, rejected_instruction}``
  (`hhh_row`). `LAYOUTS` maps a layout name to its row adapter; pass ``layout=`` to
  `load_records` or ``--layout`` to the ``prefkit data`` commands.
* Evaluation layouts (docs/evaluation.md): ``hh`` (`hh_row`: HH-RLHF pairs, checked), RewardBench 2
  best-of-N ``{prompt, chosen: [1], rejected: [3], subset}`` (`rewardbench2_row`) and the RM-Bench
  style grid ``{prompt, chosen: [3 styles], rejected: [3 styles], domain}`` (`rmbench_row`); the
  last two become ranked rows (chosen scored 1, rejected 0).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from prefkit.data.records import MISSING, DataError, Message, PairwiseRecord

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

_TURN = re.compile(r"\n\n(Human|Assistant):")


# ---- HH-RLHF ----------------------------------------------------------------------------------
def looks_like_hh(text: Any) -> bool:
    """True for a string shaped like an HH-RLHF dialogue: starts with a ``Human:`` turn (after
    optional leading whitespace) and holds at least one ``\\n\\nAssistant:`` turn."""
    return isinstance(text, str) and text.lstrip().startswith("Human:") and ASSISTANT in text


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF dialogues into ``(prompt, chosen, rejected)``.

    The prompt is the longest common prefix of the two texts, cut back to end with the last
    ``\\n\\nAssistant:`` marker it contains (the marker is kept, so the prompt ends with
    ``Assistant:``). The completions are the rest of each text with one leading space removed.
    This is right when the two replies diverge mid-sentence (``" I think"`` vs ``" I am"``) and
    when one reply is empty.

    Raises ``ValueError`` when the two texts share no assistant turn.
    """
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(ASSISTANT, 0, shared)  # the last marker lying wholly inside the shared part
    if cut < 0:
        raise ValueError("the two dialogues share no '\\n\\nAssistant:' turn")
    end = cut + len(ASSISTANT)
    prompt = chosen[:end]
    return prompt, _drop_space(chosen[end:]), _drop_space(rejected[end:])


def _drop_space(text: str) -> str:
    return text.removeprefix(" ")


def hh_to_messages(text: str, first_role: str = "user") -> list[Message]:
    """Parse HH-RLHF dialogue text into chat messages.

    ``\\n\\nHuman:`` turns become ``user`` messages and ``\\n\\nAssistant:`` turns ``assistant``
    messages, contents stripped of surrounding whitespace. Text before the first marker belongs to
    ``first_role`` (use ``"assistant"`` for a completion cut from a dialogue); it is dropped when
    empty. A final empty assistant turn (the ``Assistant:`` a split prompt ends with) is dropped,
    so a prompt becomes the conversation the reply answers.
    """
    if first_role not in ("user", "assistant"):
        raise ValueError(f"first_role must be 'user' or 'assistant', got {first_role!r}")
    stripped = text.lstrip()
    if stripped.startswith("Human:") or stripped.startswith("Assistant:"):
        text = "\n\n" + stripped
    parts = _TURN.split(text)
    messages: list[Message] = []
    head = parts[0].strip()
    if head:
        messages.append({"role": first_role, "content": head})
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"] and len(messages) > 1:
        messages.pop()
    return messages


def hh_pair_to_messages(record: PairwiseRecord) -> PairwiseRecord:
    """A copy of a split HH-RLHF pair (plain-text prompt ending in ``Assistant:``) as chat
    messages: the prompt becomes the user/assistant turns, each completion its assistant turn(s).
    Other fields are kept."""
    if not all(isinstance(t, str) for t in (record.prompt, record.chosen, record.rejected)):
        raise ValueError("hh_pair_to_messages expects a plain-text HH-RLHF pair")
    if not record.prompt.rstrip().endswith("Assistant:"):
        raise ValueError("hh_pair_to_messages expects a prompt ending with 'Assistant:' (a split HH-RLHF pair)")
    prompt = hh_to_messages(record.prompt)
    chosen = hh_to_messages(record.chosen, first_role="assistant") or [{"role": "assistant", "content": ""}]
    rejected = hh_to_messages(record.rejected, first_role="assistant") or [{"role": "assistant", "content": ""}]
    return PairwiseRecord(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        user_id=record.user_id,
        margin=record.margin,
        weight=record.weight,
        chosen_score=record.chosen_score,
        rejected_score=record.rejected_score,
        id=record.id,
    )


# ---- chat-message pairs without a prompt --------------------------------------------------------
def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def split_message_pair(chosen: list[Message], rejected: list[Message]) -> tuple[list, list, list]:
    """Split two full conversations into ``(prompt, chosen, rejected)`` message lists.

    The prompt is the longest run of identical leading messages after which both conversations
    continue with an assistant message; the completions are the rest. Raises ``ValueError`` when
    there is no such non-empty prompt.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = shared
    while cut > 0:
        if cut < len(chosen) and cut < len(rejected):
            if chosen[cut].get("role") == "assistant" and rejected[cut].get("role") == "assistant":
                break
        cut -= 1
    if cut == 0:
        raise ValueError("the two conversations share no turns followed by an assistant reply in both")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_implicit_prompt(row: dict, file: str | None, row_number: int | None) -> dict:
    """If a pairwise ``row`` has no prompt and its chosen/rejected hold one (HH-RLHF text, chat
    messages, or TRL's plain strings that begin with the same prompt), return a copy with ``prompt``,
    ``chosen`` and ``rejected`` split; otherwise return the row unchanged. Raises `DataError` when the
    layout is recognised but the split fails."""
    if row.get("prompt") is not None:
        return row
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for applies, split, field_name, expected, got in _IMPLICIT_PROMPT_LAYOUTS:  # first match wins
        if applies(chosen) and applies(rejected):
            try:
                prompt, chosen, rejected = split(chosen, rejected)
            except ValueError:
                raise DataError(file, row_number, field_name, expected, got) from None
            out = dict(row)
            out.update(prompt=prompt, chosen=chosen, rejected=rejected)
            return out
    return row


def split_text_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit-prompt pair of plain strings as ``(prompt, chosen, rejected)``.

    The prompt is the longest common prefix, moved back to the start of the word where the two texts
    first differ, so both completions start with that whitespace (``"Q: 2+2? A: 4"`` / ``"Q: 2+2? A: 5"``
    -> ``"Q: 2+2? A:"``, ``" 4"``, ``" 5"``). TRL cuts at the first differing character instead (``"The
    ca"`` + ``"t"`` / ``"r"``); cutting at a word keeps the completions' tokens what the model would
    write. ``ValueError`` when the texts share no word (or one is a prefix of the other).
    """
    k = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        k += 1
    if k == len(chosen) or k == len(rejected):
        raise ValueError("one text is a prefix of the other: no completion is left to compare")
    cut = max(chosen.rfind(ch, 0, k + 1) for ch in (" ", "\n", "\t"))
    if cut <= 0:
        raise ValueError("the texts share no prompt")
    return chosen[:cut], chosen[cut:], rejected[cut:]


# (both texts look like this, splitter, field, expected, got) for rows without a prompt
_IMPLICIT_PROMPT_LAYOUTS = (
    (
        looks_like_hh,
        split_hh_pair,
        "chosen",
        "HH-RLHF dialogues that share a prefix ending with '\\n\\nAssistant:' (the prompt)",
        "dialogues that differ before any shared assistant turn",
    ),
    (
        _is_message_list,
        split_message_pair,
        "chosen",
        "chat-message conversations that share the prompt turns and then both continue with an assistant message",
        "conversations with no shared turns before the replies",
    ),
    (
        lambda text: isinstance(text, str),
        split_text_pair,
        "prompt",
        "a prompt, or chosen and rejected texts that begin with the same prompt (TRL's implicit-prompt form)",
        "no prompt, and texts that differ from their first word",
    ),
)


# ---- LLMBar -------------------------------------------------------------------------------------
def llmbar_row(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
    """An LLMBar row ``{input, output_1, output_2, label}`` as a pairwise row.

    ``label`` 1 means ``output_1`` is preferred, 2 means ``output_2``. Other keys are kept.
    """
    for key in ("input", "output_1", "output_2"):
        if row.get(key) is None:
            raise DataError(
                file, row_number, key, "a string (LLMBar layout: input, output_1, output_2, label)", MISSING
            )
    label = row.get("label")
    if label not in (1, 2) or isinstance(label, bool):
        raise DataError(
            file,
            row_number,
            "label",
            "1 or 2 (which output is preferred, LLMBar layout)",
            label if label is not None else MISSING,
        )
    out = {k: v for k, v in row.items() if k not in ("input", "output_1", "output_2", "label")}
    first, second = row["output_1"], row["output_2"]
    out.update(prompt=row["input"], chosen=first if label == 1 else second, rejected=second if label == 1 else first)
    return out


# ---- HHH alignment (Prometheus judge wrapping) --------------------------------------------------
_HHH_PARTS = re.compile(
    r"###The instruction to evaluate:\n(?P<instruction>.*?)\n\n###Response to evaluate:\n"
    r"(?P<response>.*?)\n\n###Score Rubrics:",
    re.DOTALL,
)


def _hhh_parts(text: Any, field: str, file: str | None, row_number: int | None) -> tuple[str, str]:
    expected = (
        "a judge prompt holding '###The instruction to evaluate:', '###Response to evaluate:' "
        "and '###Score Rubrics:' sections (HHH layout)"
    )
    if not isinstance(text, str):
        raise DataError(file, row_number, field, expected, text if text is not None else MISSING)
    match = _HHH_PARTS.search(text)
    if match is None:
        raise DataError(file, row_number, field, expected, text)
    return match.group("instruction"), match.group("response")


def hhh_row(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
    """A row of the HHH alignment set in the Prometheus judge layout
    ``{source?, chosen_instruction, rejected_instruction}`` as a pairwise row.

    The prompt is the instruction under evaluation (it must be the same in both), chosen and
    rejected the two responses. ``source`` (harmless/helpful/honest/other) is kept as the id
    ``"{source}/{row_number}"`` so results can be grouped by subset.
    """
    prompt, chosen = _hhh_parts(row.get("chosen_instruction"), "chosen_instruction", file, row_number)
    prompt_r, rejected = _hhh_parts(row.get("rejected_instruction"), "rejected_instruction", file, row_number)
    if prompt != prompt_r:
        raise DataError(
            file,
            row_number,
            "rejected_instruction",
            "the same instruction under evaluation as in 'chosen_instruction'",
            prompt_r,
        )
    out = {k: v for k, v in row.items() if k not in ("chosen_instruction", "rejected_instruction", "source")}
    out.update(prompt=prompt, chosen=chosen, rejected=rejected)
    source = row.get("source")
    if source is not None and out.get("id") is None:
        out["id"] = f"{source}/{row_number}" if row_number is not None else str(source)
    return out


# ---- HH-RLHF rows, checked ---------------------------------------------------------------------
def hh_row(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
    """An HH-RLHF row ``{chosen, rejected}`` (two whole ``Human:``/``Assistant:`` dialogues) as a
    pairwise row with the shared prefix as its prompt (`split_hh_pair`). Unlike the automatic split
    of `load_records`, a row of another shape is an error. Other keys are kept."""
    for key in ("chosen", "rejected"):
        if not looks_like_hh(row.get(key)):
            raise DataError(
                file,
                row_number,
                key,
                "an HH-RLHF dialogue '\\n\\nHuman: ...\\n\\nAssistant: ...' (HH layout)",
                row.get(key, MISSING),
            )
    return split_implicit_prompt({k: v for k, v in row.items() if k != "prompt"}, file, row_number)


# ---- evaluation layouts: best-of-N and style grids -------------------------------------------------
def _text_list(row: dict, key: str, layout: str, file: str | None, row_number: int | None) -> list:
    value = row.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(t, (str, list)) for t in value):
        got = MISSING if value is None else value
        raise DataError(file, row_number, key, f"a non-empty list of responses ({layout} layout)", got)
    return value


def rewardbench2_row(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
    """A RewardBench 2 row ``{prompt, chosen: [c], rejected: [r1, r2, r3], subset?}`` as a ranked row.

    ``completions`` = chosen + rejected and ``scores`` = 1 for each chosen, 0 for each rejected,
    so the record says "the chosen responses beat every rejected one" and no more. Other keys
    (``subset``, ``id``, ...) are kept. Best-of-N evaluation (`prefkit eval rm --layout
    rewardbench2`) takes the completion scored 1 as the one correct answer among N.
    """
    chosen = _text_list(row, "chosen", "rewardbench2", file, row_number)
    rejected = _text_list(row, "rejected", "rewardbench2", file, row_number)
    out = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    out.update(completions=chosen + rejected, scores=[1.0] * len(chosen) + [0.0] * len(rejected))
    return out


def rmbench_row(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
    """An RM-Bench row ``{prompt, chosen: [s1, s2, s3], rejected: [s1, s2, s3], domain | subset}`` as
    a ranked row.

    The styles, in RM-Bench's order, are concise, detailed plain text, detailed markdown; chosen and
    rejected must have the same number of styles. ``completions`` = chosen styles then rejected
    styles (same order), ``scores`` = 1 for chosen, 0 for rejected. RM-Bench's ``domain`` (chat,
    code, math, safety-refuse, safety-response) becomes ``subset`` when the row has none.
    """
    chosen = _text_list(row, "chosen", "rmbench", file, row_number)
    rejected = _text_list(row, "rejected", "rmbench", file, row_number)
    if len(chosen) != len(rejected) or len(chosen) < 2:
        raise DataError(
            file,
            row_number,
            "rejected",
            f"as many rejected styles as chosen ones, at least 2 (rmbench layout; chosen has {len(chosen)})",
            f"{len(rejected)} responses",
        )
    out = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    out.update(completions=chosen + rejected, scores=[1.0] * len(chosen) + [0.0] * len(rejected))
    if out.get("subset") is None and row.get("domain") is not None:
        out["subset"] = row["domain"]
    return out


RowAdapter = Callable[[dict, "str | None", "int | None"], dict]

LAYOUTS: dict[str, RowAdapter] = {
    "hh": hh_row,
    "llmbar": llmbar_row,
    "hhh": hhh_row,
    "rewardbench2": rewardbench2_row,
    "rmbench": rmbench_row,
}
