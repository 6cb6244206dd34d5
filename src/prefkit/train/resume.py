"""`--resume` continues the run that was saved, not another one.

A run's ``output_dir/config.yaml`` is the configuration it was started with. On ``--resume`` the
configuration given on the command line is compared with it, setting by setting:

- a setting that changes what is learned (the loss, its hyper-parameters, the learning rate, the data,
  the model, ...) and differs is refused, listing every differing key with both values;
- the settings in `MAY_CHANGE` (how long to train, how often to log, save and evaluate, where to report)
  may differ: the run continues with the new values, and each such change is appended to
  ``output_dir/history.jsonl`` (step, checkpoint, key, old and new value) and listed in the model card.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefkit.train.config import RunConfig, config_to_dict, load_config
from prefkit.train.settings import ConfigError

__all__ = ["HISTORY_FILE", "MAY_CHANGE", "changed_settings", "read_history", "resume_config"]

HISTORY_FILE = "history.jsonl"

# Settings a resumed run may change on purpose: its length, and its logging, saving and evaluation.
MAY_CHANGE = frozenset(
    {
        "output_dir",  # the folder was moved or copied: its config.yaml is the one read
        "max_steps",
        "num_train_epochs",
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "logging_dir",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "eval_steps",
        "eval_strategy",
        "per_device_eval_batch_size",
        "report_to",
        "run_name",
        "disable_tqdm",
        "push_to_hub",
        "hub_model_id",
        "dataloader_num_workers",
        "bad_step_limit",
    }
)


# Belongs to the launch, not to the run (transformers versions have filled it from LOCAL_RANK per process).
FROM_THE_LAUNCH = frozenset({"local_rank"})


def _flat(config: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group in config_to_dict(config).values():
        out.update(group)
    for key in FROM_THE_LAUNCH:
        out.pop(key, None)
    return out


def changed_settings(before: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved, given)`` for every setting whose value differs between two flat configs."""
    return {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def resume_config(config: RunConfig, resume: str | bool) -> RunConfig:
    """``config`` after checking it against the saved run in ``config.train.output_dir``; records the
    allowed changes in `HISTORY_FILE`. Raises `ConfigError` listing the settings that may not change."""
    out = Path(config.train.output_dir)
    saved_path = out / "config.yaml"
    if resume is True and not (out.is_dir() and any(p.name.startswith("checkpoint-") for p in out.iterdir())):
        raise ConfigError(f"--resume: output_dir {str(out)!r} holds no checkpoint-* folder to resume from")
    if not saved_path.is_file():
        raise ConfigError(
            f"--resume: {saved_path} is missing, so the run to continue is unknown; restore it, or start a new "
            "run without --resume"
        )
    try:
        saved = load_config(saved_path)
    except ConfigError as err:
        raise ConfigError(f"--resume: the saved config {saved_path} does not read: {err}") from err
    before, now = _flat(saved), _flat(config)
    changed = changed_settings(before, now)
    refused = {k: v for k, v in changed.items() if k not in MAY_CHANGE}
    if refused:
        listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"--resume continues the run saved in {saved_path}, but {len(refused)} setting(s) differ from it: "
            f"{listed}. Resume with the run's own config (prefkit train {saved_path} --resume), drop those settings, "
            f"or train a new run in another output_dir. A resumed run may change only: {', '.join(sorted(MAY_CHANGE))}."
        )
    if changed and config.train.should_save:
        entry = {
            "event": "resume",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "checkpoint": str(resume) if isinstance(resume, str) else "latest",
            "changed": {k: {"from": a, "to": b} for k, (a, b) in changed.items()},
        }
        with open(out / HISTORY_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
    return config


def read_history(output_dir: str | Path) -> list[dict[str, Any]]:
    """The run's `HISTORY_FILE` entries (empty when it has none)."""
    path = Path(output_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries
