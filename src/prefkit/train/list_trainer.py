"""`ListPreferenceTrainer`: train a policy with a listwise loss (kind ``list``) on ranked records.

It is `PreferenceTrainer` (references, LoRA, logging, atomic checkpoints, exact resume, the non-finite-loss
stop) with a list batch: `ListCollator` lays out each prompt's ``K`` completions as ``B * K`` rows, the policy
and the reference score every row once (the chunked log-prob engine), and the loss reads ``[B, K]`` log-probs
with the ranking and its tie levels (`ListLogps`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from prefkit.data.collators import ListCollator
from prefkit.losses import ListLogps
from prefkit.losses.combine import combine_losses
from prefkit.train.config import PreferenceConfig
from prefkit.train.trainer import PreferenceTrainer

__all__ = ["ListPreferenceTrainer"]


class ListPreferenceTrainer(PreferenceTrainer):
    """Train a policy with the listwise loss(es) named in ``args.loss`` (``prefkit losses --kind list``) on
    `RankedRecord`\\ s (or a tokenized dataset with ``prompt_input_ids``, ``completions_input_ids``,
    ``ranking``). Arguments as for `PreferenceTrainer`; ``precompute_ref_logps`` is not supported."""

    LOSS_KINDS = ("list",)

    def __init__(self, model: nn.Module | str, args: PreferenceConfig, *pos_args, **kwargs):
        if args.precompute_ref_logps:
            raise ValueError(
                "precompute_ref_logps is not supported for listwise losses; set it to false (the reference scores "
                "each batch)"
            )
        super().__init__(model, args, *pos_args, **kwargs)

    def _default_collator(self, pad_id: int, args: PreferenceConfig):
        return ListCollator(pad_id)

    def compute_preference_loss(
        self, model: nn.Module, inputs: dict[str, Any], train: bool
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(loss, metrics, per_example_loss)`` of one batch of ``B`` lists."""
        ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        weight, ranking = inputs["weight"], inputs["ranking"]
        b, k = ranking.shape
        pol = self._logps(model, ids, attn, comp, tokens=False)
        ref = self._ref_logps(model, ids, attn, comp, tokens=False).sum.view(b, k) if self.needs_reference else None
        batch = ListLogps(
            policy=pol.sum.view(b, k),
            ranking=ranking,
            length=pol.n_tokens.view(b, k),
            ref=ref,
            levels=inputs.get("levels"),
            scores=inputs.get("scores"),
        )
        out = combine_losses(batch, self.loss_names, self.loss_weights, self.loss_params)
        self._check_batch_coupled_weights(weight)
        per_example = out.loss * weight.to(out.loss.dtype)
        metrics = dict(out.metrics)
        metrics["logps/best"] = pol.sum.view(b, k).gather(1, ranking[:, :1]).squeeze(1).detach()
        return self._batch_loss(per_example, inputs, metrics, model.training), metrics, per_example.detach()
