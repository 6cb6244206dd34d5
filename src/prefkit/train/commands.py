"""`prefkit train CONFIG.yaml [key=value ...] [--resume [CHECKPOINT]]`.

Reads the config (`prefkit.train.config`), loads the data, tokenizer, policy (and reference /
LoRA), trains with `PreferenceTrainer`, evaluates on the held-out split, and leaves in
``output_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``checkpoint-N/``
folders, the final model and tokenizer, and ``README.md`` (the model card).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefkit.data.records import DataError
from prefkit.train.settings import ConfigError

if TYPE_CHECKING:
    from prefkit.train.config import RunConfig

logger = logging.getLogger("prefkit.train")


@dataclass
class TrainingRun:
    """What `train_from_config` returns."""

    trainer: Any
    output_dir: Path
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float] = field(default_factory=dict)


def split_holdout(records: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle indices with ``seed`` and hold out ``round(fraction * n)`` records (at least 1).

    Record order is kept inside each part. Raises when nothing would be left to train on.
    """
    n = len(records)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise ConfigError(f"eval_fraction={fraction} of {n} records leaves nothing to train on")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    held_out = [r for i, r in enumerate(records) if i in held]
    return train, held_out


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-"))


def _prepare_output_dir(config: RunConfig, resume: str | bool | None) -> Path:
    out = Path(config.train.output_dir)
    existing = _checkpoints(out)
    if resume is True and not existing:
        raise ConfigError(f"--resume: output_dir {str(out)!r} holds no checkpoint-* folder to resume from")
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint folder")
    if existing and not resume:
        if not config.train.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {str(out)!r} already holds checkpoints "
                f"({', '.join(p.name for p in existing[-3:])}). "
                "Pass --resume to continue that run, choose another output_dir (output_dir=...), or set "
                "overwrite_output_dir=true to delete them and start over."
            )
        for path in existing:
            shutil.rmtree(path)
        for stale in ("metrics.jsonl", "history.jsonl"):
            if (out / stale).exists():
                (out / stale).unlink()
        logger.warning("overwrite_output_dir: deleted %d checkpoint(s) and metrics.jsonl in %s", len(existing), out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_run_data(config: RunConfig):
    """``(train_records, eval_records_or_None, description)`` from the data config."""
    from prefkit.data.loaders import load_records

    data = config.data
    if not data.train_file:
        raise ConfigError("train_file is required: the feedback file to train on (see docs/training.md)")
    train = load_records(data.train_file, kind=data.data_kind, column_map=data.column_map, split=data.train_split)
    if not train:
        raise ConfigError(f"train_file {data.train_file!r} holds no records")
    kind = type(train[0]).kind
    if kind != config.train.record_kind:
        raise ConfigError(
            f"train_file {data.train_file!r} holds {kind} records, but loss {config.train.loss} is "
            f"{config.train.loss_kind} and trains on {config.train.record_kind} records; choose a loss for "
            f"{kind} records (`prefkit losses`) or convert the data explicitly (`prefkit data convert`)"
        )
    for strict in ("listmle", "pl_dpo", "pro"):
        if strict in config.train.loss_names and any(_tied(r) for r in train):
            _refuse_tied_lists(data.train_file, data, strict)
    if config.train.curriculum == "margin":
        _refuse_pairs_without_margin(data.train_file, data, train)
    if kind == "pairwise" and any(r.tie for r in train):
        _refuse_ties(data.train_file, data)
    description: dict[str, Any] = {"train_file": data.train_file, "kind": kind}
    held_out = None
    if data.eval_file:
        held_out = load_records(data.eval_file, kind=data.data_kind, column_map=data.column_map, split=data.eval_split)
        description["eval_file"] = data.eval_file
    elif data.eval_fraction:
        train, held_out = split_holdout(train, data.eval_fraction, config.train.seed)
        description["eval"] = (
            f"{len(held_out)} records held out of train_file "
            f"(eval_fraction={data.eval_fraction}, seed={config.train.seed})"
        )
    if data.column_map:
        description["column_map"] = data.column_map
    return train, held_out, description


def _first_row(source: str, data, bad) -> tuple[str, int, dict]:
    """``(file, row number, row)`` of the first row of ``source`` for which ``bad(row)`` holds: the file is read
    again for its row numbers, which records do not keep (only once the loaded records show such a row)."""
    from prefkit.data.loaders import prepare_rows

    prepared = prepare_rows(source, kind=data.data_kind, column_map=data.column_map, split=data.train_split)
    return next((prepared.file, n, row) for n, row in prepared.rows if bad(row))


def _no_margin(pair) -> bool:
    get = pair.get if isinstance(pair, dict) else lambda key: getattr(pair, key)
    return get("margin") is None and (get("chosen_score") is None or get("rejected_score") is None)


def _refuse_pairs_without_margin(source: str, data, train) -> None:
    """``curriculum: margin`` orders the pairs by their margins: name the first row that has none."""
    if not any(_no_margin(r) for r in train):
        return
    file, n, _ = _first_row(source, data, _no_margin)
    raise DataError(
        file,
        n,
        "margin",
        "a margin, or chosen_score and rejected_score (curriculum: margin orders the pairs by it)",
        "neither",
        hint="prefkit data convert --to pairwise --mode best makes such pairs from ranked records with scores",
    )


def _refuse_ties(source: str, data) -> None:
    """A pair labelled a tie carries no preference: name its row."""
    file, n, _ = _first_row(source, data, lambda row: bool(row.get("tie")))
    raise DataError(file, n, "tie", "a preference (a tie carries none to train on; leave ties out)", True)


def _tied(record) -> bool:
    """A ranked record (or row) ordered by scores with two equal scores."""
    get = record.get if isinstance(record, dict) else lambda key: getattr(record, key, None)
    scores = get("scores")
    return get("ranking") is None and isinstance(scores, list) and len(set(scores)) < len(scores)


def _refuse_tied_lists(source: str, data, loss: str) -> None:
    """``loss`` is the Plackett-Luce likelihood of one strict order: a ranked row whose scores tie has
    none, and would stop training at its first batch. Name the first such row."""
    file, n, row = _first_row(source, data, _tied)
    instead = "ranknet accepts ties" if loss == "listmle" else "pairs from `prefkit data convert --to pairwise` do"
    raise DataError(
        file,
        n,
        "scores",
        f"distinct scores: loss {loss} needs one strict order of each list ({instead})",
        row["scores"],
    )


def build_trainer(config: RunConfig, train_records, eval_records=None, *, data_description=None, callbacks=None):
    """Load tokenizer, policy, reference and LoRA from ``config.model`` and build the trainer.

    A reward-model loss (kind reward_pair / reward_list / judge) builds a reward model on
    ``model`` instead (`build_reward_trainer`); no reference model is loaded.
    """
    from prefkit.models.loading import load_policy, load_reference, load_tokenizer
    from prefkit.train.trainer import PreferenceTrainer

    m = config.model
    tokenizer = load_tokenizer(m.tokenizer or m.model, trust_remote_code=m.trust_remote_code)
    if config.train.trains_reward_model:
        return build_reward_trainer(config, tokenizer, train_records, eval_records, data_description, callbacks)
    load_kwargs = _load_kwargs(m)
    policy = load_policy(m.model, vocab_size=len(tokenizer) if m.model == "tiny" else None, **load_kwargs)
    if m.use_lora:
        name_the_base(policy, tokenizer, config.train.output_dir, config.train.should_save)
    ref_model = None
    if m.ref_model is not None:
        if config.train.reference_free:
            raise ConfigError(
                f"ref_model={m.ref_model!r} is set but every selected loss "
                f"({', '.join(config.train.loss)}) is reference-free; remove ref_model"
            )
        ref_model = load_reference(
            m.ref_model, vocab_size=len(tokenizer) if m.ref_model == "tiny" else None, **load_kwargs
        )
    run_info = {"model": m.model, "data": data_description or {}}
    if m.ref_model is not None:
        run_info["reference"] = f"`{m.ref_model}` (frozen)"
    trainer_class = PreferenceTrainer
    if config.train.loss_kind == "list":
        from prefkit.train.list_trainer import ListPreferenceTrainer

        trainer_class = ListPreferenceTrainer
    return trainer_class(
        policy,
        config.train,
        train_dataset=train_records,
        eval_dataset=eval_records,
        processing_class=tokenizer,
        ref_model=ref_model,
        peft_config=m.lora_config(),
        callbacks=callbacks,
        run_info=run_info,
    )


def name_the_base(model, tokenizer, output_dir: str, should_save: bool = True) -> None:
    """LoRA saves only adapters, whose ``adapter_config.json`` names the base model to load them onto
    (``base_model_name_or_path``, read by ``peft.AutoPeftModelForCausalLM``). A base built here (``tiny``)
    has no name: save it to ``output_dir/base_model`` and name that folder, so the adapters load anywhere."""
    if getattr(model, "name_or_path", None):
        return
    folder = (Path(output_dir) / "base_model").resolve()
    if should_save:
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    model.name_or_path = str(folder)
    model.config._name_or_path = str(folder)


def _load_kwargs(m) -> dict[str, Any]:
    """Keyword arguments every model built from ``config.model`` is loaded with."""
    return {
        "dtype": m.dtype,
        "trust_remote_code": m.trust_remote_code,
        "attn_implementation": m.attn_implementation,
        "tiny": m.tiny_spec,
    }


def build_reward_trainer(config: RunConfig, tokenizer, train_records, eval_records, data_description, callbacks):
    """A `RewardTrainer` on a reward model built on ``config.model.model``: a scalar head
    (`build_reward_model`) for reward_pair / reward_list losses, a general preference model
    (`build_gpm`) for judge losses; a `ProcessRewardTrainer` on a per-step head
    (`build_process_reward_model`) for process losses."""
    from prefkit.models.reward import build_reward_model
    from prefkit.train.reward_trainer import RewardTrainer

    m = config.model
    if m.ref_model is not None:
        raise ConfigError(
            f"ref_model={m.ref_model!r} is set, but loss {config.train.loss} trains a reward model, which uses "
            "no reference model; remove ref_model"
        )
    load_kwargs = dict(_load_kwargs(m), vocab_size=len(tokenizer) if m.model == "tiny" else None)
    trainer_class = RewardTrainer
    if config.train.loss_kind == "judge":
        model, head = _build_judge(config, load_kwargs), f"general preference head (2k={m.gpm_embed_dim})"
        peft_config = m.lora_config(task_type=None, head="head")  # LoRA on the backbone, the head trained fully
    elif config.train.loss_kind == "process":
        from prefkit.models.process import build_process_reward_model
        from prefkit.train.process import ProcessRewardTrainer

        model = build_process_reward_model(
            m.model,
            step_separator=config.train.step_separator,
            pad_token_id=tokenizer.pad_token_id,
            seed=config.train.seed,
            **load_kwargs,
        )
        head, trainer_class = "process reward head (a logit per step)", ProcessRewardTrainer
        peft_config = m.lora_config(task_type="TOKEN_CLS")
    else:
        model = build_reward_model(m.model, pad_token_id=tokenizer.pad_token_id, **load_kwargs)
        head = "scalar reward head"
        peft_config = m.lora_config(task_type="SEQ_CLS")
    return trainer_class(
        model,
        config.train,
        train_dataset=train_records,
        eval_dataset=eval_records,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        run_info={"model": f"{m.model} + {head}", "data": data_description or {}},
    )


def _build_judge(config: RunConfig, load_kwargs: dict[str, Any]):
    from prefkit.models.gpm import build_gpm
    from prefkit.models.loading import load_policy

    m = config.model
    backbone = load_policy(m.model, **load_kwargs)
    return build_gpm(
        backbone, embed_dim=m.gpm_embed_dim, prompt_scaled=m.gpm_prompt_scaled, beta=m.gpm_beta, seed=config.train.seed
    )


def train_from_config(config: RunConfig, resume: str | bool | None = None, callbacks=None) -> TrainingRun:
    """Run a whole training job from a `RunConfig` (what `prefkit train` does)."""
    from prefkit.train.config import write_config

    args = config.train
    # Under a multi-process launch (accelerate) the saving process prepares output_dir; the others wait.
    with args.main_process_first(local=args.save_on_each_node, desc="preparing output_dir"):
        if args.should_save:
            write_config(config, _prepare_output_dir(config, resume) / "config.yaml")
    out = Path(args.output_dir)
    train_records, eval_records, description = load_run_data(config)
    try:
        trainer = build_trainer(config, train_records, eval_records, data_description=description, callbacks=callbacks)
    except (ConfigError, DataError):
        raise
    except (ValueError, OSError, ImportError) as err:  # a model, tokenizer or TrainingArguments value refused
        message = " ".join(str(err).split())
        raise ConfigError(f"building the trainer failed ({type(err).__name__}): {message}") from err
    result = trainer.train(resume_from_checkpoint=resume)
    eval_metrics: dict[str, float] = {}
    if eval_records is not None:
        eval_metrics = trainer.evaluate()
    if trainer.loss_kind == "judge" and trainer.is_peft:
        _save_merged_judge(trainer, out)
    else:
        trainer.save_model(str(out))
    trainer.create_model_card()
    return TrainingRun(trainer=trainer, output_dir=out, train_metrics=dict(result.metrics), eval_metrics=eval_metrics)


def _save_merged_judge(trainer, out: Path) -> None:
    """A general preference model trained with LoRA is saved whole, its adapters merged into the backbone
    (its checkpoints hold the adapters and the head), so `load_reward_model` and `prefkit eval rm` read it
    like any other; the adapter files of an earlier save are removed."""
    if not trainer.args.should_save:
        return
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    merged.save_pretrained(str(out))
    trainer.processing_class.save_pretrained(str(out))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Every setting is checked before anything loads: a bad one is one line (KEY: expected ..., got ...) and "
        "exit status 2. TRL's key names (beta, model_name_or_path, dataset_name, ...) are accepted where they mean "
        "a prefkit key (docs/training.md). A run whose gradient is non-finite or zero for bad_step_limit steps in "
        "a row stops with exit status 1."
    )
    parser.add_argument(
        "config",
        help="YAML config: one flat mapping of keys (docs/training.md); with a personalized: section, a "
        "personalized reward head, on frozen embeddings or end_to_end: true with its backbone (docs/personalized.md); "
        "with a process loss (prm_bce), a process reward model on stepwise records (examples/prm_tiny.yaml, "
        "docs/process.md); with a list loss (pl_dpo), a policy on ranked records (pl_dpo_tiny.yaml); "
        "with an online: section, a policy trained on its own samples and rewards: GRPO, DAPO, Dr. GRPO, GSPO, "
        "CISPO (examples/grpo_tiny.yaml); online DPO with any pairwise loss, SPPO (online_dpo_tiny.yaml); "
        "iterative DPO with online.rounds (iterative_dpo_lab.yaml); PPO with online.critic (ppo_tiny.yaml); "
        "docs/online.md",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys; values are YAML scalars (loss=ipo, learning_rate=1e-4, loss_params.beta=1e-1; "
        "online.loss=dapo for a key of the online: section)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT, or from the latest checkpoint in output_dir when no path is given "
        "(personalized end-to-end runs: output_dir/checkpoints). The run continues with its saved config.yaml: "
        "a setting that differs is refused, except max_steps, logging, saving and evaluation, which are recorded "
        "in history.jsonl",
    )


def _end_process_group() -> None:
    """Under a multi-process launch, close the process group once training is done: a gloo group
    left to the interpreter's exit can abort the process ("terminate called without an active
    exception") after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def overrides_and_resume(args: argparse.Namespace) -> tuple[list[str], str | bool | None]:
    """The overrides and ``--resume`` of ``prefkit train``: with ``--resume key=value`` argparse gives the
    override to ``--resume``; it is an override, and ``--resume`` means the latest checkpoint."""
    overrides, resume = list(args.overrides), args.resume
    if isinstance(resume, str) and "=" in resume and not os.path.exists(resume):
        overrides.append(resume)
        resume = True
    return overrides, resume


def run(args: argparse.Namespace) -> int:
    overrides, resume = overrides_and_resume(args)
    from prefkit.train.settings import read_settings

    # Every setting is checked before torch and transformers are imported (a bad one answers at once).
    try:
        read_settings(args.config, overrides)
    except ConfigError as err:
        print(f"prefkit train: error: {err}", file=sys.stderr)
        return 2
    from prefkit.train.checkpointing import CheckpointError, TrainingStoppedError
    from prefkit.train.config import REWARD_KINDS, load_config
    from prefkit.train.resume import resume_config

    try:
        config = load_config(args.config, overrides)
        if resume:
            config = resume_config(config, resume)
        run_ = train_from_config(config, resume=resume)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError) as err:
        print(f"prefkit train: error: {err}", file=sys.stderr)
        return 2
    except TrainingStoppedError as err:
        print(f"prefkit train: stopped: {err}", file=sys.stderr)
        return 1
    _end_process_group()
    if not run_.trainer.is_world_process_zero():
        return 0
    out = run_.output_dir
    acc = run_.eval_metrics.get("eval_rewards/accuracies")
    what = "reward-model" if run_.trainer.loss_kind in REWARD_KINDS else "implicit-reward"
    print(f"\nDone. Output in {out}/")
    print("  config.yaml    the resolved config (prefkit train it to re-run)")
    print("  metrics.jsonl  every logged metric, one JSON line per log event")
    print("  README.md      the model card; the final model and tokenizer are beside it")
    if acc is not None:
        print(f"  held-out {what} accuracy: {acc:.3f}")
    return 0
