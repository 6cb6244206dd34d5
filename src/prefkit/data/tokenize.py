"""Records -> tokenized examples (docs/architecture.md §2, docs/tokenization.md).

The prompt and each completion are tokenized **separately** and concatenated later by the
collators, so the completion's token ids are exactly the ids that are scored.

Rules, in the order they apply:

1. Rendering (:func:`render_prompt_completion`). Plain strings pass through. Chat-message lists
   are rendered with the tokenizer's chat template: the prompt with ``add_generation_prompt=True``,
   the completion as the rendered full conversation minus the rendered prompt (the prompt must be
   a prefix of the conversation, otherwise :class:`ChatTemplateError`).
2. Special tokens. A plain-text prompt gets the special tokens the tokenizer puts *in front of* a
   text (usually BOS; nothing for GPT-2 style tokenizers), exactly as ``tokenizer(prompt)`` does and
   as TRL's DPO/KTO trainers do. Special tokens a tokenizer would put *after* a text (an EOS/SEP
   added by its post-processor) are not put on the prompt. A chat-rendered prompt gets no extra
   special tokens: the template writes its own (as ``apply_chat_template(tokenize=True)`` does).
   Completions never get added special tokens.
3. EOS. ``tokenizer.eos_token_id`` is appended to every completion unless the completion already
   ends with it. For a completion rendered from chat messages, an EOS followed only by whitespace
   the template writes after the turn (``"...</s>\\n"``, ``"...<|im_end|>\\n"``) also counts as
   already ending with EOS, so the EOS is never doubled.
4. Truncation. ``max_prompt_length`` cuts the prompt (``keep_end``: keep its last tokens, but a
   leading BOS is kept in front; ``keep_start``: keep its first tokens). Then ``max_length`` (prompt
   + one completion) cuts each completion to ``max_length - len(prompt)`` tokens (``keep_start``:
   keep its first tokens, so a cut completion loses its EOS; ``keep_end``: keep its last tokens).
   A prompt that alone has ``max_length`` tokens or more (possible only without
   ``max_prompt_length``) leaves no completion token: :class:`OverlongPromptError`;
   :func:`tokenize_records` drops such rows by default, counts and logs them (TRL drops them too).

Stepwise records (process supervision, :func:`tokenize_stepwise`): a plain-text prompt is followed by
``step_separator``; each step is tokenized on its own as ``step + step_separator``, so every step ends with
the separator's tokens and a process reward model reads its score at the step's last token. ``max_length``
keeps the steps that fit whole (a later step never without the ones before it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefkit.data.convert import ranked_levels
from prefkit.data.records import PairwiseRecord, RankedRecord, StepwiseRecord, UnpairedRecord

logger = logging.getLogger("prefkit.data")

TRUNCATION_MODES = ("keep_start", "keep_end")

__all__ = [
    "ChatTemplateError",
    "OverlongPromptError",
    "TokenizationStats",
    "render_prompt_completion",
    "tokenize_pairwise",
    "tokenize_prompt",
    "tokenize_ranked",
    "tokenize_records",
    "tokenize_stepwise",
    "tokenize_unpaired",
]

DEFAULT_STEP_SEPARATOR = "\n"


class ChatTemplateError(ValueError):
    """Chat messages cannot be rendered: no chat template, or the template is not prefix-stable."""


class OverlongPromptError(ValueError):
    """The prompt alone has ``max_length`` tokens or more, so no completion token would remain."""


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def _check_text(value: Any, name: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return
    raise TypeError(f"{name} must be a string or a list of chat messages (dicts), got {type(value).__name__}")


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError(
            f"the record holds chat messages but the tokenizer ({type(tokenizer).__name__}) has no chat "
            "template; set tokenizer.chat_template or use plain-text prompts and completions"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _render(prompt: Any, completion: Any, tokenizer) -> tuple[str, str, bool, bool]:
    """Render one prompt/completion pair.

    Returns ``(prompt_text, completion_text, prompt_is_chat, completion_is_chat)``.
    """
    _check_text(prompt, "prompt")
    _check_text(completion, "completion")
    if not _is_messages(prompt):
        if _is_messages(completion):
            raise TypeError(
                "a plain-text prompt cannot take a chat-message completion: make the prompt a list of "
                "messages too (e.g. [{'role': 'user', 'content': prompt}])"
            )
        return prompt, completion, False, False
    prompt_text = _apply_template(tokenizer, prompt, add_generation_prompt=True)
    if not _is_messages(completion):
        return prompt_text, completion, True, False
    full_text = _apply_template(tokenizer, list(prompt) + list(completion), add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ChatTemplateError(
            "the chat template is not prefix-stable: the prompt rendered with add_generation_prompt=True "
            f"({prompt_text[-60:]!r} at its end) is not a prefix of the rendered conversation "
            f"({full_text[len(prompt_text) - 60 if len(prompt_text) > 60 else 0 :][:120]!r} around that "
            "point), so the completion cannot be cut out of it"
        )
    return prompt_text, full_text[len(prompt_text) :], True, True


def render_prompt_completion(prompt: Any, completion: Any, tokenizer) -> tuple[str, str]:
    """Render a prompt and a completion to text.

    * ``str`` prompt and ``str`` completion: returned unchanged.
    * message-list prompt and message-list completion: the prompt is rendered with the tokenizer's
      chat template and ``add_generation_prompt=True``; the completion is the rendered full
      conversation (prompt + completion messages) minus the rendered prompt.
    * message-list prompt and ``str`` completion: the rendered prompt, and the string unchanged
      (it is appended after the generation prompt).
    * ``str`` prompt and message-list completion: :class:`TypeError` (ambiguous; make both lists).

    Raises:
        ChatTemplateError: messages given but the tokenizer has no chat template, or the rendered
            prompt is not a prefix of the rendered conversation (template not prefix-stable).
    """
    prompt_text, completion_text, _, _ = _render(prompt, completion, tokenizer)
    return prompt_text, completion_text


# --------------------------------------------------------------------------------------------
# Settings and token-level helpers
# --------------------------------------------------------------------------------------------


def _check_length(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")


@dataclass(frozen=True)
class _Settings:
    max_length: int | None
    max_prompt_length: int | None
    prompt_truncation: str
    completion_truncation: str
    step_separator: str = DEFAULT_STEP_SEPARATOR
    prompt_separator: bool = True

    def __post_init__(self):
        if not isinstance(self.step_separator, str) or not self.step_separator:
            raise ValueError(f"step_separator must be a non-empty string, got {self.step_separator!r}")
        _check_length(self.max_length, "max_length")
        _check_length(self.max_prompt_length, "max_prompt_length")
        for name in ("prompt_truncation", "completion_truncation"):
            mode = getattr(self, name)
            if mode not in TRUNCATION_MODES:
                raise ValueError(f"{name} must be one of {TRUNCATION_MODES}, got {mode!r}")
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}) so that every completion keeps at least one token"
            )


class _Context:
    """A tokenizer plus the facts about it that every row needs (computed once)."""

    def __init__(self, tokenizer, settings: _Settings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no eos_token_id; completions need an EOS")
        self.bos_id = tokenizer.bos_token_id
        self.prefix_ids = _leading_special_ids(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_special_ids(tokenizer) -> list[int]:
    """The special-token ids the tokenizer puts in front of a single text (e.g. ``[bos]`` or ``[]``)."""
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    n = len(without)
    for start in range(len(with_special) - n + 1):
        if with_special[start : start + n] == without:
            return with_special[:start]
    raise ValueError(
        f"cannot locate the text tokens of {probe!r} ({without}) in the tokenizer's output with special "
        f"tokens ({with_special}); prefkit cannot tell which special tokens the tokenizer adds"
    )


def _tokenize_prompt(ctx: _Context, prompt_text: str, prompt_is_chat: bool) -> list[int]:
    ids = ctx.encode(prompt_text)
    return ids if prompt_is_chat else ctx.prefix_ids + ids


def _tokenize_completion(ctx: _Context, completion_text: str, completion_is_chat: bool) -> list[int]:
    ids = ctx.encode(completion_text)
    if not _ends_with_eos(ctx, ids, allow_trailing_whitespace=completion_is_chat):
        ids.append(ctx.eos_id)
    return ids


def _ends_with_eos(ctx: _Context, ids: list[int], allow_trailing_whitespace: bool) -> bool:
    if ids and ids[-1] == ctx.eos_id:
        return True
    if not allow_trailing_whitespace or ctx.eos_id not in ids:
        return False
    last = len(ids) - 1 - ids[::-1].index(ctx.eos_id)
    tail = ids[last + 1 :]
    return ctx.tokenizer.decode(tail, skip_special_tokens=False).strip() == ""


def _truncate_prompt(ctx: _Context, ids: list[int]) -> tuple[list[int], bool]:
    limit = ctx.settings.max_prompt_length
    if limit is None or len(ids) <= limit:
        return ids, False
    if ctx.settings.prompt_truncation == "keep_start":
        return ids[:limit], True
    # keep_end: the last tokens, but a leading BOS stays in front (the model always saw one there).
    if ctx.bos_id is not None and ids[0] == ctx.bos_id and limit > 1:
        return [ids[0]] + ids[len(ids) - (limit - 1) :], True
    return ids[len(ids) - limit :], True


def _truncate_completion(ctx: _Context, ids: list[int], budget: int | None) -> tuple[list[int], bool]:
    if budget is None or len(ids) <= budget:
        return ids, False
    if ctx.settings.completion_truncation == "keep_start":
        return ids[:budget], True
    return ids[len(ids) - budget :], True


def _completion_budget(ctx: _Context, prompt_ids: list[int]) -> int | None:
    max_length = ctx.settings.max_length
    if max_length is None:
        return None
    budget = max_length - len(prompt_ids)
    if budget < 1:
        raise OverlongPromptError(
            f"the prompt has {len(prompt_ids)} tokens, max_length is {max_length}: no completion token "
            "would remain; set max_prompt_length below max_length to cut prompts"
        )
    return budget


def _weight(value: Any) -> float:
    return 1.0 if value is None else float(value)


def _margin(value: Any) -> float:
    return 0.0 if value is None else float(value)


def _label(value: Any) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise TypeError(f"label must be a bool, got {value!r}")


# --------------------------------------------------------------------------------------------
# Per-record tokenization
# --------------------------------------------------------------------------------------------


def _pairwise(record: PairwiseRecord, ctx: _Context) -> tuple[dict[str, Any], bool, bool]:
    if record.tie:
        raise ValueError("a tie (neither response better) carries no preference to train on; leave ties out")
    # The rendered prompt depends only on the prompt, so both renders agree on it.
    p_text, c_text, p_chat, c_chat = _render(record.prompt, record.chosen, ctx.tokenizer)
    joint = record.rejected_prompt is not None
    rp_text, r_text, rp_chat, r_chat = _render(
        record.rejected_prompt if joint else record.prompt, record.rejected, ctx.tokenizer
    )
    prompt_ids, prompt_cut = _truncate_prompt(ctx, _tokenize_prompt(ctx, p_text, p_chat))
    budget = _completion_budget(ctx, prompt_ids)
    chosen_ids, chosen_cut = _truncate_completion(ctx, _tokenize_completion(ctx, c_text, c_chat), budget)
    rejected_prompt_ids: list[int] = []
    if joint:  # the rejected completion answers its own prompt, with its own budget
        rejected_prompt_ids, rejected_prompt_cut = _truncate_prompt(ctx, _tokenize_prompt(ctx, rp_text, rp_chat))
        prompt_cut = prompt_cut or rejected_prompt_cut
        budget = _completion_budget(ctx, rejected_prompt_ids)
    rejected_ids, rejected_cut = _truncate_completion(ctx, _tokenize_completion(ctx, r_text, r_chat), budget)
    example = {
        "prompt_input_ids": prompt_ids,
        "chosen_input_ids": chosen_ids,
        "rejected_input_ids": rejected_ids,
        "weight": _weight(record.weight),
        "margin": _margin(record.margin),
        "truncated": prompt_cut or chosen_cut or rejected_cut,
    }
    if joint:
        example["rejected_prompt_input_ids"] = rejected_prompt_ids
    return example, prompt_cut, chosen_cut or rejected_cut


def _unpaired(record: UnpairedRecord, ctx: _Context) -> tuple[dict[str, Any], bool, bool]:
    p_text, c_text, p_chat, c_chat = _render(record.prompt, record.completion, ctx.tokenizer)
    prompt_ids, prompt_cut = _truncate_prompt(ctx, _tokenize_prompt(ctx, p_text, p_chat))
    budget = _completion_budget(ctx, prompt_ids)
    completion_ids, completion_cut = _truncate_completion(ctx, _tokenize_completion(ctx, c_text, c_chat), budget)
    example = {
        "prompt_input_ids": prompt_ids,
        "completion_input_ids": completion_ids,
        "label": _label(record.label),
        "weight": _weight(record.weight),
        "truncated": prompt_cut or completion_cut,
    }
    return example, prompt_cut, completion_cut


def _ranked(record: RankedRecord, ctx: _Context) -> tuple[dict[str, Any], bool, bool]:
    levels = ranked_levels(record)
    level_of = [0] * len(record.completions)
    for level, members in enumerate(levels):
        for index in members:
            level_of[index] = level
    renders = [_render(record.prompt, completion, ctx.tokenizer) for completion in record.completions]
    p_text, _, p_chat, _ = renders[0]
    prompt_ids, prompt_cut = _truncate_prompt(ctx, _tokenize_prompt(ctx, p_text, p_chat))
    budget = _completion_budget(ctx, prompt_ids)
    cuts = [
        _truncate_completion(ctx, _tokenize_completion(ctx, c_text, c_chat), budget) for _, c_text, _, c_chat in renders
    ]
    any_cut = any(cut for _, cut in cuts)
    example = {
        "prompt_input_ids": prompt_ids,
        "completions_input_ids": [ids for ids, _ in cuts],
        "ranking": [index for members in levels for index in members],
        "levels": level_of,
        "scores": [float(x) for x in record.scores] if record.scores is not None else [],
        "weight": 1.0,
        "truncated": prompt_cut or any_cut,
    }
    return example, prompt_cut, any_cut


def _generation_prompt(ctx: _Context, prompt: Any, suffix: str = "") -> tuple[list[int], bool]:
    """``(ids, cut)`` of a prompt as a policy sees it before its completion: chat messages rendered with
    ``add_generation_prompt=True``, a plain text (followed by ``suffix``) with the tokenizer's leading special
    tokens; cut to ``max_prompt_length``."""
    _check_text(prompt, "prompt")
    if _is_messages(prompt):
        text, chat = _apply_template(ctx.tokenizer, prompt, add_generation_prompt=True), True
    else:
        text, chat = prompt + suffix, False
    return _truncate_prompt(ctx, _tokenize_prompt(ctx, text, chat))


def _stepwise(record: StepwiseRecord, ctx: _Context) -> tuple[dict[str, Any], bool, bool]:
    sep = ctx.settings.step_separator
    prompt_ids, prompt_cut = _generation_prompt(ctx, record.prompt, sep if ctx.settings.prompt_separator else "")
    budget = _completion_budget(ctx, prompt_ids)
    steps: list[list[int]] = []
    labels: list[float] = []
    used = 0
    for k, (step, label) in enumerate(zip(record.completions, record.labels)):
        if not isinstance(step, str):
            raise ValueError(f"step {k} is {type(step).__name__}; the steps of a stepwise record must be plain text")
        ids = ctx.encode(step + sep)
        if budget is not None and used + len(ids) > budget:
            break
        steps.append(ids)
        labels.append(float(label))
        used += len(ids)
    if not steps:
        raise OverlongPromptError(
            f"the prompt has {len(prompt_ids)} tokens and the first step does not fit in max_length "
            f"{ctx.settings.max_length}"
        )
    steps_cut = len(steps) < len(record.completions)
    example = {
        "prompt_input_ids": prompt_ids,
        "steps_input_ids": steps,
        "step_labels": labels,
        "weight": 1.0,
        "truncated": prompt_cut or steps_cut,
    }
    return example, prompt_cut, steps_cut


def tokenize_pairwise(
    record: PairwiseRecord,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    prompt_truncation: str = "keep_end",
    completion_truncation: str = "keep_start",
) -> dict[str, Any]:
    """Tokenize one pairwise record.

    Returns ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids": list[int],
    "weight": float (1.0 when absent), "margin": float (0.0 when absent), "truncated": bool}``, and for a
    joint pair (``rejected_prompt``, JPO) ``"rejected_prompt_input_ids": list[int]``, the prompt the rejected
    completion answers (it then gets that prompt's length budget).
    Completion ids end with EOS unless cut by ``max_length`` (see the module docstring for the
    special-token, EOS and truncation rules).

    Raises:
        ValueError: bad settings (e.g. ``max_prompt_length >= max_length``), no EOS token.
        OverlongPromptError: the prompt alone has ``max_length`` tokens or more.
        ChatTemplateError: chat messages that cannot be rendered.
    """
    settings = _Settings(max_length, max_prompt_length, prompt_truncation, completion_truncation)
    return _pairwise(record, _Context(tokenizer, settings))[0]


def tokenize_prompt(
    prompt: Any, tokenizer, *, max_prompt_length: int | None = None, prompt_truncation: str = "keep_end"
) -> list[int]:
    """The token ids a prompt (text or chat messages) gets in training, for generation: chat messages
    rendered with ``add_generation_prompt=True``, the tokenizer's leading special tokens on a plain
    text, cut to ``max_prompt_length`` as training cuts it."""
    _check_text(prompt, "prompt")
    ctx = _Context(tokenizer, _Settings(None, max_prompt_length, prompt_truncation, "keep_start"))
    return _generation_prompt(ctx, prompt)[0]


def tokenize_unpaired(
    record: UnpairedRecord,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    prompt_truncation: str = "keep_end",
    completion_truncation: str = "keep_start",
) -> dict[str, Any]:
    """Tokenize one unpaired (thumbs up/down) record.

    Returns ``{"prompt_input_ids", "completion_input_ids": list[int], "label": bool,
    "weight": float (1.0 when absent), "truncated": bool}``. Same rules and errors as
    :func:`tokenize_pairwise`.
    """
    settings = _Settings(max_length, max_prompt_length, prompt_truncation, completion_truncation)
    return _unpaired(record, _Context(tokenizer, settings))[0]


def tokenize_ranked(
    record: RankedRecord,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    prompt_truncation: str = "keep_end",
    completion_truncation: str = "keep_start",
) -> dict[str, Any]:
    """Tokenize one ranked (listwise) record: a prompt and ``K`` completions.

    Returns ``{"prompt_input_ids": list[int], "completions_input_ids": list[list[int]]`` (one per
    completion, in record order), ``"ranking": list[int]`` (completion indices best first),
    ``"levels": list[int]`` (each completion's rank level, 0 = best; completions with equal
    ``scores`` share a level and appear in the ranking in index order), ``"scores": list[float]`` (the
    record's graded scores, one per completion, or ``[]`` when it has none), ``"weight": 1.0,
    "truncated": bool}``. The ranking comes from the record's ``ranking`` or else its ``scores``
    (`prefkit.data.convert.ranked_levels`). Every completion gets the same budget
    ``max_length - len(prompt)``. Same rules and errors as :func:`tokenize_pairwise`.
    """
    settings = _Settings(max_length, max_prompt_length, prompt_truncation, completion_truncation)
    return _ranked(record, _Context(tokenizer, settings))[0]


def tokenize_stepwise(
    record: StepwiseRecord,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    prompt_truncation: str = "keep_end",
    step_separator: str = DEFAULT_STEP_SEPARATOR,
    prompt_separator: bool = True,
) -> dict[str, Any]:
    """Tokenize one stepwise record (a solution in steps, one label per step).

    Returns ``{"prompt_input_ids": list[int]`` (a plain prompt + ``step_separator``, or without it when
    ``prompt_separator`` is False: the prompt exactly as a policy sees it; or the chat template's generation
    prompt), ``"steps_input_ids": list[list[int]]`` (each ``step + step_separator``),
    ``"step_labels": list[float]`` (1.0 / 0.0 for bool labels), ``"weight": 1.0, "truncated": bool}``.
    Steps that do not fit whole in ``max_length`` are left out with their labels; when not even the
    first fits, :class:`OverlongPromptError`.
    """
    settings = _Settings(
        max_length, max_prompt_length, prompt_truncation, "keep_start", step_separator, prompt_separator
    )
    return _stepwise(record, _Context(tokenizer, settings))[0]


# --------------------------------------------------------------------------------------------
# Whole datasets
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizationStats:
    """What :func:`tokenize_records` did.

    Attributes:
        kind: ``"pairwise"``, ``"unpaired"`` or ``"ranked"``.
        n_records: records given.
        n_rows: rows in the returned dataset (``n_records - n_dropped``).
        n_truncated: rows with any cut (prompt or completion).
        n_prompt_truncated: rows whose prompt was cut to ``max_prompt_length``.
        n_completion_truncated: rows with at least one completion cut by ``max_length``.
        n_dropped: records dropped because their prompt alone filled ``max_length``.
        dropped_indices: 0-based indices (into the input list) of the dropped records.
    """

    kind: str
    n_records: int = 0
    n_rows: int = 0
    n_truncated: int = 0
    n_prompt_truncated: int = 0
    n_completion_truncated: int = 0
    n_dropped: int = 0
    dropped_indices: list[int] = field(default_factory=list)


def _features(kind: str):
    from datasets import Features, List, Value

    ids = List(Value("int64"))
    if kind == "pairwise":
        return Features(
            {
                "prompt_input_ids": ids,
                "chosen_input_ids": ids,
                "rejected_input_ids": ids,
                "weight": Value("float64"),
                "margin": Value("float64"),
                "truncated": Value("bool"),
            }
        )
    if kind == "stepwise":
        return Features(
            {
                "prompt_input_ids": ids,
                "steps_input_ids": List(ids),
                "step_labels": List(Value("float64")),
                "weight": Value("float64"),
                "truncated": Value("bool"),
            }
        )
    if kind == "ranked":
        return Features(
            {
                "prompt_input_ids": ids,
                "completions_input_ids": List(ids),
                "ranking": ids,
                "levels": ids,
                "scores": List(Value("float64")),
                "weight": Value("float64"),
                "truncated": Value("bool"),
            }
        )
    return Features(
        {
            "prompt_input_ids": ids,
            "completion_input_ids": ids,
            "label": Value("bool"),
            "weight": Value("float64"),
            "truncated": Value("bool"),
        }
    )


_TOKENIZERS = {PairwiseRecord: _pairwise, UnpairedRecord: _unpaired, RankedRecord: _ranked, StepwiseRecord: _stepwise}


def _record_kind(records: Sequence[Any]) -> str:
    if len(records) == 0:
        raise ValueError("tokenize_records got no records")
    kinds = {}
    for i, record in enumerate(records):
        if not isinstance(record, tuple(_TOKENIZERS)):
            raise TypeError(
                f"record {i} is a {type(record).__name__}; tokenize_records takes PairwiseRecord, "
                "UnpairedRecord, RankedRecord or StepwiseRecord (convert other kinds first, see prefkit.data "
                "conversions)"
            )
        kinds.setdefault(record.kind, i)
    if len(kinds) > 1:
        detail = ", ".join(f"{kind} (first at index {i})" for kind, i in kinds.items())
        raise ValueError(f"tokenize_records got mixed record kinds: {detail}; tokenize each kind separately")
    return next(iter(kinds))


def tokenize_records(
    records: Sequence[PairwiseRecord] | Sequence[UnpairedRecord] | Sequence[RankedRecord],
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    prompt_truncation: str = "keep_end",
    completion_truncation: str = "keep_start",
    drop_overlong_prompts: bool = True,
    progress: bool = True,
    step_separator: str = DEFAULT_STEP_SEPARATOR,
):
    """Tokenize a list of records of one kind into a ``datasets.Dataset``.

    Args:
        records: all :class:`PairwiseRecord`, all :class:`UnpairedRecord` or all :class:`RankedRecord`
            (mixed kinds: ValueError).
        tokenizer: a ``transformers`` tokenizer with an EOS token (and a chat template for messages).
        max_length, max_prompt_length, prompt_truncation, completion_truncation: as in
            :func:`tokenize_pairwise`.
        drop_overlong_prompts: a record whose prompt alone has ``max_length`` tokens or more (only
            possible without ``max_prompt_length``) is dropped, counted and logged (True, TRL's
            behaviour) or raises :class:`OverlongPromptError` naming the record index (False).
        progress: show a tqdm progress bar.
        step_separator: stepwise records: the text that ends every step (:func:`tokenize_stepwise`).

    Returns:
        ``(dataset, stats)``: the dataset has the columns of :func:`tokenize_pairwise` /
        :func:`tokenize_unpaired` / :func:`tokenize_ranked` in record order (minus dropped records),
        plus ``user_id`` when any record has one (``None`` for the others) and ``rejected_prompt_input_ids`` when
        any pair is joint (``[]`` for the others); ``stats`` is a :class:`TokenizationStats`.
        The counts are also logged on the ``"prefkit.data"`` logger (WARNING when rows were cut or
        dropped, INFO otherwise).
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    kind = _record_kind(records)
    settings = _Settings(max_length, max_prompt_length, prompt_truncation, completion_truncation, step_separator)
    ctx = _Context(tokenizer, settings)
    tokenize_one = _TOKENIZERS[type(records[0])]
    stats = TokenizationStats(kind=kind, n_records=len(records))
    columns: dict[str, list] = {name: [] for name in _features(kind)}
    user_ids: list[Any] = []
    rejected_prompts: list[list[int]] = []  # joint pairs' own prompts ([] for the others)

    rows: Iterable = tqdm(records, desc=f"Tokenizing {kind} records", disable=not progress, unit="rec")
    for index, record in enumerate(rows):
        try:
            example, prompt_cut, completion_cut = tokenize_one(record, ctx)
        except OverlongPromptError as err:
            if not drop_overlong_prompts:
                raise OverlongPromptError(f"record {index}: {err}") from err
            stats.n_dropped += 1
            stats.dropped_indices.append(index)
            continue
        except (ChatTemplateError, ValueError, TypeError) as err:
            if type(err) in (ChatTemplateError, ValueError, TypeError):  # ours: add the record index
                raise type(err)(f"record {index}: {err}") from err
            raise
        for name, values in columns.items():
            values.append(example[name])
        user_ids.append(getattr(record, "user_id", None))
        rejected_prompts.append(example.get("rejected_prompt_input_ids", []))
        stats.n_prompt_truncated += prompt_cut
        stats.n_completion_truncated += completion_cut
        stats.n_truncated += example["truncated"]
    stats.n_rows = len(user_ids)

    features = _features(kind)
    if any(rejected_prompts):
        from datasets import List, Value

        columns["rejected_prompt_input_ids"] = rejected_prompts
        features["rejected_prompt_input_ids"] = List(Value("int64"))
    dataset = Dataset.from_dict(columns, features=features)
    if any(uid is not None for uid in user_ids):
        dataset = dataset.add_column("user_id", user_ids)
    _log_stats(stats, settings)
    return dataset, stats


def _log_stats(stats: TokenizationStats, settings: _Settings) -> None:
    message = (
        f"tokenized {stats.n_records} {stats.kind} records into {stats.n_rows} rows: "
        f"{stats.n_truncated} truncated ({stats.n_prompt_truncated} with the prompt cut to "
        f"max_prompt_length={settings.max_prompt_length}, {stats.n_completion_truncated} with a completion "
        f"cut by max_length={settings.max_length}), {stats.n_dropped} dropped because the prompt alone "
        f"filled max_length"
    )
    if stats.n_dropped:
        shown = stats.dropped_indices[:10]
        more = "" if len(stats.dropped_indices) <= 10 else ", ..."
        message += f" (record indices {', '.join(map(str, shown))}{more})"
    level = logging.WARNING if (stats.n_truncated or stats.n_dropped) else logging.INFO
    logger.log(level, message)
