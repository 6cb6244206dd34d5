"""Personalized reward heads trained end to end on a backbone.

`prefkit.models.embeddings.embed_pairs` embeds every pair once with a frozen backbone and the heads
(`prefkit.models.pal.PAL`, `prefkit.models.mixture.MixtureBT`, `prefkit.models.vpl.VPL`,
`prefkit.models.micro.MiCRo`) fit on those fixed vectors. Here the same head sits on a live backbone:
the pairs of a mini-batch are tokenized as training tokenizes them
(`prefkit.data.tokenize.tokenize_pairwise`), prompt + chosen and prompt + rejected run through the
backbone with gradients, the final hidden states are pooled exactly as the embedding cache pools them
(`prefkit.models.embeddings.pool_hidden_states`: last token, or mean / sum over the response), and the
batch becomes an `EmbeddedPairs` on which the head's own differentiable objective is computed. With
the backbone frozen this is the embedding path, to float rounding. `prefkit.train.end_to_end` trains
the model with a ``transformers.Trainer`` (schedules, accumulation, mixed precision, checkpoints,
several devices).

Objectives (one per head, shared with the embedding path):

- PAL: the mean Bradley-Terry loss with each row's user's simplex weights (`PAL.objective`, the loss
  `PAL.fit` minimises);
- MixtureBT: minus the marginal log-likelihood per pair, ``-(1/N) sum_u log sum_k pi_k prod_{i in u}
  sigma(r_k(c_i) - r_k(r_i))`` (`MixtureBT.marginal_nll`), over the users present in the mini-batch
  and their pairs in it, with ``pi = softmax(mixing_logits)`` learned too. This is gradient ascent
  on the likelihood, not EM: there are no responsibilities during training, and with mini-batches
  smaller than a user's pairs each step's objective groups only the pairs of the batch (a
  stochastic surrogate of the full likelihood; a full batch is the exact one). After training,
  `set_mixture_posterior` sets ``pi`` and the responsibilities from the posterior over all training
  pairs (`MixtureBT.set_posterior`), so `MixtureBT.user_reward` / `pair_correct` serve as after EM;
- VPL: the negative ELBO of a batch of *episodes* (`VPL.episode_loss`), each one user's context set
  and target set of pairs, with the KL weight ``beta_kl``; the batch's pairs are the union of its
  episodes' pairs, each embedded once;
- MiCRo: stage 1, the mixture likelihood of the ``K`` heads with weights ``pi`` plus ``balance *
  KL(uniform || pi)`` (`MiCRo.mixture_objective`). The router (stage 2) is trained afterwards on the
  trained backbone's frozen prompt embeddings, as the paper trains it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel

from prefkit.data.collators import pad_rows
from prefkit.data.records import PairwiseRecord
from prefkit.models.embeddings import POOLINGS, EmbeddedPairs, pool_hidden_states, tokenize_pair_rows
from prefkit.models.micro import MiCRo
from prefkit.models.mixture import MixtureBT
from prefkit.models.pal import PAL
from prefkit.models.vpl import VPL

__all__ = ["HEADS", "EndToEndRewardModel", "TokenizedPairs", "tokenize_pairs"]

HEADS = {head.model_type: head for head in (PAL, MixtureBT, VPL, MiCRo)}
CONFIG_FILE = "end_to_end.json"
EXTRA_WEIGHTS_FILE = "end_to_end.safetensors"


class TokenizedPairs:
    """Pairwise records tokenized once: ``(prompt, chosen, rejected)`` ids and the user of each row.

    ``user_index[i]`` indexes ``users``; every record needs a known ``user_id``. ``ids[i]``: record
    ``i``'s own id (None where it has none), for error messages.
    """

    def __init__(
        self,
        rows: list[tuple[list[int], list[int], list[int]]],
        user_index: Tensor,
        users: list[str],
        ids: list[str | None] | None = None,
    ):
        self.rows, self.user_index, self.users = rows, user_index, users
        self.ids = list(ids) if ids is not None else [None] * len(rows)

    def describe(self, idx: Sequence[int], limit: int = 8) -> str:
        """``"rows 3 (id a3), 17, ..."``: 0-based rows of the tokenized records, with their ids."""
        parts = [f"{i}" + (f" (id {self.ids[i]})" if self.ids[i] is not None else "") for i in list(idx)[:limit]]
        return "rows " + ", ".join(parts) + (" ..." if len(idx) > limit else "")

    def __len__(self) -> int:
        return len(self.rows)

    def rows_of_users(self) -> list[list[int]]:
        """Each user's row indices, in ``users`` order."""
        rows: list[list[int]] = [[] for _ in self.users]
        for i, u in enumerate(self.user_index.tolist()):
            rows[u].append(i)
        return rows

    def batch(self, idx: Sequence[int], pad_token_id: int) -> dict[str, Tensor]:
        """``input_ids`` / ``attention_mask`` / ``completion_mask`` ``[2B, T]`` (the ``B`` chosen rows,
        then the ``B`` rejected rows, right-padded) and ``user_index`` ``[B]``."""
        prompts = [self.rows[i][0] for i in idx]
        completions = [self.rows[i][1] for i in idx] + [self.rows[i][2] for i in idx]
        batch = pad_rows(prompts + prompts, completions, pad_token_id, None)
        rows = torch.as_tensor(list(idx), dtype=torch.long)
        batch["user_index"], batch["row_index"] = self.user_index[rows], rows
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
    the model's user ids, which every record's ``user_id`` must be one of."""
    rows = tokenize_pair_rows(records, tokenizer, max_length, max_prompt_length, purpose="end-to-end heads take")
    position = {u: i for i, u in enumerate(users)}
    for i, record in enumerate(records):
        if record.user_id not in position:
            what = (
                "has no user_id" if record.user_id is None else f"has user_id {record.user_id!r}, unknown to the model"
            )
            raise ValueError(f"record {i} (id {record.id!r}) {what}; the model's users are {list(users)[:5]}...")
    user_index = [position[r.user_id] for r in records]
    ids = [r.id for r in records]
    return TokenizedPairs(rows, torch.tensor(user_index, dtype=torch.long), list(users), ids)


class EndToEndRewardModel(nn.Module):
    """A backbone, a pooling and a personalized head (PAL, MixtureBT, VPL or MiCRo), trained together.

    Args:
        backbone: a transformers base model (``AutoModel``) or a causal LM, whose base model is used
            (``model.base_model``, as `embed_pairs` does), e.g. ``build_tiny_llama(...).model``; or a
            ``peft`` model around one (LoRA: only the adapters train; `merge_lora` before saving).
        head: a `PAL` or `MixtureBT` built with ``users`` set, or a `VPL` / `MiCRo`; its ``dim`` is the
            backbone's hidden size.
        pooling: ``"last"``, ``"mean"`` or ``"sum"`` (`pool_hidden_states`).
        users: the training users (VPL and MiCRo, whose heads do not hold them; PAL and MixtureBT use
            the head's).
        beta_kl: VPL's KL weight in the ELBO.
        balance: MiCRo's load-balancing weight (needs ``mixture="learned"``).

    ``forward(batch)`` returns ``{"loss": objective, <metric>: per-example values}``: PAL
    ``accuracy``; VPL ``bt``, ``kl``, ``accuracy``; MiCRo ``log_likelihood``, ``accuracy``; MixtureBT
    none (its accuracy needs the posterior). MixtureBT's mixing weights are learned as
    ``mixing_logits`` (``pi = softmax``), initialised from the head's ``mixing_weights``.
    """

    accepts_loss_kwargs = False  # transformers.Trainer: the loss is a batch mean, scale it for accumulation

    def __init__(
        self,
        backbone: nn.Module,
        head: PAL | MixtureBT | VPL | MiCRo,
        pooling: str = "last",
        *,
        users: Sequence[str] | None = None,
        beta_kl: float = 1.0,
        balance: float = 0.0,
    ):
        super().__init__()
        if not isinstance(head, tuple(HEADS.values())):
            raise TypeError(f"end-to-end training supports {', '.join(h.__name__ for h in HEADS.values())} heads")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if isinstance(head, (PAL, MixtureBT)):
            if users is not None and list(users) != head.users:
                raise ValueError("a PAL / MixtureBT head holds its users; do not pass other users")
            users = head.users
        if not users:
            raise ValueError("no users: build PAL / MixtureBT with users=[...], pass users=[...] for VPL / MiCRo")
        if balance and not (isinstance(head, MiCRo) and head.mixture == "learned"):
            raise ValueError("balance acts on MiCRo's learned mixture weights (MiCRo(..., mixture='learned'))")
        if isinstance(head, VPL) and head.standardize:
            raise ValueError(
                "a VPL head with standardize=True holds fixed feature statistics, which go stale once the backbone "
                "trains; build it with standardize=False for end-to-end training"
            )
        self.backbone = getattr(backbone, "base_model", backbone)
        hidden = self.backbone.config.hidden_size
        if head.dim != hidden:
            raise ValueError(f"the head's dim is {head.dim}, the backbone's hidden size is {hidden}")
        self.head, self.pooling, self.users = head, pooling, list(users)
        self.beta_kl, self.balance = float(beta_kl), float(balance)
        self.mixing_logits = nn.Parameter(head.mixing_weights.log().clone()) if isinstance(head, MixtureBT) else None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def embed(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        """``[N, H]`` pooled final hidden states of ``prompt + response`` rows (with gradients)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_hidden_states(hidden, attention_mask, completion_mask, self.pooling).float()

    def embed_prompts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[N, H]`` pooled final hidden states of prompt-only rows (MiCRo's router context)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_hidden_states(hidden, attention_mask, attention_mask, self.pooling).float()

    def batch_pairs(self, batch: dict[str, Tensor]) -> EmbeddedPairs:
        """The `EmbeddedPairs` of a `TokenizedPairs.batch` (chosen rows first, then rejected)."""
        device = self.device
        emb = self.embed(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")))
        n = batch["user_index"].shape[0]
        return EmbeddedPairs(emb[:n], emb[n:], batch["user_index"].to(device), self.users)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The head's training objective on a batch (module docstring) and its metrics."""
        pairs = self.batch_pairs(batch)
        head = self.head
        if isinstance(head, VPL):
            loss, out = head.episode_loss(pairs, batch["context"], batch["targets"], self.beta_kl)
            return {"loss": loss, **out}
        if isinstance(head, MiCRo):
            loss, ll = head.mixture_objective(pairs, self.balance)
            return {"loss": loss, "log_likelihood": ll, "accuracy": (ll > -0.6931471805599453).float()}
        if isinstance(head, MixtureBT):
            return {"loss": head.marginal_nll(pairs, self.mixing_logits.log_softmax(-1))}
        loss = head.objective(pairs)
        with torch.no_grad():
            accuracy = (head.pair_logits(pairs) > 0).float()
        return {"loss": loss, "accuracy": accuracy}

    @torch.no_grad()
    def embed_pairs(self, data: TokenizedPairs, tokenizer, batch_size: int = 16) -> EmbeddedPairs:
        """`EmbeddedPairs` (CPU, with ``prompt``) of all of ``data`` with the current backbone (eval mode,
        no gradients), for the heads' evaluation and fitting methods (``PAL.pair_logits``,
        ``MixtureBT.set_posterior``, ``MiCRo.fit_router``, ...)."""
        was_training = self.training
        self.eval()
        chosen, rejected, prompts = [], [], []
        try:
            for idx in _chunks(len(data), batch_size):
                batch = data.batch(idx, tokenizer.pad_token_id)
                pairs = self.batch_pairs(batch)
                chosen.append(pairs.chosen.cpu())
                rejected.append(pairs.rejected.cpu())
                prompt = pad_rows([data.rows[i][0] for i in idx], [[] for _ in idx], tokenizer.pad_token_id, None)
                ids, mask = prompt["input_ids"].to(self.device), prompt["attention_mask"].to(self.device)
                prompts.append(self.embed_prompts(ids, mask).cpu())
        finally:
            self.train(was_training)
        return EmbeddedPairs(
            torch.cat(chosen), torch.cat(rejected), data.user_index.clone(), list(data.users), torch.cat(prompts)
        )

    @torch.no_grad()
    def set_mixture_posterior(self, data: TokenizedPairs, tokenizer, batch_size: int = 16) -> None:
        """MixtureBT: ``pi = softmax(mixing_logits)`` and every user's responsibilities from the posterior
        given all of ``data`` (after training; `MixtureBT.set_posterior`)."""
        if not isinstance(self.head, MixtureBT):
            raise TypeError(f"set_mixture_posterior is for a MixtureBT head, not {type(self.head).__name__}")
        pairs = self.embed_pairs(data, tokenizer, batch_size)  # on the CPU
        device = self.mixing_logits.device  # the head's (a GPU after training there)
        pairs = dataclasses.replace(
            pairs,
            chosen=pairs.chosen.to(device),
            rejected=pairs.rejected.to(device),
            user_index=pairs.user_index.to(device),
        )
        self.head.set_posterior(pairs, self.mixing_logits.detach().softmax(-1))

    @property
    def has_lora(self) -> bool:
        """Whether the backbone carries unmerged LoRA adapters (a ``peft`` model was passed)."""
        return callable(getattr(self.backbone, "merge_and_unload", None))

    def merge_lora(self) -> None:
        """Merge LoRA adapters into the backbone's weights (in place: a backbone shared with a language
        model is updated for it too) and drop them; the backbone is then a plain transformers model."""
        if not self.has_lora:
            raise ValueError("the backbone has no LoRA adapters to merge")
        self.backbone = self.backbone.merge_and_unload()

    def save_pretrained(self, folder: str) -> None:
        """``folder/backbone`` (transformers ``save_pretrained``), ``folder/head`` (the head's
        ``save_pretrained``), ``folder/end_to_end.json`` (pooling, head type, users, objective weights)
        and, for MixtureBT, ``folder/end_to_end.safetensors`` (``mixing_logits``)."""
        from safetensors.torch import save_file

        if self.has_lora:
            raise ValueError("the backbone carries LoRA adapters: merge them first (model.merge_lora())")
        os.makedirs(folder, exist_ok=True)
        self.backbone.save_pretrained(os.path.join(folder, "backbone"))
        self.head.save_pretrained(os.path.join(folder, "head"))
        if self.mixing_logits is not None:
            save_file({"mixing_logits": self.mixing_logits.detach().cpu()}, os.path.join(folder, EXTRA_WEIGHTS_FILE))
        config = {"pooling": self.pooling, "head": self.head.model_type, "users": self.users}
        config.update(beta_kl=self.beta_kl, balance=self.balance)
        with open(os.path.join(folder, CONFIG_FILE), "w") as fh:
            json.dump(config, fh, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str) -> EndToEndRewardModel:
        """Load what `save_pretrained` wrote (backbone with ``AutoModel``), in eval mode."""
        from safetensors.torch import load_file

        with open(os.path.join(folder, CONFIG_FILE)) as fh:
            config: dict[str, Any] = json.load(fh)
        if config.get("head") not in HEADS:
            raise ValueError(f"{folder}/{CONFIG_FILE}: unknown head {config.get('head')!r}; known: {sorted(HEADS)}")
        head = HEADS[config["head"]].from_pretrained(os.path.join(folder, "head"))
        backbone = AutoModel.from_pretrained(os.path.join(folder, "backbone"))
        users = None if isinstance(head, (PAL, MixtureBT)) else config["users"]
        model = cls(
            backbone,
            head,
            config["pooling"],
            users=users,
            beta_kl=config.get("beta_kl", 1.0),
            balance=config.get("balance", 0.0),
        )
        if model.mixing_logits is not None:
            extra = load_file(os.path.join(folder, EXTRA_WEIGHTS_FILE))
            model.mixing_logits.data.copy_(extra["mixing_logits"])
        return model.eval()


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
