"""Reward functions for online training: ``(prompts, completions, **record_fields) -> list[float | None]``.

One protocol for every source of reward. ``record_fields`` are the prompt records' other columns, one
list per column aligned with the completions (``answer=[...]`` for GSM8K), so a verifier reads its
reference from the data. ``None`` means "cannot score this one" (e.g. a reference that does not parse);
a completion that no reward scores is left out of the advantage baseline by the trainer.

Built-ins (`REWARDS`, each built by name with its parameters by `build_reward`):

==================  =================================================================================
``math``            1 when the completion's final answer equals the reference (``math-verify``: GSM8K
                    ``#### 42`` and LaTeX ``\\boxed{42}`` answers, numbers, fractions, expressions), else 0
``exact_match``     1 when the completion (stripped) equals the reference field, else 0
``regex``           1 when ``pattern`` matches the completion (``fullmatch`` or search), else 0
``verdict``         1 when a judge's written verdict (`prefkit.data.judge_prompts.parse_verdict`) names the
                    label the reference field starts with (``chosen`` of `prefkit data convert --to judge`),
                    else 0: RL on verdicts (RM-R1 / J1 style)
``length``          DAPO's soft overlong penalty on the completion's word count: 0 up to
                    ``max_words - buffer_words``, falling linearly to -1 at ``max_words``, -1 beyond
``bleu``            sentence BLEU against the reference field / 100 (BLEUBERI, with ``sacrebleu``)
``reward_model``    a reward model's score: a prefkit reward model (scalar, multi-objective with
                    ``weights`` per attribute, ...) or any one-label ``...ForSequenceClassification``
``callable``        any Python function with this protocol: ``module:function`` or ``file.py:function``
``lab``             the true reward of a lab world (``world``: a preset or ``arithmetic``; registered
                    by `prefkit.lab` through the ``prefkit.rewards`` entry point group)
==================  =================================================================================

`CombinedReward` sums several with weights, keeps each one's values for logging, and stops with
`RewardError` (naming the reward and the rows) when one raises, returns the wrong count or a non-finite
value.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "REWARDS",
    "CombinedReward",
    "RewardError",
    "RewardFunction",
    "build_reward",
    "extract_final_answer",
]


class RewardFunction(Protocol):
    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **fields: Sequence[Any]) -> list:
        """One reward (a float, or None: not scorable) per completion."""


class RewardError(ValueError):
    """A reward function failed, returned the wrong number of values or a non-finite one."""


def _reference(fields: Mapping[str, Sequence[Any]], name: str, reward: str, n: int) -> Sequence[Any]:
    if name not in fields:
        raise RewardError(
            f"reward {reward!r} reads the field {name!r} of each prompt record, but the records have only "
            f"{sorted(fields) or 'no other fields'}; set its reference_field"
        )
    values = fields[name]
    if len(values) != n:
        raise RewardError(f"reward {reward!r}: field {name!r} has {len(values)} values for {n} completions")
    return values


_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


def extract_final_answer(text: str) -> str:
    """The part of ``text`` that states its final answer: what follows the last ``####`` (GSM8K's mark)
    when there is one, else the whole text (``math-verify`` then finds the last ``\\boxed{}`` or number)."""
    if "####" in text:
        match = _GSM8K_ANSWER.search(text[text.rfind("####") :])
        if match:
            return match.group(1)
    return text


@dataclass
class MathReward:
    """1.0 when the completion's final answer equals the reference's (checked by ``math-verify``), 0.0 when
    not, None when the reference itself does not parse."""

    reference_field: str = "answer"

    def __call__(self, prompts, completions, **fields) -> list[float | None]:
        try:
            from math_verify import parse, verify
        except ImportError as err:  # pragma: no cover - a dependency of prefkit
            raise RewardError("reward 'math' needs the math-verify package: pip install math-verify") from err
        references = _reference(fields, self.reference_field, "math", len(completions))
        out: list[float | None] = []
        for completion, reference in zip(completions, references):
            gold = parse(extract_final_answer(str(reference)))
            if not gold:
                out.append(None)
                continue
            answer = parse(extract_final_answer(completion))
            out.append(1.0 if answer and verify(gold, answer) else 0.0)
        return out


@dataclass
class ExactMatchReward:
    reference_field: str = "answer"
    ignore_case: bool = False

    def __call__(self, prompts, completions, **fields) -> list[float]:
        references = _reference(fields, self.reference_field, "exact_match", len(completions))

        def norm(text: str) -> str:
            text = " ".join(str(text).split())
            return text.lower() if self.ignore_case else text

        return [1.0 if norm(c) == norm(r) else 0.0 for c, r in zip(completions, references)]


@dataclass
class RegexReward:
    pattern: str = ""
    fullmatch: bool = False

    def __post_init__(self):
        if not self.pattern:
            raise RewardError("reward 'regex' needs a pattern")
        try:
            self._compiled = re.compile(self.pattern, re.S)
        except re.error as err:
            raise RewardError(f"reward 'regex': pattern {self.pattern!r} is not a regular expression ({err})") from err

    def __call__(self, prompts, completions, **fields) -> list[float]:
        match = self._compiled.fullmatch if self.fullmatch else self._compiled.search
        return [1.0 if match(c) else 0.0 for c in completions]


@dataclass
class LengthReward:
    """DAPO's soft overlong punishment, on words: 0 while ``|y| <= max_words - buffer_words``, then
    ``(max_words - buffer_words - |y|) / buffer_words`` down to -1 at ``max_words``, and -1 beyond (Yu et al.
    2025, "DAPO", arXiv:2503.14476, eq. 13)."""

    max_words: int = 256
    buffer_words: int = 64

    def __post_init__(self):
        if not 0 < self.buffer_words <= self.max_words:
            raise RewardError(
                f"reward 'length': expected 0 < buffer_words <= max_words, got {self.buffer_words}, {self.max_words}"
            )

    def __call__(self, prompts, completions, **fields) -> list[float]:
        free = self.max_words - self.buffer_words
        out = []
        for c in completions:
            n = len(c.split())
            out.append(0.0 if n <= free else max(-1.0, (free - n) / self.buffer_words))
        return out


@dataclass
class BleuReward:
    """Sentence BLEU of the completion against the reference field, on 0..1 (BLEUBERI: Chang et al. 2025,
    "BLEUBERI: BLEU is a surprisingly effective reward for instruction following", arXiv:2505.11080)."""

    reference_field: str = "reference"

    def __call__(self, prompts, completions, **fields) -> list[float]:
        try:
            from sacrebleu.metrics import BLEU
        except ImportError as err:  # pragma: no cover - a dependency of prefkit
            raise RewardError("reward 'bleu' needs the sacrebleu package: pip install sacrebleu") from err
        bleu = BLEU(effective_order=True)
        references = _reference(fields, self.reference_field, "bleu", len(completions))
        out = []
        for c, r in zip(completions, references):
            refs = [str(x) for x in r] if isinstance(r, (list, tuple)) else [str(r)]
            out.append(bleu.sentence_score(c, refs).score / 100.0)
        return out


class RewardModelReward:
    """A reward model's score of ``(prompt, completion)``, tokenized as reward-model training tokenizes it
    (`prefkit.data.tokenize.tokenize_unpaired`: EOS after the completion, chat prompts through the
    template). ``model``: a folder, Hub id or ``tiny`` (`prefkit.models.reward.load_reward_model`: prefkit
    reward models and one-label ``...ForSequenceClassification`` models); ``tokenizer``: where its
    tokenizer is (default: ``model``). ``weights`` (multi-objective models only): ``{attribute: weight}``
    replacing the prompt gate, ``beta * sum_i w_i r'_i`` with the de-correlated attribute scores
    (unnamed attributes weigh 0). The model is loaded once, on ``device`` (default: CUDA when there is one)."""

    def __init__(
        self,
        model: str = "",
        tokenizer: str | None = None,
        weights: Mapping[str, float] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ):
        if not model or not isinstance(model, str):
            raise RewardError(f"reward 'reward_model': expected model: a folder, Hub id or 'tiny', got {model!r}")
        import torch

        from prefkit.models.loading import load_tokenizer
        from prefkit.models.reward import load_reward_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = load_reward_model(model, dtype=dtype, device=device)
            self.tokenizer = load_tokenizer(tokenizer or model)
        except (OSError, ValueError) as err:
            raise RewardError(f"reward 'reward_model': cannot load {model!r} ({err})") from err
        self.batch_size, self.max_length = batch_size, max_length
        self.weights = None
        if weights is not None:
            attributes = list(getattr(self.model, "attributes", []) or [])
            if not attributes:
                raise RewardError(f"reward 'reward_model': weights need a multi-objective model; {model!r} is not one")
            unknown = sorted(set(weights) - set(attributes))
            if unknown:
                raise RewardError(
                    f"reward 'reward_model': weights name unknown attributes {unknown}; the model has {attributes}"
                )
            self.weights = torch.tensor([float(weights.get(a, 0.0)) for a in attributes])

    def _scores(self, input_ids, attention_mask, completion_mask):
        from prefkit.train.reward_trainer import model_scores

        if self.weights is None:
            return model_scores(self.model, input_ids, attention_mask, completion_mask)
        adjusted = self.model.decorrelate(self.model.attribute_scores(input_ids, attention_mask))
        return self.model.config.beta * (adjusted * self.weights.to(adjusted)).sum(-1)

    def __call__(self, prompts, completions, **fields) -> list[float]:
        import torch

        from prefkit.data.scoring import score_items, tokenize_items

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        items = tokenize_items(list(zip(prompts, completions)), self.tokenizer, max_length=self.max_length)
        with torch.no_grad():
            scores = score_items(
                self._scores, items, model=self.model, pad_token_id=pad, batch_size=self.batch_size, progress=False
            )
        return [float(x) for x in scores.float().cpu()]


def _callable(function: str = "") -> RewardFunction:
    """``module:function`` (an importable module) or ``path/to/file.py:function`` (a Python file, read
    relative to the current folder): a function with the reward protocol."""
    module_name, sep, attr = function.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(
            f"reward 'callable': expected function: module:function or file.py:function, got {function!r}"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise RewardError(f"reward 'callable': {function!r}: no such file {module_name!r}")
            name = f"prefkit_reward_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # registered first, as an import would: dataclasses and pickling look it up
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except (ImportError, AttributeError, SyntaxError) as err:
        raise RewardError(f"reward 'callable': cannot import {function!r} ({type(err).__name__}: {err})") from err
    if not callable(fn):
        raise RewardError(f"reward 'callable': {function!r} is not callable")
    return fn


@dataclass
class VerdictReward:
    """1.0 when the completion's verdict (`parse_verdict` with ``labels`` and ``pattern``) is the right one, 0.0
    when it names the other label or none; None when the reference (the right label, with anything after it, as
    `prefkit data convert --to judge` writes ``chosen``) starts with neither label."""

    reference_field: str = "chosen"
    labels: tuple[str, str] = (" A", " B")
    pattern: str | None = None

    def __post_init__(self):
        self.labels = tuple(str(x) for x in self.labels)
        if (
            len(self.labels) != 2
            or self.labels[0].strip() == self.labels[1].strip()
            or not all(x.strip() for x in self.labels)
        ):
            raise RewardError(f"reward 'verdict': labels must be two different labels, got {list(self.labels)}")
        if self.pattern is not None:
            try:
                if re.compile(self.pattern).groups < 1:
                    raise RewardError(f"reward 'verdict': pattern {self.pattern!r} needs a group around the label")
            except re.error as err:
                raise RewardError(f"reward 'verdict': pattern {self.pattern!r} is not a regular expression ({err})")

    def __call__(self, prompts, completions, **fields) -> list[float | None]:
        from prefkit.data.judge_prompts import parse_verdict

        references = _reference(fields, self.reference_field, "verdict", len(completions))
        stripped = [label.strip() for label in self.labels]
        out: list[float | None] = []
        for completion, reference in zip(completions, references):
            head = str(reference).strip()
            right = next((i for i, label in enumerate(stripped) if re.match(rf"{re.escape(label)}(?!\w)", head)), None)
            if right is None:
                out.append(None)
                continue
            out.append(1.0 if parse_verdict(completion, self.labels, self.pattern) == right else 0.0)
        return out


REWARDS: dict[str, Callable[..., RewardFunction]] = {
    "math": MathReward,
    "exact_match": ExactMatchReward,
    "regex": RegexReward,
    "verdict": VerdictReward,
    "length": LengthReward,
    "bleu": BleuReward,
    "reward_model": RewardModelReward,
    "callable": _callable,
}
# Rewards that packages above this one provide (the lab's true reward): entry points of this group, each a
# factory ``(**params) -> reward function``, so `prefkit.online` does not import them.
ENTRY_POINT_GROUP = "prefkit.rewards"


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in REWARDS}


def reward_names() -> list[str]:
    """Every reward `build_reward` knows: the built-ins, then the registered ones."""
    return list(REWARDS) + sorted(_entry_points())


def build_reward(name: str, **params: Any) -> RewardFunction:
    """The reward ``name`` (`REWARDS`, or registered under the ``prefkit.rewards`` entry points) built with
    ``params``; `RewardError` for an unknown name or parameter."""
    if name in REWARDS:
        factory = REWARDS[name]
    else:
        registered = _entry_points()
        if name not in registered:
            raise RewardError(
                f"unknown reward {name!r}; expected one of {', '.join(reward_names())} (or callable: module:function)"
            )
        factory = registered[name].load()
    try:
        return factory(**params)
    except RewardError:
        raise
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward {name!r}: {err}") from err


@dataclass
class CombinedReward:
    """``sum_k weight_k * reward_k`` per completion over ``rewards = [(name, function, weight), ...]``;
    `__call__` returns the totals (None where every reward returned None; Nones count 0 otherwise, as TRL's
    nansum) and each reward's own values (``per_reward[name]``) for logging."""

    rewards: list[tuple[str, RewardFunction, float]]

    def score_rollouts(self, records: Sequence[Mapping], rollouts) -> tuple[list[float | None], dict[str, list]]:
        """`__call__` on rollouts (items with ``prompt_index`` into ``records`` and ``text``): each completion's
        prompt, and every other field of its record as a keyword list (``answer=[...]``)."""
        keys = sorted({k for rec in records for k in rec if k != "prompt"})
        fields = {k: [records[r.prompt_index].get(k) for r in rollouts] for k in keys}
        return self([records[r.prompt_index]["prompt"] for r in rollouts], [r.text for r in rollouts], **fields)

    def __call__(self, prompts, completions, **fields) -> tuple[list[float | None], dict[str, list]]:
        n = len(completions)
        per_reward: dict[str, list] = {}
        for name, fn, _weight in self.rewards:
            try:
                values = fn(prompts, completions, **fields)
            except RewardError:
                raise
            except Exception as err:  # a user's function: name it, whatever it raised
                raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
            values = list(values) if values is not None else []
            if len(values) != n:
                raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
            bad = [
                i
                for i, v in enumerate(values)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v))
            ]
            if bad:
                shown = ", ".join(f"row {i}: {values[i]!r}" for i in bad[:5])
                raise RewardError(f"reward {name!r} returned values that are not finite numbers ({shown})")
            per_reward[name] = values
        totals: list[float | None] = []
        for i in range(n):
            scored = [(w, per_reward[name][i]) for name, _, w in self.rewards if per_reward[name][i] is not None]
            totals.append(sum(w * float(v) for w, v in scored) if scored else None)
        return totals, per_reward
