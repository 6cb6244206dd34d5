"""Training: the log-prob engine and `PreferenceTrainer` (a ``transformers.Trainer``).

The trainer API is imported lazily, so ``import prefkit.train.logps`` does not pay for
importing ``transformers.Trainer``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PreferenceTrainer": "prefkit.train.trainer",
    "RewardTrainer": "prefkit.train.reward_trainer",
    "NonFiniteLossError": "prefkit.train.trainer",
    "PreferenceConfig": "prefkit.train.config",
    "ModelConfig": "prefkit.train.config",
    "DataConfig": "prefkit.train.config",
    "RunConfig": "prefkit.train.config",
    "ConfigError": "prefkit.train.config",
    "load_config": "prefkit.train.config",
    "parse_config": "prefkit.train.config",
    "write_config": "prefkit.train.config",
    "train_from_config": "prefkit.train.commands",
    "TrainingRun": "prefkit.train.commands",
    "MetricsJsonlCallback": "prefkit.train.callbacks",
    "PreferenceProgressCallback": "prefkit.train.callbacks",
    "completion_logps": "prefkit.train.logps",
    "LogpOutput": "prefkit.train.logps",
}

__all__ = [
    "ConfigError",
    "DataConfig",
    "LogpOutput",
    "MetricsJsonlCallback",
    "ModelConfig",
    "NonFiniteLossError",
    "PreferenceConfig",
    "PreferenceProgressCallback",
    "PreferenceTrainer",
    "RewardTrainer",
    "RunConfig",
    "TrainingRun",
    "completion_logps",
    "load_config",
    "parse_config",
    "train_from_config",
    "write_config",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prefkit.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
