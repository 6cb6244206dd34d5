"""Pairwise feedback as fixed response embeddings: the input of the personalized reward heads.

Personalized methods (mixture of Bradley-Terry by EM, PAL, VPL, MiCRo) mostly run as small heads on
frozen embeddings of each (prompt, response): embed every pair once with a backbone, then fit heads
in minutes on a CPU. `EmbeddedPairs` is that data: row ``i`` is one labelled pair, ``chosen[i]``
preferred to ``rejected[i]`` by user ``users[user_index[i]]``.

- `embed_pairs`: pairwise records -> `EmbeddedPairs`, through a backbone's final hidden states
  (last token, or mean over the response tokens), optionally cached on disk keyed by the data's
  token ids and user ids, the backbone's weights and the pooling (`StaleEmbeddingCacheError` when a
  cache file does not match).
- `EmbeddingHead`: the base of the small heads trained on these embeddings (``save_pretrained`` /
  ``from_pretrained``: ``config.json`` + ``model.safetensors`` in a folder).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prefkit.data.batching import batches_by_length, module_device, run_batched
from prefkit.data.collators import pad_rows
from prefkit.data.records import PairwiseRecord
from prefkit.data.tokenize import tokenize_pairwise
from prefkit.models.features import last_token_index
from prefkit.models.fingerprint import model_hash, save_safetensors_atomic

__all__ = [
    "CACHE_FILE",
    "POOLINGS",
    "EmbeddedPairs",
    "EmbeddingHead",
    "StaleEmbeddingCacheError",
    "embed_pairs",
    "pool_hidden_states",
]

POOLINGS = ("last", "mean", "sum")
CACHE_FILE = "embedded_pairs.safetensors"
FORMAT_VERSION = 1
MANIFEST_KEY = "prefkit_embedding_cache"


@dataclasses.dataclass
class EmbeddedPairs:
    """``N`` labelled pairs as embeddings.

    Attributes:
        chosen: ``[N, H]`` float embedding of (prompt, preferred response).
        rejected: ``[N, H]`` float embedding of (prompt, other response).
        user_index: ``[N]`` long, the row's user as an index into ``users``; -1 where the record has
            no ``user_id``.
        users: the distinct user ids, sorted; ``users[user_index[i]]`` is row ``i``'s ``user_id``.
        prompt: ``[N, H]`` embedding of the prompt alone (context for routers and gates), or None.
        group: ``[N]`` long planted group of each row's user (lab data; -1 unknown), or None.
        meta: where the embeddings come from (backbone, pooling, data fingerprint, ...).
    """

    chosen: Tensor
    rejected: Tensor
    user_index: Tensor
    users: list[str]
    prompt: Tensor | None = None
    group: Tensor | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chosen.ndim != 2 or self.chosen.shape != self.rejected.shape:
            raise ValueError(
                f"chosen and rejected must both be [N, H]; got {tuple(self.chosen.shape)} and "
                f"{tuple(self.rejected.shape)}"
            )
        n = self.chosen.shape[0]
        if self.user_index.shape != (n,) or self.user_index.dtype != torch.long:
            raise ValueError(
                f"user_index must be a [{n}] long tensor, got {tuple(self.user_index.shape)} {self.user_index.dtype}"
            )
        if n and (int(self.user_index.min()) < -1 or int(self.user_index.max()) >= len(self.users)):
            raise ValueError(
                f"user_index values must lie in [-1, {len(self.users)}) (there are {len(self.users)} users)"
            )
        if self.prompt is not None and self.prompt.shape[0] != n:
            raise ValueError(f"prompt has {self.prompt.shape[0]} rows, chosen has {n}")
        if self.group is not None and self.group.shape != (n,):
            raise ValueError(f"group must be [{n}], got {tuple(self.group.shape)}")

    def __len__(self) -> int:
        return self.chosen.shape[0]

    @property
    def dim(self) -> int:
        return self.chosen.shape[1]

    def subset(self, rows: Sequence[int] | Tensor) -> EmbeddedPairs:
        """The rows ``rows`` (indices or a boolean mask), with the same ``users`` index space."""
        idx = torch.as_tensor(rows)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        return dataclasses.replace(
            self,
            chosen=self.chosen[idx],
            rejected=self.rejected[idx],
            user_index=self.user_index[idx],
            prompt=None if self.prompt is None else self.prompt[idx],
            group=None if self.group is None else self.group[idx],
        )

    def of_users(self, users: Sequence[str]) -> EmbeddedPairs:
        """The rows of the given users (ids in ``users``)."""
        unknown = sorted(set(users) - set(self.users))
        if unknown:
            raise KeyError(f"unknown users {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        wanted = torch.tensor([self.users.index(u) for u in users], dtype=torch.long)
        return self.subset(torch.isin(self.user_index, wanted))


# ------------------------------------------------------------------------------------------
# Embedding pairwise records
# ------------------------------------------------------------------------------------------


class StaleEmbeddingCacheError(RuntimeError):
    """An embedding cache file does not match the data, backbone or pooling it was asked for."""


def pool_hidden_states(hidden: Tensor, attention_mask: Tensor, span_mask: Tensor, pooling: str) -> Tensor:
    """``[N, H]`` one vector per row of final hidden states ``[N, T, H]``.

    ``"last"``: the state at the row's last real token (``attention_mask``); ``"mean"``: the mean of
    the states where ``span_mask`` is 1 (the response tokens, or the whole prompt); ``"sum"``: their
    sum (keeps the length: a reward that adds up per-token terms is linear in it).
    """
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    if pooling in ("mean", "sum"):
        weights = span_mask.unsqueeze(-1).to(hidden.dtype)
        total = (hidden * weights).sum(dim=1)
        return total if pooling == "sum" else total / weights.sum(dim=1).clamp_min(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def truncated_backbone(model: nn.Module, layers: int | None) -> nn.Module:
    """``model`` with only its first ``layers`` decoder layers (a copy; the final norm is kept), so its
    "final" hidden states are those after layer ``layers``; ``None``: ``model`` itself.

    Intermediate layers are often better features than the last one: the last layers of a language
    model serve next-token prediction. ``layers=0`` leaves the token embeddings and the final norm.
    Needs a decoder with a ``layers`` list (Llama-style ``model.model.layers``)."""
    if layers is None:
        return model
    base = getattr(model, "model", model)
    total = len(getattr(base, "layers", ()))
    if not hasattr(base, "layers") or not 0 <= layers <= total:
        raise ValueError(f"backbone_layers must be in [0, {total}] for {type(model).__name__}, got {layers}")
    backbone = copy.deepcopy(model)
    inner = getattr(backbone, "model", backbone)
    inner.layers = nn.ModuleList(list(inner.layers)[:layers])
    backbone.config.num_hidden_layers = layers
    if hasattr(backbone.config, "layer_types") and backbone.config.layer_types is not None:
        backbone.config.layer_types = backbone.config.layer_types[:layers]
    return backbone


def embed_pairs(
    records: Sequence[PairwiseRecord],
    model: nn.Module,
    tokenizer,
    *,
    pooling: str = "last",
    batch_size: int = 16,
    cache_dir: str | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> EmbeddedPairs:
    """Embed pairwise records with a frozen backbone: the input of the personalized heads.

    Each record is tokenized as training tokenizes it (`prefkit.data.tokenize.tokenize_pairwise`:
    prompt with its leading special tokens, completion with EOS, the same truncation), and
    ``model``'s base model (a causal LM's decoder, or a base model itself) is run on prompt +
    response. A row's vector is the final hidden state at the last token (``pooling="last"``, the
    response's EOS) or the mean over the response tokens (``"mean"``); the prompt alone is embedded
    the same way (its last token, or the mean over its tokens). Identical (prompt, response) rows,
    e.g. one pair labelled by many users, are embedded once. Runs under ``torch.no_grad`` with the
    backbone in eval mode (its mode is restored afterwards).

    ``cache_dir``: a folder for one cache file (`CACHE_FILE`: safetensors, with a JSON manifest in
    its header; written atomically). A file whose data (token ids and user ids of every row),
    backbone weights (`prefkit.models.fingerprint.model_hash`) and pooling match is loaded
    instead of embedding; a file that differs raises `StaleEmbeddingCacheError` naming what differs.

    Returns `EmbeddedPairs` (float32, CPU) with ``prompt`` set and ``users`` the sorted distinct
    ``user_id`` values (-1 for records without one).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one (prefkit.models.loading.ensure_pad_token)")
    rows = tokenize_pair_rows(records, tokenizer, max_length, max_prompt_length)
    users = sorted({r.user_id for r in records if r.user_id is not None})
    position = {u: i for i, u in enumerate(users)}
    user_index = torch.tensor([-1 if r.user_id is None else position[r.user_id] for r in records], dtype=torch.long)
    fingerprint, digests = _data_fingerprint(rows, [r.user_id for r in records])
    manifest = {
        "format_version": FORMAT_VERSION,
        "pooling": pooling,
        "data_fingerprint": fingerprint,
        "n_rows": len(rows),
        "model_hash": model_hash(model),
        "users": users,
    }
    meta = {
        "backbone": getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        "pooling": pooling,
        "data_fingerprint": fingerprint,
        "model_hash": manifest["model_hash"],
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
    }
    path = None if cache_dir is None else os.path.join(cache_dir, CACHE_FILE)
    if path is not None and os.path.exists(path):
        tensors = _load_cache(path, manifest, digests)
        return EmbeddedPairs(
            tensors["chosen"], tensors["rejected"], user_index, users, tensors["prompt"], meta={**meta, "cache": path}
        )
    chosen, rejected, prompt = _embed_rows(model, rows, tokenizer.pad_token_id, pooling, batch_size, progress)
    if path is not None:
        tensors = {"chosen": chosen, "rejected": rejected, "prompt": prompt, "row_digest": digests}
        _save_cache(path, tensors, manifest)
        meta["cache"] = path
    return EmbeddedPairs(chosen, rejected, user_index, users, prompt, meta=meta)


def tokenize_pair_rows(
    records, tokenizer, max_length, max_prompt_length, *, purpose: str = "embed_pairs takes"
) -> list[tuple[list[int], list[int], list[int]]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` per record, tokenized by `tokenize_pairwise` (as
    training tokenizes pairs). Errors name the record; ``purpose`` says who takes the rows."""
    if not records:
        raise ValueError(f"no records: {purpose} PairwiseRecord rows")
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, PairwiseRecord):
            raise TypeError(f"record {i} is a {type(record).__name__}; {purpose} PairwiseRecord rows")
        try:
            ex = tokenize_pairwise(record, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        except ValueError as err:
            raise ValueError(f"record {i} (id {record.id!r}): {err}") from err
        rows.append((ex["prompt_input_ids"], ex["chosen_input_ids"], ex["rejected_input_ids"]))
    return rows


def _id_bytes(ids: Sequence[int]) -> bytes:
    array = np.asarray(ids, dtype=np.int64)
    return np.int64(array.size).tobytes() + array.tobytes()


def _data_fingerprint(rows, user_ids: Sequence[str | None]) -> tuple[str, Tensor]:
    """``(sha256 hex, row digests [N] int64)`` over each row's token ids and user id."""
    total = hashlib.sha256(b"prefkit-embedded-pairs")
    digests = []
    for ids, user in zip(rows, user_ids):
        user_bytes = b"\x00" if user is None else b"\x01" + str(user).encode()
        row = b"".join(_id_bytes(part) for part in ids) + np.int64(len(user_bytes)).tobytes() + user_bytes
        total.update(row)
        digests.append(int.from_bytes(hashlib.blake2b(row, digest_size=8).digest(), "little", signed=True))
    return total.hexdigest(), torch.tensor(digests, dtype=torch.int64)


def _embed_rows(model, rows, pad_token_id: int, pooling: str, batch_size: int, progress: bool):
    """``(chosen, rejected, prompt)`` ``[N, H]`` float32 CPU; each distinct row is embedded once."""
    responses: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    prompts: dict[tuple[int, ...], int] = {}
    index = []  # (chosen, rejected, prompt) unique ids per record
    for prompt_ids, chosen_ids, rejected_ids in rows:
        p = tuple(prompt_ids)
        c = responses.setdefault((p, tuple(chosen_ids)), len(responses))
        r = responses.setdefault((p, tuple(rejected_ids)), len(responses))
        index.append((c, r, prompts.setdefault(p, len(prompts))))
    base = getattr(model, "base_model", model)
    was_training = base.training
    base.eval()
    try:
        pairs = list(responses)
        response_vectors = _run(
            base,
            [list(p) for p, _ in pairs],
            [list(c) for _, c in pairs],
            pad_token_id,
            pooling,
            batch_size,
            progress,
            "embedding responses",
        )
        prompt_rows = [list(p) for p in prompts]
        prompt_vectors = _run(
            base,
            prompt_rows,
            [[] for _ in prompt_rows],
            pad_token_id,
            pooling,
            batch_size,
            progress,
            "embedding prompts",
        )
    finally:
        base.train(was_training)
    idx = torch.tensor(index, dtype=torch.long)
    return response_vectors[idx[:, 0]], response_vectors[idx[:, 1]], prompt_vectors[idx[:, 2]]


def _run(base, prompts, completions, pad_token_id, pooling, batch_size, progress, desc) -> Tensor:
    """Pooled final hidden states of ``prompt + completion`` rows (mean over the completion, or over
    the prompt where there is no completion)."""
    device = module_device(base)

    def one(idx: list[int]) -> Tensor:
        batch = pad_rows([prompts[i] for i in idx], [completions[i] for i in idx], pad_token_id, None)
        attention = batch["attention_mask"].to(device)
        span = batch["completion_mask"] if completions[idx[0]] else batch["attention_mask"]
        hidden = base(input_ids=batch["input_ids"].to(device), attention_mask=attention).last_hidden_state
        return pool_hidden_states(hidden, attention, span.to(device), pooling)

    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    return run_batched(one, batches_by_length(lengths, batch_size), len(prompts), desc, progress)


def _save_cache(path: str, tensors: dict[str, Tensor], manifest: dict[str, Any]) -> None:
    save_safetensors_atomic(path, tensors, {MANIFEST_KEY: json.dumps(manifest)})


def _load_cache(path: str, manifest: dict[str, Any], digests: Tensor) -> dict[str, Tensor]:
    fix = f"The cache is refused, not recomputed. Delete {path} to recompute it, or pass another cache_dir."
    try:
        with safe_open(path, framework="pt") as fh:
            cached = json.loads((fh.metadata() or {})[MANIFEST_KEY])
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise StaleEmbeddingCacheError(
            f"{path} is not a readable prefkit embedding cache ({type(err).__name__}: {err}). {fix}"
        ) from err
    problems = _cache_differences(cached, manifest, tensors.get("row_digest"), digests)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise StaleEmbeddingCacheError(f"embedding cache {path} does not match:\n{listed}\n{fix}")
    return tensors


def _cache_differences(cached: dict[str, Any], wanted: dict[str, Any], cached_rows, rows: Tensor) -> list[str]:
    if cached.get("format_version") != wanted["format_version"]:
        return [f"file format: version {cached.get('format_version')!r}, this prefkit reads {wanted['format_version']}"]
    problems = []
    if cached.get("data_fingerprint") != wanted["data_fingerprint"]:
        problems.append(f"data: {_data_difference(cached, wanted, cached_rows, rows)}")
    if cached.get("model_hash") != wanted["model_hash"]:
        problems.append(
            f"backbone: the cache was embedded with weights of hash {str(cached.get('model_hash'))[:16]}..., "
            f"this backbone's are {wanted['model_hash'][:16]}... (another model, or other weights)"
        )
    if cached.get("pooling") != wanted["pooling"]:
        problems.append(f"pooling: the cache holds {cached.get('pooling')!r} pooling, {wanted['pooling']!r} was asked")
    return problems


def _data_difference(cached: dict[str, Any], wanted: dict[str, Any], cached_rows, rows: Tensor) -> str:
    if cached.get("n_rows") != wanted["n_rows"] or cached_rows is None or cached_rows.shape != rows.shape:
        return f"the cache holds {cached.get('n_rows')} pairs, the records are {wanted['n_rows']}"
    changed = torch.nonzero(cached_rows != rows).flatten().tolist()
    if not changed:
        return "the records' token ids or user ids differ from the cached ones (fingerprint mismatch)"
    shown = ", ".join(str(i) for i in changed[:5]) + (", ..." if len(changed) > 5 else "")
    return (
        f"the token ids or user_id of {len(changed)} of {wanted['n_rows']} records differ from the cached ones "
        f"(0-based records {shown}): other data, other tokenization settings (max_length, tokenizer) or other users"
    )


# ------------------------------------------------------------------------------------------
# Heads on embeddings: save / load
# ------------------------------------------------------------------------------------------


class EmbeddingHead(nn.Module):
    """Base of the small heads trained on `EmbeddedPairs`, with Hugging Face style persistence.

    A subclass sets ``model_type`` and implements ``config()``: the keyword arguments that rebuild
    it (JSON values), so that ``type(self)(**self.config())`` has the same parameter and buffer
    shapes. ``save_pretrained(folder)`` writes ``config.json`` (``model_type`` + the config) and
    ``model.safetensors`` (the state dict); ``from_pretrained(folder)`` rebuilds and loads them.
    """

    model_type: ClassVar[str] = ""

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as fh:
            json.dump({"model_type": self.model_type, **self.config()}, fh, indent=2)
        save_file(
            {k: v.detach().contiguous() for k, v in self.state_dict().items()},
            os.path.join(folder, "model.safetensors"),
        )

    @classmethod
    def from_pretrained(cls, folder: str):
        with open(os.path.join(folder, "config.json")) as fh:
            config = json.load(fh)
        model_type = config.pop("model_type", None)
        if model_type != cls.model_type:
            raise ValueError(f"{folder} holds a {model_type!r} model, not a {cls.model_type!r} ({cls.__name__})")
        model = cls(**config)
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        return model.eval()
