"""Training in a lab world with prefkit's own trainers: a policy from the reference with any pairwise or
unpaired loss (`train_policy`), a reward model on the reference's backbone (`train_reward_model`), and a
callback that traces the policy's true reward and KL during training (`TruthCallback`).

Both trainers are the ones every user gets (`PreferenceTrainer`, `RewardTrainer`); the lab only picks
settings that suit its tiny models (constant learning rate, no checkpoints, CPU unless CUDA is there).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from prefkit.lab.evaluate import evaluate_policy
from prefkit.lab.policy import LabPolicy
from prefkit.lab.world import World

__all__ = ["TruthCallback", "reward_model_from", "train_policy", "train_reward_model"]


def _config(
    output_dir: str | Path,
    *,
    loss: str,
    loss_params: dict | None,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    progress: bool,
    eval_every: int | None,
    logging_steps: int,
):
    from prefkit.train.config import PreferenceConfig

    return PreferenceConfig(
        output_dir=str(output_dir),
        loss=loss,
        loss_params=dict(loss_params or {}),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=128,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(10, max(0, steps // 10)),
        logging_steps=logging_steps,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=False,
        disable_tqdm=not progress,
    )


def _train(trainer, progress: bool) -> None:
    if not progress:  # Trainer prints every log dict when its progress bar is off
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.model.eval()


def train_policy(
    reference: LabPolicy,
    train_records: Sequence,
    *,
    output_dir: str | Path,
    loss: str = "dpo",
    loss_params: dict[str, Any] | None = None,
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    eval_records: Sequence | None = None,
    eval_every: int | None = None,
    logging_steps: int = 10,
    callbacks: Sequence[TrainerCallback] = (),
    progress: bool = True,
):
    """Train a copy of ``reference.model`` on ``train_records`` with ``loss`` against the frozen reference;
    returns the `PreferenceTrainer` (a `ListPreferenceTrainer` on ranked records for a listwise loss;
    ``trainer.model`` is the trained policy, ``trainer.state.log_history`` its logs)."""
    from prefkit.losses import get_loss
    from prefkit.train.list_trainer import ListPreferenceTrainer
    from prefkit.train.trainer import PreferenceTrainer

    names = [loss] if isinstance(loss, str) else list(loss)
    needs_reference = any(get_loss(n).needs_reference for n in names)
    args = _config(
        output_dir,
        loss=loss,
        loss_params=loss_params,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        progress=progress,
        eval_every=eval_every if eval_records else None,
        logging_steps=logging_steps,
    )
    trainer_class = ListPreferenceTrainer if get_loss(names[0]).kind == "list" else PreferenceTrainer
    trainer = trainer_class(
        copy.deepcopy(reference.model),
        args,
        train_dataset=list(train_records),
        eval_dataset=list(eval_records) if eval_records else None,
        processing_class=reference.tokenizer,
        ref_model=reference.model if needs_reference else None,
        callbacks=list(callbacks),
        run_info={"model": f"lab reference policy ({reference.path or 'in memory'})"},
    )
    _train(trainer, progress)
    return trainer


def reward_model_from(reference: LabPolicy, seed: int = 0) -> torch.nn.Module:
    """A one-label sequence classifier on a copy of the reference's backbone, with a new seeded head."""
    config = AutoConfig.for_model(**reference.model.config.to_dict())
    config.num_labels = 1
    config.pad_token_id = reference.tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(reference.model.base_model.state_dict())
    return model


def train_reward_model(
    reference: LabPolicy,
    train_records: Sequence,
    *,
    output_dir: str | Path,
    loss: str = "bt",
    loss_params: dict[str, Any] | None = None,
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    eval_records: Sequence | None = None,
    eval_every: int | None = None,
    logging_steps: int = 10,
    progress: bool = True,
):
    """Train a reward model (`reward_model_from` the reference) on pairwise ``train_records``; returns
    the `RewardTrainer` (``trainer.model`` is the reward model)."""
    from prefkit.train.reward_trainer import RewardTrainer

    args = _config(
        output_dir,
        loss=loss,
        loss_params=loss_params,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        progress=progress,
        eval_every=eval_every if eval_records else None,
        logging_steps=logging_steps,
    )
    trainer = RewardTrainer(
        reward_model_from(reference, seed),
        args,
        train_dataset=list(train_records),
        eval_dataset=list(eval_records) if eval_records else None,
        processing_class=reference.tokenizer,
        run_info={"model": "lab reference backbone + new reward head"},
    )
    _train(trainer, progress)
    return trainer


class TruthCallback(TrainerCallback):
    """Evaluate the policy against the world's true reward every ``every`` steps (and before the first):
    ``history`` gets ``{"step", "mean_reward", "reward_se", "kl", "kl_se", "win_rate",
    "worst_group_reward", "mean_length"}`` entries."""

    def __init__(
        self, world: World, tokenizer, reference: torch.nn.Module, every: int, *, n_per_prompt: int = 8, seed: int = 0
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.world, self.tokenizer, self.reference = world, tokenizer, reference
        self.every, self.n_per_prompt, self.seed = every, n_per_prompt, seed
        self.history: list[dict[str, Any]] = []
        self._reference_samples = None

    def _record(self, step: int, model) -> None:
        if self._reference_samples is None:
            self._reference_samples = evaluate_policy(
                self.world,
                self.reference,
                self.tokenizer,
                n_per_prompt=self.n_per_prompt,
                seed=self.seed,
                progress=False,
            ).samples
        result = evaluate_policy(
            self.world,
            model,
            self.tokenizer,
            reference=self.reference,
            reference_samples=self._reference_samples,
            n_per_prompt=self.n_per_prompt,
            seed=self.seed,
            progress=False,
        )
        keys = ("mean_reward", "reward_se", "kl", "kl_se", "win_rate", "worst_group_reward", "mean_length")
        self.history.append({"step": step, **{k: getattr(result, k) for k in keys}})

    def start_from(self, reference) -> TruthCallback:
        """Take ``reference`` (an `evaluate_policy` result of the reference, made with this callback's
        ``n_per_prompt`` and ``seed``) as step 0 and as the reference's samples, so a study with many runs
        evaluates the reference once. Returns the callback."""
        self.history = [{"step": 0, "mean_reward": reference.mean_reward, "kl": 0.0}]
        self._reference_samples = reference.samples
        return self

    def path(self) -> list[dict[str, Any]]:
        """The run's ``{"step", "mean_reward", "kl"}`` points so far."""
        return [{k: point[k] for k in ("step", "mean_reward", "kl")} for point in self.history]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.history:
            self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state.global_step, model)
