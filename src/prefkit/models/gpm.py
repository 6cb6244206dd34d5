"""General preference model (GPM): preference embeddings with a skew-symmetric score.

Paper: Zhang, Zhang, Yuan, Gu, "Beyond Bradley-Terry Models: A General Preference Model for
Language Model Alignment" (2024), arXiv:2410.02197.

Each response ``y`` to a prompt ``x`` is embedded once to a unit vector ``v = v(x, y)`` in
``R^{2k}`` (a linear head on the backbone's last-token hidden state, L2-normalised). The
preference score of ``a`` over ``b`` is

    s(a > b | x) = <R v_a, v_b>,   R = blockdiag(lambda_1 J, ..., lambda_k J),   J = [[0, -1], [1, 0]]

that is ``s = sum_l lambda_l * (v_a[2l] * v_b[2l+1] - v_a[2l+1] * v_b[2l])``. ``R`` is skew-symmetric,
so ``s(a > b) = -s(b > a)`` and ``s(a > a) = 0``; and unlike a difference of scalar rewards it can
express cyclic (intransitive) preferences. In one 2-D block ``s(a > b) = sin(theta_b - theta_a)``
for unit vectors at angles ``theta``, so rock, paper and scissors at angles 0, -120 and -240
degrees give paper > rock, scissors > paper and rock > scissors, each with ``s = sin(120) ~ 0.87``.
``lambda_l = 1`` by default; with ``prompt_scaled=True`` they are prompt-dependent,
``lambda(x) = softplus(W_s h(x) + b_s) >= 0`` with ``h(x)`` the prompt's feature (the paper's
eigenvalue scale gate; the softplus parametrisation is prefkit's choice).

``P(a > b | x) = sigmoid(s(a > b | x) / beta)``; `GeneralPreferenceModel.compare` returns the
logit ``s / beta`` (``beta = config.beta``), which is what `prefkit.models.base.PairwiseJudge`
promises, and the ``gpm`` loss (`prefkit.losses.preference_models`) is ``-log sigmoid`` of it.
A GPM is a judge, not a `RewardScorer`: no scalar reward exists for cyclic preferences.

Training: end to end with `prefkit.train.reward_trainer.RewardTrainer` and the ``gpm`` loss (the
trainer calls ``compare`` on the chosen and rejected rows), or, on frozen features, with
`fit_gpm_head` and `build_gpm(..., head=...)`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from prefkit.models.features import last_token_states
from prefkit.models.multi_objective import prompt_mask
from prefkit.models.reward import register_reward_model_type

__all__ = [
    "GPMConfig",
    "GeneralPreferenceModel",
    "PreferenceEmbeddingHead",
    "build_gpm",
    "fit_gpm_head",
    "preference_score",
]

MODEL_TYPE = "prefkit_gpm"


class GPMConfig(PreTrainedConfig):
    """Config of a `GeneralPreferenceModel`: the backbone's ``text_config``, ``embed_dim`` (2k,
    even), ``prompt_scaled`` (prompt-dependent eigenvalue scales) and the temperature ``beta``."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    embed_dim: int = 8
    prompt_scaled: bool = False
    beta: float = 0.1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_head_sizes(self.embed_dim, self.beta)


def check_head_sizes(embed_dim: int, beta: float) -> None:
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 2 or embed_dim % 2:
        raise ValueError(f"embed_dim must be a positive even int (2k), got {embed_dim!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")


def preference_score(v_a: Tensor, v_b: Tensor, scales: Tensor | None = None) -> Tensor:
    """``[N]`` ``s(a > b) = <R v_a, v_b> = sum_l scales_l (v_a[2l] v_b[2l+1] - v_a[2l+1] v_b[2l])``.

    ``v_a``, ``v_b`` ``[N, 2k]``; ``scales`` ``[N, k]`` (None: all 1).
    """
    per_block = v_a[..., 0::2] * v_b[..., 1::2] - v_a[..., 1::2] * v_b[..., 0::2]
    if scales is not None:
        per_block = per_block * scales
    return per_block.sum(dim=-1)


class PreferenceEmbeddingHead(nn.Module):
    """Features ``[N, H]`` -> unit preference embeddings ``[N, 2k]`` (and eigenvalue scales ``[N, k]``
    from prompt features when ``prompt_scaled``)."""

    def __init__(self, hidden_size: int, embed_dim: int, prompt_scaled: bool = False):
        super().__init__()
        self.proj = nn.Linear(hidden_size, embed_dim, bias=False)
        self.scale_gate = nn.Linear(hidden_size, embed_dim // 2) if prompt_scaled else None

    @property
    def prompt_scaled(self) -> bool:
        return self.scale_gate is not None

    def embed(self, features: Tensor) -> Tensor:
        return F.normalize(self.proj(features), dim=-1)

    def scales(self, prompt_features: Tensor) -> Tensor:
        if self.scale_gate is None:
            raise ValueError("this head has no eigenvalue scale gate (prompt_scaled=False)")
        return F.softplus(self.scale_gate(prompt_features))

    def score(self, features_a: Tensor, features_b: Tensor, prompt_features: Tensor | None = None) -> Tensor:
        """``[N]`` preference scores ``s(a > b)`` from features (prompt features iff prompt_scaled)."""
        if self.prompt_scaled != (prompt_features is not None):
            raise ValueError(
                "pass prompt_features exactly when the head is prompt_scaled "
                f"(prompt_scaled={self.prompt_scaled}, prompt_features given: {prompt_features is not None})"
            )
        scales = None if prompt_features is None else self.scales(prompt_features)
        return preference_score(self.embed(features_a), self.embed(features_b), scales)


class GeneralPreferenceModel(PreTrainedModel):
    """Backbone + `PreferenceEmbeddingHead`. A `PairwiseJudge` (``compare``), not a `RewardScorer`.

    Pass ``backbone`` to wrap an existing base model without copying it.
    """

    config_class = GPMConfig
    base_model_prefix = "backbone"
    forward_computes = "compare"  # trainers call it through a DDP / FSDP wrapper's forward

    def __init__(self, config: GPMConfig, backbone: nn.Module | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.text_config)
        self.head = PreferenceEmbeddingHead(config.text_config.hidden_size, config.embed_dim, config.prompt_scaled)
        self.post_init()

    def _features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return last_token_states(self.backbone, input_ids, attention_mask).to(self.head.proj.weight.dtype)

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[N, 2k]`` unit preference embeddings of prompt + response rows."""
        return self.head.embed(self._features(input_ids, attention_mask))

    def eigenvalue_scales(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor | None) -> Tensor:
        """``[N, k]`` non-negative prompt-dependent scales (prompt: tokens before the completion)."""
        return self.head.scales(self._features(input_ids, prompt_mask(attention_mask, completion_mask)))

    def compare(
        self,
        input_ids_a: Tensor,
        attention_mask_a: Tensor,
        input_ids_b: Tensor,
        attention_mask_b: Tensor,
        completion_mask_a: Tensor | None = None,
        completion_mask_b: Tensor | None = None,
    ) -> Tensor:
        """``[N]`` logits ``s(a > b) / beta``; ``P(a > b) = sigmoid(logit)``.

        ``a[i]`` and ``b[i]`` share a prompt. With ``prompt_scaled`` the scales are read from the
        prompt part of ``a`` (``completion_mask_a`` is then required); otherwise the completion
        masks are not needed.
        """
        v_a = self.embed(input_ids_a, attention_mask_a)
        v_b = self.embed(input_ids_b, attention_mask_b)
        scales = None
        if self.config.prompt_scaled:
            scales = self.eigenvalue_scales(input_ids_a, attention_mask_a, completion_mask_a)
        return preference_score(v_a, v_b, scales) / self.config.beta

    def forward(
        self,
        input_ids_a: Tensor,
        attention_mask_a: Tensor,
        input_ids_b: Tensor,
        attention_mask_b: Tensor,
        completion_mask_a: Tensor | None = None,
        completion_mask_b: Tensor | None = None,
    ) -> Tensor:
        return self.compare(
            input_ids_a, attention_mask_a, input_ids_b, attention_mask_b, completion_mask_a, completion_mask_b
        )


# also registers the config and model with AutoConfig / AutoModel
register_reward_model_type(MODEL_TYPE, GeneralPreferenceModel)


def build_gpm(
    backbone,
    *,
    embed_dim: int = 8,
    prompt_scaled: bool = False,
    beta: float = 0.1,
    head: PreferenceEmbeddingHead | None = None,
    seed: int = 0,
) -> GeneralPreferenceModel:
    """A `GeneralPreferenceModel` around ``backbone``'s base model (shared, not copied).

    The head is new (seeded) unless ``head`` (e.g. from `fit_gpm_head`) is given, whose sizes must
    match ``embed_dim`` / ``prompt_scaled``.
    """
    base = getattr(backbone, "base_model", backbone)
    # a copy: building a composite config resets the attention implementation of the one it is given
    config = GPMConfig(
        text_config=copy.deepcopy(base.config), embed_dim=embed_dim, prompt_scaled=prompt_scaled, beta=beta
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GeneralPreferenceModel(config, backbone=base)
    if head is not None:
        model.head.load_state_dict(head.state_dict())
    return model


def fit_gpm_head(
    chosen_features: Tensor,
    rejected_features: Tensor,
    *,
    prompt_features: Tensor | None = None,
    embed_dim: int = 8,
    beta: float = 0.1,
    epochs: int = 200,
    lr: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
) -> PreferenceEmbeddingHead:
    """Train a GPM head on frozen features ``[B, H]`` (chosen, rejected; prompt ones make it
    prompt_scaled) with ``-log sigmoid(s(chosen > rejected) / beta)``; Adam, seeded."""
    check_head_sizes(embed_dim, beta)
    n = chosen_features.shape[0]
    if rejected_features.shape != chosen_features.shape or (
        prompt_features is not None and prompt_features.shape[0] != n
    ):
        raise ValueError(
            f"shapes disagree: chosen {tuple(chosen_features.shape)}, rejected {tuple(rejected_features.shape)}, "
            f"prompt {None if prompt_features is None else tuple(prompt_features.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = PreferenceEmbeddingHead(chosen_features.shape[1], embed_dim, prompt_features is not None)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            prompt = None if prompt_features is None else prompt_features[batch].float()
            s = head.score(chosen_features[batch].float(), rejected_features[batch].float(), prompt)
            loss = -F.logsigmoid(s / beta).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()
