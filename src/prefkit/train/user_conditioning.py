"""User-conditioned policies: one policy for many users, each user a soft-prompt token.

Every user of the training data gets ``user_prefix_tokens`` new special tokens (``<|user:ID|>``, or
``<|user:ID:0|>``, ``<|user:ID:1|>``, ... for several) in the tokenizer, and the policy one new input
embedding row per token. Every example's prompt gets its user's tokens in front (after a leading BOS,
which stays first), so the policy learns ``pi(y | x, u)`` with any pairwise (or unpaired) loss.

Initialisation and the reference. All new rows start at the same vector, the mean of the model's
existing rows (ids ``0 .. base_vocab - 1``; the output-embedding rows too, when they are not tied), in
the policy and in the reference. So at the start ``pi(y | x, u)`` is the same for every user, and the
frozen reference stays so: ``pi_ref(y | x, u) = pi_ref(y | x, <neutral>)`` for every ``u``. The KL
term of DPO and its relatives is therefore to the reference conditioned on that neutral token, not
to the reference without any prefix. (A policy that already carries user tokens, e.g. a run
continued from a user-conditioned checkpoint, keeps its rows; only new users start at the mean, and
its frozen copy is then user-dependent.)

A new user after training (`fit_new_user` = `add_new_user` + `fit_user`): their token starts at the
mean of the seen users' rows, and only that embedding row is optimised, on their few pairs, with the
loss; every other weight stays as it is. `prefkit.online.sampling.sample_for_user` samples completions
with a user's tokens in front of the prompt.

The mapping user -> tokens -> ids is a `UserTokens`; the trainer writes it as ``users.json`` next to
the model and tokenizer (`load_user_tokens` reads it back). docs/personalized.md, "User-conditioned
policies".
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prefkit.data.records import PairwiseRecord

logger = logging.getLogger("prefkit.train")

__all__ = [
    "MISSING_USER",
    "USERS_FILE",
    "UserTokens",
    "add_new_user",
    "add_user_tokens",
    "fit_new_user",
    "fit_user",
    "load_user_tokens",
    "pair_margins",
    "setup_user_conditioning",
    "user_token_names",
]

USERS_FILE = "users.json"
FORMAT = "prefkit-user-tokens/1"
# With user_id_missing: shared, a record without a user_id counts as this user.
MISSING_USER = "none"


def user_token_names(user_id: str, n_tokens: int = 1) -> list[str]:
    """The special tokens of one user: ``["<|user:ID|>"]``, or ``["<|user:ID:0|>", ...]`` for ``n_tokens > 1``."""
    if n_tokens == 1:
        return [f"<|user:{user_id}|>"]
    return [f"<|user:{user_id}:{k}|>" for k in range(n_tokens)]


@dataclass
class UserTokens:
    """Which token ids stand for which user.

    Attributes:
        ids: user id -> its ``n_tokens`` token ids (the prompt prefix), in order.
        n_tokens: tokens per user (``user_prefix_tokens``).
        base_vocab: the tokenizer's length before user tokens were added; the neutral start row is
            the mean of the rows ``0 .. base_vocab - 1``.
        missing_user: the user a record without ``user_id`` counts as (`MISSING_USER`), or None:
            such a record is an error.
    """

    ids: dict[str, list[int]]
    n_tokens: int
    base_vocab: int
    missing_user: str | None = None

    @property
    def users(self) -> list[str]:
        return sorted(self.ids)

    def ids_of(self, user_id: str | None) -> list[int]:
        """The prefix ids of ``user_id`` (None: the shared token, when ``missing_user`` is set)."""
        key = self.missing_user if user_id is None else str(user_id)
        if key is None:
            raise ValueError(
                "a record has no user_id; user-conditioned training needs one (or user_id_missing: shared)"
            )
        if key not in self.ids:
            raise KeyError(
                f"user {key!r} has no token (known users: {_preview(self.users)}); add a new user with "
                "prefkit.train.user_conditioning.fit_new_user"
            )
        return list(self.ids[key])

    def prefix(self, prompt_ids: Sequence[int], user_id: str | None, bos_token_id: int | None) -> list[int]:
        """``prompt_ids`` with the user's tokens in front; a leading BOS stays first."""
        ids = list(prompt_ids)
        head = 1 if ids and bos_token_id is not None and ids[0] == bos_token_id else 0
        return ids[:head] + self.ids_of(user_id) + ids[head:]

    def prefix_dataset(self, dataset, split: str, bos_token_id: int | None, index_column: str = "example_index"):
        """A tokenized dataset with every ``prompt_input_ids`` prefixed by its row's ``user_id``.

        Raises ValueError naming the rows (1-based record numbers) that have no ``user_id`` (unless
        ``missing_user`` is set) or whose user has no token."""
        n = len(dataset)
        users = dataset["user_id"] if "user_id" in dataset.column_names else [None] * n
        numbers = [int(i) + 1 for i in dataset[index_column]] if index_column in dataset.column_names else None
        where = (lambda rows: _preview([numbers[i] for i in rows])) if numbers else (lambda rows: _preview(rows))
        if self.missing_user is None:
            missing = [i for i, u in enumerate(users) if u is None]
            if missing:
                raise ValueError(
                    f"{split} data: {len(missing)} of {n} records have no user_id (records {where(missing)}); "
                    "user_conditioning needs a user_id on every record, or set user_id_missing: shared to give "
                    f"them the shared token {user_token_names(MISSING_USER, self.n_tokens)[0]}"
                )
        unknown = sorted({str(u) for u in users if u is not None and str(u) not in self.ids})
        if unknown:
            raise ValueError(
                f"{split} data: user(s) {_preview(unknown)} do not occur in the training data, so they have no "
                "token; give them training records, or add them after training with fit_new_user"
            )
        prompts = [self.prefix(p, u, bos_token_id) for p, u in zip(dataset["prompt_input_ids"], users)]
        dataset = dataset.remove_columns("prompt_input_ids").add_column("prompt_input_ids", prompts)
        if "rejected_prompt_input_ids" in dataset.column_names:  # joint pairs: their other prompt too
            others = [
                self.prefix(p, u, bos_token_id) if len(p) else p
                for p, u in zip(dataset["rejected_prompt_input_ids"], users)
            ]
            dataset = dataset.remove_columns("rejected_prompt_input_ids").add_column(
                "rejected_prompt_input_ids", others
            )
        return dataset

    def to_dict(self, tokenizer=None) -> dict[str, Any]:
        users = {}
        for user in self.users:
            entry: dict[str, Any] = {"ids": self.ids[user]}
            if tokenizer is not None:
                entry["tokens"] = tokenizer.convert_ids_to_tokens(self.ids[user])
            users[user] = entry
        return {
            "format": FORMAT,
            "n_tokens": self.n_tokens,
            "base_vocab": self.base_vocab,
            "missing_user": self.missing_user,
            "users": users,
        }

    def save(self, folder: str | os.PathLike, tokenizer=None) -> Path:
        """Write ``folder/users.json`` (with the token strings when ``tokenizer`` is given)."""
        path = Path(folder) / USERS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(tokenizer), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def load_user_tokens(folder: str | os.PathLike, tokenizer=None) -> UserTokens:
    """Read ``folder/users.json``; with a ``tokenizer``, check that it maps every token to the saved id."""
    path = Path(folder) / USERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a user-conditioned policy")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    tokens = UserTokens(
        ids={u: [int(i) for i in e["ids"]] for u, e in data["users"].items()},
        n_tokens=int(data["n_tokens"]),
        base_vocab=int(data["base_vocab"]),
        missing_user=data.get("missing_user"),
    )
    if tokenizer is not None:
        for user, ids in tokens.ids.items():
            got = tokenizer.convert_tokens_to_ids(user_token_names(user, tokens.n_tokens))
            if got != ids:
                raise ValueError(
                    f"{path}: user {user!r} has ids {ids} but the tokenizer maps its tokens to {got}; load the "
                    "tokenizer saved with this policy"
                )
    return tokens


def _preview(items: Sequence[Any], limit: int = 8) -> str:
    shown = ", ".join(str(x) for x in list(items)[:limit])
    return shown + (", ..." if len(items) > limit else "")


# ------------------------------------------------------------------------------------------
# Tokens and embedding rows
# ------------------------------------------------------------------------------------------


def _add_special(tokenizer, names: Sequence[str]) -> None:
    """Add ``names`` as special tokens (matched whole, never split, skipped when decoding)."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in names], special_tokens=True)


def _embedding_weights(model: nn.Module) -> list[Tensor]:
    """The input embedding weight, and the output embedding weight when it is a separate tensor."""
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:
        weights.append(out.weight)
    return weights


def _ensure_rows(model: nn.Module, n_rows: int) -> None:
    """Grow the model's embeddings to at least ``n_rows`` rows (never shrink a padded vocabulary)."""
    if model.get_input_embeddings().weight.shape[0] < n_rows:
        model.resize_token_embeddings(n_rows, mean_resizing=False)


@torch.no_grad()
def _set_rows(model: nn.Module, new_ids: Sequence[int], source: Sequence[int] | range) -> None:
    """Set the embedding rows ``new_ids`` (input, and output when untied) to the mean of the rows ``source``."""
    for weight in _embedding_weights(model):
        mean = weight[torch.as_tensor(list(source), device=weight.device)].float().mean(0)
        weight[torch.as_tensor(list(new_ids), device=weight.device)] = mean.to(weight.dtype)


def add_user_tokens(
    model: nn.Module, tokenizer, users: Sequence[str], *, n_tokens: int = 1, missing_user: str | None = None
) -> UserTokens:
    """Add ``n_tokens`` special tokens per user to ``tokenizer``, grow ``model``'s embeddings to match,
    and start every new row at the mean of the existing rows. Tokens the tokenizer already has keep
    their ids and rows."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    users = sorted({str(u) for u in users})
    if not users:
        raise ValueError("no users: user conditioning needs records with a user_id")
    base_vocab = len(tokenizer)
    names = {u: user_token_names(u, n_tokens) for u in users}
    vocab = tokenizer.get_vocab()
    new = [t for u in users for t in names[u] if t not in vocab]
    _add_special(tokenizer, new)
    ids = {u: tokenizer.convert_tokens_to_ids(names[u]) for u in users}
    new_ids = tokenizer.convert_tokens_to_ids(new)
    _ensure_rows(model, len(tokenizer))
    if new_ids:
        _set_rows(model, new_ids, range(base_vocab))
    logger.info("user conditioning: %d users, %d new tokens (ids %s..)", len(users), len(new_ids), new_ids[:1])
    return UserTokens(ids=ids, n_tokens=n_tokens, base_vocab=base_vocab, missing_user=missing_user)


def _users_of(data) -> list[str | None]:
    """The ``user_id`` of every record of a list of records or a tokenized dataset."""
    if data is None:
        return []
    if isinstance(data, (list, tuple)):
        return [getattr(r, "user_id", None) for r in data]
    if "user_id" in data.column_names:
        return list(data["user_id"])
    return [None] * len(data)


def setup_user_conditioning(model: nn.Module, tokenizer, train_data, args, peft_config=None):
    """The trainer's hook: tokens for the users of ``train_data`` (records or a tokenized dataset),
    added to ``tokenizer`` and ``model`` (before LoRA wrapping); returns ``(UserTokens, peft_config)``.

    With LoRA, ``peft_config`` gets the user token ids as ``trainable_token_indices`` (only those
    rows of the embedding train; with the adapters disabled, the reference sees the neutral rows)."""
    from prefkit.train.trainer import _is_peft_model

    if _is_peft_model(model):
        raise ValueError(
            "user_conditioning adds embedding rows, which a model that is already PEFT-wrapped cannot take; "
            "pass the base model and a peft_config (lora_r) instead"
        )
    missing_user = MISSING_USER if args.user_id_missing == "shared" else None
    users = {MISSING_USER if u is None and missing_user else u for u in _users_of(train_data)}
    users.discard(None)
    tokens = add_user_tokens(
        model, tokenizer, sorted(users), n_tokens=args.user_prefix_tokens, missing_user=missing_user
    )
    if peft_config is not None:
        peft_config = copy.copy(peft_config)
        ids = sorted(i for row in tokens.ids.values() for i in row)
        if getattr(peft_config, "trainable_token_indices", None) is not None:
            raise ValueError("user_conditioning sets the LoRA config's trainable_token_indices itself; leave it unset")
        peft_config.trainable_token_indices = ids
    return tokens, peft_config


def init_reference_rows(reference: nn.Module, tokens: UserTokens) -> None:
    """Give a separately loaded reference the user rows at its own neutral start (the mean of its rows
    ``0 .. base_vocab - 1``), so it scores every user alike."""
    ids = sorted(i for row in tokens.ids.values() for i in row)
    _ensure_rows(reference, max(ids) + 1)
    _set_rows(reference, ids, range(tokens.base_vocab))


def describe(tokens: UserTokens) -> str:
    """One line for the model card."""
    shared = f", records without user_id -> {MISSING_USER!r}" if tokens.missing_user else ""
    return f"{len(tokens.ids)} users, {tokens.n_tokens} soft-prompt token(s) each{shared} (users.json)"


# ------------------------------------------------------------------------------------------
# Scoring pairs, a new user, sampling
# ------------------------------------------------------------------------------------------


def _check_pairs(records) -> list[PairwiseRecord]:
    records = list(records)
    if not records or not all(isinstance(r, PairwiseRecord) for r in records):
        raise ValueError("give a non-empty list of PairwiseRecords")
    return records


def _tokenized_pairs(records, tokenizer, tokens: UserTokens | None, user_id, *, max_length, max_prompt_length):
    """Pairwise examples of ``records`` (prefixed with ``user_id``'s tokens, or each record's own
    ``user_id`` when ``user_id`` is None; no prefix when ``tokens`` is None)."""
    from prefkit.data.tokenize import tokenize_pairwise

    records = _check_pairs(records)
    examples = []
    for r in records:
        ex = tokenize_pairwise(r, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        if tokens is not None:
            who = r.user_id if user_id is None else user_id
            ex["prompt_input_ids"] = tokens.prefix(ex["prompt_input_ids"], who, tokenizer.bos_token_id)
        examples.append(ex)
    return examples


def _pair_logps(model: nn.Module, batch: dict[str, Tensor], *, tokens: bool):
    from prefkit.data.batching import module_device
    from prefkit.train.logps import completion_logps

    device = module_device(model)
    ids, attn, comp = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
    return completion_logps(model, ids, attn, comp, per_token=tokens, logsumsq=tokens)


@torch.no_grad()
def pair_margins(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer,
    records: Sequence[PairwiseRecord],
    *,
    tokens: UserTokens | None = None,
    user_id: str | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> Tensor:
    """``[N]`` implicit-reward margins ``(log pi - log ref)(chosen) - (log pi - log ref)(rejected)`` of
    ``records`` (> 0: the policy ranks the pair as labelled). With ``tokens``, prompts get the tokens of
    each record's ``user_id`` (or of ``user_id`` for all); without, no prefix (a pooled policy)."""
    from prefkit.data.collators import PairwiseCollator

    examples = _tokenized_pairs(
        records, tokenizer, tokens, user_id, max_length=max_length, max_prompt_length=max_prompt_length
    )
    collate = PairwiseCollator(tokenizer.pad_token_id)
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        diff = _pair_logps(policy, batch, tokens=False).sum - _pair_logps(reference, batch, tokens=False).sum
        b = diff.shape[0] // 2
        out.append((diff[:b] - diff[b:]).float().cpu())
    return torch.cat(out)


def _add_user_row(model: nn.Module, tokens: UserTokens, new_ids: list[int], vocab_size: int) -> None:
    """Start the new user's k-th row at the mean of the seen users' k-th rows."""
    _ensure_rows(model, vocab_size)
    for k, new_id in enumerate(new_ids):
        _set_rows(model, [new_id], [ids[k] for ids in tokens.ids.values()])


class _RowOverride:
    """While active, the input embedding returns ``rows[k]`` wherever the input id is ``ids[k]``
    (a trainable parameter in place of the fixed embedding rows)."""

    def __init__(self, model: nn.Module, ids: list[int], rows: nn.Parameter):
        self.ids, self.rows = ids, rows
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        input_ids = args[0]
        for k, token_id in enumerate(self.ids):
            output = torch.where((input_ids == token_id).unsqueeze(-1), self.rows[k].to(output.dtype), output)
        return output

    def remove(self):
        self.handle.remove()


def add_new_user(
    policy: nn.Module, tokenizer, tokens: UserTokens, user_id: str, *, reference: nn.Module | None = None
) -> list[int]:
    """Add ``user_id``'s tokens to ``tokenizer`` and ``tokens``, and its rows to ``policy`` (and to
    ``reference``, in place, when given), each starting at the mean of the seen users' rows of that
    model (the k-th token at the mean of their k-th tokens). Returns the new ids."""
    user_id = str(user_id)
    if user_id in tokens.ids:
        raise ValueError(f"user {user_id!r} already has a token; add_new_user adds users that have none")
    if not tokens.ids:
        raise ValueError("tokens has no users: a new user starts at the mean of the seen users' rows")
    names = user_token_names(user_id, tokens.n_tokens)
    _add_special(tokenizer, names)
    new_ids = tokenizer.convert_tokens_to_ids(names)
    for model in (policy, reference):
        if model is not None:
            _add_user_row(model, tokens, new_ids, len(tokenizer))
    tokens.ids[user_id] = new_ids
    return new_ids


def _loss_params(loss: str, beta: float, loss_params: dict[str, Any] | None):
    from prefkit.losses import get_loss
    from prefkit.losses.combine import resolve_loss_params

    spec = get_loss(loss)
    if spec.kind != "pairwise":
        raise ValueError(f"fitting a user trains on pairs: loss {loss!r} is of kind {spec.kind!r}, not pairwise")
    shared = {"beta": beta} if "beta" in spec.hyperparameters else {}
    return spec, resolve_loss_params([loss], {**shared, **(loss_params or {})})


def fit_user(
    policy: nn.Module,
    tokenizer,
    tokens: UserTokens,
    user_id: str,
    pairs: Sequence[PairwiseRecord],
    *,
    loss: str = "dpo",
    beta: float = 0.1,
    loss_params: dict[str, Any] | None = None,
    steps: int = 100,
    lr: float = 0.05,
    reference: nn.Module | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> float:
    """Optimise **only** ``user_id``'s embedding rows of ``policy`` on ``pairs`` (their prompts
    prefixed with the user's tokens) with the pairwise ``loss``: Adam, ``lr``, ``steps`` full-batch
    steps; ``beta`` and ``loss_params`` as in the config. Every other weight of ``policy``, the other
    users' rows included, stays unchanged. The reference log-probs come from ``reference`` (it must
    have the user's rows, see `add_new_user`) or, by default, from ``policy`` itself with the rows as
    they are before the first step. Returns the last loss."""
    from prefkit.data.collators import PairwiseCollator
    from prefkit.losses.combine import combine_losses
    from prefkit.train.trainer import pair_logps_batch

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or not lr > 0:
        raise ValueError(f"steps must be an int >= 1 and lr > 0, got steps={steps!r}, lr={lr!r}")
    spec, params = _loss_params(loss, beta, loss_params)
    ids = tokens.ids_of(user_id)
    examples = _tokenized_pairs(
        pairs, tokenizer, tokens, user_id, max_length=max_length, max_prompt_length=max_prompt_length
    )
    batch = PairwiseCollator(tokenizer.pad_token_id)(examples)
    ref = None
    if spec.needs_reference:
        with torch.no_grad():
            ref = _pair_logps(policy if reference is None else reference, batch, tokens=spec.needs_tokens)

    def objective() -> Tensor:
        pol = _pair_logps(policy, batch, tokens=spec.needs_tokens)
        loss_batch = pair_logps_batch(pol, ref, batch["completion_mask"], batch["margin"], tokens=spec.needs_tokens)
        return combine_losses(loss_batch, [loss], [1.0], params).loss.mean()

    final = _optimise_rows(policy, ids, objective, steps=steps, lr=lr)
    logger.info("fit_user %r: %d pairs, %d steps, final %s loss %.4f", user_id, len(examples), steps, loss, final)
    return final


def fit_new_user(
    policy: nn.Module,
    tokenizer,
    tokens: UserTokens,
    user_id: str,
    pairs: Sequence[PairwiseRecord],
    *,
    reference: nn.Module | None = None,
    **fit,
) -> list[int]:
    """An unseen user from a few of their pairs: `add_new_user` (rows at the mean of the seen users'
    rows, in ``policy`` and ``reference``), then `fit_user` (only those rows train; ``fit``: ``loss``,
    ``beta``, ``loss_params``, ``steps``, ``lr``, ``max_length``, ``max_prompt_length``). Without a
    ``reference``, the reference is the policy with the new rows at their start. Returns the new
    user's token ids (also added to ``tokens``)."""
    _check_pairs(pairs)
    _loss_params(fit.get("loss", "dpo"), fit.get("beta", 0.1), fit.get("loss_params"))  # fail before adding
    new_ids = add_new_user(policy, tokenizer, tokens, user_id, reference=reference)
    fit_user(policy, tokenizer, tokens, user_id, pairs, reference=reference, **fit)
    return new_ids


def _optimise_rows(policy: nn.Module, ids: list[int], objective, *, steps: int, lr: float) -> float:
    """Minimise ``objective()`` over the input-embedding rows ``ids`` alone (Adam, ``steps`` steps);
    every parameter of ``policy`` is frozen meanwhile and the rows are written back at the end.
    Returns the last loss."""
    weight = policy.get_input_embeddings().weight
    index = torch.as_tensor(ids, device=weight.device)
    rows = nn.Parameter(weight[index].detach().float().clone())
    was_training, grads = policy.training, [p.requires_grad for p in policy.parameters()]
    policy.eval()
    for p in policy.parameters():
        p.requires_grad_(False)
    override = _RowOverride(policy, ids, rows)
    optimizer = torch.optim.Adam([rows], lr=lr)
    try:
        for _ in range(steps):
            value = objective()
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    finally:
        override.remove()
        for p, g in zip(policy.parameters(), grads):
            p.requires_grad_(g)
        policy.train(was_training)
    with torch.no_grad():
        weight[index] = rows.detach().to(weight.dtype)
    return float(value.detach())
