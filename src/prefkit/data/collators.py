"""Tokenized examples -> padded batches (docs/architecture.md §3, docs/tokenization.md).

Examples are dicts as produced by :mod:`prefkit.data.tokenize` (or rows of the
``datasets.Dataset`` it returns): id lists may be Python lists or 1-D tensors. Keys a collator
does not need are ignored, except ``user_id``, which is passed through as a Python list.
Padding is on the right; ``attention_mask`` is 1 on real tokens and ``completion_mask`` is 1 on
the completion tokens (the ones scored).

With ``share_prompt=True``, `PairwiseCollator` and `ListCollator` pack each example into **one**
row, ``[prompt][completion 1]...[completion K]`` (`pack_shared_rows`), for
`prefkit.train.logps.shared_prefix_logps`, which runs the prompt once for all its completions.
With ``packing=True``, `PairwiseCollator` packs several such units (or, without ``share_prompt``,
prompt + chosen and prompt + rejected units) into each row, so a batch holds (almost) no padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger("prefkit.data")

__all__ = [
    "SHARED_PREFIX_KEYS",
    "ListCollator",
    "PairwiseCollator",
    "StepCollator",
    "UnpairedCollator",
    "pack_shared_rows",
]

# The keys of a packed (share_prompt / packing) batch that `prefkit.train.logps.shared_prefix_logps` reads.
SHARED_PREFIX_KEYS = ("input_ids", "position_ids", "segment_ids", "completion_rows", "completion_mask")


def _check_pad(pad_token_id: Any, pad_to_multiple_of: Any) -> None:
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(
            f"pad_token_id must be an int, got {pad_token_id!r} (set tokenizer.pad_token before building the collator)"
        )
    if pad_to_multiple_of is not None and (
        isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
    ):
        raise ValueError(f"pad_to_multiple_of must be None or a positive int, got {pad_to_multiple_of!r}")


def _ids(example: dict, key: str, index: int) -> list[int]:
    try:
        value = example[key]
    except KeyError:
        raise KeyError(f"example {index} has no {key!r} (keys: {sorted(example)})") from None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return list(value)


def pad_rows(
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    pad_token_id: int,
    pad_to_multiple_of: int | None,
) -> dict[str, torch.Tensor]:
    """Right-pad ``prompt + completion`` rows into input_ids / attention_mask / completion_mask."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = _round_up(max(lengths), pad_to_multiple_of)
    n = len(lengths)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        n_prompt, n_total = len(prompt), len(prompt) + len(completion)
        if n_total:
            input_ids[row, :n_total] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :n_total] = 1
        completion_mask[row, n_prompt:n_total] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def pack_shared_rows(
    prompts: Sequence[list[int]],
    completions: Sequence[Sequence[list[int]]],
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    pad_to_multiple_of: int | None,
    *,
    packing: bool = False,
    max_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pack units ``[prompt][completion 1]...[completion K]`` into rows (prefix sharing, packing).

    Unit ``u`` is ``prompts[u]`` and its ``K`` completions ``completions[u]`` (the same ``K`` for
    every unit); ``rows[u][k]`` is the row that prompt ``u`` + completion ``k`` has in the unpacked
    layout (`pad_rows` over all ``N = U * K`` rows). Without ``packing`` each unit is one row (prefix
    sharing); with ``packing`` the units are packed into as few rows of at most ``max_tokens`` tokens
    as first-fit by decreasing length finds (a unit longer than ``max_tokens`` gets a row of its own;
    ``max_tokens=None``: the longest unit's length, so no row is wider than the widest unit).
    Returns, right-padded to the longest row ``L`` (rounded up to ``pad_to_multiple_of``):

    - ``input_ids`` ``[R, L]``: the packed tokens, then ``pad_token_id``;
    - ``position_ids`` ``[R, L]``: ``0..P-1`` over each unit's prompt and ``P..P+C_k-1`` over its
      completion ``k`` (every completion restarts where its prompt ends: its positions in its
      unpacked row); 0 on padding;
    - ``segment_ids`` ``[R, L]``: 0 on each prompt, ``k + 1`` on completion ``k``, -1 on padding;
    - ``completion_rows`` ``[U, K]``: ``rows``, in the order in which the units appear, row by row;
    - ``completion_mask`` ``[N, T]``: the unpacked layout's completion mask (row ``rows[u][k]`` is 1
      at columns ``P..P+C_k-1``), in which the log-probs come back.

    Every unit needs a prompt token and a completion token (a unit begins where a prompt does).
    """
    k = len(completions[0])
    flat_rows = sorted(r for unit_rows in rows for r in unit_rows)
    if any(len(c) != k for c in completions) or any(len(r) != k for r in rows):
        raise ValueError(f"every unit must have the same number of completions and rows ({k})")
    if flat_rows != list(range(len(flat_rows))):
        raise ValueError(f"rows must number the U*K = {len(flat_rows)} unpacked rows 0..{len(flat_rows) - 1} once each")
    for u, (prompt, unit_completions) in enumerate(zip(prompts, completions)):
        if not prompt or not any(unit_completions):
            raise ValueError(f"unit {u} (unpacked rows {list(rows[u])}) needs a prompt token and a completion token")
    lengths = [len(p) + sum(len(c) for c in cs) for p, cs in zip(prompts, completions)]
    bins = _first_fit(lengths, max_tokens or max(lengths)) if packing else [[u] for u in range(len(lengths))]
    unpacked = [len(p) + len(c) for p, cs in zip(prompts, completions) for c in cs]
    width = _round_up(max(sum(lengths[u] for u in units) for units in bins), pad_to_multiple_of)
    unpacked_width = _round_up(max(unpacked), pad_to_multiple_of)
    input_ids = torch.full((len(bins), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    segment_ids = torch.full((len(bins), width), -1, dtype=torch.long)
    completion_mask = torch.zeros((len(flat_rows), unpacked_width), dtype=torch.long)
    for i, units in enumerate(bins):
        start = 0
        for u in units:
            n_prompt = len(prompts[u])
            input_ids[i, start : start + n_prompt] = torch.tensor(prompts[u], dtype=torch.long)
            position_ids[i, start : start + n_prompt] = torch.arange(n_prompt)
            segment_ids[i, start : start + n_prompt] = 0
            start += n_prompt
            for j, completion in enumerate(completions[u]):
                end = start + len(completion)
                input_ids[i, start:end] = torch.tensor(completion, dtype=torch.long)
                position_ids[i, start:end] = torch.arange(n_prompt, n_prompt + len(completion))
                segment_ids[i, start:end] = j + 1
                completion_mask[rows[u][j], n_prompt : n_prompt + len(completion)] = 1
                start = end
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "completion_rows": torch.tensor([rows[u] for units in bins for u in units], dtype=torch.long),
        "completion_mask": completion_mask,
    }


def _first_fit(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` in bins of at most ``max_tokens`` in total, first-fit by decreasing
    length (ties in index order); an item longer than ``max_tokens`` gets a bin of its own."""
    bins: list[list[int]] = []
    totals: list[int] = []
    for u in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((b for b, total in enumerate(totals) if total + lengths[u] <= max_tokens), None)
        if fits is None:
            bins.append([u])
            totals.append(lengths[u])
        else:
            bins[fits].append(u)
            totals[fits] += lengths[u]
    return bins


def _round_up(width: int, multiple: int | None) -> int:
    return width if multiple is None else -(-width // multiple) * multiple


def _reference_sums(examples: Sequence[dict], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Precomputed reference log-probs (`prefkit.train.reference_cache`) as ``[B]`` float64 tensors,
    for each of ``keys`` the examples carry."""
    out = {}
    for key in keys:
        present = [key in example for example in examples]
        if not any(present):
            continue
        if not all(present):
            raise KeyError(f"examples {[i for i, p in enumerate(present) if not p]} have no {key!r}; others have it")
        out[key] = torch.tensor([float(example[key]) for example in examples], dtype=torch.float64)
    return out


def _reference_tokens(
    examples: Sequence[dict], key: str, prompts: Sequence[list[int]], completions: Sequence[list[int]], width: int
) -> torch.Tensor:
    """Per-token reference log-probs ``[B, width]`` float64 in the layout of ``completion_mask``:
    example ``i``'s values at columns ``len(prompt_i) .. len(prompt_i) + len(completion_i) - 1``."""
    out = torch.zeros((len(examples), width), dtype=torch.float64)
    for i, (example, prompt, completion) in enumerate(zip(examples, prompts, completions)):
        values = _ids(example, key, i)
        if len(values) != len(completion):
            raise ValueError(
                f"example {i}: {key!r} has {len(values)} values for a completion of {len(completion)} tokens "
                "(the reference log-probs were computed for other token ids)"
            )
        out[i, len(prompt) : len(prompt) + len(completion)] = torch.tensor(values, dtype=torch.float64)
    return out


def _user_ids(examples: Sequence[dict]) -> list | None:
    if not any("user_id" in example for example in examples):
        return None
    return [example.get("user_id") for example in examples]


class PairwiseCollator:
    """Collate pairwise examples into one concatenated batch of ``2B`` rows.

    Rows ``0..B-1`` are prompt+chosen and rows ``B..2B-1`` prompt+rejected (row ``i`` and ``B+i``
    share example ``i``'s prompt; for a joint pair, non-empty ``rejected_prompt_input_ids``, row ``B+i`` is
    that prompt + rejected), right-padded with ``pad_token_id``.

    Output: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[2B, T]`` long; ``weight``
    and ``margin`` ``[B]`` float32 (1.0 / 0.0 when an example lacks them); ``user_id`` (list of
    length ``B``) when the examples carry one. ``T`` is the longest row, rounded up to a multiple
    of ``pad_to_multiple_of`` when set.

    With ``share_prompt=True`` the prompt appears once: ``input_ids``, ``position_ids`` and
    ``segment_ids`` are ``[B, L]`` packed rows ``[prompt][chosen][rejected]`` and
    ``completion_rows`` is ``[B, 2]`` (`pack_shared_rows`); ``completion_mask`` keeps the ``[2B, T]``
    layout above (the layout `prefkit.train.logps.shared_prefix_logps` returns log-probs in);
    there is no ``attention_mask``. ``weight``, ``margin`` and ``user_id`` are unchanged.

    Precomputed reference log-probs (``PreferenceConfig.precompute_ref_logps``) pass through when
    the examples carry them: ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]`` float64, and
    ``ref_chosen_token_logps`` / ``ref_rejected_token_logps`` ``[B, T]`` float64 in the layout of
    the chosen / rejected half of ``completion_mask``.

    With ``packing=True`` (padding-free packing) the batch has the keys and layout of
    ``share_prompt`` above, but the units — ``[prompt][chosen][rejected]`` with ``share_prompt``,
    else ``[prompt][chosen]`` and ``[prompt][rejected]`` — are packed into ``R`` rows of at most
    ``packing_max_tokens`` tokens (None: the longest unit's length; `pack_shared_rows`), and
    ``completion_rows`` is ``[U, K]``: ``[B, 2]`` or ``[2B, 1]``, one row per unit in order of appearance.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        share_prompt: bool = False,
        packing: bool = False,
        packing_max_tokens: int | None = None,
    ):
        _check_pad(pad_token_id, pad_to_multiple_of)
        if packing_max_tokens is not None and (
            isinstance(packing_max_tokens, bool) or not isinstance(packing_max_tokens, int) or packing_max_tokens < 1
        ):
            raise ValueError(f"packing_max_tokens must be None or a positive int, got {packing_max_tokens!r}")
        if packing_max_tokens is not None and not packing:
            raise ValueError("packing_max_tokens is set but packing is off; set packing=True or drop it")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.share_prompt = share_prompt
        self.packing = packing
        self.packing_max_tokens = packing_max_tokens

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("PairwiseCollator got an empty batch")
        prompts = [_ids(ex, "prompt_input_ids", i) for i, ex in enumerate(examples)]
        chosen = [_ids(ex, "chosen_input_ids", i) for i, ex in enumerate(examples)]
        rejected = [_ids(ex, "rejected_input_ids", i) for i, ex in enumerate(examples)]
        # a joint pair (JPO): the rejected completion answers its own prompt
        own = [ex.get("rejected_prompt_input_ids") for ex in examples]
        rejected_prompts = [
            _ids(ex, "rejected_prompt_input_ids", i) if o is not None and len(o) else p
            for i, (ex, o, p) in enumerate(zip(examples, own, prompts))
        ]
        joint = any(o is not None and len(o) for o in own)
        size = len(examples)
        if self.share_prompt and joint:
            raise ValueError(
                "share_prompt runs each pair's prompt once, but a joint pair (rejected_prompt) has two prompts; "
                "set share_prompt to false"
            )
        if self.share_prompt:  # units [prompt][chosen][rejected]
            batch: dict[str, Any] = pack_shared_rows(
                prompts,
                [[c, r] for c, r in zip(chosen, rejected)],
                [[i, size + i] for i in range(size)],  # chosen rows, then rejected rows
                self.pad_token_id,
                self.pad_to_multiple_of,
                packing=self.packing,
                max_tokens=self.packing_max_tokens,
            )
        elif self.packing:  # units [prompt][chosen] and [prompt][rejected]
            batch = pack_shared_rows(
                prompts + rejected_prompts,
                [[c] for c in chosen + rejected],
                [[i] for i in range(2 * size)],
                self.pad_token_id,
                self.pad_to_multiple_of,
                packing=True,
                max_tokens=self.packing_max_tokens,
            )
        else:
            batch = pad_rows(prompts + rejected_prompts, chosen + rejected, self.pad_token_id, self.pad_to_multiple_of)
        batch["weight"] = torch.tensor([float(ex.get("weight", 1.0)) for ex in examples], dtype=torch.float32)
        batch["margin"] = torch.tensor([float(ex.get("margin", 0.0)) for ex in examples], dtype=torch.float32)
        batch.update(_reference_sums(examples, ("ref_chosen_logps", "ref_rejected_logps")))
        width = batch["completion_mask"].shape[1]
        for key, rows_prompts, completions in (
            ("ref_chosen_token_logps", prompts, chosen),
            ("ref_rejected_token_logps", rejected_prompts, rejected),
        ):
            if key in examples[0]:
                batch[key] = _reference_tokens(examples, key, rows_prompts, completions, width)
        user_ids = _user_ids(examples)
        if user_ids is not None:
            batch["user_id"] = user_ids
        return batch


class UnpairedCollator:
    """Collate unpaired (thumbs up/down) examples, with KTO's mismatched KL rows.

    Output: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[B, T]`` long (prompt ``i`` +
    completion ``i``); ``label`` ``[B]`` bool; ``weight`` ``[B]`` float32; ``user_id`` (list) when
    the examples carry one; and, with ``kl_rows=True`` (default), ``kl_input_ids``,
    ``kl_attention_mask``, ``kl_completion_mask`` ``[B, T_kl]``: prompt ``i`` + the completion of
    example ``(i - 1) % B``, padded separately (``T_kl`` may differ from ``T``). This is TRL 1.16's
    KTO pairing (the completions rotated by one, ``completions[-1:] + completions[:-1]``), so the
    KL estimate z0 from these rows equals TRL's on the same batch.

    The KL rows' prompt and completion were each sized for their own example, so a KL row can be
    longer than ``max_length``; with ``max_length`` set, KL rows are cut to their first
    ``max_length`` tokens (tokenization guarantees every prompt is shorter than ``max_length``, so
    at least one completion token remains). Matched rows are never cut here: tokenization sized them.

    A batch of one example has no other completion to mismatch with: its KL row is the matched row
    (prompt 0 + completion 0), so a KL estimate from that batch equals the implied reward. A
    warning is logged the first time this happens; drop the last incomplete batch
    (``dataloader_drop_last``) or use batches of at least 2 to avoid it.

    Precomputed reference log-probs (``ref_completion_logps``) pass through as ``[B]`` float64
    when the examples carry them.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        kl_rows: bool = True,
    ):
        _check_pad(pad_token_id, pad_to_multiple_of)
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(f"max_length must be None or a positive int, got {max_length!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.kl_rows = kl_rows
        self._warned_single = False

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("UnpairedCollator got an empty batch")
        prompts = [_ids(ex, "prompt_input_ids", i) for i, ex in enumerate(examples)]
        completions = [_ids(ex, "completion_input_ids", i) for i, ex in enumerate(examples)]
        batch: dict[str, Any] = pad_rows(prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
        labels = []
        for i, ex in enumerate(examples):
            if "label" not in ex:
                raise KeyError(f"example {i} has no 'label' (keys: {sorted(ex)})")
            labels.append(bool(ex["label"]))
        batch["label"] = torch.tensor(labels, dtype=torch.bool)
        batch["weight"] = torch.tensor([float(ex.get("weight", 1.0)) for ex in examples], dtype=torch.float32)
        batch.update(_reference_sums(examples, ("ref_completion_logps",)))
        user_ids = _user_ids(examples)
        if user_ids is not None:
            batch["user_id"] = user_ids
        if self.kl_rows:
            batch.update(self._kl(prompts, completions))
        return batch

    def _kl(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        size = len(prompts)
        if size == 1 and not self._warned_single:
            logger.warning(
                "UnpairedCollator: a batch of 1 has no mismatched completion; its KL row is the matched "
                "row, so the KL estimate for this batch equals the implied reward (warned once)"
            )
            self._warned_single = True
        kl_completions = [completions[(i - 1) % size] for i in range(size)]  # TRL 1.16's pairing
        if self.max_length is not None:
            too_long = [i for i, p in enumerate(prompts) if len(p) >= self.max_length]
            if too_long:
                raise ValueError(
                    f"examples {too_long} have prompts of max_length={self.max_length} tokens or more; "
                    "tokenize with the same max_length (it drops or cuts such prompts)"
                )
            kl_completions = [c[: self.max_length - len(p)] for p, c in zip(prompts, kl_completions)]
        rows = pad_rows(prompts, kl_completions, self.pad_token_id, self.pad_to_multiple_of)
        return {f"kl_{key}": value for key, value in rows.items()}


class ListCollator:
    """Collate ranked (listwise) examples into ``B * K`` rows, record-major.

    ``K`` is the largest number of completions in the batch. Row ``b * K + k`` is prompt ``b`` +
    completion ``k`` of example ``b``. An example with fewer than ``K`` completions fills its spare
    rows with its completion 0 again (so every row has real tokens); its ``ranking`` and
    ``levels`` rows end with ``-1`` there, which the list losses read as "absent".

    Output: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[B*K, T]`` long; ``ranking``
    ``[B, K]`` long (completion indices best first, ``-1`` padded); ``levels`` ``[B, K]`` long
    (rank level per completion, 0 = best, ties share a level, ``-1`` absent; from a strict
    ``ranking`` when an example has no ``levels``); ``scores`` ``[B, K]`` float32 (each completion's
    graded score, NaN where absent or for an example without scores; only when some example has
    them); ``weight`` ``[B]`` float32; ``user_id`` (list)
    when the examples carry one.

    With ``share_prompt=True`` the prompt appears once: ``input_ids``, ``position_ids`` and
    ``segment_ids`` are ``[B, L]`` packed rows ``[prompt][completion 0]...[completion K-1]`` (spare
    completions included, as above) and ``completion_rows`` is ``[B, K]`` (`pack_shared_rows`);
    ``completion_mask`` keeps the ``[B*K, T]`` record-major layout above; there is no
    ``attention_mask``.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, share_prompt: bool = False):
        _check_pad(pad_token_id, pad_to_multiple_of)
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.share_prompt = share_prompt

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("ListCollator got an empty batch")
        prompts = [_ids(ex, "prompt_input_ids", i) for i, ex in enumerate(examples)]
        lists = [_completion_list(ex, i) for i, ex in enumerate(examples)]
        k = max(len(completions) for completions in lists)
        filled = [[c[j] if j < len(c) else c[0] for j in range(k)] for c in lists]
        if self.share_prompt:
            rows = [[b * k + j for j in range(k)] for b in range(len(examples))]  # record-major
            batch: dict[str, Any] = pack_shared_rows(prompts, filled, rows, self.pad_token_id, self.pad_to_multiple_of)
        else:
            rows_prompt = [p for p in prompts for _ in range(k)]
            rows_completion = [c for completions in filled for c in completions]
            batch = pad_rows(rows_prompt, rows_completion, self.pad_token_id, self.pad_to_multiple_of)
        rankings = [_ranking(ex, i, len(c)) for i, (ex, c) in enumerate(zip(examples, lists))]
        levels = [_levels(ex, ranking) for ex, ranking in zip(examples, rankings)]
        batch["ranking"] = torch.tensor([r + [-1] * (k - len(r)) for r in rankings], dtype=torch.long)
        batch["levels"] = torch.tensor([lv + [-1] * (k - len(lv)) for lv in levels], dtype=torch.long)
        scores = [_scores(ex, i, len(c)) for i, (ex, c) in enumerate(zip(examples, lists))]
        if any(s is not None for s in scores):
            nan = float("nan")
            rows_scores = [(s if s is not None else []) for s in scores]
            batch["scores"] = torch.tensor([s + [nan] * (k - len(s)) for s in rows_scores], dtype=torch.float32)
        batch["weight"] = torch.tensor([float(ex.get("weight", 1.0)) for ex in examples], dtype=torch.float32)
        user_ids = _user_ids(examples)
        if user_ids is not None:
            batch["user_id"] = user_ids
        return batch


class StepCollator:
    """Collate stepwise examples (`prefkit.data.tokenize.tokenize_stepwise`) into one right-padded row each:
    ``prompt + step_1 + ... + step_n``.

    Output: ``input_ids``, ``attention_mask``, ``completion_mask`` (the steps' tokens) ``[B, T]`` long;
    ``step_rows`` / ``step_positions`` ``[S]`` long (the row and the position of each step's last token,
    where a process reward model reads the step's score; steps in example order); ``step_labels`` ``[S]``
    float32; ``step_example`` ``[S]`` long (the example of each step, = ``step_rows``); ``weight`` ``[B]``.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        _check_pad(pad_token_id, pad_to_multiple_of)
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("StepCollator got an empty batch")
        prompts = [_ids(ex, "prompt_input_ids", i) for i, ex in enumerate(examples)]
        rows, positions, labels = [], [], []
        solutions = []
        for b, (ex, prompt) in enumerate(zip(examples, prompts)):
            steps = [list(s) for s in ex["steps_input_ids"]]
            step_labels = list(ex["step_labels"])
            if not steps or len(steps) != len(step_labels):
                raise ValueError(f"example {b} has {len(steps)} steps and {len(step_labels)} step labels")
            end = len(prompt)
            for ids in steps:
                end += len(ids)
                rows.append(b)
                positions.append(end - 1)
            labels.extend(float(y) for y in step_labels)
            solutions.append([t for ids in steps for t in ids])
        batch = pad_rows(prompts, solutions, self.pad_token_id, self.pad_to_multiple_of)
        batch["step_rows"] = torch.tensor(rows, dtype=torch.long)
        batch["step_positions"] = torch.tensor(positions, dtype=torch.long)
        batch["step_example"] = batch["step_rows"].clone()
        batch["step_labels"] = torch.tensor(labels, dtype=torch.float32)
        batch["weight"] = torch.tensor([float(ex.get("weight", 1.0)) for ex in examples], dtype=torch.float32)
        return batch


def _completion_list(example: dict, index: int) -> list[list[int]]:
    if "completions_input_ids" not in example:
        raise KeyError(f"example {index} has no 'completions_input_ids' (keys: {sorted(example)})")
    completions = [list(c.tolist() if isinstance(c, torch.Tensor) else c) for c in example["completions_input_ids"]]
    if not completions:
        raise ValueError(f"example {index} has no completions")
    return completions


def _ranking(example: dict, index: int, n: int) -> list[int]:
    ranking = _ids(example, "ranking", index)
    if sorted(ranking) != list(range(n)):
        raise ValueError(f"example {index}: ranking {ranking} is not a permutation of its {n} completion indices")
    return ranking


def _scores(example: dict, index: int, n: int) -> list[float] | None:
    """An example's graded scores (one per completion), or None when it has none."""
    scores = example.get("scores")
    if scores is None or len(scores) == 0:
        return None
    if len(scores) != n:
        raise ValueError(f"example {index}: {len(scores)} scores for its {n} completions")
    return [float(x) for x in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]


def _levels(example: dict, ranking: list[int]) -> list[int]:
    if example.get("levels") is not None:
        return list(example["levels"])
    levels = [0] * len(ranking)
    for position, index in enumerate(ranking):
        levels[index] = position
    return levels
