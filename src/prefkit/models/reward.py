"""Scalar (Bradley-Terry) reward models: build one to train, load any to score (DESIGN.md §4).

A scalar reward model is a Hugging Face ``...ForSequenceClassification`` with ``num_labels=1``:
the backbone runs over prompt + response and a linear head reads one logit, the reward, at the
last non-pad token (the Hugging Face convention: the rightmost position whose id is not
``config.pad_token_id``, so left and right padding both work). Saved with ``save_pretrained``,
such a model loads back with ``AutoModelForSequenceClassification`` and with
:func:`load_reward_model`.

- :func:`build_reward_model` makes one to train from any backbone that has a
  ``...ForSequenceClassification`` class (``"tiny"``: the built-in tiny Llama).
- :func:`load_reward_model` loads any sequence-classification reward model (a local folder or a
  Hub id) as a `SequenceClassifierReward`, which implements `prefkit.models.base.RewardScorer`
  and `PairwiseJudge`. prefkit's own model types (config ``model_type`` starting with
  ``"prefkit_"``) load through the classes registered with :func:`register_reward_model_type`.
- :func:`reward_scores` is the one place rewards are read from a classifier.

When the pad token is also the EOS token (a common fallback), the Hugging Face convention reads
the reward at the last token *before* the trailing EOS; training and scoring agree on it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from prefkit.models.loading import TINY, TinySpec, is_llama2c_file, load_policy, resolve_dtype

PREFKIT_PREFIX = "prefkit_"

_MODEL_TYPES: dict[str, type] = {}


class SequenceClassifierReward(nn.Module):
    """A ``...ForSequenceClassification`` (one label) as a `RewardScorer` and `PairwiseJudge`.

    ``score`` reads the reward at the last non-pad token; ``compare`` gives ``r_a - r_b``, the
    Bradley-Terry logit that ``a`` is preferred. ``save_pretrained`` writes the wrapped model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        _check_single_label(model.config, type(model).__name__)
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return reward_scores(self.model, input_ids, attention_mask)

    def score(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor | None = None) -> Tensor:
        """``[N]`` rewards; ``completion_mask`` is accepted for the protocol and not needed."""
        return reward_scores(self.model, input_ids, attention_mask)

    def compare(
        self,
        input_ids_a: Tensor,
        attention_mask_a: Tensor,
        input_ids_b: Tensor,
        attention_mask_b: Tensor,
        completion_mask_a: Tensor | None = None,
        completion_mask_b: Tensor | None = None,
    ) -> Tensor:
        """``[N]`` logits ``r(a) - r(b)`` that ``a[i]`` is preferred to ``b[i]``."""
        return self.score(input_ids_a, attention_mask_a) - self.score(input_ids_b, attention_mask_b)

    def save_pretrained(self, save_directory, **kwargs: Any) -> None:
        self.model.save_pretrained(save_directory, **kwargs)


def _check_single_label(config, where: str) -> None:
    num_labels = getattr(config, "num_labels", None)
    if num_labels != 1:
        raise ValueError(
            f"{where} has num_labels={num_labels} (architectures: {getattr(config, 'architectures', None)}), but a "
            "scalar reward model has exactly one output (num_labels=1): this is not a reward model"
        )


def reward_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[N]`` rewards of a one-label sequence classifier, read at the last non-pad token.

    Positions with ``attention_mask == 0`` are set to the model's ``pad_token_id`` first, so the
    padding the model sees is the padding the mask says. Without a ``pad_token_id`` the model
    cannot find the last token of a padded row: that is an error; an unpadded batch is scored one
    row at a time.
    """
    if isinstance(model, SequenceClassifierReward):
        model = model.model
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [N, T]; got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    pad_id = _config(model).get_text_config().pad_token_id
    padded = bool((attention_mask == 0).any())
    if pad_id is None:
        if padded:
            raise ValueError(
                f"{type(model).__name__} has no pad_token_id, so the last token of a padded row cannot be "
                "found; set model.config.pad_token_id to the tokenizer's pad token id"
            )
        rows = [_logits(model, input_ids[i : i + 1], attention_mask[i : i + 1]) for i in range(input_ids.shape[0])]
        return torch.cat(rows)
    return _logits(model, input_ids.masked_fill(attention_mask == 0, pad_id), attention_mask)


def _config(model: nn.Module):
    """``model.config``; for a DDP / FSDP / DeepSpeed wrapper (which has none), its inner module's.
    The wrapper itself is what runs the forward, so its gradient synchronisation is kept."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


def _logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"a reward model must return logits [N, 1]; {type(model).__name__} gave {tuple(logits.shape)}")
    return logits[:, 0]


def register_reward_model_type(model_type: str, cls: type) -> None:
    """Make :func:`load_reward_model` load folders whose config has ``model_type`` with ``cls``.

    ``cls`` is a ``transformers.PreTrainedModel`` subclass (with ``config_class``) implementing
    `RewardScorer` and/or `PairwiseJudge`. The config and model are also registered with
    ``AutoConfig`` / ``AutoModel``, so ``AutoModel.from_pretrained`` reads the folder too.
    """
    if not model_type.startswith(PREFKIT_PREFIX):
        raise ValueError(f"prefkit reward model types start with {PREFKIT_PREFIX!r}; got {model_type!r}")
    config_class = getattr(cls, "config_class", None)
    if config_class is None or getattr(config_class, "model_type", None) != model_type:
        raise ValueError(
            f"{cls.__name__}.config_class must be a PretrainedConfig subclass with model_type={model_type!r}"
        )
    if not (hasattr(cls, "score") or hasattr(cls, "compare")):
        raise TypeError(f"{cls.__name__} implements neither score() (RewardScorer) nor compare() (PairwiseJudge)")
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, cls, exist_ok=True)
    _MODEL_TYPES[model_type] = cls


def registered_reward_model_types() -> dict[str, type]:
    return dict(_MODEL_TYPES)


def build_reward_model(
    backbone_name_or_path: str,
    *,
    pad_token_id: int | None = None,
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    tiny: TinySpec | None = None,
    vocab_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A ``...ForSequenceClassification`` with ``num_labels=1`` and ``pad_token_id`` set, to train.

    ``"tiny"`` takes the tiny Llama of `prefkit.models.loading.load_policy` (sizes from ``tiny``)
    and puts a seeded linear head on it; so does a llama2.c ``*.bin`` checkpoint (converted by
    `prefkit.models.llama2c`). Anything else goes to
    ``AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)``; the head is new
    unless the folder already is a one-label reward model. ``pad_token_id`` (the tokenizer's) is
    written to the config when the backbone has none.
    """
    if backbone_name_or_path == TINY:
        spec = tiny or TinySpec()
        model = _llama_classifier(load_policy(TINY, tiny=spec, vocab_size=vocab_size, dtype=dtype), spec.seed)
    elif is_llama2c_file(backbone_name_or_path):
        model = _llama_classifier(load_policy(backbone_name_or_path, dtype=dtype), seed=0)
    else:
        from transformers import AutoModelForSequenceClassification

        torch_dtype = resolve_dtype(dtype)
        load_kwargs = dict(kwargs, num_labels=1, trust_remote_code=trust_remote_code)
        if torch_dtype is not None:
            load_kwargs["dtype"] = torch_dtype
        try:
            model = AutoModelForSequenceClassification.from_pretrained(backbone_name_or_path, **load_kwargs)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err):
                raise
            raise ValueError(
                f"{backbone_name_or_path!r}: this architecture has no ...ForSequenceClassification class in "
                "transformers, so prefkit cannot put a scalar reward head on it"
            ) from err
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        if pad_token_id is None:
            raise ValueError(
                f"{backbone_name_or_path!r} has no pad_token_id; pass pad_token_id (the tokenizer's pad id) so the "
                "reward can be read at the last non-pad token"
            )
        text_config.pad_token_id = pad_token_id
        model.config.pad_token_id = pad_token_id
    return model


def _llama_classifier(backbone: nn.Module, seed: int) -> nn.Module:
    """A one-label `LlamaForSequenceClassification` on ``backbone``'s (a `LlamaForCausalLM`) weights; the head
    is new, seeded."""
    from transformers import LlamaForSequenceClassification

    config = backbone.config
    config.num_labels = 1
    config.architectures = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    model.model.load_state_dict(backbone.model.state_dict())
    return model.to(backbone.dtype)


def load_reward_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a reward model to score with, in eval mode.

    - ``"tiny"``: a random tiny Llama classifier (tests, demos);
    - a folder or Hub id whose config ``model_type`` was registered with
      :func:`register_reward_model_type`: that class's ``from_pretrained``;
    - any other sequence-classification model with one label: a `SequenceClassifierReward`.
      A folder with several labels, or whose weights lack the classification head (e.g. a plain
      causal LM), is an error rather than a model with a random head.
    """
    if name_or_path == TINY:
        model = SequenceClassifierReward(build_reward_model(TINY, dtype=dtype or "float32"))
    else:
        model = _load_pretrained(name_or_path, resolve_dtype(dtype), trust_remote_code)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _load_pretrained(name_or_path: str, torch_dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

    if os.path.isfile(os.path.join(name_or_path, "adapter_config.json")):
        raise ValueError(
            f"{name_or_path!r} holds a PEFT (LoRA) adapter, not a whole reward model: load it with "
            "peft.AutoPeftModelForSequenceClassification.from_pretrained, call merge_and_unload() and "
            "save_pretrained the result, then load that folder"
        )
    config_dict, _ = PretrainedConfig.get_config_dict(name_or_path, trust_remote_code=trust_remote_code)
    model_type = config_dict.get("model_type", "")
    load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype
    if model_type.startswith(PREFKIT_PREFIX):
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"{name_or_path!r} is a prefkit model of type {model_type!r}, which is not registered "
                f"(registered: {sorted(_MODEL_TYPES) or 'none'}); import the module that defines it first"
            )
        return _MODEL_TYPES[model_type].from_pretrained(name_or_path, **load_kwargs)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    _check_single_label(config, repr(name_or_path))
    model, info = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, config=config, output_loading_info=True, **load_kwargs
    )
    if info.get("missing_keys"):
        raise ValueError(
            f"{name_or_path!r} is not a sequence-classification reward model: its weights lack "
            f"{sorted(info['missing_keys'])} (architectures: {config.architectures}); to train a reward model "
            "from this backbone use build_reward_model"
        )
    return SequenceClassifierReward(model)
