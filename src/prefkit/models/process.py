"""Process reward models (PRMs): a score for every step of a solution.

A PRM here is a Hugging Face ``...ForTokenClassification`` with one label: the backbone runs over
``prompt + step_1 + ... + step_n`` (each step tokenized as ``step + separator``, see
`prefkit.data.tokenize.tokenize_stepwise`) and a linear head reads one logit at every token; the logit
at a step's last token (its separator) is the log-odds that the step is correct. The separator is part
of the model: it is saved in the config (``prefkit_step_separator``) and scoring reads it back, so a PRM
is always scored the way it was trained.

- :func:`build_process_reward_model` puts a new head on any backbone that has a
  ``...ForTokenClassification`` class (``"tiny"`` and llama2.c files: the built-in Llama).
- :func:`load_process_reward_model` loads a saved one (``AutoModelForTokenClassification`` works too).
- :func:`step_logits` reads the step logits of a collated batch (`prefkit.data.collators.StepCollator`);
  :func:`score_steps` scores stepwise records, batched, and is what evaluation and search call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from prefkit.models.loading import TINY, TinySpec, is_llama2c_file, load_policy, resolve_dtype
from prefkit.models.reward import _config

SEPARATOR_KEY = "prefkit_step_separator"

__all__ = [
    "SEPARATOR_KEY",
    "PRMScorer",
    "StepScorer",
    "build_process_reward_model",
    "load_process_reward_model",
    "score_steps",
    "step_logits",
    "step_separator",
]


def build_process_reward_model(
    backbone_name_or_path: str,
    *,
    step_separator: str = "\n",
    pad_token_id: int | None = None,
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    tiny: TinySpec | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """A one-label ``...ForTokenClassification`` to train as a PRM, with ``step_separator`` in its config
    and no dropout on the head. ``"tiny"`` / llama2.c files: the tiny Llama of
    `prefkit.models.loading.load_policy` with a seeded head; anything else goes to
    ``AutoModelForTokenClassification.from_pretrained(..., num_labels=1)``."""
    if not isinstance(step_separator, str) or not step_separator:
        raise ValueError(f"step_separator must be a non-empty string, got {step_separator!r}")
    if backbone_name_or_path == TINY or is_llama2c_file(backbone_name_or_path):
        spec = tiny or TinySpec()
        backbone = load_policy(backbone_name_or_path, tiny=spec, vocab_size=vocab_size, dtype=dtype)
        model = _llama_token_classifier(backbone, spec.seed if backbone_name_or_path == TINY else seed)
    else:
        from transformers import AutoConfig, AutoModelForTokenClassification

        config = AutoConfig.from_pretrained(backbone_name_or_path, num_labels=1, trust_remote_code=trust_remote_code)
        config.classifier_dropout = 0.0
        load_kwargs = dict(kwargs, config=config, trust_remote_code=trust_remote_code)
        torch_dtype = resolve_dtype(dtype)
        if torch_dtype is not None:
            load_kwargs["dtype"] = torch_dtype
        try:
            with torch.random.fork_rng(devices=[]):  # the new head is seeded
                torch.manual_seed(seed)
                model = AutoModelForTokenClassification.from_pretrained(backbone_name_or_path, **load_kwargs)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err):
                raise
            raise ValueError(
                f"{backbone_name_or_path!r}: this architecture has no ...ForTokenClassification class in "
                "transformers, so prefkit cannot put a per-step head on it"
            ) from err
    setattr(model.config, SEPARATOR_KEY, step_separator)
    if model.config.get_text_config().pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def _llama_token_classifier(backbone: nn.Module, seed: int) -> nn.Module:
    from transformers import LlamaForTokenClassification

    config = backbone.config
    config.num_labels = 1
    config.architectures = None
    config.classifier_dropout = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForTokenClassification(config)
    model.model.load_state_dict(backbone.model.state_dict())
    return model.to(backbone.dtype)


def step_separator(model: nn.Module) -> str | None:
    """The separator a PRM was trained with (None when its config does not say); through a DDP / FSDP wrapper."""
    return getattr(_config(model), SEPARATOR_KEY, None)


def load_process_reward_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a PRM saved by prefkit (or any one-label token classifier with ``prefkit_step_separator`` in its
    config) in eval mode. A folder that is not one is an error, not a model with a random head."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    if os.path.isfile(os.path.join(name_or_path, "adapter_config.json")):
        raise ValueError(
            f"{name_or_path!r} holds a PEFT (LoRA) adapter: merge it into its base (merge_and_unload) and save "
            "the result, then load that folder"
        )
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if getattr(config, "num_labels", None) != 1 or getattr(config, SEPARATOR_KEY, None) is None:
        raise ValueError(
            f"{name_or_path!r} is not a prefkit process reward model (one-label token classifier with "
            f"{SEPARATOR_KEY} in its config; architectures: {getattr(config, 'architectures', None)}); train one "
            "with a process loss (`prefkit losses --kind process`)"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model, info = AutoModelForTokenClassification.from_pretrained(
        name_or_path, config=config, output_loading_info=True, **kwargs
    )
    if info.get("missing_keys"):
        raise ValueError(f"{name_or_path!r}: the weights lack {sorted(info['missing_keys'])}")
    if device is not None:
        model = model.to(device)
    return model.eval()


def step_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``[S]`` step logits of a `StepCollator` batch: the token classifier's logit at each step's last token.
    Runs through ``model``'s own forward (so a DDP / FSDP wrapper synchronises gradients)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits
    if logits.dim() != 3 or logits.shape[-1] != 1:
        raise ValueError(f"a process reward model must return logits [B, T, 1], got {tuple(logits.shape)}")
    return logits[batch["step_rows"], batch["step_positions"], 0].float()


class StepScorer(Protocol):
    """Anything that gives per-step log-odds for stepwise records: ``score(records) -> list[list[float]]``
    (one list per record, one logit per step; a step cut by ``max_length`` gets none). `PRMScorer` is the
    explicit PRM; an implicit PRM scores through the same interface."""

    def score(self, records: Sequence[Any], progress: bool = False) -> list[list[float]]: ...


class PRMScorer:
    """A trained PRM as a `StepScorer`: records are tokenized with the model's own separator, collated and
    scored ``batch_size`` at a time, in eval mode, without gradients."""

    def __init__(self, model: nn.Module, tokenizer, *, batch_size: int = 16, max_length: int | None = None):
        separator = step_separator(model)
        if separator is None:
            raise ValueError(
                f"the model has no {SEPARATOR_KEY} in its config: it is not a prefkit process reward model"
            )
        self.model, self.tokenizer, self.separator = model, tokenizer, separator
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, records: Sequence[Any], progress: bool = False) -> list[list[float]]:
        return score_steps(
            self.model,
            self.tokenizer,
            records,
            batch_size=self.batch_size,
            max_length=self.max_length,
            progress=progress,
        )


@torch.no_grad()
def score_steps(
    model: nn.Module,
    tokenizer,
    records: Sequence[Any],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> list[list[float]]:
    """Per-step logits of each stepwise record under a PRM (see `StepScorer`)."""
    from prefkit.data.batching import module_device, steps_by_row, stepwise_batches

    separator = step_separator(model)
    if separator is None:
        raise ValueError(f"the model has no {SEPARATOR_KEY} in its config: it is not a prefkit process reward model")
    device = module_device(model)
    was_training = model.training
    model.eval()
    out: list[list[float]] = [[] for _ in records]
    batches = stepwise_batches(
        records, tokenizer, step_separator=separator, batch_size=batch_size, max_length=max_length, progress=progress
    )
    try:
        for owners, batch in batches:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            logits = step_logits(model, batch).cpu().tolist()
            for i, row in zip(owners, steps_by_row(logits, batch["step_example"].tolist(), len(owners))):
                out[i] = row
    finally:
        model.train(was_training)
    return out
