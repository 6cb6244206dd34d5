"""The ``prefkit train`` configuration of online training (`prefkit.online`), read and checked before
torch is imported (it lives beside `prefkit.train.settings`, whose checks it shares).

A config with an ``online:`` section trains a policy on its own samples (`prefkit.online.trainer`):

.. code-block:: yaml

    model: tiny                      # ModelConfig keys (docs/training.md)
    output_dir: runs/grpo_tiny       # any transformers.TrainingArguments key
    max_steps: 20
    per_device_train_batch_size: 2   # prompts per step; each gets num_generations completions
    learning_rate: 1.0e-2
    online:
      prompts_file: examples/data/prompts_tiny.jsonl   # rows with a prompt, plus the fields rewards read
      num_generations: 8
      max_new_tokens: 8
      temperature: 1.0
      loss: grpo                     # a policy loss: grpo, dapo, bnpo, dr_grpo, gspo, cispo; or a pairwise
                                     # loss (dpo, ipo, simpo, ...): online preference optimisation
      loss_params: {beta: 0.0}
      advantage: grpo                # grpo, dr_grpo, rloo, reinforce_pp, reinforce_baseline
      rewards:
        - {reward: math, weight: 1.0}                                   # reads each record's `answer`
        - {reward: callable, function: examples/rewards.py:ascii_share}

``key=value`` overrides set top-level keys; ``online.KEY=value`` sets a key of the section.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefkit.ranges import ParamRangeError, resolve_params
from prefkit.train.settings import (
    ConfigError,
    _class_fields,
    _fail,
    _suggest,
    _transformers_file,
    check_in_range,
    check_model_path,
    check_values,
    has_section,
    loss_catalog,
    parse_overrides,
    read_config_file,
)

__all__ = ["ADVANTAGES", "ONLINE_KEYS", "REWARDS", "is_online_config", "read_online_settings"]

# The rewards of prefkit.online.rewards and the advantage estimators of prefkit.losses.advantages, by name
# (this module imports neither: it runs before torch; a test keeps the lists equal).
REWARDS = ("math", "exact_match", "regex", "verdict", "length", "bleu", "reward_model", "callable", "lab")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_baseline")
GROUPLESS_ADVANTAGES = ("reinforce_pp", "reinforce_baseline")

# key of the online: section -> (default, what it is)
ONLINE_KEYS: dict[str, tuple[Any, str]] = {
    "prompts_file": (None, "a JSONL/JSON/CSV/Parquet file of prompt records (prompt + the fields rewards read)"),
    "prompt_field": ("prompt", "the column holding the prompt"),
    "prompt_template": (
        None,
        "build each prompt from the record's fields instead, e.g. '{question}\\nAnswer after ####.'",
    ),
    "chat": (False, "send each prompt as a user message through the tokenizer's chat template"),
    "num_generations": (8, "completions per prompt (G)"),
    "max_new_tokens": (64, "longest completion, in tokens"),
    "temperature": (1.0, "sampling temperature"),
    "top_p": (1.0, "nucleus sampling mass (1.0: off)"),
    "top_k": (0, "top-k sampling (0: off)"),
    "max_prompt_length": (None, "cut prompts to their last N tokens"),
    "rollout_batch_size": (64, "sequences per generate call"),
    "loss": ("grpo", "a policy loss (prefkit losses --kind policy)"),
    "loss_params": ({}, "the loss's hyper-parameters, e.g. {beta: 0.04}"),
    "advantage": ("grpo", "an advantage estimator"),
    "advantage_params": ({}, "the estimator's hyper-parameters"),
    "rewards": (None, "a list of {reward: NAME, weight: W, ...parameters}"),
    "num_iterations": (1, "optimizer steps per rollout batch (GRPO's mu); save_steps must be a multiple"),
    "dynamic_sampling": (False, "DAPO: leave groups with all-equal rewards out of the loss"),
    "refill_rounds": (0, "DAPO with dynamic_sampling: up to N rounds of sampling more prompts to refill the batch"),
    "overlong_filtering": (False, "DAPO: leave completions cut by max_new_tokens out of the loss"),
    "min_new_tokens": (0, "no end token before this many tokens (benchmarks force equal lengths with it)"),
    "share_prompt": (False, "score each prompt once for its num_generations completions (eager/sdpa attention)"),
    "kl_reward_coef": (0.0, "KL as a reward term: reward - coef * sum_t KL_t to the reference, before advantages"),
    "kl_reward_estimator": ("k1", "the estimator of kl_reward_coef's KL: k1, k2 or k3"),
    "judge": (None, "online DPO: a pairwise judge labelling each prompt's first two samples, {judge: lab, ...}"),
    "pairs": ("best_worst", "online DPO: best_worst (highest vs lowest score) or all (every unequal pair)"),
    "ref_sync_steps": (0, "online DPO: every N steps the reference takes the policy's weights (TR-DPO; 0: frozen)"),
    "rounds": (0, "iterative DPO: rounds of sample -> label -> train offline (0: online training instead)"),
    "ref_update": ("previous", "iterative DPO: each round's reference: previous (the round's start) or initial"),
    "same_prompts": (False, "iterative DPO: every round samples all prompts (default: a new part each round)"),
    "momentum": (0.0, "iterative DPO: Nesterov extrapolation after each round, APO (He et al. 2024); 0: off"),
    "critic": (
        None,
        "PPO with a critic: policy (a copy of its backbone, zero head), shared (a value head on the policy's own "
        "backbone) or a reward model's folder",
    ),
    "ppo": (
        {},
        "PPO's switches: gamma, lam, cliprange_value, reward_normalization, reward_clip, whiten_advantages, "
        "critic_warmup_steps, critic_learning_rate (docs/online.md)",
    ),
    "rollout_backend": ("hf", "hf (transformers generate) or vllm (a colocated vllm.LLM on a GPU: prefkit[vllm])"),
    "vllm_gpu_memory_utilization": (0.3, "vllm: the share of GPU memory the engine may take"),
    "vllm_sleep_mode": (False, "vllm: free the engine's weights and KV cache between generations"),
}


def is_online_config(path: str | Path) -> bool:
    """Whether ``path`` is a config with an ``online:`` section (training on the policy's own samples)."""
    return has_section(path, "online")


def _allowed_top_keys() -> set[str]:
    config_py = Path(__file__).resolve().with_name("config.py")
    keys = set(_class_fields(config_py, "ModelConfig"))
    keys |= set(_class_fields(_transformers_file("training_args.py"), "TrainingArguments"))
    return keys | {"bad_step_limit"}


def _int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, f"an integer >= {minimum}", value)


def check_online(online: Mapping[str, Any], *, paths: bool = True) -> dict[str, Any]:
    """The ``online:`` section with its defaults, every value checked."""
    if not isinstance(online, Mapping):
        raise _fail("online", "a mapping of online-training keys", online)
    for key in online:
        if key not in ONLINE_KEYS:
            hint = _suggest(str(key), list(ONLINE_KEYS)).replace(" Did you mean '", " Did you mean 'online.")
            raise ConfigError(f"unknown key 'online.{key}'.{hint} Keys: {', '.join(ONLINE_KEYS)}")
    o = {k: online.get(k, default) for k, (default, _) in ONLINE_KEYS.items()}
    if not o["prompts_file"] or not isinstance(o["prompts_file"], str):
        raise _fail("online.prompts_file", ONLINE_KEYS["prompts_file"][1], o["prompts_file"])
    if paths and not Path(o["prompts_file"]).exists():
        raise _fail("online.prompts_file", "an existing file", o["prompts_file"])
    _int("online.num_generations", o["num_generations"], 1)
    _int("online.max_new_tokens", o["max_new_tokens"], 1)
    _int("online.top_k", o["top_k"], 0)
    _int("online.rollout_batch_size", o["rollout_batch_size"], 1)
    _int("online.num_iterations", o["num_iterations"], 1)
    _int("online.min_new_tokens", o["min_new_tokens"], 0)
    _int("online.refill_rounds", o["refill_rounds"], 0)
    if o["min_new_tokens"] > o["max_new_tokens"]:
        raise _fail("online.min_new_tokens", f"at most max_new_tokens ({o['max_new_tokens']})", o["min_new_tokens"])
    check_in_range("online.kl_reward_coef", o["kl_reward_coef"], ">= 0")
    if o["kl_reward_estimator"] not in ("k1", "k2", "k3"):
        raise _fail("online.kl_reward_estimator", "one of k1, k2, k3", o["kl_reward_estimator"])
    if o["max_prompt_length"] is not None:
        _int("online.max_prompt_length", o["max_prompt_length"], 1)
    if o["prompt_template"] is not None and not (isinstance(o["prompt_template"], str) and "{" in o["prompt_template"]):
        raise _fail("online.prompt_template", "a text with {field} placeholders", o["prompt_template"])
    if o["rollout_backend"] not in ("hf", "vllm"):
        raise _fail("online.rollout_backend", "hf or vllm", o["rollout_backend"])
    if o["rollout_backend"] == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise _fail("online.rollout_backend", "hf, or vllm with the vllm package installed (prefkit[vllm])", "vllm")
    check_in_range("online.vllm_gpu_memory_utilization", o["vllm_gpu_memory_utilization"], "(0, 1]")
    for key in ("chat", "dynamic_sampling", "overlong_filtering", "share_prompt", "vllm_sleep_mode"):
        if not isinstance(o[key], bool):
            raise _fail(f"online.{key}", "true or false", o[key])
    check_in_range("online.temperature", o["temperature"], "> 0")
    check_in_range("online.top_p", o["top_p"], "(0, 1]")
    catalog = loss_catalog()
    if o["loss"] not in catalog or catalog[o["loss"]].kind not in ("policy", "pairwise", "list"):
        policy = sorted(n for n, e in catalog.items() if e.kind == "policy")
        raise _fail(
            "online.loss",
            "a policy loss (" + ", ".join(policy) + "), a pairwise loss (online DPO: prefkit losses --kind pairwise) "
            "or a list loss (sppo)",
            o["loss"],
        )
    if o["pairs"] not in ("best_worst", "all"):
        raise _fail("online.pairs", "best_worst or all", o["pairs"])
    _int("online.ref_sync_steps", o["ref_sync_steps"], 0)
    _check_ppo(o, catalog)
    _int("online.rounds", o["rounds"], 0)
    if o["ref_update"] not in ("previous", "initial"):
        raise _fail("online.ref_update", "previous or initial", o["ref_update"])
    if not isinstance(o["same_prompts"], bool):
        raise _fail("online.same_prompts", "true or false", o["same_prompts"])
    check_in_range("online.momentum", o["momentum"], ">= 0")
    if o["momentum"] and not o["rounds"]:
        raise ConfigError("online.momentum extrapolates between iterative DPO rounds: set online.rounds too")
    if o["rounds"] and catalog[o["loss"]].kind != "pairwise":
        raise ConfigError("online.rounds (iterative DPO) trains a pairwise loss (dpo, ipo, ...)")
    if catalog[o["loss"]].needs_kl and not o["rounds"]:
        raise _fail(
            "online.loss",
            "a loss without the token-level KL for online DPO (tdpo1 / tdpo2 train offline: prefkit train, or "
            "iterative DPO with online.rounds)",
            o["loss"],
        )
    if o["judge"] is not None:
        if not isinstance(o["judge"], Mapping) or "judge" not in o["judge"]:
            raise _fail("online.judge", "a mapping with judge: NAME (e.g. {judge: lab, world: default})", o["judge"])
        if catalog[o["loss"]].kind == "policy":
            raise ConfigError("online.judge labels pairs: it needs a pairwise or list loss (online DPO, sppo)")
    if catalog[o["loss"]].kind == "policy" and (online.get("pairs") is not None or o["ref_sync_steps"]):
        raise ConfigError("online.pairs and online.ref_sync_steps are settings of online preference losses (dpo, ...)")
    if not isinstance(o["loss_params"], Mapping):
        raise _fail("online.loss_params", "a mapping of hyper-parameters", o["loss_params"])
    try:
        resolve_params([o["loss"]], o["loss_params"], catalog)
    except ParamRangeError as err:
        raise ConfigError(f"online.loss_params.{err}") from None
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"online.loss_params: {err}") from None
    if o["advantage"] not in ADVANTAGES:
        raise _fail("online.advantage", "one of " + ", ".join(ADVANTAGES), o["advantage"])
    if o["advantage"] not in GROUPLESS_ADVANTAGES and o["num_generations"] < 2 and o["critic"] is None:
        raise _fail("online.num_generations", f"at least 2 for advantage {o['advantage']} (it compares a group)", 1)
    if not isinstance(o["advantage_params"], Mapping):
        raise _fail("online.advantage_params", "a mapping", o["advantage_params"])
    rewards = o["rewards"]
    if not isinstance(rewards, list) or not rewards:
        raise _fail("online.rewards", ONLINE_KEYS["rewards"][1], rewards)
    for i, item in enumerate(rewards):
        where = f"online.rewards[{i}]"
        if not isinstance(item, Mapping) or "reward" not in item:
            raise _fail(where, "a mapping with reward: NAME", item)
        if item["reward"] not in REWARDS:
            raise _fail(f"{where}.reward", "one of " + ", ".join(REWARDS), item["reward"])
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise _fail(f"{where}.weight", "a finite number", weight)
    return o


PPO_KEYS = {
    "gamma": "[0, 1]",
    "lam": "[0, 1]",
    "cliprange_value": "> 0",
    "reward_clip": ">= 0",
    "critic_learning_rate": "> 0",
    "vf_coef": "> 0",
}
PPO_FLAGS = ("reward_normalization", "whiten_advantages")


def _check_ppo(o: dict[str, Any], catalog) -> None:
    """``online.critic`` (PPO) and ``online.ppo``'s switches."""
    ppo = o["ppo"]
    if not isinstance(ppo, Mapping):
        raise _fail("online.ppo", "a mapping of PPO settings", ppo)
    if ppo and o["critic"] is None:
        raise ConfigError("online.ppo sets PPO's switches: name the critic too (online.critic: policy)")
    if o["critic"] is None:
        return
    if not isinstance(o["critic"], str) or not o["critic"]:
        raise _fail("online.critic", "policy, shared or a reward model's folder", o["critic"])
    if o["critic"] not in ("policy", "shared"):
        check_model_path("online.critic", o["critic"], allow_tiny=False)
    if catalog[o["loss"]].kind != "policy":
        raise ConfigError("online.critic (PPO) trains a policy loss (dapo, grpo, ...)")
    known = (*PPO_KEYS, *PPO_FLAGS, "critic_warmup_steps")
    for key, value in ppo.items():
        if key not in known:
            hint = _suggest(str(key), list(known)).replace(" Did you mean '", " Did you mean 'online.ppo.")
            raise ConfigError(f"unknown key 'online.ppo.{key}'.{hint} Keys: {', '.join(known)}")
        if key in PPO_FLAGS and not isinstance(value, bool):
            raise _fail(f"online.ppo.{key}", "true or false", value)
        if key == "critic_warmup_steps":
            _int("online.ppo.critic_warmup_steps", value, 0)
        if key in PPO_KEYS:
            check_in_range(f"online.ppo.{key}", value, PPO_KEYS[key])


def read_online_settings(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(top-level values, online section)`` of the config file ``path`` with its overrides, checked."""
    mapping = read_config_file(path)
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: a config is one YAML mapping (key: value)")
    values = dict(mapping)
    online = dict(values.pop("online") or {})
    for key, value in parse_overrides(overrides):
        if key.startswith("online."):
            *parents, leaf = key[len("online.") :].split(".")
            node = online
            for part in parents:  # online.loss_params.beta=0.1 sets one entry of a mapping
                child = node.get(part)
                node[part] = child = dict(child) if isinstance(child, Mapping) else {}
                node = child
            node[leaf] = value
        else:
            values[key] = value
    allowed = _allowed_top_keys()
    for key in values:
        if key not in allowed:
            hint = _suggest(str(key), sorted(allowed))
            in_section = f" (online training keys go in the online: section: {', '.join(ONLINE_KEYS)})"
            raise ConfigError(f"unknown config key {key!r} in {path}.{hint}{in_section if key in ONLINE_KEYS else ''}")
    check_values(values)
    for key in ("model", "ref_model", "tokenizer"):
        check_model_path(key, values.get(key))
    return values, check_online(online)
