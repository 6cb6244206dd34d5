"""`ProcessRewardTrainer`: train a process reward model (a logit per step) on stepwise records.

It is `RewardTrainer` (and so `PreferenceTrainer`: tokenization, weights, logging, atomic checkpoints,
exact resume, the non-finite-loss stop, the model card) with a per-step batch: `StepCollator` puts each
solution in one row, the token classifier's logit is read at every step's last token
(`prefkit.models.process.step_logits`), and a loss of kind ``process`` (``prm_bce``) turns the
``[S]`` step logits and labels into one loss per solution.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from prefkit.data.collators import StepCollator
from prefkit.losses import StepScores
from prefkit.losses.combine import combine_losses
from prefkit.models.process import SEPARATOR_KEY, build_process_reward_model, step_logits, step_separator
from prefkit.train.config import PreferenceConfig
from prefkit.train.reward_trainer import RewardTrainer, _inner_module

__all__ = ["ProcessRewardTrainer"]


class ProcessRewardTrainer(RewardTrainer):
    """Train a PRM with the loss(es) named in ``args.loss`` (kind ``process``).

    Args:
        model: a one-label ``...ForTokenClassification`` (`prefkit.models.process.build_process_reward_model`)
            or a backbone name for it (``"tiny"``, a folder, a Hub id).
        args: a `PreferenceConfig`; ``step_separator`` is the text that ends every step (it must equal the
            separator in the model's config, which is set from it when the model has none).
        train_dataset / eval_dataset: `StepwiseRecord`\\ s, or tokenized datasets with the columns of
            `prefkit.data.tokenize.tokenize_stepwise`.
        Other arguments as for `RewardTrainer`.
    """

    LOSS_KINDS = ("process",)

    def __init__(self, model: nn.Module | str, args: PreferenceConfig, *pos_args, **kwargs):
        if not isinstance(model, str):
            _check_separator(model, args.step_separator)
        self._separator = args.step_separator  # for _load_model, which runs before Trainer sets self.args
        super().__init__(model, args, *pos_args, **kwargs)

    def _load_model(self, name: str, tokenizer) -> nn.Module:
        return build_process_reward_model(
            name,
            step_separator=self._separator,
            pad_token_id=tokenizer.pad_token_id,
            vocab_size=len(tokenizer) if name == "tiny" else None,
        )

    def _default_collator(self, pad_id: int, args: PreferenceConfig):
        return StepCollator(pad_id)

    def compute_preference_loss(
        self, model: nn.Module, inputs: dict[str, Any], train: bool
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(loss, metrics, per_example_loss)``: the step logits of the batch through the process loss."""
        weight = inputs["weight"]
        batch = StepScores(
            logits=step_logits(model, inputs),
            labels=inputs["step_labels"],
            example=inputs["step_example"],
            batch_size=weight.shape[0],
        )
        out = combine_losses(batch, self.loss_names, self.loss_weights, self.loss_params)
        per_example = out.loss * weight.to(out.loss.dtype)
        return per_example.mean(), dict(out.metrics), per_example.detach()


def _check_separator(model: nn.Module, separator: str) -> None:
    """A PRM is scored with the separator in its config: it must be the one it is trained with."""
    have = step_separator(model)
    if have is None:
        setattr(_inner_module(model).config, SEPARATOR_KEY, separator)
    elif have != separator:
        raise ValueError(
            f"step_separator is {separator!r}, but the model was built with {have!r} ({SEPARATOR_KEY} in its "
            "config); train with the model's separator"
        )
