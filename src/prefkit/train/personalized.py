"""`prefkit train CONFIG.yaml` for the personalized reward heads (docs/personalized.md, "Command line").

A config with a ``personalized:`` section trains one of the heads of `prefkit.models` that know whose
preference a pair is (mixture of Bradley-Terry by EM, PAL, VPL, MiCRo) on frozen response embeddings:

1. read ``train_file`` (pairwise records, every one with a ``user_id``);
2. hold out every pair of the ``unseen_users`` and ``eval_fraction`` of each other user's pairs;
3. embed all pairs once with the backbone ``model`` (`prefkit.models.embeddings.embed_pairs`, cached on
   disk in ``embedding_cache_dir``);
4. fit the head with its own ``fit`` methods, printing the fit's history;
5. write ``output_dir/``: the head (``config.json`` + ``model.safetensors``), ``users.json`` (the seen
   users, and VPL's latent per user), ``personalized.yaml`` (the resolved config; ``prefkit train`` it to
   re-run), ``metrics.jsonl`` (the fit's history), ``heldout.jsonl`` (the held-out pairs), ``README.md``
   (the model card) and ``eval/`` (`prefkit.eval.personalized` on the held-out pairs).

With ``end_to_end: true`` in the ``personalized:`` section (any method; `EndToEndParams`), steps 3-4
become one: the backbone is trained together with the head by `prefkit.train.end_to_end.EndToEndTrainer`
(a ``transformers.Trainer``: schedules, accumulation, mixed precision, checkpoints in
``output_dir/checkpoints`` and ``--resume``, several processes), then MiCRo's router is fit on the
trained backbone's embeddings. The backbone is saved to ``output_dir/backbone/``, and the written
``personalized.yaml`` points ``model`` at it, so that ``prefkit eval rm`` embeds with the trained backbone.

The config is one YAML mapping: the keys of `PersonalizedConfig` at the top, and the ``personalized:``
mapping holding ``method`` and that method's hyper-parameters (`METHODS`). Overrides are ``key=value``
and ``personalized.key=value``. Unknown keys are errors that name the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import shutil
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from prefkit.data.records import DataError
from prefkit.models.embeddings import POOLINGS, EmbeddedPairs
from prefkit.train.config import ConfigError, parse_overrides, read_config_file
from prefkit.train.settings import is_personalized_config  # noqa: F401 - re-exported

__all__ = [
    "METHODS",
    "EndToEndParams",
    "MiCRoParams",
    "MixtureBTParams",
    "PALParams",
    "PersonalizedConfig",
    "VPLParams",
    "embed_records",
    "fit_end_to_end",
    "is_personalized_config",
    "load_backbone",
    "load_personalized_config",
    "parse_personalized_config",
    "train_personalized",
]

CONFIG_FILE = "personalized.yaml"
USERS_FILE = "users.json"
HELDOUT_FILE = "heldout.jsonl"
DOCS = "docs/personalized.md"


# ------------------------------------------------------------------------------------------
# Method hyper-parameters
# ------------------------------------------------------------------------------------------


@dataclass
class MixtureBTParams:
    """Mixture of Bradley-Terry heads fit by EM (`prefkit.models.mixture.MixtureBT`)."""

    k: int = field(default=2, metadata={"help": "Number of latent user groups (one reward head each)."})
    hidden_size: int | None = field(default=None, metadata={"help": "None: linear heads; else each head's MLP width."})
    iters: int = field(default=50, metadata={"help": "At most this many EM iterations."})
    m_steps: int = field(default=20, metadata={"help": "L-BFGS iterations per M-step."})
    l2: float = field(default=1e-3, metadata={"help": "Weight penalty (l2 / 2) sum_k ||w_k||^2."})
    tol: float = field(default=1e-6, metadata={"help": "Stop when the objective improves by less than this."})
    n_init: int = field(default=4, metadata={"help": "k-means restarts of the initial grouping."})


@dataclass
class PALParams:
    """PAL: K prototypes, each user a point on the simplex (`prefkit.models.pal.PAL`)."""

    k: int = field(default=2, metadata={"help": "Number of prototypes."})
    variant: str = field(default="ideal_point", metadata={"help": "ideal_point (model A) or mixture (model B)."})
    pref_dim: int | None = field(default=None, metadata={"help": "Preference-space size; None: identity map."})
    hidden_size: int | None = field(default=None, metadata={"help": "With pref_dim: the map's MLP hidden width."})
    epochs: int = field(default=200, metadata={"help": "Training epochs (Adam, Bradley-Terry loss)."})
    lr: float = field(default=0.03, metadata={"help": "Adam learning rate."})
    batch_size: int = field(default=256, metadata={"help": "Pairs per step."})
    new_user_steps: int = field(default=100, metadata={"help": "Eval: Adam steps fitting an unseen user's weights."})
    new_user_lr: float = field(default=0.1, metadata={"help": "Eval: learning rate of those steps."})


@dataclass
class VPLParams:
    """VPL: a user latent inferred from a few labelled pairs (`prefkit.models.vpl.VPL`)."""

    latent_dim: int = field(default=8, metadata={"help": "Size of the user latent z."})
    hidden: int = field(default=64, metadata={"help": "Width of the encoder and reward MLPs."})
    context_size: int = field(default=4, metadata={"help": "Context pairs per user and step."})
    target_size: int | None = field(default=None, metadata={"help": "Target pairs per user and step (None: same)."})
    steps: int = field(default=500, metadata={"help": "Training steps (Adam, negative ELBO)."})
    beta_kl: float = field(default=1.0, metadata={"help": "KL weight; 1 is the true ELBO, large values collapse."})
    users_per_step: int = field(default=32, metadata={"help": "Users (episodes) per step."})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    log_every: int = field(default=50, metadata={"help": "Log the loss, KL and active units every this many steps."})
    standardize: bool = field(
        default=False,
        metadata={
            "help": "Standardise each embedding dimension by the training pairs' mean and std (saved with the "
            "model), for unnormalised features such as sum pooling. Not with end_to_end (the backbone moves)."
        },
    )


@dataclass
class MiCRoParams:
    """MiCRo: K reward heads, then a context-aware router (`prefkit.models.micro.MiCRo`)."""

    k: int = field(default=2, metadata={"help": "Number of reward heads."})
    hidden: int = field(default=0, metadata={"help": "0: linear heads; else one shared ReLU layer of this width."})
    router_hidden: int = field(default=0, metadata={"help": "0: linear router; else one ReLU layer of this width."})
    mixture: str = field(default="uniform", metadata={"help": "Stage-1 mixture weights: uniform or learned."})
    steps: int = field(default=300, metadata={"help": "Stage-1 steps (heads)."})
    lr: float = field(default=1e-2, metadata={"help": "Stage-1 Adam learning rate."})
    batch_size: int = field(default=256, metadata={"help": "Stage-1 pairs per step."})
    balance: float = field(default=0.0, metadata={"help": "Stage-1 load balancing KL(uniform || pi) (learned)."})
    router_steps: int = field(default=200, metadata={"help": "Stage-2 steps (router, full batch)."})
    router_lr: float = field(default=1e-2, metadata={"help": "Stage-2 Adam learning rate."})
    user_context: bool = field(
        default=True,
        metadata={
            "help": "Router context = prompt embedding + one-hot seen-user id (zeros for an unseen user); "
            "false: the prompt embedding alone."
        },
    )
    adapt_steps: int = field(default=20, metadata={"help": "Eval: router steps adapting to an unseen user."})
    adapt_lr: float = field(default=5e-2, metadata={"help": "Eval: learning rate of those steps."})
    log_every: int = field(default=50, metadata={"help": "Log every this many steps."})


@dataclass
class EndToEndParams:
    """``end_to_end: true`` in the ``personalized:`` section: train the backbone together with the head
    (`prefkit.train.end_to_end.EndToEndTrainer`, a ``transformers.Trainer``) instead of fitting the head
    on frozen embeddings. Where the method has a key of its own for a setting (`END_TO_END_ALIASES`:
    PAL's ``lr`` / ``batch_size`` / ``epochs``; VPL's ``lr``, ``users_per_step``, ``steps``,
    ``log_every``; MiCRo's ``lr``, ``batch_size``, ``steps``, ``log_every``), that key sets it."""

    end_to_end: bool = field(default=False, metadata={"help": "Train backbone and head together."})
    backbone_lr: float | None = field(default=None, metadata={"help": "End to end: backbone learning rate (None: lr)."})
    lr: float = field(default=1e-3, metadata={"help": "End to end: learning rate of the head."})
    batch_size: int = field(default=8, metadata={"help": "End to end: pairs (VPL: episodes) per device and step."})
    epochs: float = field(default=1.0, metadata={"help": "End to end: passes over the training pairs."})
    max_steps: int = field(default=-1, metadata={"help": "End to end: optimizer steps; -1: epochs decide."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "End to end: batches per optimizer step."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "End to end: transformers LR schedule."})
    warmup_steps: float = field(
        default=0, metadata={"help": "End to end: LR warmup steps (a float in (0, 1): a share of all steps)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "End to end: AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "End to end: gradient clipping norm (0: none)."})
    bf16: bool = field(default=False, metadata={"help": "End to end: bfloat16 mixed precision."})
    save_steps: int = field(
        default=0,
        metadata={"help": "End to end: a checkpoint in output_dir/checkpoints every N steps (0: none); --resume."},
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "End to end: checkpoints kept."})
    logging_steps: int = field(default=10, metadata={"help": "End to end: log the objective every N steps."})
    warm_start: bool = field(
        default=False,
        metadata={
            "help": "End to end: first fit the head on the frozen backbone's embeddings with the method's own fit "
            "(EM for mixture_bt; keys shared with end-to-end training at the method's defaults), then train it "
            "with the backbone."
        },
    )
    pairs_per_user: int = field(
        default=0,
        metadata={
            "help": "End to end: 0: batches of independent pairs; N: of chunks of N pairs of one user (batch_size "
            "then counts chunks), so mixture_bt's objective sees each user's pairs together."
        },
    )
    lora_r: int = field(
        default=0, metadata={"help": "End to end: LoRA rank on the backbone (0: train all its weights)."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "End to end: LoRA scale numerator (alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "End to end: dropout on the LoRA branch."})
    lora_target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "End to end: modules given adapters (None: peft's default for the model)."}
    )

    def __post_init__(self):
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0: no LoRA), got {self.lora_r}")
        if self.pairs_per_user < 0:
            raise ConfigError(f"pairs_per_user must be >= 0 (0: independent pairs), got {self.pairs_per_user}")


# Settings of EndToEndParams that a method's own key sets (EndToEndParams field -> method field).
END_TO_END_ALIASES: dict[str, dict[str, str]] = {
    "pal": {"lr": "lr", "batch_size": "batch_size", "epochs": "epochs"},
    "mixture_bt": {},
    "vpl": {"lr": "lr", "batch_size": "users_per_step", "max_steps": "steps", "logging_steps": "log_every"},
    "micro": {"lr": "lr", "batch_size": "batch_size", "max_steps": "steps", "logging_steps": "log_every"},
}
_E2E_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EndToEndParams)}
# Settings that do not apply to a method end to end, and why.
_STEPS = "its own steps count the optimizer steps"
END_TO_END_NOT_APPLICABLE: dict[str, dict[str, str]] = {
    "vpl": {"epochs": _STEPS, "pairs_per_user": "its batches are episodes of one user's pairs already"},
    "micro": {"epochs": _STEPS},
}

METHODS: dict[str, type] = {"mixture_bt": MixtureBTParams, "pal": PALParams, "vpl": VPLParams, "micro": MiCRoParams}
PAPERS = {
    "mixture_bt": 'Chakraborty et al. (2024), "MaxMin-RLHF: Alignment with Diverse Human Preferences", '
    "arXiv:2402.08925",
    "pal": 'Chen, Chen, Rege, Vinayak (2024), "PAL: Pluralistic Alignment Framework for Learning from '
    'Heterogeneous Preferences", arXiv:2406.08469',
    "vpl": 'Poddar, Wan, Ivison, Gupta, Jaques (2024), "Personalizing Reinforcement Learning from Human Feedback '
    'with Variational Preference Learning", arXiv:2408.10075',
    "micro": 'Shen et al. (2025), "MiCRo: Mixture Modeling and Context-aware Routing for Personalized Preference '
    'Learning", arXiv:2505.24846',
}


# ------------------------------------------------------------------------------------------
# The run config
# ------------------------------------------------------------------------------------------


@dataclass
class PersonalizedConfig:
    """One personalized run: backbone and embeddings, data and split, output, and the method."""

    personalized: Any = field(
        default=None,
        metadata={"help": "The method: {method: mixture_bt | pal | vpl | micro, <its hyper-parameters>}."},
    )
    model: str = field(
        default="tiny",
        metadata={
            "help": "Backbone that embeds each (prompt, response): a local folder, a Hub id, 'tiny' (random tiny "
            "Llama, byte tokenizer) or 'lab:WORLD[:SEED]' (the lab world's cached reference policy)."
        },
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer; None: the backbone's own."})
    dtype: str = field(default="float32", metadata={"help": "Backbone weight dtype."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow backbone code from the Hub."})
    tiny_hidden_size: int = field(default=64, metadata={"help": "model: tiny - hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "model: tiny - decoder layers."})
    tiny_seed: int = field(default=0, metadata={"help": "model: tiny - seed of the random weights."})
    pooling: str = field(
        default="last",
        metadata={"help": "last (EOS token's state), mean or sum (over the response's tokens)."},
    )
    backbone_layers: int | None = field(
        default=None,
        metadata={
            "help": "Embed with the backbone's first N decoder layers only (0: token embeddings + final norm); "
            "None: all of them."
        },
    )
    max_length: int | None = field(default=None, metadata={"help": "Cut prompt + response to this many tokens."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Cut prompts to this many tokens."})
    embed_batch_size: int = field(default=16, metadata={"help": "Sequences per backbone forward pass."})
    embedding_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Root of the embedding caches (one per data file and backbone); None: output_dir/embeddings"},
    )
    train_file: str | None = field(default=None, metadata={"help": "Pairwise feedback with a user_id on every row."})
    train_split: str | None = field(default=None, metadata={"help": "Split of train_file to read."})
    column_map: dict[str, str] | None = field(default=None, metadata={"help": "prefkit field -> file column."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out pairs to evaluate on (not eval_fraction)."})
    eval_fraction: float = field(
        default=0.2, metadata={"help": "Hold out this fraction of each training user's pairs (seen-user accuracy)."}
    )
    unseen_users: int | list[str] = field(
        default=0,
        metadata={"help": "Users held out of training entirely (few-shot accuracy): a count drawn with seed, or ids."},
    )
    groups: str | None = field(
        default=None,
        metadata={"help": "Groups for the eval tables: 'lab' (user ids group:NAME/K) or a user_id -> group file."},
    )
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={"help": "Eval: k pairs per unseen user."})
    shot_draws: int = field(default=3, metadata={"help": "Eval: random draws of each unseen user's k pairs."})
    output_dir: str = field(default="runs/personalized", metadata={"help": "Where the run is written."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a head already in output_dir."})
    seed: int = field(default=0, metadata={"help": "Seed of the split, the initialisation and the fit."})
    progress: bool = field(default=True, metadata={"help": "Show the embedding progress bar."})

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "last" and self.backbone_layers == 0:
            raise ConfigError(
                "pooling: last with backbone_layers: 0 gives every response the same vector (the last token's "
                "embedding, with no layer to mix in the rest); use pooling: mean or sum, or backbone_layers >= 1"
            )
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_file is not None and self.eval_fraction:
            raise ConfigError("give eval_file or eval_fraction, not both (set eval_fraction: 0 with an eval_file)")
        if isinstance(self.unseen_users, int) and self.unseen_users < 0:
            raise ConfigError(f"unseen_users must be a count >= 0 or a list of user ids, got {self.unseen_users}")
        if not self.shots or any(not isinstance(k, int) or k < 1 for k in self.shots):
            raise ConfigError(f"shots must be a list of ints >= 1, got {self.shots!r}")
        if self.shot_draws < 1:
            raise ConfigError(f"shot_draws must be >= 1, got {self.shot_draws}")

    @property
    def method(self) -> str:
        return self.personalized["method"]

    @property
    def end_to_end(self) -> EndToEndParams:
        """The end-to-end switch and its hyper-parameters (`EndToEndParams`)."""
        return self.personalized.get("end_to_end") or EndToEndParams()

    @property
    def params(self):
        """The method's hyper-parameters (a `METHODS` dataclass)."""
        return self.personalized["params"]

    @property
    def cache_root(self) -> Path:
        return Path(self.embedding_cache_dir or Path(self.output_dir) / "embeddings")


def _unknown(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}.{hint} Valid keys: {', '.join(valid)} (see {DOCS}).")


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Strings to the field's number type (YAML reads ``1e-3`` as text); ints to floats for float fields."""
    members = _members(tp)
    if isinstance(value, str) and str not in members:
        for target in (int, float):
            if target in members:
                try:
                    return target(value)
                except ValueError:
                    continue
        wanted = " or ".join(m.__name__ for m in members if isinstance(m, type) and m is not type(None))
        raise ConfigError(f"config key {key!r}: expected {wanted}, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and float in members and int not in members:
        return float(value)
    return value


def _build(cls: type, values: Mapping[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            raise _unknown(str(key), valid, where)
        kwargs[key] = _coerce(key, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid config{where}: {err}") from err


def _method_section(section: Any, source: str) -> dict[str, Any]:
    """``{"method": name, "params": <METHODS[name] dataclass>}`` from the ``personalized:`` mapping."""
    if not isinstance(section, Mapping) or "method" not in section:
        raise ConfigError(
            f"{source}: 'personalized' must be a mapping with a 'method' ({' | '.join(METHODS)}) and that "
            f"method's hyper-parameters, got {section!r}"
        )
    method = section["method"]
    if method not in METHODS:
        raise ConfigError(f"{source}: personalized.method must be one of {', '.join(METHODS)}, got {method!r}")
    params = {k: v for k, v in section.items() if k != "method"}
    where = f" personalized ({method}) in {source}"
    end_to_end = params.pop("end_to_end", False)
    if not isinstance(end_to_end, bool):
        raise ConfigError(f"{source}: personalized.end_to_end must be true or false, got {end_to_end!r}")
    own = {f.name for f in dataclasses.fields(METHODS[method])}
    settings = [f.name for f in dataclasses.fields(EndToEndParams) if f.name != "end_to_end"]
    given = {k: params.pop(k) for k in list(params) if k in settings and k not in own}
    if not end_to_end:
        if given:
            raise ConfigError(f"{source}: {', '.join(given)} set(s) end-to-end training; add end_to_end: true")
        return {"method": method, "params": _build(METHODS[method], params, where)}
    aliases = END_TO_END_ALIASES[method]
    for key in given:
        if key in aliases:
            raise ConfigError(f"{source}: for {method}, {method}'s own key {aliases[key]!r} sets {key}; use it")
        why = END_TO_END_NOT_APPLICABLE.get(method, {}).get(key)
        if why and given[key] != _E2E_DEFAULTS[key]:  # the default value is harmless (e.g. switching method)
            raise ConfigError(f"{source}: {key} does not apply to {method} end to end ({why})")
    method_params = _build(METHODS[method], params, where)
    given.update({key: getattr(method_params, alias) for key, alias in aliases.items()})
    return {
        "method": method,
        "params": method_params,
        "end_to_end": _build(EndToEndParams, {"end_to_end": True, **given}, where),
    }


def parse_personalized_config(
    mapping: Mapping[str, Any], overrides: Sequence[str] = (), *, source: str = "config"
) -> PersonalizedConfig:
    """A `PersonalizedConfig` from a YAML mapping plus ``key=value`` / ``personalized.key=value`` overrides."""
    values = {str(k): v for k, v in dict(mapping).items()}
    section = dict(values.get("personalized") or {})
    for key, value in parse_overrides(overrides):
        head, _, rest = key.partition(".")
        if head == "personalized" and rest:
            section[rest] = value
        elif rest:
            raise ConfigError(f"override {key!r}: only personalized.KEY overrides are dotted")
        else:
            values[key] = value
    values["personalized"] = _method_section(section, source)
    return _build(PersonalizedConfig, values, f" in {source}")


def load_personalized_config(path: str | Path, overrides: Sequence[str] = ()) -> PersonalizedConfig:
    mapping = read_config_file(path)
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: a config is one YAML mapping (key: value), got {type(mapping).__name__}")
    return parse_personalized_config(mapping, overrides, source=str(path))


def config_to_dict(config: PersonalizedConfig) -> dict[str, Any]:
    """The resolved config as a mapping `parse_personalized_config` reads back."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "personalized"}
    section = {"method": config.method, **dataclasses.asdict(config.params)}
    if config.end_to_end.end_to_end:
        skip = set(END_TO_END_ALIASES[config.method]) | set(END_TO_END_NOT_APPLICABLE.get(config.method, ()))
        section.update({k: v for k, v in dataclasses.asdict(config.end_to_end).items() if k not in skip})
    return {"personalized": section, **out}


# ------------------------------------------------------------------------------------------
# Backbone and embeddings
# ------------------------------------------------------------------------------------------


def load_backbone(config: PersonalizedConfig):
    """``(model, tokenizer)`` of ``config.model``: 'lab:WORLD[:SEED]' (or another registered
    `prefkit.models.loading.model_source`), 'tiny', a folder or a Hub id."""
    from prefkit.models.embeddings import truncated_backbone
    from prefkit.models.loading import TinySpec, ensure_pad_token, load_policy, load_tokenizer, model_source

    source = model_source(config.model)
    if source is not None:  # e.g. lab:WORLD[:SEED], registered by prefkit.lab (an entry point)
        try:
            model, tokenizer = source(config.model, progress=config.progress)
        except ValueError as err:
            raise ConfigError(f"model {config.model!r}: {err}") from err
        return truncated_backbone(model, config.backbone_layers), ensure_pad_token(tokenizer, config.model)
    tokenizer = load_tokenizer(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code)
    spec = TinySpec(hidden_size=config.tiny_hidden_size, num_layers=config.tiny_num_layers, seed=config.tiny_seed)
    model = load_policy(
        config.model,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        tiny=spec,
        vocab_size=len(tokenizer) if config.model == "tiny" else None,
    )
    return truncated_backbone(model, config.backbone_layers).eval(), tokenizer


def embed_records(records, backbone, config: PersonalizedConfig, data_name: str, cache_root: Path | None = None):
    """`embed_pairs` of ``records``, cached under ``cache_root`` (default: ``config.cache_root``) in a folder
    named by the data, backbone, pooling and lengths (so each data file and backbone gets its own cache)."""
    import hashlib

    from prefkit.models.embeddings import embed_pairs

    model, tokenizer = backbone
    key = json.dumps(
        [str(Path(data_name).resolve()) if Path(data_name).exists() else data_name]
        + [config.model, config.tokenizer, config.pooling, config.max_length, config.max_prompt_length]
        + ([] if config.backbone_layers is None else [f"layers={config.backbone_layers}"])
        + ([config.tiny_hidden_size, config.tiny_num_layers, config.tiny_seed] if config.model == "tiny" else [])
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = Path(cache_root or config.cache_root) / f"{Path(data_name).name}-{digest}"
    return embed_pairs(
        records,
        model,
        tokenizer,
        pooling=config.pooling,
        batch_size=config.embed_batch_size,
        cache_dir=str(folder),
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        progress=config.progress,
    )


def reindex_users(pairs: EmbeddedPairs) -> EmbeddedPairs:
    """The same rows with ``users`` cut to the users that have rows (so a model fit on them knows only those)."""
    present = sorted(set(pairs.user_index.tolist()) - {-1})
    mapping = torch.full((len(pairs.users),), -1, dtype=torch.long)
    mapping[present] = torch.arange(len(present))
    index = torch.where(pairs.user_index >= 0, mapping[pairs.user_index.clamp_min(0)], -1)
    return dataclasses.replace(pairs, user_index=index, users=[pairs.users[i] for i in present])


# ------------------------------------------------------------------------------------------
# Split and fit
# ------------------------------------------------------------------------------------------


def split_users(records, config: PersonalizedConfig) -> tuple[list[int], list[int], list[str]]:
    """``(train_rows, heldout_rows, unseen_users)``: every row of the unseen users and ``eval_fraction``
    of each other user's rows (at least one row of each is kept for training) are held out."""
    users = sorted({r.user_id for r in records})
    rng = random.Random(config.seed)
    if isinstance(config.unseen_users, list):
        unknown = sorted(set(config.unseen_users) - set(users))
        if unknown:
            raise ConfigError(f"unseen_users {unknown[:5]} are not users of {config.train_file}")
        unseen = sorted(config.unseen_users)
    else:
        if config.unseen_users >= len(users):
            raise ConfigError(f"unseen_users={config.unseen_users} leaves none of the {len(users)} users to train on")
        unseen = sorted(rng.sample(users, config.unseen_users))
    rows_of: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        rows_of.setdefault(r.user_id, []).append(i)
    held = [i for u in unseen for i in rows_of[u]]
    for user in users:
        if user in unseen or not config.eval_fraction:
            continue
        rows = rows_of[user][:]
        rng.shuffle(rows)
        held += rows[: min(len(rows) - 1, round(config.eval_fraction * len(rows)))]
    held_set = set(held)
    return [i for i in range(len(records)) if i not in held_set], sorted(held_set), unseen


def fit_head(pairs: EmbeddedPairs, config: PersonalizedConfig):
    """``(head, history, extra)``: the method's head fit on ``pairs`` (every row of a seen user), the fit's
    history (dicts with a ``stage``) and what `users.json` holds besides the users (VPL's latents)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _FITTERS[config.method](pairs, config.params, config.seed)


def _fit_mixture_bt(pairs, p: MixtureBTParams, seed):
    from prefkit.models.mixture import MixtureBT

    head = MixtureBT(pairs.dim, p.k, hidden_size=p.hidden_size)
    objective = head.fit(pairs, p.iters, m_steps=p.m_steps, l2=p.l2, tol=p.tol, n_init=p.n_init, seed=seed)
    return head, [{"stage": "em", "iter": i, "objective": j} for i, j in enumerate(objective)], {}


def _fit_pal(pairs, p: PALParams, seed):
    from prefkit.models.pal import PAL

    head = PAL(pairs.dim, p.k, variant=p.variant, pref_dim=p.pref_dim, hidden_size=p.hidden_size)
    losses = head.fit(pairs, p.epochs, lr=p.lr, batch_size=p.batch_size, seed=seed)
    return head, [{"stage": "bt", "epoch": i + 1, "loss": v} for i, v in enumerate(losses)], {}


def _fit_vpl(pairs, p: VPLParams, seed):
    from prefkit.models.vpl import VPL

    head = VPL(pairs.dim, p.latent_dim, p.hidden, standardize=p.standardize)
    logged = head.fit(
        pairs,
        context_size=p.context_size,
        target_size=p.target_size,
        steps=p.steps,
        beta_kl=p.beta_kl,
        users_per_step=p.users_per_step,
        lr=p.lr,
        log_every=p.log_every,
        seed=seed,
    )
    return head, [{"stage": "elbo", **row} for row in logged], {"user_latents": _vpl_latents(head, pairs)}


def _vpl_latents(head, pairs: EmbeddedPairs) -> dict[str, list[float]]:
    """Each user's posterior mean given all their pairs (what `users.json` stores for VPL)."""
    latents = {}
    with torch.no_grad():
        for u, user in enumerate(pairs.users):
            mine = pairs.subset(pairs.user_index == u)
            latents[user] = head.encode(mine.chosen.float(), mine.rejected.float())[0].tolist()
    return latents


def _fit_micro(pairs, p: MiCRoParams, seed):
    head = _new_micro(pairs.dim, len(pairs.users), p)
    stage1 = head.fit_mixture(
        pairs, steps=p.steps, lr=p.lr, batch_size=p.batch_size, balance=p.balance, log_every=p.log_every, seed=seed
    )
    return head, [{"stage": "mixture", **row} for row in stage1] + _fit_micro_router(head, pairs, p), {}


def _new_micro(dim: int, n_users: int, p: MiCRoParams):
    from prefkit.models.micro import MiCRo

    context_dim = dim + (n_users if p.user_context else 0)  # the router reads the prompt embedding (+ user)
    return MiCRo(dim, p.k, context_dim, hidden=p.hidden, router_hidden=p.router_hidden, mixture=p.mixture)


def _fit_micro_router(head, pairs: EmbeddedPairs, p: MiCRoParams) -> list[dict[str, Any]]:
    """Stage 2: the router on ``pairs`` (prompt embedding + one-hot user with ``user_context``)."""
    if pairs.prompt is None:
        raise ConfigError("MiCRo's router reads prompt embeddings; these pairs have none")
    features = torch.eye(len(pairs.users)) if p.user_context else None
    stage2 = head.fit_router(pairs, user_features=features, steps=p.router_steps, lr=p.router_lr, log_every=p.log_every)
    return [{"stage": "router", **row} for row in stage2]


_FITTERS = {"mixture_bt": _fit_mixture_bt, "pal": _fit_pal, "vpl": _fit_vpl, "micro": _fit_micro}


def fit_end_to_end(
    train_records, backbone, config: PersonalizedConfig, say: Callable[[str], None] = print, resume=None
):
    """``(model, history)``: the method's head trained together with ``backbone`` (``(model, tokenizer)``,
    updated in place) on ``train_records`` by `prefkit.train.end_to_end.train_end_to_end`, checkpoints in
    ``output_dir/checkpoints`` (``resume``: a checkpoint folder, or True for the last one). ``model``
    is the `EndToEndRewardModel`; MiCRo's router is trained afterwards, by `finish_end_to_end`."""
    from prefkit.models.end_to_end import EndToEndRewardModel, tokenize_pairs
    from prefkit.train.end_to_end import train_end_to_end

    lm, tokenizer = backbone
    users = sorted({r.user_id for r in train_records})
    p, e = config.params, config.end_to_end
    dim = getattr(lm, "base_model", lm).config.hidden_size
    history: list[dict[str, Any]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = _new_head(config.method, p, dim, users)
        if e.warm_start:
            say(f"warm start: fitting {config.method} on the frozen backbone's embeddings first")
            pairs = reindex_users(_embed_uncached(train_records, backbone, config))
            head, history, _ = fit_head(pairs, _warm_start_config(config))
            history = [{**row, "stage": f"warm_start/{row.get('stage')}"} for row in history]
        model = EndToEndRewardModel(_with_lora(lm, e), head, config.pooling, **_objective(config, users))
    data = tokenize_pairs(
        train_records, tokenizer, users, max_length=config.max_length, max_prompt_length=config.max_prompt_length
    )
    extra: dict[str, Any] = {}
    if config.method == "vpl":
        extra = {"context_size": p.context_size, "target_size": p.target_size}
    length = f"{e.max_steps} steps" if e.max_steps > 0 else f"{e.epochs:g} epochs"
    say(
        f"training {config.method} end to end with the backbone on {len(data)} pairs of {len(users)} users "
        f"({length}, batch {e.batch_size} x {e.gradient_accumulation_steps}, lr {e.lr}, backbone lr "
        f"{e.lr if e.backbone_lr is None else e.backbone_lr})"
    )
    logged = train_end_to_end(
        model,
        data,
        tokenizer,
        output_dir=str(Path(config.output_dir) / "checkpoints"),
        epochs=e.epochs,
        max_steps=e.max_steps,
        batch_size=e.batch_size,
        lr=e.lr,
        backbone_lr=e.backbone_lr,
        resume=resume,
        progress=config.progress,
        pairs_per_user=e.pairs_per_user,
        gradient_accumulation_steps=e.gradient_accumulation_steps,
        lr_scheduler_type=e.lr_scheduler_type,
        warmup_steps=e.warmup_steps,
        weight_decay=e.weight_decay,
        max_grad_norm=e.max_grad_norm,
        bf16=e.bf16,
        save_strategy="steps" if e.save_steps else "no",
        save_steps=e.save_steps or 500,
        save_total_limit=e.save_total_limit,
        logging_steps=e.logging_steps,
        seed=config.seed,
        **extra,
    )
    if e.lora_r:
        model.merge_lora()  # the adapters into the backbone's weights, which are saved and embed from now on
    keep = ("loss", "accuracy", "bt", "kl", "active_units", "log_likelihood", "learning_rate", "grad_norm")
    history += [{"stage": "end_to_end", "step": row["step"], **{k: row[k] for k in keep if k in row}} for row in logged]
    return model, history


def _warm_start_config(config: PersonalizedConfig) -> PersonalizedConfig:
    """``config`` for the warm-start fit: the method's keys that also set end-to-end training (PAL's
    ``lr`` / ``batch_size`` / ``epochs``, VPL's and MiCRo's ``steps``, ...) back at the method's defaults."""
    aliased = set(END_TO_END_ALIASES[config.method].values())
    defaults = {f.name: f.default for f in dataclasses.fields(config.params) if f.name in aliased}
    section = {**config.personalized, "params": dataclasses.replace(config.params, **defaults)}
    return dataclasses.replace(config, personalized=section)


def _with_lora(lm, e: EndToEndParams):
    """``lm``'s base model with LoRA adapters (``lora_r > 0``; its own weights frozen), or ``lm`` itself."""
    if not e.lora_r:
        return lm
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ConfigError(f"lora_r={e.lora_r} needs the `peft` package: pip install 'prefkit[peft]'") from err
    lora = LoraConfig(
        r=e.lora_r,
        lora_alpha=e.lora_alpha,
        lora_dropout=e.lora_dropout,
        target_modules=e.lora_target_modules,
        task_type="FEATURE_EXTRACTION",
    )
    return get_peft_model(getattr(lm, "base_model", lm), lora)


def _new_head(method: str, p, dim: int, users: list[str]):
    from prefkit.models.mixture import MixtureBT
    from prefkit.models.pal import PAL
    from prefkit.models.vpl import VPL

    if method == "pal":
        return PAL(dim, p.k, variant=p.variant, pref_dim=p.pref_dim, hidden_size=p.hidden_size, users=users)
    if method == "mixture_bt":
        return MixtureBT(dim, p.k, hidden_size=p.hidden_size, users=users)
    if method == "vpl":
        if p.standardize:
            raise ConfigError(
                "personalized.standardize (vpl) fixes feature statistics of the frozen backbone's embeddings; "
                "with end_to_end: true the backbone trains and they would go stale: drop one of the two"
            )
        return VPL(dim, p.latent_dim, p.hidden)
    return _new_micro(dim, len(users), p)


def _objective(config: PersonalizedConfig, users: list[str]) -> dict[str, Any]:
    """`EndToEndRewardModel` keyword arguments: the users (VPL and MiCRo heads do not hold them) and the
    objective's weight (VPL's beta_kl, MiCRo's balance)."""
    if config.method == "vpl":
        return {"users": users, "beta_kl": config.params.beta_kl}
    if config.method == "micro":
        return {"users": users, "balance": config.params.balance}
    return {}


def finish_end_to_end(model, train_pairs: EmbeddedPairs, config: PersonalizedConfig):
    """After end-to-end training, on ``train_pairs`` embedded by the trained backbone: MiCRo's router
    (stage 2) and VPL's per-user latents. Returns ``(history rows, users.json extras)``."""
    if config.method == "micro":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return _fit_micro_router(model.head, train_pairs, config.params), {}
    if config.method == "vpl":
        return [], {"user_latents": _vpl_latents(model.head, train_pairs)}
    return [], {}


def _final_metrics(head, pairs: EmbeddedPairs, config: PersonalizedConfig, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The trained head on its training pairs: ``train_accuracy`` (each user's own reward, or VPL under
    the user's latent given all their pairs, or MiCRo's routed mixture), VPL's ``active_units`` and
    MixtureBT's ``mixing_weights``."""
    from prefkit.models.micro import MiCRo
    from prefkit.models.vpl import VPL, active_units

    with torch.no_grad():
        if isinstance(head, VPL):
            latents = torch.tensor([extra["user_latents"][u] for u in pairs.users])  # users.json's
            z = latents[pairs.user_index]
            correct = head.reward(pairs.chosen, z) > head.reward(pairs.rejected, z)
            units = active_units(latents) if len(latents) >= 2 else 0
            return {"train_accuracy": float(correct.float().mean()), "active_units": units}
        if isinstance(head, MiCRo):
            features = torch.eye(len(pairs.users)) if config.params.user_context else None
            return {"train_accuracy": head.accuracy(pairs, features)}
        if hasattr(head, "pair_correct"):  # MixtureBT: each user's most likely group's head
            accuracy = float(head.pair_correct(pairs).float().mean())
            return {"train_accuracy": accuracy, "mixing_weights": head.mixing_weights.tolist()}
        correct = head.pair_logits(pairs) > 0
    return {"train_accuracy": float(correct.float().mean())}


def _embed_uncached(records, backbone, config: PersonalizedConfig) -> EmbeddedPairs:
    from prefkit.models.embeddings import embed_pairs

    model, tokenizer = backbone
    return embed_pairs(
        records,
        model,
        tokenizer,
        pooling=config.pooling,
        batch_size=config.embed_batch_size,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        progress=config.progress,
    )


def _history_line(row: Mapping[str, Any]) -> str:
    parts = []
    for key, value in row.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4f}")
        elif isinstance(value, list):
            parts.append(f"{key}=[{', '.join(f'{v:.3f}' for v in value)}]")
        else:
            parts.append(f"{key}={value}")
    return "  " + " ".join(parts)


def _print_history(history: Sequence[Mapping[str, Any]], say: Callable[[str], None], lines: int = 12) -> None:
    """About ``lines`` rows of the history, evenly spaced, always the first and the last of each stage."""
    stride = max(1, len(history) // lines)
    for i, row in enumerate(history):
        last_of_stage = i + 1 == len(history) or history[i + 1].get("stage") != row.get("stage")
        first_of_stage = i == 0 or history[i - 1].get("stage") != row.get("stage")
        if i % stride == 0 or first_of_stage or last_of_stage:
            say(_history_line(row))


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


@dataclass
class PersonalizedRun:
    """What `train_personalized` returns."""

    output_dir: Path
    head: Any
    history: list[dict[str, Any]]
    evaluation: dict[str, Any] | None


def _prepare_output_dir(config: PersonalizedConfig) -> Path:
    out = Path(config.output_dir)
    if (out / "config.json").exists():
        if not config.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {str(out)!r} already holds a model (config.json); choose another output_dir "
                "(output_dir=...) or set overwrite_output_dir=true"
            )
        shutil.rmtree(out / "eval", ignore_errors=True)
        (out / HELDOUT_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _load_train_records(config: PersonalizedConfig):
    from prefkit.data.loaders import load_records

    if not config.train_file:
        raise ConfigError(f"train_file is required: pairwise feedback with a user_id on every row (see {DOCS})")
    records = load_records(config.train_file, kind="pairwise", column_map=config.column_map, split=config.train_split)
    missing = [i + 1 for i, r in enumerate(records) if r.user_id is None]
    if missing:
        raise DataError(
            f"{config.train_file}: {len(missing)} of {len(records)} rows have no user_id (rows "
            f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}); personalized models need "
            "one on every row (map a column with column_map: {user_id: COLUMN})"
        )
    return records


def train_personalized(
    config: PersonalizedConfig,
    say: Callable[[str], None] = print,
    resume: str | bool | None = None,
    evaluate: Callable[..., dict[str, Any]] | None = None,
) -> PersonalizedRun:
    """Run the whole job (what ``prefkit train`` does with a ``personalized:`` config). ``resume``: continue
    end-to-end training from a checkpoint (a folder, or True: the last one in ``output_dir/checkpoints``).
    ``evaluate(config, head, users, extra, eval_pairs, out, say) -> results`` scores the held-out pairs
    (`prefkit.eval.personalized.evaluate_fitted_head`, which `train_and_evaluate` passes); None: no
    evaluation."""
    if not config.end_to_end.end_to_end and _num_processes() > 1:
        raise ConfigError(
            "heads on frozen embeddings fit in one process (in seconds to minutes on a CPU); run prefkit train "
            "without accelerate launch, or set end_to_end: true to train the backbone on several processes"
        )
    if resume and not config.end_to_end.end_to_end:
        raise ConfigError(
            "--resume continues end-to-end training (end_to_end: true with save_steps); heads on frozen "
            "embeddings fit in one go: drop --resume"
        )
    from prefkit.data.groups import resolve_groups
    from prefkit.data.loaders import load_records, write_records

    out = _prepare_output_dir(config)
    records = _load_train_records(config)
    train_rows, held_rows, unseen = split_users(records, config)
    if config.groups:  # fail before training on a bad groups file
        resolve_groups(config.groups, sorted({r.user_id for r in records}))
    say(
        f"{config.method}: {len(records)} pairs of {len({r.user_id for r in records})} users in {config.train_file}; "
        f"training on {len(train_rows)}, holding out {len(held_rows)} ({len(unseen)} unseen users)"
    )
    backbone = load_backbone(config)
    if config.end_to_end.end_to_end:
        model, history = fit_end_to_end([records[i] for i in train_rows], backbone, config, say, resume)
        if not main_process():  # several processes trained together; the main one writes and evaluates
            return PersonalizedRun(out, model.head, history, None)
        head, saved = model.head.cpu(), _save_backbone(backbone, config, out)  # the head works on CPU embeddings
        say(f"embedding the pairs with the trained backbone ({config.pooling} pooling, not cached)")
        pairs = _embed_uncached(records, backbone, config)
        train_pairs = reindex_users(pairs.subset(train_rows))
        rows, extra = finish_end_to_end(model, train_pairs, config)
        history += rows
        history.append({"stage": "final", **_final_metrics(head, train_pairs, config, extra)})
    else:
        saved = config
        say(f"embedding with {config.model} ({config.pooling} pooling), cache in {config.cache_root}")
        pairs = embed_records(records, backbone, config, config.train_file)
        train_pairs = reindex_users(pairs.subset(train_rows))
        say(f"fitting {config.method} on {len(train_pairs)} pairs of {len(train_pairs.users)} users (dim {pairs.dim})")
        head, history, extra = fit_head(train_pairs, config)
        history.append({"stage": "final", **_final_metrics(head, train_pairs, config, extra)})
    _print_history(history, say)

    head.save_pretrained(str(out))
    (out / USERS_FILE).write_text(json.dumps({"users": train_pairs.users, **extra}, indent=1) + "\n")
    (out / CONFIG_FILE).write_text(
        "# Resolved prefkit personalized config: `prefkit train THIS_FILE` re-runs it.\n"
        + (
            "# End to end: `model` is the trained backbone (backbone/), which `prefkit eval rm` embeds with.\n"
            if saved is not config
            else ""
        )
        + yaml.safe_dump(config_to_dict(saved), sort_keys=False)
    )
    with open(out / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in history)

    evaluation, eval_data = None, None
    if evaluate is None:
        pass
    elif config.eval_file:
        eval_data = config.eval_file
        eval_records = load_records(eval_data, kind="pairwise", column_map=config.column_map)
        eval_pairs = (
            _embed_uncached(eval_records, backbone, config)
            if config.end_to_end.end_to_end
            else embed_records(eval_records, backbone, config, eval_data)
        )
    elif held_rows:
        eval_data = str(out / HELDOUT_FILE)
        write_records([records[i] for i in held_rows], eval_data)
        eval_pairs = pairs.subset(held_rows)
    if eval_data is not None:
        evaluation = evaluate(config, head, train_pairs.users, extra, eval_pairs, out, say)
        evaluation["data"] = [eval_data]
    _write_model_card(out, config, len(train_pairs), train_pairs.users, history, evaluation)
    return PersonalizedRun(out, head, history, evaluation)


def main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _num_processes() -> int:
    """Processes of the launch (``WORLD_SIZE``, set by ``accelerate launch`` / ``torchrun``; 1 without)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _save_backbone(backbone, config: PersonalizedConfig, out: Path) -> PersonalizedConfig:
    """Write the trained backbone and its tokenizer to ``out/backbone``; return ``config`` pointing
    ``model`` at it (what `prefkit eval rm` loads to embed pairs)."""
    model, tokenizer = backbone
    folder = out / "backbone"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return dataclasses.replace(config, model=str(folder.resolve()), tokenizer=None, backbone_layers=None)


def _write_model_card(out: Path, config, n_pairs: int, users, history, evaluation) -> None:
    final = next((row for row in reversed(history) if row.get("stage") == "final"), history[-1])
    lines = [
        f"# {config.method} personalized reward head",
        "",
        f"- Method: `{config.method}` (`prefkit.models`); paper: {PAPERS[config.method]}.",
        (
            f"- Backbone (trained end to end with the head, in `backbone/`): from `{config.model}`, "
            if config.end_to_end.end_to_end
            else f"- Backbone (frozen, embeds each prompt + response): `{config.model}`, "
        )
        + f"{config.pooling} pooling.",
        f"- Data: `{config.train_file}`: {n_pairs} training pairs of {len(users)} users"
        + (f"; {len(config.unseen_users)} unseen users held out" if isinstance(config.unseen_users, list) else "")
        + ".",
        f"- Hyper-parameters: `{json.dumps(dataclasses.asdict(config.params))}`; seed {config.seed}.",
        f"- Last logged fit metrics: `{json.dumps(final)}`.",
        "",
        "Files: `config.json` + `model.safetensors` (the head; `from_pretrained`), `users.json` (seen users), "
        f"`{CONFIG_FILE}` (the resolved config), `metrics.jsonl` (the fit's history)"
        + (", `eval/` (report.md, results.json, accuracy_vs_k.png)" if evaluation else "")
        + ".",
        "",
        "Evaluate on other pairs with `prefkit eval rm --model THIS_FOLDER --data FILE [--groups lab|FILE]`.",
    ]
    if evaluation and evaluation.get("seen"):
        lines += ["", f"Held-out accuracy of seen users: {evaluation['seen']['accuracy']:.3f}."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
