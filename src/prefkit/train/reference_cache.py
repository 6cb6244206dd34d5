"""Reference log-probs computed once before training and cached on disk (DESIGN.md §2).

With ``PreferenceConfig.precompute_ref_logps`` the trainer scores every row of its tokenized
train / eval datasets with the reference once (batched, longest rows first, no gradients), stores
the values in one file per dataset and attaches them to the rows as columns (`REF_COLUMNS`,
`REF_TOKEN_COLUMNS`), which the collators batch like any other column. Shuffling moves a row's
values with the row, and no reference model is held during training.

A cache file ``<reference_cache_dir>/<split>.safetensors`` holds, for ``N`` rows:

- ``sum.<field>`` ``[N]``: each row's summed completion log-prob (``field``: ``chosen`` and
  ``rejected`` for pairwise data, ``completion`` for unpaired data);
- with per-token values, ``tokens.<field>`` (the completion tokens' log-probs of all rows, one
  after the other) and ``offsets.<field>`` ``[N + 1]`` (row ``i``'s are ``tokens[offsets[i]:offsets[i + 1]]``);
- ``row_digest`` ``[N]``: a 64-bit hash of each row's token ids (names the rows that differ when
  the data changed);
- a manifest in the file's metadata (``prefkit_reference_cache``, JSON): the `CacheKey`.

The key is what the values depend on: the token ids of every row in order (`dataset_fingerprint`;
tokenization settings matter through the ids they produce), the reference's weights
(`model_hash`: SHA-256 over every tensor's name, dtype, shape and bytes), its dtype, the data kind
and the file format version. A file whose manifest does not match is refused with
`StaleReferenceCacheError`, naming what differs; it is never recomputed or reused silently. Files
are written to a temporary name and renamed into place, so an interrupted write leaves no file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefkit.data.batching import batches_by_length
from prefkit.models.fingerprint import model_hash, save_safetensors_atomic

logger = logging.getLogger("prefkit.train")

__all__ = [
    "FORMAT_VERSION",
    "REF_COLUMNS",
    "REF_TOKEN_COLUMNS",
    "CacheKey",
    "ReferenceLogps",
    "StaleReferenceCacheError",
    "attach_reference_columns",
    "cached_reference_logps",
    "compute_reference_logps",
    "dataset_fingerprint",
    "load_reference_cache",
    "model_hash",
    "reference_dtype",
    "save_reference_cache",
]

FORMAT_VERSION = 1
MANIFEST_KEY = "prefkit_reference_cache"

# The tokenized columns a kind's values depend on, and the completions ("fields") it scores, in the
# row order of its collator (pairwise: chosen rows, then rejected rows).
ID_COLUMNS = {
    "pairwise": ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
    "unpaired": ("prompt_input_ids", "completion_input_ids"),
}
FIELDS = {"pairwise": ("chosen", "rejected"), "unpaired": ("completion",)}
# Dataset columns the values are attached as: summed log-probs, and per-token log-probs of the
# completion tokens (pairwise only; losses with needs_tokens read them).
REF_COLUMNS = {
    "pairwise": ("ref_chosen_logps", "ref_rejected_logps"),
    "unpaired": ("ref_completion_logps",),
}
REF_TOKEN_COLUMNS = {"pairwise": ("ref_chosen_token_logps", "ref_rejected_token_logps"), "unpaired": ()}

_FIX = (
    "The cache is refused, not recomputed or reused. Delete {path} to recompute it, or set "
    "reference_cache_dir to another folder."
)


class StaleReferenceCacheError(RuntimeError):
    """A reference cache file does not match this run's data, reference model or settings."""


@dataclass(frozen=True)
class CacheKey:
    """What a cache file's values depend on (stored as its manifest)."""

    kind: str
    dataset_fingerprint: str
    n_rows: int
    model_hash: str
    dtype: str
    per_token: bool
    format_version: int = FORMAT_VERSION


@dataclass
class ReferenceLogps:
    """Reference log-probs of ``N`` dataset rows, in dataset order.

    ``sums[field]``: ``[N]`` summed completion log-probs. ``tokens[field]`` (or ``None``): ``N``
    1-D tensors, the log-probs of each row's completion tokens in order.
    """

    sums: dict[str, Tensor]
    tokens: dict[str, list[Tensor]] | None = None


# ------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in FIELDS:
        raise ValueError(f"reference log-probs are cached for kinds {sorted(FIELDS)}, got {kind!r}")


def dataset_fingerprint(dataset, kind: str) -> tuple[str, Tensor]:
    """``(sha256 hex, row_digests [N] int64)`` of the token ids of every row of a tokenized dataset.

    The SHA-256 covers each row's id columns (`ID_COLUMNS`) in order, lengths included; a row's
    digest is the first 8 bytes of the BLAKE2b hash of the same bytes (to name changed rows).
    """
    _check_kind(kind)
    columns = ID_COLUMNS[kind]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the dataset lacks the tokenized {kind} columns {missing} (has {dataset.column_names})")
    total = hashlib.sha256(f"{kind}:{','.join(columns)}".encode())
    digests = []
    for chunk in dataset.with_format(None).select_columns(list(columns)).iter(batch_size=1024):
        for values in zip(*(chunk[c] for c in columns)):
            row = b"".join(_id_bytes(ids) for ids in values)
            total.update(row)
            digests.append(int.from_bytes(hashlib.blake2b(row, digest_size=8).digest(), "little", signed=True))
    return total.hexdigest(), torch.tensor(digests, dtype=torch.int64)


def _id_bytes(ids: Sequence[int]) -> bytes:
    array = np.asarray(ids, dtype=np.int64)
    return np.int64(array.size).tobytes() + array.tobytes()


def reference_dtype(model: nn.Module) -> str:
    """The dtype of the reference's floating-point weights (``"mixed"`` if they differ)."""
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


# ------------------------------------------------------------------------------------------
# Computing
# ------------------------------------------------------------------------------------------


def compute_reference_logps(
    dataset,
    kind: str,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    score: Callable[[dict[str, Any]], Any],
    *,
    batch_size: int,
    per_token: bool,
    progress: bool = True,
    desc: str = "reference log-probs",
) -> ReferenceLogps:
    """Score every row of a tokenized dataset once, under ``torch.no_grad()``.

    ``collate`` is the kind's prefkit collator (`PairwiseCollator`, `UnpairedCollator`);
    ``score(batch)`` returns the reference's `prefkit.train.logps.LogpOutput` for its rows (with
    ``per_token`` when asked). Rows are batched longest first (`batches_by_length`); the values come
    back in dataset order.
    """
    _check_kind(kind)
    fields = FIELDS[kind]
    columns = ID_COLUMNS[kind]
    plain = dataset.with_format(None)
    lengths = [len(row[0]) + max(len(c) for c in row[1:]) for row in zip(*(plain[c] for c in columns))]
    n = len(lengths)
    sums: dict[str, Tensor] = {}
    tokens: dict[str, list[Tensor]] | None = {f: [torch.empty(0)] * n for f in fields} if per_token else None
    with torch.no_grad():
        for idx in tqdm(batches_by_length(lengths, batch_size), desc=desc, unit="batch", disable=not progress):
            batch = collate([plain[i] for i in idx])
            out = score(batch)
            mask = batch["completion_mask"].bool()
            for k, field in enumerate(fields):
                rows = slice(k * len(idx), (k + 1) * len(idx))
                values = out.sum[rows].detach().cpu()
                if field not in sums:
                    sums[field] = values.new_zeros(n)
                sums[field][torch.tensor(idx)] = values
                if tokens is not None:
                    per_row = out.per_token[rows].detach().cpu()
                    for j, i in enumerate(idx):
                        tokens[field][i] = per_row[j][mask[k * len(idx) + j].cpu()].clone()
    return ReferenceLogps(sums=sums, tokens=tokens)


def attach_reference_columns(dataset, values: ReferenceLogps, kind: str, *, per_token: bool):
    """``dataset`` with the values as columns (`REF_COLUMNS`; `REF_TOKEN_COLUMNS` when ``per_token``).

    Columns of an earlier attachment are replaced. Values are stored as float64 (exact for float32
    log-probs).
    """
    old = [c for c in REF_COLUMNS[kind] + REF_TOKEN_COLUMNS[kind] if c in dataset.column_names]
    if old:
        dataset = dataset.remove_columns(old)
    for field, column in zip(FIELDS[kind], REF_COLUMNS[kind]):
        dataset = dataset.add_column(column, values.sums[field].double().tolist())
    if per_token:
        if values.tokens is None:
            raise ValueError("per-token reference log-probs were requested but not computed")
        for field, column in zip(FIELDS[kind], REF_TOKEN_COLUMNS[kind]):
            dataset = dataset.add_column(column, [t.double().tolist() for t in values.tokens[field]])
    return dataset


# ------------------------------------------------------------------------------------------
# The file
# ------------------------------------------------------------------------------------------


def cached_reference_logps(
    dataset,
    kind: str,
    path: str,
    *,
    model_hash: str,
    dtype: str,
    per_token: bool,
    split: str,
    compute: Callable[[], ReferenceLogps],
) -> ReferenceLogps:
    """The reference log-probs of ``dataset``: loaded from ``path`` when its key matches, computed
    with ``compute()`` and saved there when there is no file, refused when the file is stale."""
    fingerprint, rows = dataset_fingerprint(dataset, kind)
    key = CacheKey(kind, fingerprint, len(dataset), model_hash, dtype, per_token)
    values = load_reference_cache(path, key, rows, split=split)
    if values is not None:
        logger.info("reference log-probs of the %s dataset loaded from %s", split, path)
        return values
    values = compute()
    save_reference_cache(path, values, key, rows)
    logger.info("reference log-probs of the %s dataset (%d rows) cached in %s", split, len(dataset), path)
    return values


def save_reference_cache(path: str, values: ReferenceLogps, key: CacheKey, row_digests: Tensor) -> None:
    """Write ``values`` with ``key`` as manifest to ``path``, atomically (temporary file, fsync,
    ``os.replace``); on any error the temporary file is removed and nothing is left at ``path``."""
    tensors = {"row_digest": row_digests.contiguous()}
    for field, sums in values.sums.items():
        tensors[f"sum.{field}"] = sums.contiguous()
        if values.tokens is not None:
            rows = values.tokens[field]
            counts = torch.tensor([0] + [t.numel() for t in rows], dtype=torch.int64)
            tensors[f"offsets.{field}"] = torch.cumsum(counts, 0)
            tensors[f"tokens.{field}"] = torch.cat(rows) if rows else sums.new_zeros(0)
    save_safetensors_atomic(path, tensors, {MANIFEST_KEY: json.dumps(dataclasses.asdict(key))})


def load_reference_cache(path: str, key: CacheKey, row_digests: Tensor, *, split: str) -> ReferenceLogps | None:
    """The values cached at ``path`` for ``key``; ``None`` when there is no file.

    A file whose manifest differs from ``key`` raises `StaleReferenceCacheError` naming what
    differs (the data, with the first changed rows; the reference model; its dtype; the kind; the
    format) and how to fix it. A cache with per-token values serves a run that needs only sums.
    """
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as fh:
            manifest = json.loads((fh.metadata() or {})[MANIFEST_KEY])
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise StaleReferenceCacheError(
            f"{path} is not a readable prefkit reference cache ({type(err).__name__}: {err}). " + _FIX.format(path=path)
        ) from err
    problems = _differences(manifest, key, tensors.get("row_digest"), row_digests, split)
    if problems:
        raise StaleReferenceCacheError(
            f"reference cache {path} does not match this run:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\n"
            + _FIX.format(path=path)
        )
    fields = FIELDS[key.kind]
    sums = {f: tensors[f"sum.{f}"] for f in fields}
    if not key.per_token:
        return ReferenceLogps(sums=sums)
    tokens = {}
    for f in fields:
        flat, offsets = tensors[f"tokens.{f}"], tensors[f"offsets.{f}"].tolist()
        tokens[f] = [flat[offsets[i] : offsets[i + 1]] for i in range(key.n_rows)]
    return ReferenceLogps(sums=sums, tokens=tokens)


def _differences(
    manifest: dict[str, Any], key: CacheKey, cached_rows: Tensor | None, rows: Tensor, split: str
) -> list[str]:
    problems = []
    if manifest.get("format_version") != key.format_version:
        return [
            f"file format: written as version {manifest.get('format_version')!r}, this prefkit reads "
            f"version {key.format_version}"
        ]
    if manifest.get("kind") != key.kind:
        problems.append(f"data kind: the cache holds {manifest.get('kind')} data, this run trains on {key.kind} data")
    elif manifest.get("dataset_fingerprint") != key.dataset_fingerprint:
        problems.append(f"data: {_data_difference(manifest, key, cached_rows, rows, split)}")
    if manifest.get("model_hash") != key.model_hash:
        problems.append(
            f"reference model: the cache was computed with weights of hash {str(manifest.get('model_hash'))[:16]}..., "
            f"this run's reference has {key.model_hash[:16]}... (another reference model, or other weights)"
        )
    if manifest.get("dtype") != key.dtype:
        problems.append(
            f"reference dtype: the cache was computed in {manifest.get('dtype')}, this run's is {key.dtype}"
        )
    if key.per_token and not manifest.get("per_token"):
        problems.append(
            "per-token values: the cache holds summed log-probs only, and a selected loss needs the "
            "reference's per-token log-probs (needs_tokens)"
        )
    return problems


def _data_difference(manifest: dict[str, Any], key: CacheKey, cached_rows: Tensor | None, rows: Tensor, split: str):
    cached_n = manifest.get("n_rows")
    if cached_n != key.n_rows or cached_rows is None or cached_rows.shape != rows.shape:
        return (
            f"the cache was computed for {cached_n} rows, this run's {split} dataset has {key.n_rows} "
            "(other data, or other tokenization settings)"
        )
    changed = torch.nonzero(cached_rows != rows).flatten().tolist()
    if not changed:  # every row digest agrees but the full hashes do not: name no row
        return f"the {split} dataset's token ids differ from the cached ones (fingerprint mismatch)"
    shown = ", ".join(str(i) for i in changed[:5]) + (", ..." if len(changed) > 5 else "")
    return (
        f"the token ids of {len(changed)} of {key.n_rows} rows of the {split} dataset differ from the cached "
        f"ones (0-based rows {shown}): other data, or other tokenization settings"
    )
