"""The model card (``README.md``) written next to a run's checkpoints.

It says what was trained (model, reference, LoRA), on what (data files and row counts), with
which objective (each loss with its weight, hyper-parameters, formula and citation from the loss
registry), with which training hyper-parameters, and how it ended (final train and eval metrics).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# TrainingArguments shown in the card (the full set is in config.yaml).
CARD_ARGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "optim",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "bf16",
    "fp16",
    "max_length",
    "max_prompt_length",
    "logps_chunk_size",
    "logps_memory_mb",
)


@dataclass
class ModelCardInfo:
    """Everything the card shows. ``losses``: dicts with name, weight, params, formula, citation."""

    model: str
    reference: str
    losses: list[dict[str, Any]]
    hyperparameters: dict[str, Any]
    train_metrics: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    global_step: int | None = None
    prefkit_version: str = ""
    reward_model: bool = False  # a reward model (RewardTrainer) rather than a policy: no reference
    history: list[dict[str, Any]] = field(default_factory=list)  # resumes that changed settings (history.jsonl)


def _fmt(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return _fmt(value.value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    for key, value in rows:
        cell = _fmt(value).replace("|", "\\|")
        lines.append(f"| `{key}` | {cell} |")
    return "\n".join(lines)


def render_model_card(info: ModelCardInfo) -> str:
    names = [loss["name"] for loss in info.losses]
    front = {"library_name": "transformers", "tags": ["prefkit", *names]}
    if "/" in info.model and not Path(info.model).exists():  # a Hub id
        front["base_model"] = info.model
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    title = " + ".join(names)
    out.append(f"# {title} fine-tune of `{info.model}`")
    out.append("")
    out.append(
        f"Trained with prefkit {info.prefkit_version}".rstrip()
        + (f" for {info.global_step} optimizer steps." if info.global_step is not None else ".")
    )
    out.append("")
    out.append("## Model")
    out.append("")
    if info.reward_model:
        out.append(f"- Reward model: `{info.model}`")
    else:
        out.append(f"- Policy: `{info.model}`")
        out.append(f"- Reference: {info.reference}")
    if info.lora:
        out.append(f"- LoRA: {_fmt(info.lora)} (only the adapters are trained and saved)")
    out.append("")
    out.append("## Data")
    out.append("")
    if info.data:
        for key, value in info.data.items():
            out.append(f"- {key}: {_fmt(value)}")
    else:
        out.append("- (given to the trainer in memory)")
    out.append("")
    out.append("## Objective")
    out.append("")
    if len(info.losses) > 1:
        out.append("The trained loss is the weighted sum of:")
        out.append("")
    for loss in info.losses:
        out.append(f"### `{loss['name']}` (weight {_fmt(loss['weight'])})")
        out.append("")
        out.append(f"- Formula: `{loss['formula']}`")
        out.append(f"- Paper: {loss['citation']}")
        out.append(f"- Hyper-parameters: {_fmt(loss['params'])}")
        out.append("")
    out.append("## Training hyper-parameters")
    out.append("")
    out.append(_table(list(info.hyperparameters.items()), ("key", "value")))
    out.append("")
    out.append("All settings are in `config.yaml`; every logged value is in `metrics.jsonl`.")
    out.append("")
    if info.history:
        out.append("## Resumes that changed settings")
        out.append("")
        out.append("The run was resumed with these settings changed (`history.jsonl`):")
        out.append("")
        for entry in info.history:
            changes = ", ".join(f"{k}: {v.get('from')} -> {v.get('to')}" for k, v in entry.get("changed", {}).items())
            out.append(f"- {entry.get('time', '')}: {changes}")
        out.append("")
    out.append("## Final metrics")
    out.append("")
    if not info.train_metrics and not info.eval_metrics:
        out.append("(none logged)")
    if info.train_metrics:
        out.append("Training (last logging window):")
        out.append("")
        out.append(_table(sorted(info.train_metrics.items()), ("metric", "value")))
        out.append("")
    if info.eval_metrics:
        out.append("Evaluation (held-out split, last evaluation):")
        out.append("")
        out.append(_table(sorted(info.eval_metrics.items()), ("metric", "value")))
        out.append("")
    out.append("`rewards/accuracies` is the implicit-reward accuracy: the fraction of pairs whose chosen")
    out.append("completion gets the higher implicit reward.")
    out.append("")
    return "\n".join(out)


def write_model_card(info: ModelCardInfo, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("README.md.tmp")
    tmp.write_text(render_model_card(info), encoding="utf-8")
    tmp.replace(path)
    return path
