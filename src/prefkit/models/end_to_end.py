"""Personalized reward heads trained end to end on a backbone.

`prefkit.models.embeddings.embed_pairs` embeds every pair once with a frozen backbone and the heads
(`prefkit.models.pal.PAL`, `prefkit.models.mixture.MixtureBT`) fit on those fixed vectors. Here the
same head sits on a live backbone: each mini-batch of pairwise records is tokenized as training
tokenizes it (`prefkit.data.tokenize.tokenize_pairwise`), prompt + chosen and prompt + rejected run
through the backbone with gradients, the final hidden states are pooled exactly as the embedding
cache pools them (`prefkit.models.embeddings.pool_hidden_states`: last token, or mean / sum over the
response), and the batch becomes an `EmbeddedPairs` on which the head's own differentiable objective
is computed. Backbone and head are then updated together (AdamW, optionally a separate backbone
learning rate). With the backbone frozen this is the embedding path, to float rounding.

Objectives (one per head, shared with the embedding path):

- PAL: the mean Bradley-Terry loss with each row's user's simplex weights (`PAL.objective`, the loss
  `PAL.fit` minimises);
- MixtureBT: minus the marginal log-likelihood per pair, ``-(1/N) sum_u log sum_k pi_k prod_{i in u}
  sigma(r_k(c_i) - r_k(r_i))`` (`MixtureBT.marginal_nll`), over the users present in the mini-batch
  and their pairs in it, with ``pi = softmax(mixing_logits)`` learned too. This is gradient ascent
  on the likelihood, not EM: there are no responsibilities during training, and with mini-batches
  smaller than a user's pairs each step's objective groups only the pairs of the batch (a
  stochastic surrogate of the full likelihood; a full batch is the exact one). After training,
  `train_end_to_end` sets ``pi`` and the responsibilities from the posterior over all training
  pairs (`MixtureBT.set_posterior`), so `MixtureBT.user_reward` / `pair_correct` serve as after EM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel

from prefkit.data.collators import pad_rows
from prefkit.data.records import PairwiseRecord
from prefkit.data.tokenize import tokenize_pairwise
from prefkit.models.embeddings import POOLINGS, EmbeddedPairs, pool_hidden_states
from prefkit.models.mixture import MixtureBT
from prefkit.models.pal import PAL

__all__ = ["HEADS", "EndToEndRewardModel", "TokenizedPairs", "tokenize_pairs", "train_end_to_end"]

HEADS = {PAL.model_type: PAL, MixtureBT.model_type: MixtureBT}
CONFIG_FILE = "end_to_end.json"


class TokenizedPairs:
    """Pairwise records tokenized once: ``(prompt, chosen, rejected)`` ids and the user of each row.

    ``user_index[i]`` indexes ``users`` (a head's users); every record needs a known ``user_id``.
    """

    def __init__(self, rows: list[tuple[list[int], list[int], list[int]]], user_index: Tensor, users: list[str]):
        self.rows, self.user_index, self.users = rows, user_index, users

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: Sequence[int], pad_token_id: int) -> dict[str, Tensor]:
        """``input_ids`` / ``attention_mask`` / ``completion_mask`` ``[2B, T]`` (the ``B`` chosen rows,
        then the ``B`` rejected rows, right-padded) and ``user_index`` ``[B]``."""
        prompts = [self.rows[i][0] for i in idx]
        completions = [self.rows[i][1] for i in idx] + [self.rows[i][2] for i in idx]
        batch = pad_rows(prompts + prompts, completions, pad_token_id, None)
        batch["user_index"] = self.user_index[torch.as_tensor(list(idx), dtype=torch.long)]
        return batch


def tokenize_pairs(
    records: Sequence[PairwiseRecord],
    tokenizer,
    users: Sequence[str],
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> TokenizedPairs:
    """Tokenize ``records`` with `tokenize_pairwise` (the embedding cache's tokenization); ``users``:
    the head's user ids, which every record's ``user_id`` must be one of."""
    if not records:
        raise ValueError("no records to train on")
    position = {u: i for i, u in enumerate(users)}
    rows, user_index = [], []
    for i, record in enumerate(records):
        if not isinstance(record, PairwiseRecord):
            raise TypeError(f"record {i} is a {type(record).__name__}; end-to-end heads take PairwiseRecord rows")
        if record.user_id not in position:
            what = (
                "has no user_id" if record.user_id is None else f"has user_id {record.user_id!r}, unknown to the head"
            )
            raise ValueError(f"record {i} (id {record.id!r}) {what}; the head's users are {list(users)[:5]}...")
        try:
            ex = tokenize_pairwise(record, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        except ValueError as err:
            raise ValueError(f"record {i} (id {record.id!r}): {err}") from err
        rows.append((ex["prompt_input_ids"], ex["chosen_input_ids"], ex["rejected_input_ids"]))
        user_index.append(position[record.user_id])
    return TokenizedPairs(rows, torch.tensor(user_index, dtype=torch.long), list(users))


class EndToEndRewardModel(nn.Module):
    """A backbone, a pooling and a personalized head (PAL or MixtureBT), trained together.

    Args:
        backbone: a transformers base model (``AutoModel``) or a causal LM, whose base model is used
            (``model.base_model``, as `embed_pairs` does), e.g. ``build_tiny_llama(...).model``.
        head: a `PAL` or `MixtureBT` built with ``dim`` the backbone's hidden size and ``users`` set.
        pooling: ``"last"``, ``"mean"`` or ``"sum"`` (`pool_hidden_states`).

    MixtureBT's mixing weights are learned as ``mixing_logits`` (``pi = softmax``), initialised from
    the head's ``mixing_weights``.
    """

    def __init__(self, backbone: nn.Module, head: PAL | MixtureBT, pooling: str = "last"):
        super().__init__()
        if not isinstance(head, tuple(HEADS.values())):
            raise TypeError(f"end-to-end training supports PAL and MixtureBT heads, got {type(head).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not head.users:
            raise ValueError("the head has no users; build it with users=[...] (every training user)")
        self.backbone = getattr(backbone, "base_model", backbone)
        hidden = self.backbone.config.hidden_size
        if head.dim != hidden:
            raise ValueError(f"the head's dim is {head.dim}, the backbone's hidden size is {hidden}")
        self.head, self.pooling = head, pooling
        self.mixing_logits = nn.Parameter(head.mixing_weights.log().clone()) if isinstance(head, MixtureBT) else None

    @property
    def users(self) -> list[str]:
        return self.head.users

    def embed(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        """``[N, H]`` pooled final hidden states of ``prompt + response`` rows (with gradients)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_hidden_states(hidden, attention_mask, completion_mask, self.pooling)

    def batch_pairs(self, batch: dict[str, Tensor]) -> EmbeddedPairs:
        """The `EmbeddedPairs` of a `TokenizedPairs.batch` (chosen rows first, then rejected)."""
        device = next(self.backbone.parameters()).device
        emb = self.embed(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")))
        n = batch["user_index"].shape[0]
        return EmbeddedPairs(emb[:n], emb[n:], batch["user_index"], self.users)

    def objective(self, pairs: EmbeddedPairs) -> Tensor:
        """The head's training objective on ``pairs`` (module docstring)."""
        if isinstance(self.head, MixtureBT):
            return self.head.marginal_nll(pairs, self.mixing_logits.log_softmax(-1))
        return self.head.objective(pairs)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.objective(self.batch_pairs(batch))

    @torch.no_grad()
    def embed_pairs(self, data: TokenizedPairs, tokenizer, batch_size: int = 16) -> EmbeddedPairs:
        """`EmbeddedPairs` of all of ``data`` with the current backbone (eval mode, no gradients), for
        the heads' evaluation methods (``PAL.pair_logits``, ``MixtureBT.pair_correct``, ...)."""
        was_training = self.training
        self.eval()
        try:
            parts = [
                self.batch_pairs(data.batch(idx, tokenizer.pad_token_id)) for idx in _chunks(len(data), batch_size)
            ]
        finally:
            self.train(was_training)
        return EmbeddedPairs(
            torch.cat([p.chosen for p in parts]).cpu(),
            torch.cat([p.rejected for p in parts]).cpu(),
            data.user_index.clone(),
            list(data.users),
        )

    def save_pretrained(self, folder: str) -> None:
        """``folder/backbone`` (transformers ``save_pretrained``), ``folder/head`` (the head's
        ``save_pretrained``) and ``folder/end_to_end.json`` (the pooling)."""
        os.makedirs(folder, exist_ok=True)
        self.backbone.save_pretrained(os.path.join(folder, "backbone"))
        self.head.save_pretrained(os.path.join(folder, "head"))
        with open(os.path.join(folder, CONFIG_FILE), "w") as fh:
            json.dump({"pooling": self.pooling, "head": self.head.model_type}, fh, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str) -> EndToEndRewardModel:
        """Load what `save_pretrained` wrote (backbone with ``AutoModel``), in eval mode."""
        with open(os.path.join(folder, CONFIG_FILE)) as fh:
            config: dict[str, Any] = json.load(fh)
        if config.get("head") not in HEADS:
            raise ValueError(f"{folder}/{CONFIG_FILE}: unknown head {config.get('head')!r}; known: {sorted(HEADS)}")
        head = HEADS[config["head"]].from_pretrained(os.path.join(folder, "head"))
        backbone = AutoModel.from_pretrained(os.path.join(folder, "backbone"))
        return cls(backbone, head, config["pooling"]).eval()


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def train_end_to_end(
    model: EndToEndRewardModel,
    data: TokenizedPairs,
    tokenizer,
    *,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 1e-3,
    backbone_lr: float | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Train backbone and head together on ``data`` with AdamW; return the objective of every step.

    ``lr``: the head's learning rate (and MixtureBT's ``mixing_logits``); ``backbone_lr``: the
    backbone's (default ``lr``; 0 keeps it fixed: the embedding path, trained by gradient).
    Mini-batches of ``batch_size`` pairs in a seeded random order each epoch. A MixtureBT head gets
    its ``pi`` and responsibilities from the posterior over all of ``data`` at the end. Leaves the
    model in eval mode.
    """
    if epochs < 1 or batch_size < 1 or lr < 0 or (backbone_lr is not None and backbone_lr < 0):
        raise ValueError(f"need epochs, batch_size >= 1 and lr >= 0; got {epochs}, {batch_size}, {lr}, {backbone_lr}")
    if data.users != model.users:
        raise ValueError("data was tokenized for other users than the head's; use tokenize_pairs(..., model.users)")
    backbone_params = list(model.backbone.parameters())
    head_params = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.AdamW(
        [{"params": backbone_params, "lr": lr if backbone_lr is None else backbone_lr}, {"params": head_params}],
        lr=lr,
        weight_decay=weight_decay,
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    history = []
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=generator).split(batch_size):
            loss = model(data.batch(idx.tolist(), tokenizer.pad_token_id))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
    model.eval()
    if isinstance(model.head, MixtureBT):
        model.head.set_posterior(model.embed_pairs(data, tokenizer, batch_size), model.mixing_logits.softmax(-1))
    return history
