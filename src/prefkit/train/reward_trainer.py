"""`RewardTrainer`: train a reward model (scalar Bradley-Terry, listwise, or a pairwise judge).

It is `PreferenceTrainer` with another model and another loss computation: datasets (records
tokenized here, or tokenized ``datasets.Dataset``\\ s), per-example weights, metric logging,
atomic checkpoints, resume, the non-finite-loss stop and the model card are the same code.
No reference model is ever created (reward losses are registered reference-free).

Per batch, by the kind of the configured loss(es):

- ``reward_pair`` (e.g. ``bt``): `PairwiseCollator` rows, chosen then rejected, are scored in
  **one** forward over the ``[2B, T]`` batch; the scores become a `RewardPair`.
- ``reward_list`` (``ranknet``, ``listmle``): `ListCollator` rows ``[B*K, T]``, one forward, a
  `RewardList` of ``[B, K]`` scores with the ranking and tie levels.
- ``judge`` (e.g. ``gpm``): ``model.compare(chosen rows, rejected rows)`` gives the logits of a
  `PreferenceLogits`; a scalar model without ``compare`` gives ``r_w - r_l`` from one forward.

A model is scored with its own ``score(input_ids, attention_mask, completion_mask)`` method
when it has one (prefkit's reward model classes), otherwise as a Hugging Face sequence
classifier (`prefkit.models.reward.reward_scores`, the logit at the last non-pad token).
``save_model`` writes ``save_pretrained`` output: a trained classifier loads back with
``AutoModelForSequenceClassification`` and with `prefkit.models.reward.load_reward_model`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from prefkit.data.collators import ListCollator, PairwiseCollator
from prefkit.losses import PreferenceLogits, RewardList, RewardPair
from prefkit.losses.combine import combine_losses
from prefkit.models.loading import ensure_pad_token
from prefkit.models.reward import build_reward_model, reward_scores
from prefkit.train.config import PreferenceConfig
from prefkit.train.trainer import PreferenceTrainer

__all__ = ["RewardTrainer", "model_scores"]


def model_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """``[N]`` rewards: ``model.score(...)`` for a prefkit reward model, else the classifier's logit.

    (A Hugging Face classifier's ``score`` attribute is its linear head, a module, not a method.)
    Under a DDP / FSDP / DeepSpeed wrapper the classifier runs through the wrapper's forward.
    """
    inner = _inner_module(model)
    method = getattr(inner, "score", None)
    if callable(method) and not isinstance(method, nn.Module):
        if getattr(inner, "forward_computes", None) == "score":  # through the wrapper's forward
            return model(input_ids, attention_mask, completion_mask)
        _refuse_wrapped(model, "score")
        return method(input_ids, attention_mask, completion_mask)
    return reward_scores(model, input_ids, attention_mask)


def _inner_module(model: nn.Module) -> nn.Module:
    """The model a DDP / FSDP / DeepSpeed wrapper holds (``model`` itself when it is not wrapped)."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    return model


def _refuse_wrapped(model: nn.Module, method: str) -> None:
    """Calling a wrapped model's own ``method`` would bypass the wrapper's forward, and with it the
    gradient synchronisation of multi-process training: refuse instead. (A model whose ``forward``
    is that method says so with ``forward_computes = "score"`` / ``"compare"`` and is called through
    the wrapper.)"""
    inner = _inner_module(model)
    if inner is not model:
        raise NotImplementedError(
            f"{type(inner).__name__} is scored by its own {method}() method, which bypasses the "
            f"{type(model).__name__} wrapper's forward (and its gradient synchronisation). Multi-process "
            "RewardTrainer runs train models whose forward computes the score (one-label "
            "...ForSequenceClassification models, the general preference model); train this model in one "
            "process, or give it forward_computes = 'score' / 'compare' (see docs/distributed.md)"
        )


class RewardTrainer(PreferenceTrainer):
    """Train a reward model with the loss(es) named in ``args.loss`` (kinds reward_pair,
    reward_list or judge).

    Args:
        model: a one-label ``...ForSequenceClassification`` (see
            `prefkit.models.reward.build_reward_model`), a prefkit reward model with ``score`` /
            ``compare``, or a backbone name for ``build_reward_model`` (``"tiny"``, a folder, a
            Hub id; a new reward head is put on it).
        args: a `PreferenceConfig`; ``loss`` and ``loss_params`` select the objective.
        train_dataset / eval_dataset: `PairwiseRecord`\\ s (reward_pair, judge) or
            `RankedRecord`\\ s (reward_list), or tokenized datasets with the matching columns.
        processing_class: the tokenizer (loaded from ``model`` when that is a name). When the
            model's config has no ``pad_token_id``, the tokenizer's is written to it.
        peft_config: a ``peft.PeftConfig`` (task type ``SEQ_CLS`` for a classifier), optional.
        Other arguments as for `PreferenceTrainer` (``ref_model`` must stay None).
    """

    LOSS_KINDS = ("reward_pair", "reward_list", "judge")

    def __init__(self, model: nn.Module | str, args: PreferenceConfig, *pos_args, **kwargs):
        tokenizer = kwargs.get("processing_class")
        if not isinstance(model, str) and tokenizer is not None:
            _set_pad_token_id(model, ensure_pad_token(tokenizer))
        super().__init__(model, args, *pos_args, **kwargs)

    def _load_model(self, name: str, tokenizer) -> nn.Module:
        return build_reward_model(
            name,
            pad_token_id=tokenizer.pad_token_id,
            vocab_size=len(tokenizer) if name == "tiny" else None,
        )

    def _default_collator(self, pad_id: int, args: PreferenceConfig):
        return ListCollator(pad_id) if self.loss_kind == "reward_list" else PairwiseCollator(pad_id)

    def compute_preference_loss(
        self, model: nn.Module, inputs: dict[str, Any], train: bool
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(loss, metrics, per_example_loss)`` for one batch (see the module docstring)."""
        ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        weight = inputs["weight"]
        b = weight.shape[0]
        if self.loss_kind == "judge":
            batch = PreferenceLogits(logits=self._judge_logits(model, ids, attn, comp, b), margin=inputs.get("margin"))
        else:
            scores = model_scores(model, ids, attn, comp)
            if self.loss_kind == "reward_pair":
                batch = RewardPair(chosen=scores[:b], rejected=scores[b:], margin=inputs.get("margin"))
            else:
                batch = RewardList(scores=scores.view(b, -1), ranking=inputs["ranking"], levels=inputs.get("levels"))
        out = combine_losses(batch, self.loss_names, self.loss_weights, self.loss_params)
        self._check_batch_coupled_weights(weight)
        per_example = out.loss * weight.to(out.loss.dtype)
        metrics = dict(out.metrics)
        if self.loss_kind == "judge":
            metrics.setdefault("rewards/accuracies", (batch.logits.detach() > 0).float())
        return per_example.mean(), metrics, per_example.detach()

    def model_card_info(self):
        info = super().model_card_info()
        info.reward_model = True
        return info

    @staticmethod
    def _judge_logits(model: nn.Module, ids: Tensor, attn: Tensor, comp: Tensor, b: int) -> Tensor:
        """``[B]`` logits that chosen (rows ``:B``) beats rejected (rows ``B:``)."""
        inner = _inner_module(model)
        compare = getattr(inner, "compare", None)
        if callable(compare):
            if getattr(inner, "forward_computes", None) == "compare":  # through the wrapper's forward
                return model(ids[:b], attn[:b], ids[b:], attn[b:], comp[:b], comp[b:])
            _refuse_wrapped(model, "compare")
            return compare(ids[:b], attn[:b], ids[b:], attn[b:], comp[:b], comp[b:])
        scores = model_scores(model, ids, attn, comp)
        return scores[:b] - scores[b:]


def _set_pad_token_id(model: nn.Module, tokenizer) -> None:
    """Give a classifier without ``pad_token_id`` the tokenizer's (it locates the last token)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    text_config = config.get_text_config()
    if text_config.pad_token_id is None:
        text_config.pad_token_id = tokenizer.pad_token_id
        config.pad_token_id = tokenizer.pad_token_id
