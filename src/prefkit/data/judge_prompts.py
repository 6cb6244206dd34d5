"""Judge prompts: how a pair is shown to a generative judge, how its written verdict is read, and how a pairwise
judge scores a list (`round_robin_scores`).

A `JudgeTemplate` holds the prompt text with ``{prompt}``, ``{a}`` and ``{b}``, the two verdict labels that
continue it (``" A"``, ``" B"``) and whether it goes through the tokenizer's chat template. It lives here, at the
bottom of the house, because three layers use the same prompt: `prefkit data convert --to judge` (training a judge
on verdicts), `prefkit eval judge` (evaluating one) and the online ``verdict`` reward (RL on verdicts).

`parse_verdict` reads a verdict from generated text: a given regular expression whose first group is a label, or
by default, first found: ``[[A]]`` (MT-Bench's form), "Answer A is better", the label after "better", "best",
"verdict", "winner" or "answer is" ("The better answer is B", "Verdict: A"), a label at the very start of the text
("A." / "B: ..."). Anything else is no verdict; give ``pattern`` for another format.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefkit.data.records import render_text

__all__ = ["TEMPLATES", "JudgeTemplate", "judge_prompt", "load_template", "parse_verdict", "round_robin_scores"]

_PLAIN = (
    "Here is a question and two answers.\n\nQuestion: {prompt}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Which answer is better, A or B? The better answer is"
)


@dataclass(frozen=True)
class JudgeTemplate:
    """``text``: the prompt with ``{prompt}``, ``{a}`` and ``{b}``; ``labels``: the two verdict texts (first, second)
    that continue it; ``chat``: send ``text`` as the user turn through the tokenizer's chat template."""

    text: str = _PLAIN
    labels: tuple[str, str] = (" A", " B")
    chat: bool = False

    def __post_init__(self):
        for field in ("{prompt}", "{a}", "{b}"):
            if field not in self.text:
                raise ValueError(f"a judge template needs {field} in its text")
        if len(self.labels) != 2 or self.labels[0] == self.labels[1] or not all(self.labels):
            raise ValueError(f"a judge template needs two different non-empty labels, got {self.labels!r}")
        if self.labels[0].strip() == self.labels[1].strip() or not all(x.strip() for x in self.labels):
            raise ValueError(f"the two labels must differ in more than spaces, got {self.labels!r}")


TEMPLATES = {
    "plain": JudgeTemplate(),
    "chat": JudgeTemplate(
        text=_PLAIN.replace(" The better answer is", " Reply with the letter only."), labels=("A", "B"), chat=True
    ),
}


def load_template(name_or_path: str) -> JudgeTemplate:
    """A built-in template (``plain``, ``chat``) or a YAML file ``{text: ..., labels: [A, B], chat: false}``."""
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"--template {name_or_path}: neither {', '.join(TEMPLATES)} nor a file")
    import yaml

    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str) or set(doc) - {"text", "labels", "chat"}:
        raise ValueError(f"{path}: expected {{text: ..., labels: [first, second], chat: true|false}}, got {doc!r}")
    labels = tuple(str(x) for x in doc.get("labels", TEMPLATES["plain"].labels))
    return JudgeTemplate(doc["text"], labels, bool(doc.get("chat", False)))


def judge_prompt(template: JudgeTemplate, prompt: Any, a: Any, b: Any) -> str | list[dict[str, str]]:
    """The judge's prompt for ``(prompt, a, b)``: the filled text, or for a chat template one user message."""
    text = template.text.format(prompt=render_text(prompt), a=render_text(a), b=render_text(b))
    return [{"role": "user", "content": text}] if template.chat else text


def _alternation(labels: tuple[str, str]) -> str:
    return "|".join(re.escape(label.strip()) for label in labels)


def parse_verdict(text: str, labels: tuple[str, str] = (" A", " B"), pattern: str | None = None) -> int | None:
    """Which label a generated verdict names: 0 (first), 1 (second) or None (no verdict found).

    ``pattern``: a regular expression whose first group is the label (compared without surrounding spaces);
    else the default forms of the module docstring. Labels are matched as whole words, case-sensitively."""
    stripped = [label.strip() for label in labels]
    if pattern is not None:
        match = re.search(pattern, text, re.S)
        if match is None or not match.groups() or match.group(1) is None:
            return None
        found = match.group(1).strip()
        return stripped.index(found) if found in stripped else None
    alt = _alternation(labels)
    forms = (
        rf"\[\[\s*({alt})\s*\]\]",
        rf"(?i:answer|response)\s+({alt})\s+(?i:is)\s+(?i:the\s+)?(?i:better|best)",
        rf"(?i:\bbetter\b|\bbest\b|verdict|winner|answer is)[^A-Za-z0-9]*"
        rf"(?:(?i:is|answer|response|one)\s+)*({alt})(?!\w)",
        rf"^\W*({alt})(?!\w)",
    )
    for form in forms:
        match = re.search(form, text)
        if match:
            return stripped.index(match.group(1))
    return None


def round_robin_scores(judge: Callable, prompts: Sequence[Any], groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """Scores from a pairwise judge ``judge(prompts, first, second) -> [P(first preferred)]``: completion ``i`` of a
    group scores the mean over the other completions ``j`` of ``P(i preferred to j)`` (its expected win rate in a
    round robin; each unordered pair judged once, ``P(j over i) = 1 - P(i over j)``). One judge call for all pairs."""
    firsts, seconds, who, asked = [], [], [], []
    for g, (prompt, group) in enumerate(zip(prompts, groups)):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                asked.append(prompt)
                firsts.append(group[i])
                seconds.append(group[j])
                who.append((g, i, j))
    probs = list(judge(asked, firsts, seconds)) if who else []
    if len(probs) != len(who):
        raise ValueError(f"the judge returned {len(probs)} probabilities for {len(who)} pairs")
    wins = [[0.0] * len(group) for group in groups]
    for (g, i, j), prob in zip(who, probs):
        wins[g][i] += float(prob)
        wins[g][j] += 1.0 - float(prob)
    return [[w / max(len(group) - 1, 1) for w in row] for row, group in zip(wins, groups)]
