"""`EndToEndTrainer`: personalized reward heads trained together with their backbone by a
``transformers.Trainer`` (`prefkit.models.end_to_end.EndToEndRewardModel`).

What the Trainer brings: learning-rate schedules and warmup, gradient accumulation, mixed precision
(``bf16`` / ``fp16``), gradient clipping, logging and progress bars, several devices through
accelerate (DDP; the head's objective is computed per process on its share of the batch and the
gradients are averaged), and, through `prefkit.train.checkpointing.CheckpointingTrainer`, atomic
checkpoints and exact resume.

Batches:

- PAL, MixtureBT, MiCRo (stage 1): each example is one pair (`PairRows`); a batch of ``B`` pairs is
  the ``[2B, T]`` rows of `TokenizedPairs.batch`, so ``per_device_train_batch_size`` counts pairs.
  With ``pairs_per_user = N``, each example is a chunk of up to ``N`` pairs of one user (the batch
  size then counts chunks), for MixtureBT, whose objective groups a user's pairs within a batch.
- VPL: each example is one *episode* (`Episodes`): a user drawn uniformly, ``context_size`` of
  their pairs as the context set and, independently, ``target_size`` as the target set (each set
  without replacement), as `prefkit.models.vpl.VPL.fit` draws them. Episode ``i`` is a function of
  ``(seed, i)`` alone, so a resumed run sees the same episodes. A batch of ``E`` episodes embeds
  the union of their pairs once and indexes it (``context`` ``[E, C]``, ``targets`` ``[E, n]``).

``backbone_learning_rate`` gives the backbone its own learning rate (the head takes
``learning_rate``); 0 freezes it (the embedding path, trained by gradient). Every training log adds
the batch metrics of the head (`EndToEndRewardModel.forward`) averaged over the logging window; with
a VPL head also ``active_units`` (the latent dimensions in use: a collapsed posterior has none) on a
fixed probe of context sets.

MixtureBT's objective couples the pairs of a user inside a batch, so gradient accumulation (and
splitting a batch over processes) changes it, unlike the per-pair means of the other heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback

from prefkit.models.end_to_end import EndToEndRewardModel, TokenizedPairs
from prefkit.models.mixture import MixtureBT
from prefkit.models.vpl import VPL, active_units
from prefkit.train.checkpointing import CheckpointingTrainer

__all__ = ["EndToEndTrainer", "Episodes", "PairRows", "train_end_to_end"]


class PairRows(torch.utils.data.Dataset):
    """Pairs of a `TokenizedPairs` as training examples; `collate` pads a list of examples.

    ``pairs_per_user`` 0: example ``i`` is pair ``i``. ``N > 0``: each user's pairs, in a seeded random
    order, are cut into chunks of at most ``N`` and each chunk is an example, so a batch holds whole
    chunks of a few users: an objective that couples a user's pairs (MixtureBT's marginal likelihood)
    then sees several pairs of each user in the batch instead of about one.
    """

    def __init__(self, data: TokenizedPairs, pad_token_id: int, pairs_per_user: int = 0, seed: int = 0):
        if isinstance(pairs_per_user, bool) or not isinstance(pairs_per_user, int) or pairs_per_user < 0:
            raise ValueError(f"pairs_per_user must be an int >= 0, got {pairs_per_user!r}")
        self.data, self.pad_token_id = data, pad_token_id
        if not pairs_per_user:
            self.chunks = [[i] for i in range(len(data))]
            return
        generator = torch.Generator().manual_seed(seed)
        self.chunks = []
        for rows in data.rows_of_users():
            shuffled = [rows[j] for j in torch.randperm(len(rows), generator=generator).tolist()]
            self.chunks += [shuffled[k : k + pairs_per_user] for k in range(0, len(shuffled), pairs_per_user)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> list[int]:
        return self.chunks[i]

    def collate(self, chunks: list[list[int]]) -> dict[str, Tensor]:
        return self.data.batch([row for chunk in chunks for row in chunk], self.pad_token_id)


class Episodes(torch.utils.data.Dataset):
    """``length`` VPL episodes over the users of a `TokenizedPairs` (module docstring).

    Every user needs ``max(context_size, target_size)`` pairs.
    """

    def __init__(
        self, data: TokenizedPairs, pad_token_id: int, length: int, context_size: int, target_size: int, seed: int
    ):
        for name, value in (("length", length), ("context_size", context_size), ("target_size", target_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Episodes: {name} must be a positive int, got {value!r}")
        self.rows = data.rows_of_users()
        need = max(context_size, target_size)
        short = [u for u, rows in zip(data.users, self.rows) if len(rows) < need]
        if short:
            raise ValueError(
                f"{len(short)} user(s) have fewer than {need} pairs (context_size and target_size each need that "
                f"many), e.g. {short[:5]}; keep only users with enough pairs or lower context_size / target_size"
            )
        if len(self.rows) < 2:
            raise ValueError(f"VPL needs pairs of at least 2 users, got {len(self.rows)}")
        self.data, self.pad_token_id, self.length = data, pad_token_id, length
        self.context_size, self.target_size, self.seed = context_size, target_size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        """``(context rows, target rows)`` of episode ``i``."""
        if not 0 <= i < self.length:
            raise IndexError(f"episode {i} of {self.length}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        rows = self.rows[int(torch.randint(len(self.rows), (1,), generator=generator))]
        context = torch.randperm(len(rows), generator=generator)[: self.context_size]
        targets = torch.randperm(len(rows), generator=generator)[: self.target_size]
        return [rows[j] for j in context.tolist()], [rows[j] for j in targets.tolist()]

    def collate(self, episodes: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        """The union of the episodes' pairs as one `TokenizedPairs.batch`, plus ``context`` ``[E, C]`` and
        ``targets`` ``[E, n]`` indexing its rows."""
        unique = sorted({row for context, targets in episodes for row in context + targets})
        position = {row: j for j, row in enumerate(unique)}
        batch = self.data.batch(unique, self.pad_token_id)
        batch["context"] = torch.tensor([[position[r] for r in c] for c, _ in episodes], dtype=torch.long)
        batch["targets"] = torch.tensor([[position[r] for r in t] for _, t in episodes], dtype=torch.long)
        return batch

    def probe(self, n_users: int) -> dict[str, Tensor]:
        """One fixed context set for each of the first ``n_users`` users (for `active_units`), batched
        like `collate` (targets equal to the contexts)."""
        generator = torch.Generator().manual_seed(self.seed)
        episodes = []
        for rows in self.rows[:n_users]:
            picked = [rows[j] for j in torch.randperm(len(rows), generator=generator)[: self.context_size].tolist()]
            episodes.append((picked, picked))
        return self.collate(episodes)


class EndToEndTrainer(CheckpointingTrainer):
    """Train an `EndToEndRewardModel` (backbone + personalized head) with ``transformers.Trainer``.

    Args:
        model: the `EndToEndRewardModel`.
        args: ``transformers.TrainingArguments`` (``remove_unused_columns`` is set to False; the batch
            size counts pairs, or episodes for VPL).
        train_dataset: a `PairRows` or (VPL) `Episodes`; its ``collate`` is the collator.
        eval_dataset: the same kind, optional (``eval_loss`` and the head's metrics).
        backbone_learning_rate: the backbone's learning rate (None: ``args.learning_rate``; 0: frozen).
        probe_users: VPL: users in the fixed probe of `active_units` logged with every training log.
    """

    def __init__(
        self,
        model: EndToEndRewardModel,
        args: TrainingArguments,
        train_dataset: PairRows | Episodes,
        eval_dataset: PairRows | Episodes | None = None,
        *,
        processing_class=None,
        backbone_learning_rate: float | None = None,
        probe_users: int = 64,
        callbacks=None,
    ):
        if not isinstance(model, EndToEndRewardModel):
            raise TypeError(f"model must be an EndToEndRewardModel, got {type(model).__name__}")
        episodic = isinstance(model.head, VPL)
        for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if data is not None and isinstance(data, Episodes) != episodic:
                wanted = "Episodes" if episodic else "PairRows"
                raise TypeError(f"a {type(model.head).__name__} head trains on {wanted}; {name} is a {type(data)}")
        if backbone_learning_rate is not None and not (
            math.isfinite(backbone_learning_rate) and backbone_learning_rate >= 0
        ):
            raise ValueError(f"backbone_learning_rate must be a number >= 0, got {backbone_learning_rate!r}")
        args.remove_unused_columns = False  # the collator's keys are not forward() arguments
        self.backbone_learning_rate = backbone_learning_rate
        if backbone_learning_rate == 0:
            model.backbone.requires_grad_(False)
        self._probe = train_dataset.probe(probe_users) if episodic and probe_users >= 2 else None
        super().__init__(
            model=model,
            args=args,
            data_collator=train_dataset.collate,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )

    def _get_dataloader(self, dataset, *args, **kwargs):
        """Each dataset batches with its own ``collate`` (an evaluation set's row indices are its own)."""
        collator, self.data_collator = self.data_collator, getattr(dataset, "collate", self.data_collator)
        try:
            return super()._get_dataloader(dataset, *args, **kwargs)
        finally:
            self.data_collator = collator

    def create_optimizer(self, model=None):
        """Transformers' optimizer (``args.optim``) over the head's and (unless frozen) the backbone's
        parameters, with weight decay as transformers assigns it and the backbone's own learning rate."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = []
        for backbone in (True, False):
            for with_decay in (True, False):
                params = [
                    p
                    for name, p in opt_model.named_parameters()
                    if p.requires_grad and name.startswith("backbone.") == backbone and (name in decay) == with_decay
                ]
                if not params:
                    continue
                decay_rate = self.args.weight_decay if with_decay else 0.0
                group: dict[str, Any] = {"params": params, "weight_decay": decay_rate}
                if backbone and self.backbone_learning_rate is not None:
                    group["lr"] = self.backbone_learning_rate
                groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(inputs)
        loss = out.pop("loss")
        if model.training and not torch.isfinite(loss.detach()):
            rows = sorted(set(inputs["row_index"].tolist()))
            raise FloatingPointError(
                f"non-finite end-to-end training loss ({loss.item()}) at global step {self.state.global_step + 1}, "
                f"on the batch of {self.train_dataset.data.describe(rows)}; training stopped before the optimizer "
                "step, no checkpoint was written for it (lower the learning rate or check those records)"
            )
        self._store_metrics(out, "train" if model.training else "eval")
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _extra_train_logs(self) -> dict[str, float]:
        if self._probe is None:
            return {}
        model: EndToEndRewardModel = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                pairs = model.batch_pairs(self._probe)
                context = self._probe["context"].to(pairs.chosen.device)
                mu, _ = model.head.encode(pairs.chosen[context], pairs.rejected[context])
        finally:
            model.train(was_training)
        return {"active_units": active_units(mu.float().cpu())}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Checkpoints hold the state dict (transformers' format, what resume loads); a final save writes
        `EndToEndRewardModel.save_pretrained` (backbone/, head/, end_to_end.json)."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir or self.args.output_dir)
        return None


def train_end_to_end(
    model: EndToEndRewardModel,
    data: TokenizedPairs,
    tokenizer,
    *,
    output_dir: str,
    epochs: float = 1.0,
    max_steps: int = -1,
    batch_size: int = 8,
    lr: float = 1e-3,
    backbone_lr: float | None = None,
    context_size: int = 4,
    target_size: int | None = None,
    pairs_per_user: int = 0,
    resume: str | bool | None = None,
    progress: bool = False,
    **training_args: Any,
) -> list[dict[str, float]]:
    """Train ``model`` on ``data`` with `EndToEndTrainer`; return the training log (one dict per log).

    ``batch_size`` pairs per device and step (VPL: episodes of ``context_size`` context and
    ``target_size`` (default ``context_size``) target pairs; VPL needs ``max_steps``: its episodes are
    drawn, not enumerated). ``lr``: the head's learning rate; ``backbone_lr``: the backbone's (default
    ``lr``; 0 keeps it fixed). ``pairs_per_user``: examples are chunks of that many pairs of one user
    (`PairRows`; ``batch_size`` then counts chunks). Other keyword arguments go to ``TrainingArguments`` (defaults here:
    a constant learning rate, no weight decay, logging every step, no checkpoints, ``seed`` 0).
    A MixtureBT head gets ``pi`` and its responsibilities from the posterior over all of ``data`` at
    the end (`EndToEndRewardModel.set_mixture_posterior`). Leaves the model in eval mode.
    """
    if data.users != model.users:
        raise ValueError("data was tokenized for other users than the model's; use tokenize_pairs(..., model.users)")
    episodic = isinstance(model.head, VPL)
    if episodic and max_steps < 1:
        raise ValueError("a VPL head trains on drawn episodes: give max_steps (the number of optimizer steps)")
    settings: dict[str, Any] = {
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": not progress,
    }
    settings.update(training_args)
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        **settings,
    )
    pad = tokenizer.pad_token_id
    if episodic:
        length = max_steps * batch_size * args.gradient_accumulation_steps
        target = context_size if target_size is None else target_size
        dataset: PairRows | Episodes = Episodes(data, pad, length, context_size, target, args.seed)
    else:
        dataset = PairRows(data, pad, pairs_per_user, args.seed)
    trainer = EndToEndTrainer(model, args, dataset, processing_class=tokenizer, backbone_learning_rate=backbone_lr)
    if not progress:
        trainer.pop_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    model.eval()
    if isinstance(model.head, MixtureBT):
        model.set_mixture_posterior(data, tokenizer, batch_size)
    return [row for row in trainer.state.log_history if "loss" in row]
