"""Multi-objective reward model with a prompt-conditioned gate (ArmoRM).

Paper: Wang, Xiong, Xie, Zhao, Zhang, "Interpretable Preferences via Multi-Objective Reward
Modeling and Mixture-of-Experts" (2024), arXiv:2406.12845.

Model, for a prompt ``x`` and a response ``y`` (``h(.)``: the frozen backbone's final hidden state
at the last token, `prefkit.models.features`):

- attribute scores ``r(x, y) = W h(x, y) + b`` in ``R^A``, one per rated attribute (helpfulness,
  correctness, coherence, complexity, verbosity, ...), fitted by ridge regression on ``rated``
  records (stage 1, `fit_regression`);
- de-correlated scores ``r'_i = r_i - lambda_i * r_v`` where ``v`` is the verbosity attribute and
  ``lambda_i = cov(r_i, r_v) / var(r_v)`` over the rated records' predicted scores (the reference
  distribution). This least-squares choice makes the Pearson correlation of every ``r'_i`` with
  ``r_v`` exactly 0 there; for ``i = v`` it gives ``lambda_v = 1``, so ``r'_v = 0`` (the verbosity
  objective itself carries no reward). `fit_decorrelation`.
- gate weights ``w(x) = softmax(MLP(h(x)))`` (non-negative, sum 1) from the prompt alone;
- reward ``R(x, y) = beta * sum_i w_i(x) * r'_i(x, y)``.

The gate (and ``beta``) are trained with the Bradley-Terry loss
``-log sigmoid(R(x, y_w) - R(x, y_l))`` on pairwise records, the backbone and the regression
frozen (stage 2, `fit_gate`). prefkit learns ``beta`` with the gate (as ``exp`` of a free
parameter); it only scales rewards and never changes a ranking.

Everything is inspectable: `MultiObjectiveRewardModel.explain` returns the raw and de-correlated
attribute scores, the gate's weights and the reward of each sequence.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from prefkit.data.records import DataError, PairwiseRecord, RatedRecord
from prefkit.models.features import embed_prompt_completions, embed_prompts, last_token_states
from prefkit.models.reward import register_reward_model_type

__all__ = [
    "AttributeGate",
    "MultiObjectiveConfig",
    "MultiObjectiveRewardModel",
    "RewardExplanation",
    "fit_decorrelation",
    "fit_gate",
    "fit_regression",
    "prompt_mask",
    "ratings_matrix",
    "train_multi_objective",
]

MODEL_TYPE = "prefkit_multi_objective"


class MultiObjectiveConfig(PreTrainedConfig):
    """Config of a `MultiObjectiveRewardModel`.

    ``text_config``: the backbone's config. ``attributes``: names of the A objectives, in output
    order. ``gate_hidden_sizes``: hidden layer widths of the gate MLP (ReLU between layers).
    ``verbosity_attribute``: the attribute the others are de-correlated from (None: no
    de-correlation). ``decorrelation``: ``lambda_i`` per attribute. ``beta``: reward scale.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    attributes: list[str] | None = None
    gate_hidden_sizes: list[int] | None = None
    verbosity_attribute: str | None = None
    decorrelation: list[float] | None = None
    beta: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.attributes = list(self.attributes or [])
        self.gate_hidden_sizes = list(self.gate_hidden_sizes or [])
        if self.decorrelation is None:
            self.decorrelation = [0.0] * len(self.attributes)
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes must be unique, got {self.attributes}")
        if len(self.decorrelation) != len(self.attributes):
            raise ValueError(
                f"decorrelation has {len(self.decorrelation)} values for {len(self.attributes)} attributes"
            )
        if self.verbosity_attribute is not None and self.verbosity_attribute not in self.attributes:
            raise ValueError(
                f"verbosity_attribute {self.verbosity_attribute!r} is not one of the attributes {self.attributes}"
            )


class AttributeGate(nn.Module):
    """Prompt features ``[N, H]`` -> attribute weights ``[N, A]`` (softmax: non-negative, sum 1)."""

    def __init__(self, hidden_size: int, num_attributes: int, hidden_sizes: Sequence[int] = ()):
        super().__init__()
        layers: list[nn.Module] = []
        width = hidden_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_attributes))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return torch.softmax(self.net(features), dim=-1)


@dataclass
class RewardExplanation:
    """Why a sequence got its reward: every tensor has one row per sequence.

    ``scores`` ``[N, A]``: regression outputs; ``adjusted`` ``[N, A]``: after verbosity
    de-correlation; ``weights`` ``[N, A]``: the gate's weights (prompt-dependent); ``rewards``
    ``[N]`` = ``beta * (weights * adjusted).sum(-1)``.
    """

    attributes: list[str]
    scores: Tensor
    adjusted: Tensor
    weights: Tensor
    rewards: Tensor

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per sequence: ``{"reward": float, "attributes": {name: {score, adjusted, weight}}}``."""
        out = []
        for i in range(self.rewards.shape[0]):
            per_attribute = {
                name: {
                    "score": float(self.scores[i, j]),
                    "adjusted": float(self.adjusted[i, j]),
                    "weight": float(self.weights[i, j]),
                }
                for j, name in enumerate(self.attributes)
            }
            out.append({"reward": float(self.rewards[i]), "attributes": per_attribute})
        return out


def prompt_mask(attention_mask: Tensor, completion_mask: Tensor | None) -> Tensor:
    """``[N, T]`` mask of the prompt: real tokens before each row's first completion token."""
    if completion_mask is None:
        raise ValueError(
            "this model needs completion_mask (1 on response tokens) to find the prompt its gate reads; "
            "batches from prefkit's collators carry it"
        )
    if completion_mask.shape != attention_mask.shape:
        raise ValueError(
            f"completion_mask has shape {tuple(completion_mask.shape)}, attention_mask {tuple(attention_mask.shape)}"
        )
    no_completion = ~completion_mask.bool().any(dim=1)
    if bool(no_completion.any()):
        rows = no_completion.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no completion token (completion_mask is all 0)")
    before_completion = completion_mask.long().cumsum(dim=1) == 0
    return attention_mask * before_completion.to(attention_mask.dtype)


class MultiObjectiveRewardModel(PreTrainedModel):
    """Backbone + attribute regression head + prompt gate (ArmoRM). A `RewardScorer`.

    ``score`` needs ``completion_mask`` (the gate reads the prompt: the tokens before the first
    completion token). Pass ``backbone`` to wrap an existing base model without copying it.
    """

    config_class = MultiObjectiveConfig
    forward_computes = "score"  # trainers call it through a DDP / FSDP wrapper's forward
    base_model_prefix = "backbone"

    def __init__(self, config: MultiObjectiveConfig, backbone: nn.Module | None = None):
        super().__init__(config)
        if not config.attributes:
            raise ValueError("MultiObjectiveConfig.attributes is empty: the model needs at least one attribute")
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.text_config)
        hidden, n_attr = config.text_config.hidden_size, len(config.attributes)
        self.regression = nn.Linear(hidden, n_attr)
        self.gate = AttributeGate(hidden, n_attr, config.gate_hidden_sizes)
        self.post_init()

    @property
    def attributes(self) -> list[str]:
        return list(self.config.attributes)

    def _features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = last_token_states(self.backbone, input_ids, attention_mask)
        return states.to(self.regression.weight.dtype)

    def attribute_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[N, A]`` regression outputs for prompt + response rows (before de-correlation)."""
        return self.regression(self._features(input_ids, attention_mask))

    def decorrelate(self, scores: Tensor) -> Tensor:
        """``r'_i = r_i - lambda_i * r_verbosity`` (unchanged when there is no verbosity attribute)."""
        if self.config.verbosity_attribute is None:
            return scores
        v = self.config.attributes.index(self.config.verbosity_attribute)
        lambdas = torch.tensor(self.config.decorrelation, dtype=scores.dtype, device=scores.device)
        return scores - scores[:, v : v + 1] * lambdas

    def gate_weights(self, prompt_ids: Tensor, prompt_attention_mask: Tensor) -> Tensor:
        """``[N, A]`` non-negative weights summing to 1, from prompt-only rows."""
        return self.gate(self._features(prompt_ids, prompt_attention_mask))

    def explain(
        self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor | None = None
    ) -> RewardExplanation:
        """Attribute scores, de-correlated scores, gate weights and rewards of collated rows."""
        scores = self.attribute_scores(input_ids, attention_mask)
        adjusted = self.decorrelate(scores)
        weights = self.gate_weights(input_ids, prompt_mask(attention_mask, completion_mask))
        rewards = self.config.beta * (weights * adjusted).sum(dim=-1)
        return RewardExplanation(self.attributes, scores, adjusted, weights, rewards)

    def score(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor | None = None) -> Tensor:
        """``[N]`` rewards ``beta * sum_i w_i(prompt) * r'_i(prompt + response)``."""
        return self.explain(input_ids, attention_mask, completion_mask).rewards

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor | None = None) -> Tensor:
        return self.score(input_ids, attention_mask, completion_mask)


# also registers the config and model with AutoConfig / AutoModel
register_reward_model_type(MODEL_TYPE, MultiObjectiveRewardModel)


# --------------------------------------------------------------------------------------------
# Stage 1: attribute regression and verbosity de-correlation
# --------------------------------------------------------------------------------------------


def fit_regression(features: Tensor, ratings: Tensor, l2: float = 1.0) -> tuple[Tensor, Tensor]:
    """Ridge regression of each attribute on the features, in closed form.

    ``features`` ``[N, H]``, ``ratings`` ``[N, A]`` with NaN where a row lacks that attribute (each
    attribute is fitted on the rows that have it). Per attribute, with the rated rows centred
    (``Xc = X - mean(X)``, ``yc = y - mean(y)``; the intercept is not penalised):
    ``w = (Xc^T Xc + l2 * I)^-1 Xc^T yc``, ``b = mean(y) - mean(X) . w``.
    Returns ``(weight [A, H], bias [A])`` in float32 (solved in float64).
    """
    if features.ndim != 2 or ratings.ndim != 2 or features.shape[0] != ratings.shape[0]:
        raise ValueError(
            f"features must be [N, H] and ratings [N, A], got {tuple(features.shape)} and {tuple(ratings.shape)}"
        )
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be a positive number, got {l2}")
    x_all, y_all = features.double(), ratings.double()
    eye = torch.eye(x_all.shape[1], dtype=torch.float64)
    weights, biases = [], []
    for j in range(y_all.shape[1]):
        rated = ~torch.isnan(y_all[:, j])
        if not bool(rated.any()):
            raise ValueError(f"attribute column {j} has no rated row")
        x, y = x_all[rated], y_all[rated, j]
        x_mean, y_mean = x.mean(dim=0), y.mean()
        xc = x - x_mean
        w = torch.linalg.solve(xc.T @ xc + l2 * eye, xc.T @ (y - y_mean))
        weights.append(w)
        biases.append(y_mean - x_mean @ w)
    return torch.stack(weights).float(), torch.stack(biases).float()


def fit_decorrelation(scores: Tensor, verbosity_index: int) -> Tensor:
    """``[A]`` lambdas with ``corr(r_i - lambda_i * r_v, r_v) = 0`` on ``scores`` ``[N, A]``.

    ``lambda_i = cov(r_i, r_v) / var(r_v)`` (the least-squares slope of ``r_i`` on ``r_v``), so
    ``lambda_v = 1``.
    """
    if scores.ndim != 2 or not 0 <= verbosity_index < scores.shape[1]:
        raise ValueError(
            f"need scores [N, A] and 0 <= verbosity_index < A, got {tuple(scores.shape)}, {verbosity_index}"
        )
    centred = scores.double() - scores.double().mean(dim=0)
    r_v = centred[:, verbosity_index]
    var = (r_v * r_v).sum()
    if float(var) == 0.0:
        raise ValueError("the verbosity scores are constant on the reference data: cannot de-correlate from them")
    return ((centred * r_v[:, None]).sum(dim=0) / var).float()


def ratings_matrix(records: Sequence[RatedRecord]) -> tuple[list[str], Tensor]:
    """Attribute names (order of first appearance) and ``[N, A]`` ratings, NaN where missing."""
    attributes: list[str] = []
    for record in records:
        attributes += [name for name in record.ratings if name not in attributes]
    matrix = torch.full((len(records), len(attributes)), float("nan"))
    for i, record in enumerate(records):
        for name, value in record.ratings.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(None, i + 1, "ratings", f"a finite number for attribute {name!r}", value)
            matrix[i, attributes.index(name)] = float(value)
    return attributes, matrix


# --------------------------------------------------------------------------------------------
# Stage 2: the gate
# --------------------------------------------------------------------------------------------


def fit_gate(
    prompt_features: Tensor,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    hidden_sizes: Sequence[int] = (64,),
    epochs: int = 200,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    beta_init: float = 1.0,
    seed: int = 0,
) -> tuple[AttributeGate, float]:
    """Train a gate with the Bradley-Terry loss on frozen attribute scores; returns ``(gate, beta)``.

    ``prompt_features`` ``[B, H]``; ``chosen_scores`` / ``rejected_scores`` ``[B, A]`` are the
    (de-correlated) attribute scores of the chosen and rejected responses. Loss per pair:
    ``-log sigmoid(beta * w(x) . (r'_w - r'_l))`` with ``beta = exp(log_beta)`` learned too;
    Adam, shuffled mini-batches, all randomness from ``seed``.
    """
    n, n_attr = chosen_scores.shape
    if prompt_features.shape[0] != n or rejected_scores.shape != chosen_scores.shape:
        raise ValueError(
            f"shapes disagree: prompt_features {tuple(prompt_features.shape)}, chosen_scores "
            f"{tuple(chosen_scores.shape)}, rejected_scores {tuple(rejected_scores.shape)}"
        )
    if beta_init <= 0:
        raise ValueError(f"beta_init must be > 0, got {beta_init}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gate = AttributeGate(prompt_features.shape[1], n_attr, hidden_sizes)
    log_beta = nn.Parameter(torch.tensor(math.log(beta_init)))
    optimizer = torch.optim.Adam([*gate.parameters(), log_beta], lr=lr, weight_decay=weight_decay)
    x, diff = prompt_features.float(), (chosen_scores - rejected_scores).float()
    gate.train()
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            margin = log_beta.exp() * (gate(x[batch]) * diff[batch]).sum(dim=-1)
            loss = -F.logsigmoid(margin).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return gate.eval(), log_beta.detach().exp().item()


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def _check_records(records: Sequence[Any], cls: type, name: str) -> None:
    if not records:
        raise ValueError(f"{name} is empty")
    for i, record in enumerate(records):
        if not isinstance(record, cls):
            raise DataError(None, i + 1, None, f"a {cls.kind} record in {name}", type(record).__name__)


def train_multi_objective(
    backbone,
    tokenizer,
    rated_records: Sequence[RatedRecord],
    pairwise_records: Sequence[PairwiseRecord],
    *,
    verbosity_attribute: str | None = "verbosity",
    l2: float = 1.0,
    gate_hidden_sizes: Sequence[int] = (64,),
    epochs: int = 200,
    lr: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
    feature_batch_size: int = 16,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> MultiObjectiveRewardModel:
    """ArmoRM's two stages on a frozen backbone; returns the assembled model (in eval mode).

    1. features of the rated (prompt, completion) rows; ridge regression per attribute
       (`fit_regression`); lambdas from the predicted scores on those rows (`fit_decorrelation`;
       ``verbosity_attribute=None`` skips it, a name missing from the ratings is an error);
    2. features of the pairwise prompts and responses; the gate and ``beta`` by Bradley-Terry on
       the de-correlated scores (`fit_gate`).

    The returned model wraps ``backbone``'s base model itself (no copy).
    """
    _check_records(rated_records, RatedRecord, "rated_records")
    _check_records(pairwise_records, PairwiseRecord, "pairwise_records")
    attributes, ratings = ratings_matrix(rated_records)
    if verbosity_attribute is not None and verbosity_attribute not in attributes:
        raise ValueError(
            f"verbosity_attribute {verbosity_attribute!r} is not among the rated attributes {attributes}; "
            "pass verbosity_attribute=None to skip the de-correlation"
        )
    embed_kw = dict(batch_size=feature_batch_size, max_prompt_length=max_prompt_length, progress=progress)
    rated_features = embed_prompt_completions(
        backbone,
        tokenizer,
        [r.prompt for r in rated_records],
        [r.completion for r in rated_records],
        max_length=max_length,
        **embed_kw,
    )
    weight, bias = fit_regression(rated_features, ratings, l2)
    lambdas = [0.0] * len(attributes)
    if verbosity_attribute is not None:
        predicted = rated_features @ weight.T + bias
        lambdas = fit_decorrelation(predicted, attributes.index(verbosity_attribute)).tolist()

    model = _assemble(backbone, attributes, weight, bias, lambdas, verbosity_attribute, gate_hidden_sizes)

    prompts = [r.prompt for r in pairwise_records]
    prompt_features = embed_prompts(backbone, tokenizer, prompts, **embed_kw)
    chosen, rejected = (
        _adjusted_scores(model, tokenizer, prompts, [getattr(r, side) for r in pairwise_records], max_length, embed_kw)
        for side in ("chosen", "rejected")
    )
    gate, beta = fit_gate(
        prompt_features,
        chosen,
        rejected,
        hidden_sizes=gate_hidden_sizes,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )
    model.gate.load_state_dict(gate.state_dict())
    model.config.beta = beta
    return model.eval()


def _assemble(backbone, attributes, weight, bias, lambdas, verbosity_attribute, gate_hidden_sizes):
    """A model around ``backbone``'s base model with the fitted regression (the gate still new)."""
    base = getattr(backbone, "base_model", backbone)
    config = MultiObjectiveConfig(
        # a copy: building a composite config resets the attention implementation of the one it is given
        text_config=copy.deepcopy(base.config),
        attributes=attributes,
        gate_hidden_sizes=list(gate_hidden_sizes),
        verbosity_attribute=verbosity_attribute,
        decorrelation=lambdas,
    )
    model = MultiObjectiveRewardModel(config, backbone=base)
    with torch.no_grad():
        model.regression.weight.copy_(weight)
        model.regression.bias.copy_(bias)
    return model


def _adjusted_scores(model, tokenizer, prompts, completions, max_length, embed_kw) -> Tensor:
    """``[N, A]`` de-correlated attribute scores of prompt + completion texts (no gradients)."""
    features = embed_prompt_completions(
        model.backbone, tokenizer, prompts, completions, max_length=max_length, **embed_kw
    )
    with torch.no_grad():
        return model.decorrelate(model.regression(features))
