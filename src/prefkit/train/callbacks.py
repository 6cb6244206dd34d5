"""Trainer callbacks: ``metrics.jsonl`` and a compact progress display.

Both plug into ``transformers.Trainer``'s callback system; the trainer adds them by default.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

METRICS_FILE = "metrics.jsonl"


def _json_value(value: Any) -> Any:
    """JSON-safe scalars: non-finite floats become the strings "nan", "inf", "-inf"."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def log_split(logs: dict[str, Any]) -> str:
    """``"eval"`` for evaluation logs, ``"summary"`` for the end-of-training summary, else ``"train"``."""
    if any(k.startswith("eval_") for k in logs):
        return "eval"
    if "train_runtime" in logs or "train_loss" in logs:
        return "summary"
    return "train"


class MetricsJsonlCallback(TrainerCallback):
    """Append one JSON line per log event to ``output_dir/metrics.jsonl``, flushed at once.

    Each line is ``{"step": global_step, "split": "train" | "eval" | "summary", **logs}``. When a
    run resumes from a checkpoint, the lines written after that checkpoint (by the interrupted run,
    or a finished run's final evaluation and summary) are dropped first, so the file reads as one
    run; a fresh (not resumed) training run empties the file first. Only the main process writes.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self._path = Path(path) if path is not None else None
        # Set by the trainer when it resumes: the file's line count when the checkpoint was written (the
        # lines after it, e.g. a finished run's final evaluation and summary, are written again).
        self.keep_lines: int | None = None

    def line_count(self, args) -> int:
        """How many lines the file holds now (0 when there is none)."""
        path = self.path(args)
        if not path.is_file():
            return 0
        with open(path, encoding="utf-8") as fh:
            return sum(1 for _ in fh)

    def path(self, args) -> Path:
        return self._path if self._path is not None else Path(args.output_dir) / METRICS_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = self.path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            return
        kept = []
        if state.global_step > 0 and self.keep_lines is not None:  # resumed: the lines before the checkpoint
            kept = path.read_text(encoding="utf-8").splitlines()[: self.keep_lines]
        elif state.global_step > 0:  # resumed from a checkpoint that does not say: keep its steps
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    step = json.loads(line).get("step", 0)
                except json.JSONDecodeError:
                    continue  # a line cut by the crash that interrupted the run
                if isinstance(step, int) and step <= state.global_step:
                    kept.append(line)
        # A fresh run starts a fresh file; a resumed one drops what came after its checkpoint.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "split": log_split(logs)}
        record.update({k: _json_value(v) for k, v in logs.items()})
        path = self.path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


# Display order and short names of the preference metrics.
_SHORT = (
    ("loss", "loss"),
    ("rewards/accuracies", "acc"),
    ("rewards/margins", "margin"),
    ("rewards/chosen", "chosen"),
    ("rewards/rejected", "rejected"),
    ("kl", "kl"),
    ("reward_shift", "shift"),
    ("accuracy", "acc"),  # personalized heads trained end to end (prefkit.train.end_to_end)
    ("log_likelihood", "loglik"),
    ("active_units", "active units"),
)


def format_log(logs: dict[str, Any], step: int, max_steps: int | None = None) -> str:
    """One readable line for a log event (training, evaluation or the final summary)."""
    split = log_split(logs)
    if split == "summary":
        parts = [f"done: {step} steps"]
        if "train_runtime" in logs:
            parts.append(f"in {logs['train_runtime']:.1f}s")
        if "train_loss" in logs:
            parts.append(f"mean train loss {logs['train_loss']:.4f}")
        return ", ".join(parts)
    prefix = ""
    if split == "eval":
        loss_keys = [k for k in logs if k.startswith("eval") and k.endswith("_loss")]
        prefix = loss_keys[0][: -len("loss")] if loss_keys else "eval_"
    if split == "eval":
        head = f"{prefix.rstrip('_')} @ step {step}"
    else:
        head = f"step {step}" + (f"/{max_steps}" if max_steps else "")
    parts = [head]
    for key, short in _SHORT:
        value = logs.get(prefix + key)
        if isinstance(value, int):
            parts.append(f"{short} {value}")
        elif isinstance(value, float):
            parts.append(f"{short} {value:.4f}" if short != "acc" else f"{short} {value:.2f}")
    components = sorted(k[len(prefix) + len("loss/") :] for k in logs if k.startswith(prefix + "loss/"))
    if len(components) > 1:
        parts.extend(f"{name} {logs[prefix + 'loss/' + name]:.4f}" for name in components)
    if split == "train" and isinstance(logs.get("learning_rate"), (int, float)):
        parts.append(f"lr {logs['learning_rate']:.2e}")
    return "  ".join(parts)


class PreferenceProgressCallback(ProgressCallback):
    """transformers' tqdm progress bar, printing each log event as one compact line
    (loss, reward accuracy, margin, ...) instead of the raw dict. Everything logged is also in
    ``metrics.jsonl``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log(logs, state.global_step, state.max_steps))
