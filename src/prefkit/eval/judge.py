"""Generative judges: any causal LM as a pairwise judge (`prefkit eval judge`, and a preference source elsewhere).

For a pair (x, y1, y2) the judge reads a prompt that shows the question and the two answers under labels and asks
which is better (`prefkit.data.judge_prompts`: ``plain`` for base models, ``chat`` for chat models through their
chat template, or a template file). Its verdict is read one of two ways:

- ``logprob`` (default): the log-probability of the first label's text minus the second's as the continuation of
  that prompt, ``v = log p(" A" | prompt) - log p(" B" | prompt)`` — no sampling, any tokenizer (the labels may
  span several tokens; the log-prob engine sums them);
- ``generate``: the judge writes (greedy, up to ``max_new_tokens``) and `parse_verdict` reads the label from the
  text (``[[A]]``, "The better answer is B", ... or a given regular expression): ``v = +1`` (A), ``-1`` (B) or
  ``0`` when no verdict is found (counted wrong, and reported as ``verdict_rate``).

Every pair is judged in both orders: with the chosen response as A (``v_1``) and as B (``v_2``). Reported:

- ``accuracy``: share of the 2N verdicts that pick the chosen response (``v_1 > 0``, ``v_2 < 0``);
- ``pair_accuracy``: share of pairs judged right in both orders; ``order_averaged_accuracy``: ``v_1 - v_2 > 0``
  (the verdict with the position effect cancelled);
- ``position_bias``: share of the verdicts given that pick the first position (0.5: none; 1: always A);
- ``consistency``: share of pairs whose two verdicts pick the same response;
- ``verdict_rate``: share of the 2N verdicts that name a label (1 for ``logprob``);
- self-preference (`self_preference`), when the responses carry their source model and the judge is one of them.

Ties and several subsets are as in `prefkit eval rm` (a tie row is reported apart and left out of the
accuracies). `LMJudge` is the same judge as a preference source: ``judge(prompts, first, second) -> P(first
preferred)``, the protocol of the online preference trainer's labeller (registered as the ``lm`` judge) and of
`prefkit.online.best_of_n`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prefkit.data.batching import left_pad
from prefkit.data.judge_prompts import (
    TEMPLATES,
    JudgeTemplate,
    judge_prompt,
    load_template,
    parse_verdict,
    round_robin_scores,
)
from prefkit.data.records import PairwiseRecord
from prefkit.data.tokenize import tokenize_prompt
from prefkit.train.logps import completion_logps, last_logits_forward

__all__ = [
    "TEMPLATES",
    "VERDICT_MODES",
    "JudgeTemplate",
    "LMJudge",
    "generate_verdicts",
    "judge_metrics",
    "judge_pairs",
    "lm_judge",
    "load_template",
    "self_preference",
    "win_rates",
]

VERDICT_MODES = ("logprob", "generate")


def _prompt_ids(
    tokenizer, template: JudgeTemplate, prompt: Any, a: Any, b: Any, max_prompt_length: int | None
) -> list[int]:
    """The judge prompt's ids, as training would tokenize it (a chat template's generation prompt for ``chat``),
    cut from the start to ``max_prompt_length`` (the answers and the question to the judge stay)."""
    if template.chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the chat template needs a tokenizer with a chat template; use --template plain")
    query = judge_prompt(template, prompt, a, b)
    return tokenize_prompt(query, tokenizer, max_prompt_length=max_prompt_length, prompt_truncation="keep_end")


def _both_orders(tokenizer, template, records, max_prompt_length) -> list[list[int]]:
    """The judge prompts of each record with the chosen response as A, then as B (2N, pair-major)."""
    return [
        _prompt_ids(tokenizer, template, r.prompt, a, b, max_prompt_length)
        for r in records
        for a, b in ((r.chosen, r.rejected), (r.rejected, r.chosen))
    ]


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
    label_ids = [list(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in template.labels]
    if not all(label_ids) or label_ids[0] == label_ids[1]:
        raise ValueError(f"the labels {template.labels!r} tokenize to no tokens or to the same tokens")
    prompts = _both_orders(tokenizer, template, records, max_prompt_length)
    # The labels' common first tokens (a space, say) add the same log-prob to both and cancel in v: they join the
    # prompt. When one token is left of each, one forward per prompt reads both (the next-token distribution).
    shared = 0
    while shared < min(map(len, label_ids)) and label_ids[0][shared] == label_ids[1][shared]:
        shared += 1
    prompts = [ids + label_ids[0][:shared] for ids in prompts]
    rest = [ids[shared:] for ids in label_ids]
    was_training = model.training
    model.eval()
    try:
        if len(rest[0]) == 1 and len(rest[1]) == 1:
            verdicts = _next_token_verdicts(model, tokenizer, prompts, (rest[0][0], rest[1][0]), batch_size, progress)
        else:
            verdicts = _two_label_verdicts(model, tokenizer, prompts, rest, batch_size, progress)
    finally:
        model.train(was_training)
    return verdicts.reshape(len(records), 2)


def _batches(n: int, batch_size: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(range(0, n, batch_size), desc="judging", disable=not progress, unit="batch")


def _next_token_verdicts(model, tokenizer, prompts, labels: tuple[int, int], batch_size, progress) -> np.ndarray:
    """``log p(labels[0]) - log p(labels[1])`` as the next token after each prompt, one forward each (left padding,
    only the last position's logits computed where the model allows it)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.zeros(len(prompts))
    for start in _batches(len(prompts), batch_size, progress):
        chunk = prompts[start : start + batch_size]
        input_ids, attention = left_pad(chunk, pad)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logits = last_logits_forward(model, **inputs).logits[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        out[start : start + len(chunk)] = (logp[:, labels[0]] - logp[:, labels[1]]).cpu().numpy()
    return out


def _two_label_verdicts(model, tokenizer, prompts, labels: list[list[int]], batch_size, progress) -> np.ndarray:
    """``log p(labels[0] | prompt) - log p(labels[1] | prompt)``, each label's tokens summed by the log-prob engine."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [(ids, label) for ids in prompts for label in (0, 1)]  # prompt p, label l at 2 p + l
    scores = np.zeros(len(rows))
    for start in _batches(len(rows), batch_size, progress):
        chunk = rows[start : start + batch_size]
        seqs = [(ids + labels[lab], len(ids)) for ids, lab in chunk]
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
    per_label = scores.reshape(len(prompts), 2)
    return per_label[:, 0] - per_label[:, 1]


@torch.no_grad()
def generate_verdicts(
    model: nn.Module,
    tokenizer,
    records: Sequence[PairwiseRecord],
    template: JudgeTemplate = TEMPLATES["plain"],
    *,
    max_new_tokens: int = 32,
    pattern: str | None = None,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, list[list[str]]]:
    """``([N, 2] verdicts in {+1, -1, 0}, [N][2] generated texts)``: the judge writes greedily after each prompt
    (both orders) and `parse_verdict` reads the label (+1: the first label, A; -1: B; 0: none found)."""
    from tqdm.auto import tqdm

    prompts = _both_orders(tokenizer, template, records, max_prompt_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="judging", disable=not progress, unit="batch"):
            chunk = prompts[start : start + batch_size]
            input_ids, attention = left_pad(chunk, pad)  # every prompt ends where generation starts
            width = input_ids.shape[1]
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts += tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
    finally:
        model.train(was_training)
    picks = [parse_verdict(text, template.labels, pattern) for text in texts]
    verdicts = np.array([0.0 if p is None else 1.0 - 2.0 * p for p in picks]).reshape(len(records), 2)
    return verdicts, [texts[i : i + 2] for i in range(0, len(texts), 2)]


def judge_metrics(verdicts: Any, ties: Any | None = None) -> dict[str, float]:
    """The judge's metrics (module docstring) from ``[N, 2]`` verdicts; tie rows (``ties``) are left out. A verdict
    of exactly 0 names neither response: it is wrong, inconsistent and left out of the position bias."""
    v = np.asarray(verdicts, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 2:
        raise ValueError(f"verdicts must be [N, 2] (chosen first, chosen second), got {v.shape}")
    keep = ~np.asarray(ties, dtype=bool) if ties is not None else np.ones(len(v), dtype=bool)
    v = v[keep]
    if not len(v):
        return {"n": 0}
    pick_first, pick_second = np.sign(v[:, 0]), -np.sign(v[:, 1])  # +1: picks the chosen response, 0: neither
    given = np.concatenate([v[:, 0], v[:, 1]])
    decided = given != 0
    return {
        "n": int(len(v)),
        "accuracy": float(np.concatenate([pick_first > 0, pick_second > 0]).mean()),
        "pair_accuracy": float(((pick_first > 0) & (pick_second > 0)).mean()),
        "order_averaged_accuracy": float(((v[:, 0] - v[:, 1]) > 0).mean()),
        "position_bias": float((given[decided] > 0).mean()) if decided.any() else float("nan"),
        "consistency": float(((pick_first == pick_second) & (pick_first != 0)).mean()),
        "verdict_rate": float(decided.mean()),
    }


def self_preference(verdicts: Any, sources: Sequence[tuple[Any, Any]], judge_name: str) -> dict[str, float] | None:
    """How much the judge favours responses from its own model (``judge_name``), on the pairs where exactly one
    response is its own (``sources[i]`` = (source of chosen, source of rejected)); None when there are none.

    ``own_pick_rate``: share of those verdicts that pick the judge's own response; ``own_chosen_rate``: share of
    those pairs whose chosen (truly better) response is its own; ``self_preference = own_pick_rate -
    own_chosen_rate`` (> 0: it picks itself more often than its answers deserve); ``accuracy_own_chosen`` /
    ``accuracy_own_rejected``: its accuracy when its own response is the better / the worse one."""
    v = np.asarray(verdicts, dtype=np.float64)
    own_chosen = np.array([c == judge_name and r != judge_name for c, r in sources])
    own_rejected = np.array([r == judge_name and c != judge_name for c, r in sources])
    mixed = own_chosen | own_rejected
    if not mixed.any():
        return None
    right = np.stack([v[:, 0] > 0, v[:, 1] < 0], axis=1)  # picks the chosen, per order
    wrong = np.stack([v[:, 0] < 0, v[:, 1] > 0], axis=1)  # picks the rejected
    picks_own = np.where(own_chosen[:, None], right, wrong)[mixed]
    out = {
        "n": int(mixed.sum()),
        "own_pick_rate": float(picks_own.mean()),
        "own_chosen_rate": float(own_chosen[mixed].mean()),
    }
    out["self_preference"] = out["own_pick_rate"] - out["own_chosen_rate"]
    if own_chosen.any():
        out["accuracy_own_chosen"] = float(right[own_chosen].mean())
    if own_rejected.any():
        out["accuracy_own_rejected"] = float(right[own_rejected].mean())
    return out


class LMJudge:
    """A causal LM as a preference source: ``judge(prompts, first, second) -> [P(first preferred)]``.

    Each pair is judged in both orders with log-probability verdicts and ``P = sigmoid((v_1 - v_2) / 2)``, the
    order-averaged verdict as a probability (the position effect cancels). The protocol of the online preference
    trainer's labeller (``online.judge: {judge: lm, model: ...}``) and of best-of-N with a judge."""

    def __init__(self, model: nn.Module, tokenizer, template: JudgeTemplate = TEMPLATES["plain"], **options: Any):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.options = {"batch_size": 8, "max_prompt_length": None, "progress": False, **options}

    def __call__(self, prompts: Sequence[Any], first: Sequence[Any], second: Sequence[Any]) -> list[float]:
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"need as many prompts as pairs, got {len(prompts)}, {len(first)}, {len(second)}")
        if not len(prompts):
            return []
        records = [PairwiseRecord(p, a, b) for p, a, b in zip(prompts, first, second)]
        v = judge_pairs(self.model, self.tokenizer, records, self.template, **self.options)
        return (1.0 / (1.0 + np.exp(-(v[:, 0] - v[:, 1]) / 2.0))).tolist()


def win_rates(judge: LMJudge, prompts: Sequence[Any], groups: Sequence[Sequence[Any]]) -> list[np.ndarray]:
    """Each completion's mean probability of beating the other completions of its prompt by ``judge``
    (`round_robin_scores`): how a pairwise judge scores a best-of-N list (RewardBench 2)."""
    return [np.asarray(row, dtype=np.float64) for row in round_robin_scores(judge, prompts, groups)]


def lm_judge(
    model: str,
    tokenizer: str | None = None,
    template: str = "plain",
    dtype: str = "float32",
    device: str | None = None,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
) -> LMJudge:
    """Build an `LMJudge` from a model path or Hub id (the ``lm`` judge of ``online.judge``)."""
    from prefkit.models.loading import load_policy, load_tokenizer

    the_template = load_template(template)
    tok = load_tokenizer(tokenizer or model)
    policy = load_policy(model, dtype=dtype, vocab_size=len(tok) if model == "tiny" else None)
    policy.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval().requires_grad_(False)
    return LMJudge(policy, tok, the_template, batch_size=batch_size, max_prompt_length=max_prompt_length)
