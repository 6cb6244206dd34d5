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
    (``subset``, ``id``, ...) are kept; ``num_correct``, when present, must count the chosen responses. Best-of-N
    evaluation (`prefkit eval rm --layout rewardbench2`) takes the completion scored 1 as the one correct answer
    among N; the Ties subset (ids ``ref:<k>`` / ``tied:<k>``, several correct answers) is scored by its own rule.
    """
    chosen = _text_list(row, "chosen", "rewardbench2", file, row_number)
    rejected = _text_list(row, "rejected", "rewardbench2", file, row_number)
    n_correct = row.get("num_correct")
    if n_correct is not None and n_correct != len(chosen):
        raise DataError(
            file, row_number, "num_correct", f"the number of chosen responses ({len(chosen)}; rewardbench2)", n_correct
        )
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


# ---- stepwise (process supervision) layouts ------------------------------------------------------
def _step_row(row: dict, drop: tuple[str, ...], prompt: Any, steps: list, labels: list) -> dict:
    out = {k: v for k, v in row.items() if k not in drop}
    out.update(prompt=prompt, completions=steps, labels=labels)
    return out


def _require_text(row: dict, key: str, what: str, file: str | None, row_number: int | None) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(file, row_number, key, f"a non-empty string ({what})", MISSING if value is None else value)
    return value


def _require_steps(row: dict, key: str, what: str, file: str | None, row_number: int | None) -> list[str]:
    value = row.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise DataError(
            file, row_number, key, f"a non-empty list of step texts ({what})", MISSING if value is None else value
        )
    return value


def joined_steps_row(
    row: dict, file: str | None = None, row_number: int | None = None, separator: str = "\n\n"
) -> dict:
    """A stepwise row whose ``completions`` is one text with its steps joined by ``separator`` (layout
    ``joined``: a blank line; ``joined:SEP`` for another, with ``\\n`` and ``\\t`` escapes): split into the
    list of steps (empty pieces dropped). ``labels`` must then have one entry per piece."""
    text = _require_text(row, "completions", f"the steps joined by {separator!r}, joined layout", file, row_number)
    steps = [piece for piece in text.split(separator) if piece.strip()]
    return _step_row(row, ("completions",), row.get("prompt"), steps, row.get("labels"))


MATH_SHEPHERD_TAG = "ки"


def math_shepherd_row(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
    """A Math-Shepherd row ``{input, label, task?}`` as a stepwise row.

    ``input`` is the question followed by the solution, each step ending with the tag ``ки``;
    ``label`` is the same text with each tag replaced by ``+`` (the step is correct) or ``-``.
    The prompt is the text before ``Step 1:`` (or before the first step when there is no such
    marker: everything up to the first line break), the steps are the tagged pieces, stripped.
    """
    text = _require_text(row, "input", "Math-Shepherd layout: question and steps tagged 'ки'", file, row_number)
    label = _require_text(row, "label", "Math-Shepherd layout: the input with each 'ки' as + or -", file, row_number)
    tags = [m.start() for m in re.finditer(MATH_SHEPHERD_TAG, text)]
    if not tags:
        raise DataError(file, row_number, "input", f"at least one step tag {MATH_SHEPHERD_TAG!r}", text)
    labels = []
    for k, at in enumerate(tags):
        mark = label[at - k * (len(MATH_SHEPHERD_TAG) - 1)] if at - k < len(label) else None
        if mark not in ("+", "-"):
            raise DataError(file, row_number, "label", f"'+' or '-' where 'input' has step tag {k + 1}", label)
        labels.append(mark == "+")
    start = text.find("Step 1:")
    if start < 0:
        start = text.find("\n") + 1
    prompt, pieces = text[:start].strip(), text[start:].split(MATH_SHEPHERD_TAG)[: len(tags)]
    steps = [piece.strip() for piece in pieces]
    if not prompt or not all(steps):
        raise DataError(file, row_number, "input", "a question, then non-empty steps each ending in 'ки'", text)
    return _step_row(row, ("input", "label"), prompt, steps, labels)


def prm800k_row(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
    """A PRM800K row ``{question: {problem}, label: {steps: [{completions: [{text, rating}], chosen_completion,
    human_completion}]}}`` as a stepwise row.

    Each step is its chosen completion (``chosen_completion``), else the human's rewrite, else its first
    completion, and the solution ends at the first step without a chosen one. Ratings: 1 (good) and 0
    (neutral) are correct, -1 wrong (Lightman et al. count neutral steps as correct in their main
    setting); a human rewrite is correct.
    """
    question, label = row.get("question"), row.get("label")
    if not isinstance(question, dict) or not isinstance(question.get("problem"), str):
        raise DataError(file, row_number, "question", "an object with a 'problem' text (PRM800K layout)", question)
    if not isinstance(label, dict) or not isinstance(label.get("steps"), list) or not label["steps"]:
        raise DataError(file, row_number, "label", "an object with a non-empty 'steps' list (PRM800K layout)", label)
    steps, labels = [], []
    for k, step in enumerate(label["steps"], start=1):
        where = f"label.steps[{k}]"
        completions = step.get("completions") if isinstance(step, dict) else None
        if not isinstance(completions, list) or not completions:
            raise DataError(file, row_number, where, "an object with a non-empty 'completions' list", step)
        chosen, human = step.get("chosen_completion"), step.get("human_completion")
        if isinstance(chosen, int) and not isinstance(chosen, bool) and 0 <= chosen < len(completions):
            pick, last = completions[chosen], False
        elif isinstance(human, dict) and isinstance(human.get("text"), str):
            pick, last = dict(human, rating=1), False
        else:
            pick, last = completions[0], True
        text, rating = (
            pick.get("text") if isinstance(pick, dict) else None,
            pick.get("rating") if isinstance(pick, dict) else None,
        )
        if not isinstance(text, str) or rating not in (-1, 0, 1) or isinstance(rating, bool):
            raise DataError(file, row_number, where, "a completion with a 'text' and a 'rating' of -1, 0 or 1", pick)
        steps.append(text)
        labels.append(rating >= 0)
        if last:
            break
    return _step_row(row, ("question", "label"), question["problem"], steps, labels)


def processbench_row(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
    """A ProcessBench row ``{id, problem, steps, label, final_answer_correct?}`` as a stepwise row.

    ``label`` is the 0-based index of the first wrong step, -1 when every step is right. The steps after
    the first wrong one carry no label in ProcessBench, so they are left out: the record holds steps
    ``0..label`` with labels ``[True] * label + [False]`` (all steps, all True, for -1). ProcessBench's
    metric depends only on the steps up to the first wrong one, so it is unchanged by the cut.
    """
    problem = _require_text(row, "problem", "ProcessBench layout", file, row_number)
    steps = _require_steps(row, "steps", "ProcessBench layout", file, row_number)
    first = row.get("label")
    if isinstance(first, bool) or not isinstance(first, int) or not -1 <= first < len(steps):
        raise DataError(
            file,
            row_number,
            "label",
            f"the index of the first wrong step, -1 to {len(steps) - 1} (ProcessBench layout)",
            MISSING if first is None else first,
        )
    if first >= 0:
        steps, labels = steps[: first + 1], [True] * first + [False]
    else:
        labels = [True] * len(steps)
    return _step_row(row, ("problem", "steps", "label"), problem, steps, labels)


def prmbench_row(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
    """A PRMBench row ``{modified_question, modified_process, error_steps, classification, idx, ...}`` as a
    stepwise row, as PRMBench's own evaluation reads it.

    The prompt is ``modified_question``, the steps ``modified_process``; step ``k`` (1-based, as in
    ``error_steps``) is wrong when ``k`` is in ``error_steps``. Error indices past the last step (about 100
    of PRMBench's 6,216 rows have one) are ignored, as PRMBench's scorer ignores them. Empty steps are
    dropped with their labels (prefkit's records hold no empty step; PRMBench has 15 in 3 rows, all
    labelled correct, which its scorer counts). ``classification`` becomes the row's ``subset`` and
    ``{classification}_{idx}`` its id.
    """
    question = _require_text(row, "modified_question", "PRMBench layout", file, row_number)
    steps = _require_steps(row, "modified_process", "PRMBench layout", file, row_number)
    errors = row.get("error_steps")
    if not isinstance(errors, list) or not all(
        isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in errors
    ):
        raise DataError(file, row_number, "error_steps", "a list of 1-based step numbers (PRMBench layout)", errors)
    category = _require_text(row, "classification", "PRMBench layout: the error class", file, row_number)
    wrong = set(errors)
    kept = [(step, k not in wrong) for k, step in enumerate(steps, start=1) if step.strip()]
    out = _step_row(
        row, ("modified_question", "modified_process"), question, [s for s, _ in kept], [y for _, y in kept]
    )
    out.setdefault("subset", category)
    if out.get("id") is None and row.get("idx") is not None:
        out["id"] = f"{category}_{row['idx']}"
    return out


RowAdapter = Callable[[dict, "str | None", "int | None"], dict]

LAYOUTS: dict[str, RowAdapter] = {
    "hh": hh_row,
    "llmbar": llmbar_row,
    "hhh": hhh_row,
    "rewardbench2": rewardbench2_row,
    "rmbench": rmbench_row,
    "joined": joined_steps_row,
    "math_shepherd": math_shepherd_row,
    "prm800k": prm800k_row,
    "processbench": processbench_row,
    "prmbench": prmbench_row,
}
# The record kind each layout makes.
LAYOUT_KINDS = {
    "hh": "pairwise",
    "llmbar": "pairwise",
    "hhh": "pairwise",
    "rewardbench2": "ranked",
    "rmbench": "ranked",
    "joined": "stepwise",
    "math_shepherd": "stepwise",
    "prm800k": "stepwise",
    "processbench": "stepwise",
    "prmbench": "stepwise",
}


def layout_adapter(name: str) -> RowAdapter:
    """The row adapter of a layout name: one of `LAYOUTS`, or ``joined:SEP`` (steps joined by ``SEP``,
    with ``\\n`` / ``\\t`` written as escapes)."""
    if name in LAYOUTS:
        return LAYOUTS[name]
    if isinstance(name, str) and name.startswith("joined:") and len(name) > len("joined:"):
        separator = name[len("joined:") :].replace("\\n", "\n").replace("\\t", "\t")

        def adapter(row: dict, file: str | None = None, row_number: int | None = None) -> dict:
            return joined_steps_row(row, file, row_number, separator)

        return adapter
    raise ValueError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)} or joined:SEPARATOR")


def layout_kind(name: str) -> str | None:
    """The record kind a layout makes (None for an unknown name)."""
    return "stepwise" if isinstance(name, str) and name.startswith("joined:") else LAYOUT_KINDS.get(name)
