"""Reading a training configuration and checking every setting before torch is imported.

`prefkit train` reads the YAML file and the ``key=value`` overrides here, then `check_settings` checks
every value it knows (types, ranges, loss names and hyper-parameters, paths) and raises `ConfigError`
with one line, ``KEY: expected ..., got ...``. Only then does `prefkit.train.config` import
``transformers`` (several seconds) to build the dataclasses. Nothing here imports torch:

- the YAML loader reads ``1e-5`` as a number (YAML 1.1 wants ``1.0e-5``) and refuses a key given twice;
- the valid keys are read from the dataclasses' source (`prefkit.train.config` and transformers'
  ``TrainingArguments``) with `ast`, not by importing them;
- the losses' names, kinds, hyper-parameters and ranges are read from ``prefkit/losses/*.py`` the same
  way and checked by the rules the trainer uses (`prefkit.ranges.resolve_params`);
- TRL's key names are accepted where they mean exactly a prefkit key (`TRL_ALIASES`), and otherwise
  answered with the prefkit key to use (`TRL_HINTS`).
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefkit.data.loaders import HUB_NAME, SUFFIXES
from prefkit.ranges import ParamRangeError, range_problem, resolve_params

__all__ = [
    "ConfigError",
    "TRL_ALIASES",
    "TRL_HINTS",
    "check_model_path",
    "check_settings",
    "check_values",
    "known_keys",
    "loss_catalog",
    "parse_value",
    "read_config_file",
]


class ConfigError(ValueError):
    """A bad config: unknown key (with a suggestion), bad value or bad override."""


# ------------------------------------------------------------------------------------------
# YAML
# ------------------------------------------------------------------------------------------
class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-5`` / ``3E4`` as floats and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{key}: the key is given twice (lines {seen[key]} and {line}{self._where()}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def _where(self) -> str:
        name = getattr(self, "source_name", None)
        return f" of {name}" if name else ""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str, source: str | None = None) -> Any:
    loader = ConfigLoader(text)
    loader.source_name = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_config_file(path: str | Path) -> Any:
    """The YAML value in the config file ``path``; `ConfigError` when the file is missing, not YAML, or
    gives a key twice."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return _load_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err


def has_section(path: str | Path, section: str) -> bool:
    """Whether the config file ``path`` is a YAML mapping with the key ``section`` (False for anything
    unreadable: reading it as a training config then says what is wrong)."""
    try:
        mapping = _load_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    except (OSError, yaml.YAMLError, UnicodeDecodeError, ConfigError):
        return False
    return isinstance(mapping, dict) and section in mapping


def is_personalized_config(path: str | Path) -> bool:
    """Whether ``path`` is a config with a ``personalized:`` section (a personalized reward head)."""
    return has_section(path, "personalized")


def parse_value(raw: str) -> Any:
    """An override's value as a YAML scalar (``0.2``, ``1e-1``, ``true``, ``[dpo, sft]``); an empty value is None."""
    if not raw.strip():
        return None
    return _load_yaml(raw)


# ------------------------------------------------------------------------------------------
# Keys, read from the dataclasses' source
# ------------------------------------------------------------------------------------------
def _class_fields(path: Path, class_name: str) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            names = []
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if not _is_init_false(item.value):
                        names.append(item.target.id)
            return names
    raise RuntimeError(f"class {class_name} not found in {path}")


def _is_init_false(value: ast.expr | None) -> bool:
    if not isinstance(value, ast.Call):
        return False
    return any(k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False for k in value.keywords)


def _transformers_file(name: str) -> Path:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the transformers package is not installed: pip install transformers")
    return Path(list(spec.submodule_search_locations)[0]) / name


@functools.lru_cache(maxsize=1)
def known_keys() -> dict[str, str]:
    """Every key a training config may hold -> its section (``model``, ``data`` or ``train``)."""
    config_py = Path(__file__).with_name("config.py")
    keys: dict[str, str] = {}
    for section, cls in (("model", "ModelConfig"), ("data", "DataConfig"), ("train", "PreferenceConfig")):
        for name in _class_fields(config_py, cls):
            keys.setdefault(name, section)
    for name in _class_fields(_transformers_file("training_args.py"), "TrainingArguments"):
        keys.setdefault(name, "train")
    return keys


# transformers' enumerations of some TrainingArguments values: key -> (file, enum class)
TRANSFORMERS_CHOICES: dict[str, tuple[str, str]] = {
    "lr_scheduler_type": ("trainer_utils.py", "SchedulerType"),
    "optim": ("training_args.py", "OptimizerNames"),
    "eval_strategy": ("trainer_utils.py", "IntervalStrategy"),
    "logging_strategy": ("trainer_utils.py", "IntervalStrategy"),
    "save_strategy": ("trainer_utils.py", "SaveStrategy"),
}


@functools.cache
def _enum_values(file: str, class_name: str) -> tuple[str, ...]:
    """The string values of the enum ``class_name`` in transformers' ``file``, read with `ast`."""
    tree = ast.parse(_transformers_file(file).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return tuple(
                item.value.value
                for item in node.body
                if isinstance(item, ast.Assign)
                and isinstance(item.value, ast.Constant)
                and isinstance(item.value.value, str)
            )
    return ()


# ------------------------------------------------------------------------------------------
# Losses, read from prefkit/losses/*.py
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogEntry:
    """What `register_loss` declares about a loss, read from the source."""

    name: str
    kind: str
    hyperparameters: dict[str, Any]
    ranges: dict[str, str]
    batch_coupled: bool = False
    needs_kl: bool = False
    token_masks: str | None = None


@functools.lru_cache(maxsize=1)
def loss_catalog() -> dict[str, CatalogEntry]:
    """Every registered loss (name -> `CatalogEntry`), read from the ``@register_loss(...)`` decorators
    and keyword-only defaults in ``prefkit/losses/*.py`` without importing them (a test checks that this
    equals the live registry)."""
    out: dict[str, CatalogEntry] = {}
    for path in sorted((Path(__file__).parent.parent / "losses").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            for deco in node.decorator_list:
                if not (isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register_loss"):
                    continue
                name = ast.literal_eval(deco.args[0])
                kw = {k.arg: ast.literal_eval(k.value) for k in deco.keywords}
                defaults = {
                    a.arg: ast.literal_eval(d)
                    for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults)
                    if d is not None
                }
                out[name] = CatalogEntry(
                    name,
                    kw["kind"],
                    defaults,
                    dict(kw.get("ranges") or {}),
                    bool(kw.get("batch_coupled", False)),
                    bool(kw.get("needs_kl", False)),
                    kw.get("token_masks"),
                )
    return out


# ------------------------------------------------------------------------------------------
# TRL's names
# ------------------------------------------------------------------------------------------
# TRL key -> the prefkit key that means exactly the same (a dotted key sets one entry of loss_params).
TRL_ALIASES: dict[str, str] = {
    "model_name_or_path": "model",
    "dataset_name": "train_file",
    "dataset_train_split": "train_split",
    "dataset_test_split": "eval_split",
    "torch_dtype": "dtype",
    "precompute_ref_log_probs": "precompute_ref_logps",
    "padding_free": "packing",
    "beta": "loss_params.beta",
    "label_smoothing": "loss_params.label_smoothing",
    "cpo_alpha": "loss_params.cpo_alpha",
    "discopop_tau": "loss_params.tau",
    "ld_alpha": "loss_params.alpha",
    "f_divergence_type": "loss_params.divergence",
    "desirable_weight": "loss_params.desirable_weight",
    "undesirable_weight": "loss_params.undesirable_weight",
    "center_rewards_coefficient": "loss_params.center_coef",
}

# TRL key -> what to write instead (no exact one-key equivalent).
TRL_HINTS: dict[str, str] = {
    "loss_type": "prefkit's key is loss, with prefkit's names (TRL sigmoid = dpo, robust = robust_dpo, "
    "exo_pair = exo, nca_pair = nca; `prefkit losses` lists them)",
    "rpo_alpha": "RPO is a loss of its own: loss: rpo with loss_params.alpha: ALPHA "
    "(or loss: [dpo, sft] with loss_weights: [1.0, ALPHA])",
    "max_completion_length": "set max_length (prompt + completion) and max_prompt_length",
    "use_peft": "set lora_r (e.g. lora_r: 16) to train LoRA adapters",
    "lora_task_type": "prefkit picks the LoRA task type from the loss",
    "simpo_gamma": "set loss_params.gamma_beta_ratio to gamma / beta",
    "f_alpha_divergence_coef": "set loss_params.alpha; prefkit's alpha is 1 - TRL's (docs/losses.md, f_dpo)",
    "model_init_kwargs": "set dtype, attn_implementation and trust_remote_code directly",
    "ref_model_init_kwargs": "set ref_model; it loads with the policy's dtype and attention",
    "dataset_config": "load the configuration into a file or datasets folder and give it as train_file",
    "eval_dataset_name": "set eval_file",
    "sync_ref_model": "prefkit keeps the reference frozen (not supported)",
}


# ------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------
# key -> range (prefkit.ranges notation) of a number
NUMBERS: dict[str, str] = {
    "learning_rate": "> 0",
    "weight_decay": ">= 0",
    "max_grad_norm": ">= 0",
    "adam_beta1": "[0, 1)",
    "adam_beta2": "[0, 1)",
    "adam_epsilon": "> 0",
    "eval_fraction": "[0, 1)",
    "lora_alpha": "> 0",
    "lora_dropout": "[0, 1)",
    "gpm_beta": "> 0",
    "logps_memory_mb": "> 0",
    "group_robust_step_size": ">= 0",
    "group_robust_size_adjustment": ">= 0",
    "num_train_epochs": "> 0",
}
# key -> smallest allowed integer (None allowed where the key may be null)
INTEGERS: dict[str, int] = {
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "tiny_hidden_size": 1,
    "tiny_num_layers": 1,
    "tiny_num_heads": 1,
    "tiny_intermediate_size": 1,
    "tiny_max_position_embeddings": 2,
    "user_prefix_tokens": 1,
    "lora_r": 0,
    "bad_step_limit": 0,
    "dataloader_num_workers": 0,
}
NULLABLE_INTEGERS: dict[str, int] = {"max_length": 1, "max_prompt_length": 1, "packing_max_tokens": 1}
# logged / saved / evaluated every N steps, or a fraction of the run (< 1), as TrainingArguments reads them
STEP_INTERVALS = ("save_steps", "logging_steps", "eval_steps")
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("float32", "bfloat16", "float16", "auto"),
    "prompt_truncation": ("keep_end", "keep_start"),
    "completion_truncation": ("keep_start", "keep_end"),
    "user_id_missing": ("error", "shared"),
    "data_kind": ("pairwise", "unpaired", "rated", "ranked", "stepwise"),
    "curriculum": ("none", "margin"),
}
BOOLEANS = (
    "share_prompt",
    "packing",
    "precompute_ref_logps",
    "user_conditioning",
    "group_robust",
    "overwrite_output_dir",
    "trust_remote_code",
    "gpm_prompt_scaled",
    "bf16",
    "fp16",
    "gradient_checkpointing",
)
MODEL_KEYS = ("model", "ref_model", "tokenizer")
DATA_KEYS = ("train_file", "eval_file")


def _fail(key: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {got!r}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(key, "a number", value) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, "a number", value)
    return value


def _integer(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, f"an integer >= {minimum}", value)
    return value


def check_in_range(key: str, value: Any, rng: str) -> None:
    """`ConfigError` ``KEY: expected ..., got ...`` unless ``value`` lies in ``rng`` (`prefkit.ranges`)."""
    problem = range_problem(value, rng)
    if problem:
        raise ConfigError(f"{key}: {problem}")


def _looks_local(value: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether a missing ``value`` is meant as a local path rather than a Hub name: it starts like a path,
    has more than one ``/``, ends like a file (``suffixes``), starts with an existing folder (``runs/x``), or
    cannot be a Hub name."""
    first = Path(value).parts[0] if Path(value).parts else ""
    return bool(
        value.startswith((".", "/", "~"))
        or value.count("/") > 1
        or "\\" in value
        or value.lower().endswith(suffixes)
        or (first and Path(first).is_dir())
        or not HUB_NAME.match(value)
    )


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_key_error(key: str, where: str = "") -> ConfigError:
    """The error for a key no section owns: TRL's name -> the prefkit key, else the closest key."""
    if key in TRL_HINTS:
        return ConfigError(f"{key}: not a prefkit key (TRL's name){where}: {TRL_HINTS[key]}")
    return ConfigError(
        f"unknown config key {key!r}{where}.{_suggest(key, list(known_keys()))} See docs/training.md for every key."
    )


def apply_aliases(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``values`` with TRL's names (`TRL_ALIASES`) turned into prefkit's keys; a key given both ways is
    an error."""
    out = dict(values)
    for trl, ours in TRL_ALIASES.items():
        if trl not in out or trl in known_keys():
            continue
        value = out.pop(trl)
        head, _, sub = ours.partition(".")
        if not sub:
            if head in out:
                raise ConfigError(f"{trl}: TRL's name for {head}, which is also set{where}; keep one")
            out[head] = value
            continue
        params = out.get(head) or {}
        if not isinstance(params, dict):
            raise _fail(head, "a mapping", params)
        if sub in params:
            raise ConfigError(f"{trl}: TRL's name for {ours}, which is also set{where}; keep one")
        out[head] = {**params, sub: value}
    return out


def _registered_source(value: str) -> bool:
    """A ``SCHEME:REST`` spec whose scheme a package registers (entry points ``prefkit.model_sources``)."""
    from importlib.metadata import entry_points

    scheme, sep, _ = value.partition(":")
    return (
        bool(sep)
        and scheme.isidentifier()
        and any(ep.name == scheme for ep in entry_points(group="prefkit.model_sources"))
    )


def check_model_path(key: str, value: Any, *, allow_tiny: bool = True) -> None:
    """A model / tokenizer source must be ``tiny``, an existing local folder or file, or a Hub model id;
    a path that looks local (``./x``, ``runs/x`` where ``runs/`` exists, ``a/b/c``) but is missing is
    refused here, instead of after a minute of Hub retries."""
    if value is None or (allow_tiny and value == "tiny"):
        return
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, "a local folder, a Hub model id" + (" or tiny" if allow_tiny else ""), value)
    path = Path(os.path.expanduser(value))
    if path.exists() or _registered_source(value) or not _looks_local(value, (".bin", ".safetensors", ".pt")):
        return
    parent = path.parent
    hint = ""
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean {str(parent / close[0])!r}?"
    raise ConfigError(f"{key}: expected an existing folder or a Hub model id, got {value!r} (no such folder{hint})")


def _check_data_path(key: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, "a data file, a datasets folder or a Hub dataset name", value)
    if not Path(os.path.expanduser(value)).exists() and _looks_local(value, tuple(SUFFIXES)):
        raise ConfigError(f"{key}: expected an existing data file or folder, or a Hub dataset name, got {value!r}")


def _check_output_dir(value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _fail("output_dir", "a folder name", value)
    path = Path(os.path.expanduser(value))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: expected a folder, got {value!r} (a file)")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"output_dir: expected a folder, got {value!r} ({str(ancestor)!r} is a file)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: expected a writable folder, got {value!r} (no write permission on {ancestor})")


def check_losses(values: Mapping[str, Any]) -> None:
    """``loss``, ``loss_weights`` and ``loss_params`` against the losses' declarations."""
    loss = values.get("loss", "dpo")
    names = [loss] if isinstance(loss, str) else loss
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _fail("loss", "a loss name or a list of loss names (`prefkit losses`)", loss)
    weights = values.get("loss_weights")
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != len(names):
            raise _fail("loss_weights", f"a list of {len(names)} number(s), one per loss", weights)
        for w in weights:
            if range_problem(w, "any"):
                raise _fail("loss_weights", "finite numbers", weights)
    params = values.get("loss_params")
    if params is not None and not isinstance(params, Mapping):
        raise _fail("loss_params", "a mapping of hyper-parameters ({beta: 0.1})", params)
    try:
        resolve_params(names, params, loss_catalog())
    except KeyError as err:
        raise ConfigError(f"loss: {err.args[0]}") from None
    except ParamRangeError as err:
        raise ConfigError(f"loss_params.{err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"loss_params: {err}") from None
    kind = loss_catalog()[names[0]].kind
    kl_losses = [n for n in names if loss_catalog()[n].needs_kl]
    for key in ("share_prompt", "packing", "precompute_ref_logps"):
        if kl_losses and values.get(key) is True:
            raise _fail(key, f"false for {', '.join(kl_losses)} (they read the reference's token distributions)", True)
    masked = [n for n in names if loss_catalog()[n].token_masks]
    if len(masked) > 1:
        raise _fail("loss", "at most one token-mask loss (each builds its own masks)", names)
    if masked and loss_catalog()[masked[0]].token_masks == "learned" and (values.get("lora_r") or 0) > 0:
        raise _fail(
            "lora_r", f"0 for {masked[0]} (its learned masks train beside the policy's full weights)", values["lora_r"]
        )
    if values.get("curriculum") == "margin" and kind != "pairwise":
        raise _fail("curriculum", f"none for {kind} losses (margin orders preference pairs)", "margin")
    if loss_catalog()[names[0]].kind == "policy":
        raise ConfigError(
            f"loss: {', '.join(names)} are policy-gradient losses over completions sampled during training; "
            "prefkit's online trainer that runs them is not built yet (use them from Python: "
            "prefkit.losses.policy_gradient)"
        )


def check_values(values: Mapping[str, Any]) -> None:
    """The checks of single values and of pairs of them (types, ranges, choices, tiny sizes,
    ``max_length`` against ``max_prompt_length``) that apply to every training configuration."""
    get = values.get
    for key, rng in NUMBERS.items():
        if get(key) is not None:
            check_in_range(key, _number(key, get(key)), rng)
    for key, minimum in INTEGERS.items():
        if key in values:
            _integer(key, get(key), minimum)
    for key, minimum in NULLABLE_INTEGERS.items():
        if get(key) is not None:
            _integer(key, get(key), minimum)
    for key in STEP_INTERVALS:
        if get(key) is None:
            continue
        x = _number(key, get(key))
        if not (math.isfinite(x) and (x >= 1 and float(x).is_integer() or 0 < x < 1)):
            raise _fail(key, "an integer >= 1 (steps) or a fraction of the run in (0, 1)", get(key))
    for key, choices in CHOICES.items():
        if get(key) is not None and get(key) not in choices:
            raise _fail(key, "one of " + ", ".join(choices), get(key))
    for key, (file, enum) in TRANSFORMERS_CHOICES.items():
        choices, value = _enum_values(file, enum), get(key)
        if isinstance(value, bool):  # YAML 1.1 reads `no` as false; the text field gets the word back
            value = "yes" if value else "no"
        if value is not None and choices and value not in choices:
            raise _fail(key, "one of " + ", ".join(choices), value)
    column_map = get("column_map")
    if column_map is not None and (
        not isinstance(column_map, Mapping) or not all(isinstance(v, str) for v in column_map.values())
    ):
        raise _fail("column_map", "a mapping prefkit field -> file column ({prompt: question})", column_map)
    targets = get("lora_target_modules")
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise _fail("lora_target_modules", "all-linear or a list of module names ([q_proj, v_proj])", targets)
    if "model" in values and not (isinstance(get("model"), str) and get("model").strip()):
        raise _fail("model", "tiny, a local folder or a Hub model id", get("model"))
    if not get("user_conditioning"):
        changed = [k for k, d in (("user_prefix_tokens", 1), ("user_id_missing", "error")) if get(k, d) != d]
        if changed:
            raise ConfigError(f"{changed[0]}: set, but user_conditioning is false; set user_conditioning: true")
    for key in BOOLEANS:
        if key in values and not isinstance(get(key), bool):
            raise _fail(key, "true or false", get(key))
    if "max_steps" in values:
        steps = _integer("max_steps", get("max_steps"), -1)
        if steps == 0:
            raise _fail("max_steps", "at least one training step (>= 1), or -1 to train num_train_epochs", 0)
    if "seed" in values:
        _integer("seed", get("seed"), 0)
    for key in ("warmup_steps",):
        if get(key) is not None and range_problem(_number(key, get(key)), ">= 0"):
            raise _fail(key, "a number >= 0", get(key))
    if "gpm_embed_dim" in values:
        dim = _integer("gpm_embed_dim", get("gpm_embed_dim"), 2)
        if dim % 2:
            raise _fail("gpm_embed_dim", "an even integer >= 2", dim)
    strategy = get("train_sampling_strategy")
    if get("curriculum") == "margin" and strategy not in (None, "random", "sequential"):
        raise _fail("train_sampling_strategy", "sequential (curriculum: margin fixes the order)", strategy)
    if "step_separator" in values and (not isinstance(get("step_separator"), str) or not get("step_separator")):
        raise _fail("step_separator", "a non-empty string (the text that ends every step)", get("step_separator"))
    if "logps_chunk_size" in values and get("logps_chunk_size") != "auto":
        value = get("logps_chunk_size")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail("logps_chunk_size", "an integer >= 1 or auto", value)
    hidden, heads = get("tiny_hidden_size", 64), get("tiny_num_heads", 4)
    if hidden % heads:
        raise ConfigError(f"tiny_num_heads: expected a divisor of tiny_hidden_size ({hidden}), got {heads}")
    max_length, max_prompt = get("max_length"), get("max_prompt_length")
    if max_length is not None and max_prompt is not None and max_length <= max_prompt:
        raise ConfigError(
            f"max_length: expected more than max_prompt_length ({max_prompt}) to leave room for the completion, "
            f"got {max_length}"
        )


def check_settings(values: Mapping[str, Any], source: str | None = None, *, paths: bool = True) -> None:
    """Check every value of a flat training config that can be checked without torch; raise `ConfigError`
    (``KEY: expected ..., got ...``) at the first bad one. ``paths``: also check that model and data paths
    exist (or are Hub names) and that ``output_dir`` can be written."""
    where = f" in {source}" if source else ""
    valid = known_keys()
    for key in values:
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r}{where}")
        if key not in valid:
            raise unknown_key_error(key, where)
    check_values(values)
    get = values.get
    check_losses(values)
    if not paths:
        return
    if not get("train_file"):
        raise _fail("train_file", "the feedback file to train on (docs/training.md)", get("train_file"))
    groups = get("groups")
    if groups is not None and groups != "lab" and not Path(str(groups)).is_file():
        raise _fail("groups", "lab or a YAML/JSON file mapping user_id -> group", groups)
    for key in MODEL_KEYS:
        check_model_path(key, get(key))
    for key in DATA_KEYS:
        _check_data_path(key, get(key))
    _check_output_dir(get("output_dir", "runs/prefkit"))


# ------------------------------------------------------------------------------------------
# The flat mapping: file + overrides
# ------------------------------------------------------------------------------------------
def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["loss=ipo", "loss_params.beta=1e-1"]`` -> ``[("loss", "ipo"), ("loss_params.beta", 0.1)]``."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has no key")
        try:
            value = parse_value(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: the value {raw!r} is not valid YAML ({' '.join(str(err).split())})") from err
        out.append((key, value))
    return out


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    head, *rest = dotted.split(".")
    head = TRL_ALIASES.get(head, head) if head not in known_keys() else head
    if "." in head:  # a TRL alias of a loss hyper-parameter, e.g. beta -> loss_params.beta
        head, *more = head.split(".")
        rest = more + rest
    if head not in known_keys():
        raise unknown_key_error(head, " in override")
    if not rest:
        values[head] = value
        return
    current = values.get(head)
    current = {} if current is None else current
    if not isinstance(current, dict):
        raise ConfigError(f"override {dotted!r}: {head!r} is not a mapping (it is {current!r})")
    node = current = dict(current)
    for part in rest[:-1]:
        child = node.get(part)
        child = {} if child is None else child
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a mapping (it is {child!r})")
        node[part] = child = dict(child)
        node = child
    node[rest[-1]] = value
    values[head] = current


def flat_values(
    mapping: Mapping[str, Any] | None,
    overrides: Sequence[str] = (),
    *,
    source: str | None = None,
    paths: bool = False,
) -> dict[str, Any]:
    """The config's flat ``key -> value`` mapping: ``mapping`` with TRL's names turned into prefkit's and
    the overrides applied, every value checked (`check_settings`; the paths too with ``paths``)."""
    where = f" in {source}" if source else ""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source or 'config'}: a config is one flat YAML mapping (key: value)")
    values = apply_aliases(dict(mapping), where)
    for key, value in parse_overrides(overrides):
        _set_dotted(values, key, value)
    check_settings(values, source, paths=paths)
    return values


def read_settings(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read and check a training config file and its overrides without importing torch (what
    `prefkit train` does before loading anything); the flat, checked values."""
    return flat_values(read_config_file(path), overrides, source=str(path), paths=True)
