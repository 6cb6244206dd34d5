"""Generative judges: any causal LM as a pairwise judge, its verdict read from next-token probabilities
(`prefkit eval judge`).

For a pair (x, y1, y2) the judge reads a prompt that shows the question and the two answers under labels and asks
which is better (`TEMPLATES`: ``plain`` for base models, ``chat`` for chat models through their chat template, or a
template file). Its verdict is the log-probability of the first label's text minus the second's as the
continuation of that prompt, ``v = log p(" A" | prompt) - log p(" B" | prompt)`` — no sampling, and any tokenizer
(the labels may span several tokens; the log-prob engine sums them). Every pair is judged in both orders: with the
chosen response as A (``v_1``) and as B (``v_2``). Reported:

- ``accuracy``: share of the 2N verdicts that pick the chosen response (``v_1 > 0``, ``v_2 < 0``);
- ``pair_accuracy``: share of pairs judged right in both orders; ``order_averaged_accuracy``: ``v_1 - v_2 > 0``
  (the verdict with the position effect cancelled);
- ``position_bias``: share of the 2N verdicts that pick the first position (0.5: none; 1: always A);
- ``consistency``: share of pairs whose two verdicts pick the same response.

Ties and several subsets are as in `prefkit eval rm` (a tie row is reported apart and left out of the
accuracies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prefkit.data.records import PairwiseRecord, render_text
from prefkit.data.tokenize import tokenize_prompt
from prefkit.train.logps import completion_logps

__all__ = ["TEMPLATES", "JudgeTemplate", "judge_metrics", "judge_pairs", "load_template"]

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


def _prompt_ids(
    tokenizer, template: JudgeTemplate, prompt: Any, a: Any, b: Any, max_prompt_length: int | None
) -> list[int]:
    """The judge prompt's ids, as training would tokenize it (a chat template's generation prompt for ``chat``),
    cut from the start to ``max_prompt_length`` (the answers and the question to the judge stay)."""
    text = template.text.format(prompt=render_text(prompt), a=render_text(a), b=render_text(b))
    if template.chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the chat template needs a tokenizer with a chat template; use --template plain")
    query = [{"role": "user", "content": text}] if template.chat else text
    return tokenize_prompt(query, tokenizer, max_prompt_length=max_prompt_length, prompt_truncation="keep_end")


@torch.no_grad()
def judge_pairs(
    model: nn.Module,
    tokenizer,
    records: Sequence[PairwiseRecord],
    template: JudgeTemplate = TEMPLATES["plain"],
    *,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """``[N, 2]`` verdicts: column 0 with the chosen response as A, column 1 with it as B; each is
    ``log p(first label | prompt) - log p(second label | prompt)`` (> 0: the judge picks A)."""
    from tqdm.auto import tqdm

    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in template.labels]
    if not all(label_ids) or label_ids[0] == label_ids[1]:
        raise ValueError(f"the labels {template.labels!r} tokenize to no tokens or to the same tokens")
    rows = []  # (prompt ids, label index) for pair i, order o, label l at 4 i + 2 o + l
    for r in records:
        for a, b in ((r.chosen, r.rejected), (r.rejected, r.chosen)):
            ids = _prompt_ids(tokenizer, template, r.prompt, a, b, max_prompt_length)
            rows += [(ids, 0), (ids, 1)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = np.zeros(len(rows))
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="judging", disable=not progress, unit="batch"):
            chunk = rows[start : start + batch_size]
            seqs = [(ids + label_ids[lab], len(ids)) for ids, lab in chunk]
            width = max(len(s) for s, _ in seqs)
            input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            completion = torch.zeros_like(input_ids)
            for i, (s, n_prompt) in enumerate(seqs):
                input_ids[i, : len(s)] = torch.tensor(s)
                attention[i, : len(s)] = 1
                completion[i, n_prompt : len(s)] = 1
            out = completion_logps(model, input_ids.to(device), attention.to(device), completion.to(device))
            scores[start : start + len(chunk)] = out.sum.float().cpu().numpy()
    finally:
        model.train(was_training)
    per_label = scores.reshape(len(records), 2, 2)
    return per_label[:, :, 0] - per_label[:, :, 1]


def judge_metrics(verdicts: Any, ties: Any | None = None) -> dict[str, float]:
    """The judge's metrics (module docstring) from ``[N, 2]`` verdicts; tie rows (``ties``) are left out."""
    v = np.asarray(verdicts, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 2:
        raise ValueError(f"verdicts must be [N, 2] (chosen first, chosen second), got {v.shape}")
    keep = ~np.asarray(ties, dtype=bool) if ties is not None else np.ones(len(v), dtype=bool)
    v = v[keep]
    if not len(v):
        return {"n": 0}
    right_first, right_second = v[:, 0] > 0, v[:, 1] < 0
    picks_first = np.concatenate([v[:, 0] > 0, v[:, 1] > 0])
    return {
        "n": int(len(v)),
        "accuracy": float(np.concatenate([right_first, right_second]).mean()),
        "pair_accuracy": float((right_first & right_second).mean()),
        "order_averaged_accuracy": float(((v[:, 0] - v[:, 1]) > 0).mean()),
        "position_bias": float(picks_first.mean()),
        "consistency": float((right_first == right_second).mean()),
    }
