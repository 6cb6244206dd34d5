"""Input/output types of preference losses and the loss registry.

A loss is a pure function over tensors (DESIGN.md §3): it takes one batch object
(`PairLogps`, `UnpairedLogps`, `ListLogps`, `RewardPair`, `RewardList`, `PreferenceLogits`) and keyword-only
hyper-parameters with their published defaults, and returns a `LossOutput` whose ``loss`` is
**per example, unreduced**. The trainer weights and reduces. Nothing in ``prefkit.losses``
knows about models, tokenizers or optimizers.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from prefkit.ranges import check_range

KINDS = ("pairwise", "unpaired", "list", "reward_pair", "reward_list", "judge", "policy", "process")


@dataclass
class LossOutput:
    """``loss``: ``[B]`` per-example loss. ``metrics``: name -> per-example ``[B]`` tensor.

    Metric names shared by all pairwise losses: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``. Unpaired losses report ``rewards`` (one per
    example; the trainer splits it by label).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class PairLogps:
    """Summed log-probs of chosen (w) and rejected (l) completions, shape ``[B]``.

    ``ref_*`` are ``None`` for reference-free losses. ``*_len`` are completion token counts
    (float). Per-token tensors are ``[B, T]`` with the log-prob of each completion token at its
    position and 0 elsewhere; ``*_mask`` marks completion tokens (1.0) in the same layout. They
    are filled only for losses registered with ``needs_tokens=True`` (the ``*_logsumsq``
    tensors as well, which only WPO-style weighting reads).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_len: Tensor
    rejected_len: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    policy_chosen_tokens: Tensor | None = None
    policy_rejected_tokens: Tensor | None = None
    ref_chosen_tokens: Tensor | None = None
    ref_rejected_tokens: Tensor | None = None
    chosen_mask: Tensor | None = None
    rejected_mask: Tensor | None = None
    # log sum_v pi(v | context)^2 per completion token (detached), same layout; WPO's weights
    chosen_logsumsq: Tensor | None = None
    rejected_logsumsq: Tensor | None = None
    margin: Tensor | None = None  # optional per-pair preference strength from the data
    # KL(pi_ref(.|prefix) || pi(.|prefix)) over the vocabulary at each completion token, with its gradient, same
    # layout; filled only for losses registered with needs_kl=True (TDPO's sequential KL)
    chosen_kl: Tensor | None = None
    rejected_kl: Tensor | None = None
    # per-token weights >= 0 on the log-ratios and on the KL terms, same layout; filled only for losses registered
    # with token_masks (SparsePO's learned masks, MaPO's activation masks), computed by the trainer
    chosen_weights: Tensor | None = None
    rejected_weights: Tensor | None = None
    chosen_kl_weights: Tensor | None = None
    rejected_kl_weights: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.policy_chosen.shape[0]


@dataclass
class UnpairedLogps:
    """Thumbs-up/down feedback: one completion per example, ``label`` True when desirable.

    ``ref_point`` is a scalar tensor the trainer keeps and passes in: the batch KL estimate
    z0 for KTO, the running mean reward delta for BCO. Losses hold no state.
    """

    policy: Tensor
    ref: Tensor | None
    label: Tensor
    length: Tensor
    ref_point: Tensor | None = None


@dataclass
class ListLogps:
    """``K`` completions per prompt: ``policy``/``ref`` are ``[B, K]``, ``ranking`` ``[B, K]``
    holds completion indices from best to worst; ``length`` ``[B, K]`` token counts; ``win_prob``
    ``[B, K]`` (optional) each completion's estimated probability of beating the others (SPPO); ``levels``
    ``[B, K]`` (optional) each completion's rank level, 0 = best, tied completions share one, ``-1`` absent;
    ``scores`` ``[B, K]`` (optional) graded labels from the data, higher is better (a reward model's or
    annotators' scores), NaN where a list has none."""

    policy: Tensor
    ranking: Tensor
    length: Tensor
    ref: Tensor | None = None
    win_prob: Tensor | None = None
    levels: Tensor | None = None
    scores: Tensor | None = None


@dataclass
class RewardPair:
    """Reward-model scores of chosen and rejected, ``[B]`` each; optional ``margin`` ``[B]``."""

    chosen: Tensor
    rejected: Tensor
    margin: Tensor | None = None


@dataclass
class RewardList:
    """Reward-model scores ``[B, K]`` and a best-to-worst ``ranking`` ``[B, K]``.

    A list with fewer than ``K`` completions ends its ``ranking`` row with ``-1`` (its absent
    entries' scores are ignored). ``levels`` ``[B, K]`` (optional) gives each completion's rank
    level, 0 = best, ``-1`` absent; tied completions share a level. Without it the ranking is
    strict: ``levels[b, ranking[b, k]] = k``.
    """

    scores: Tensor
    ranking: Tensor
    levels: Tensor | None = None


@dataclass
class PreferenceLogits:
    """A pairwise judge's logits ``[B]`` that chosen beats rejected (0 = indifferent), and an
    optional per-pair ``margin`` ``[B]`` from the data. Losses of kind ``"judge"`` take it."""

    logits: Tensor
    margin: Tensor | None = None


@dataclass
class StepScores:
    """A process reward model's logits for the steps of ``B`` solutions, flattened: ``logits`` ``[S]`` (one
    per step, the log-odds that the step is correct), ``labels`` ``[S]`` (1 correct, 0 wrong, or a soft
    probability in between) and ``example`` ``[S]`` (the index in ``0..B-1`` of the solution each step
    belongs to). Every solution has at least one step. Losses of kind ``"process"`` take it."""

    logits: Tensor
    labels: Tensor
    example: Tensor
    batch_size: int


@dataclass
class PolicyLogps:
    """Per-token log-probs of sampled completions, ``[B, T]`` each (0 where ``mask`` is 0).

    ``advantages`` is ``[B]`` (one per completion) or ``[B, T]``. ``old_logps``: the sampling
    policy's log-probs (None: on-policy, taken as ``logps.detach()``). ``ref_logps``: the reference's,
    needed when ``beta > 0``. ``max_completion_length``: Dr. GRPO's constant normaliser (None: ``T``).
    """

    logps: Tensor
    advantages: Tensor
    mask: Tensor
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    max_completion_length: int | None = None

    @property
    def batch_size(self) -> int:
        return self.logps.shape[0]


BATCH_TYPES = {
    "pairwise": PairLogps,
    "unpaired": UnpairedLogps,
    "list": ListLogps,
    "reward_pair": RewardPair,
    "reward_list": RewardList,
    "judge": PreferenceLogits,
    "policy": PolicyLogps,
    "process": StepScores,
}


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function and what the trainer must feed it."""

    name: str
    kind: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    needs_tokens: bool
    formula: str
    citation: str
    # True when loss[i] does not belong to example i (e.g. AOT sorts over the batch): the
    # trainer then refuses per-example weights other than 1.
    batch_coupled: bool = False
    # hyper-parameter -> allowed range (`prefkit.ranges`), checked when the parameters are resolved
    ranges: dict[str, str] = field(default_factory=dict)
    # True when the loss reads the per-token full-vocabulary KL to the reference (chosen_kl / rejected_kl)
    needs_kl: bool = False
    # "learned" / "activations": the loss reads per-token masks (chosen_weights, ..., chosen_kl_weights, ...) that the
    # trainer computes from the reference's hidden states (`prefkit.models.token_masks`); None: no masks
    token_masks: str | None = None

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Keyword-only parameters and their defaults, read from the signature."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def __call__(self, batch, **kwargs) -> LossOutput:
        return self.fn(batch, **kwargs)


_REGISTRY: dict[str, LossSpec] = {}


def _docstring_field(doc: str, key: str) -> str:
    """Return the text after ``key:`` in a docstring (up to the next blank line)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    for i, line in enumerate(lines):
        if line.strip().lower().startswith(key + ":"):
            out = [line.split(":", 1)[1].strip()]
            for nxt in lines[i + 1 :]:
                if not nxt.strip():
                    break
                out.append(nxt.strip())
            return " ".join(s for s in out if s)
    return ""


# What a token-mask loss's masks are made from (`prefkit.models.token_masks`).
TOKEN_MASKS = ("learned", "activations")


def register_loss(
    name: str,
    *,
    kind: str,
    needs_reference: bool = True,
    needs_tokens: bool = False,
    batch_coupled: bool = False,
    ranges: dict[str, str] | None = None,
    needs_kl: bool = False,
    token_masks: str | None = None,
) -> Callable[[Callable[..., LossOutput]], Callable[..., LossOutput]]:
    """Register ``fn`` under ``name``.

    The docstring must contain a ``Formula:`` line and a ``Paper:`` line; `prefkit losses`
    prints both. Hyper-parameters are the function's keyword-only arguments; ``ranges`` gives each
    one's allowed values in `prefkit.ranges` notation (``{"beta": "> 0"}``). The arguments of this
    decorator must be literals: the configuration check reads them from the source without importing
    torch (`prefkit.train.settings`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")

    def deco(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        formula = _docstring_field(fn.__doc__ or "", "formula")
        citation = _docstring_field(fn.__doc__ or "", "paper")
        if not formula or not citation:
            raise ValueError(f"loss {name!r}: docstring needs 'Formula:' and 'Paper:' lines")
        declared = dict(ranges or {})
        params = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if set(declared) != params:
            raise ValueError(f"loss {name!r}: ranges must name each hyper-parameter once ({sorted(params)})")
        for text in declared.values():
            check_range(text)
        if needs_kl and not (needs_tokens and needs_reference and kind == "pairwise"):
            raise ValueError(f"loss {name!r}: needs_kl is for pairwise losses with needs_tokens and a reference")
        if token_masks not in (None, *TOKEN_MASKS) or (token_masks and not needs_kl):
            raise ValueError(f"loss {name!r}: token_masks is one of {TOKEN_MASKS} on a needs_kl loss")
        _REGISTRY[name] = LossSpec(
            name, kind, fn, needs_reference, needs_tokens, formula, citation, batch_coupled, declared, needs_kl,
            token_masks,
        )  # fmt: skip
        return fn

    return deco


def get_loss(name: str) -> LossSpec:
    """Look up a registered loss; an unknown name is an error naming the closest one."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown loss {name!r}.{hint} Run `prefkit losses` for the list.")
    return _REGISTRY[name]


def list_losses(kind: str | None = None) -> list[LossSpec]:
    return [s for s in _REGISTRY.values() if kind is None or s.kind == kind]


def pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """The standard per-example metrics of a pairwise loss (rewards detached)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": c,
        "rewards/rejected": r,
        "rewards/margins": c - r,
        "rewards/accuracies": (c > r).to(c.dtype),
    }


def require_reference(b: PairLogps | UnpairedLogps | ListLogps, loss: str) -> None:
    missing = b.ref is None if not isinstance(b, PairLogps) else (b.ref_chosen is None or b.ref_rejected is None)
    if missing:
        raise ValueError(f"loss {loss!r} needs reference log-probs, but the batch has none")


def ranking_levels(ranking: Tensor, levels: Tensor | None = None) -> Tensor:
    """``[B, K]`` rank level of each completion by index (0 best, ``-1`` absent): ``levels`` when given, else the
    position of each completion in its strict ``ranking`` (best first, ``-1`` padding)."""
    if levels is not None:
        return levels
    n, k = ranking.shape
    position = torch.arange(k, device=ranking.device).expand(n, k)
    index = torch.where(ranking >= 0, ranking, k)  # padding writes to a spare last column, dropped afterwards
    out = torch.full((n, k + 1), -1, dtype=ranking.dtype, device=ranking.device)
    return out.scatter(1, index, position)[:, :k]


def has_ties(levels: Tensor) -> bool:
    """Whether any list of ``levels`` ``[B, K]`` (``-1`` absent) holds two present completions at one level."""
    same = levels[:, :, None] == levels[:, None, :]
    distinct = ~torch.eye(levels.shape[1], dtype=torch.bool, device=levels.device)
    return bool((same & distinct & (levels >= 0)[:, :, None]).any())


def plackett_luce_nll(ordered: Tensor, present: Tensor) -> Tensor:
    """``[B]`` negative Plackett-Luce log-likelihood of a ranking: ``ordered`` ``[B, K]`` holds each list's scores
    best first (anything where ``present`` is False, i.e. absent entries at the end), and the result is
    ``sum_k [logsumexp_{j >= k, present} s_j - s_k]`` over the present positions ``k``."""
    low = torch.finfo(ordered.dtype).min
    k = torch.arange(ordered.shape[1], device=ordered.device)
    later = (k[None, :] >= k[:, None])[None] & present[:, None, :]  # [B, k, j]: j >= k and j present
    lse = torch.logsumexp(torch.where(later, ordered[:, None, :], low), dim=-1)
    return torch.where(present, lse - ordered, torch.zeros_like(ordered)).sum(1)


def as_tensor(x: float, like: Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)
