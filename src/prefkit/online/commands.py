"""``prefkit train CONFIG.yaml`` for a config with an ``online:`` section (`prefkit.train.online_settings`).

Reads and checks the config before torch loads, loads the prompt records (each row needs a prompt;
other columns are passed to the rewards), the policy (`ModelConfig` keys), the rewards, and trains with
`prefkit.online.trainer.OnlineTrainer`. Leaves in ``output_dir``: ``config.yaml`` (the config as run),
``metrics.jsonl``, ``checkpoint-N/`` folders and the final model and tokenizer. ``--resume`` continues
the run in ``output_dir`` with the saved config; a setting that differs from it is refused, except those
`prefkit.train.resume.MAY_CHANGE` lists.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from prefkit.data.records import DataError
from prefkit.train.settings import ConfigError

__all__ = ["load_prompt_records", "run_online"]


def load_prompt_records(
    path: str, prompt_field: str = "prompt", *, template: str | None = None, chat: bool = False
) -> list[dict[str, Any]]:
    """The rows of ``path`` as prompt records (``prompt`` plus every other column). The prompt is the
    ``prompt_field`` column, or ``template`` filled with the row's fields; ``chat`` makes it a user message.
    A row without a prompt text (or a field the template names) is a `DataError` naming file, row and field."""
    from prefkit.data.loaders import read_rows
    from prefkit.data.validate import TEXT_EXPECTED, surrogate_position

    records = []
    for n, row in read_rows(path):
        if template is not None:
            try:
                prompt = template.format(**row)
            except KeyError as err:
                raise DataError(path, n, str(err.args[0]), "a field that online.prompt_template names", None) from None
            prompt_field = "prompt"
            row = {**row, "prompt": prompt}
        prompt = row.get(prompt_field)
        ok = (isinstance(prompt, str) and prompt.strip()) or (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt)
        )
        if not ok:
            raise DataError(path, n, prompt_field, f"a prompt: {TEXT_EXPECTED}", prompt)
        if isinstance(prompt, str) and surrogate_position(prompt) is not None:
            raise DataError(path, n, prompt_field, "valid Unicode text", "a lone surrogate")
        record = {k: v for k, v in row.items() if k != prompt_field}
        record["prompt"] = [{"role": "user", "content": prompt}] if chat and isinstance(prompt, str) else prompt
        records.append(record)
    if not records:
        raise DataError(path, None, None, "at least one prompt record", "none")
    return records


def _saved_settings(out: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    path = out / "config.yaml"
    if not path.is_file():
        return None
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    online = saved.pop("online", {}) or {}
    return saved, online


def _check_resume(values: dict, online: dict, out: Path, resume, *, need_checkpoint: bool = True) -> None:
    from prefkit.train.resume import MAY_CHANGE, changed_settings

    saved = _saved_settings(out)
    if saved is None:
        raise ConfigError(f"--resume: {out / 'config.yaml'} is missing, so the run to continue is unknown")
    if need_checkpoint and resume is True and not any(p.name.startswith("checkpoint-") for p in out.iterdir()):
        raise ConfigError(f"--resume: output_dir {str(out)!r} holds no checkpoint-* folder to resume from")
    before, now = saved
    differ = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed_settings(before, values).items() if k not in MAY_CHANGE]
    differ += [f"online.{k}: {a!r} -> {b!r}" for k, (a, b) in changed_settings(now, online).items()]
    if differ:
        raise ConfigError(
            f"--resume continues the run saved in {out / 'config.yaml'}, but settings differ from it: "
            f"{'; '.join(differ)}"
        )


def run_online(config_path: str, overrides: Sequence[str], resume=None) -> int:
    """The ``prefkit train`` entry for an ``online:`` config; exit status (2: bad config or data, 1: stopped)."""
    from prefkit.train.online_settings import read_online_settings

    try:
        values, online = read_online_settings(config_path, overrides)
    except ConfigError as err:
        print(f"prefkit train: error: {err}", file=sys.stderr)
        return 2
    from prefkit.online.rewards import RewardError
    from prefkit.train.checkpointing import CheckpointError, TrainingStoppedError

    try:
        if online["rounds"]:
            try:
                _run_iterative(values, online, resume)
            except (ConfigError, DataError, RewardError):
                raise
            except (ValueError, OSError, ImportError) as err:
                message = " ".join(str(err).split())
                raise ConfigError(f"iterative DPO failed ({type(err).__name__}): {message}") from err
            return 0
        try:
            trainer, out = _build(values, online, resume)
        except (ConfigError, DataError, RewardError):
            raise
        except (ValueError, OSError, ImportError) as err:  # a value only transformers or the model loader checks
            raise ConfigError(
                f"building the trainer failed ({type(err).__name__}): {' '.join(str(err).split())}"
            ) from err
        trainer.train(resume_from_checkpoint=resume)
    except (ConfigError, DataError, RewardError, CheckpointError, FileNotFoundError) as err:
        print(f"prefkit train: error: {err}", file=sys.stderr)
        return 2
    except TrainingStoppedError as err:
        print(f"prefkit train: stopped: {err}", file=sys.stderr)
        return 1
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        from prefkit.online.report import write_online_report

        write_online_report(out, trainer.state.log_history, online)
        rows = [h for h in trainer.state.log_history if "reward" in h]
        print(f"\nDone. Output in {out}/")
        print("  report.md      reward, KL and completion length against the step (curves.png)")
        print("  config.yaml    the config as run (prefkit train it to re-run)")
        print("  metrics.jsonl  reward, each reward's mean, KL, completion length per step")
        if rows:
            first, last = rows[0], rows[-1]
            print(
                f"  reward: {first['reward']:.3f} (step {first['step']}) -> {last['reward']:.3f} (step {last['step']})"
            )
    return 0


def _run_iterative(values: dict[str, Any], online: dict[str, Any], resume) -> Path:
    """Iterative DPO (``online.rounds`` > 0): `prefkit.online.iterative.iterative_dpo` from the config; the
    top-level training keys configure every round's offline run."""
    from prefkit.online.iterative import IterativeSettings, iterative_dpo
    from prefkit.online.rollouts import SamplingSettings
    from prefkit.train.config import PreferenceConfig

    m, training = _split(values)
    if m.use_lora:
        raise ConfigError("online.rounds (iterative DPO) trains whole models; LoRA (lora_r) is not supported there")
    out = Path(training.pop("output_dir"))
    if resume:
        _check_resume(values, online, out, resume, need_checkpoint=False)
    elif any(out.glob("round_*")):
        raise ConfigError(
            f"output_dir {str(out)!r} already holds rounds; pass --resume to continue that run or choose another"
        )
    settings = IterativeSettings(
        rounds=online["rounds"],
        sampling=SamplingSettings(
            n=online["num_generations"],
            temperature=online["temperature"],
            top_p=online["top_p"],
            top_k=online["top_k"],
            max_new_tokens=online["max_new_tokens"],
            min_new_tokens=online["min_new_tokens"],
            seed=int(training.get("seed", 42)),
        ),
        pairs=online["pairs"],
        ref_update=online["ref_update"],
        same_prompts=online["same_prompts"],
        max_prompt_length=online["max_prompt_length"],
        momentum=float(online["momentum"]),
    )
    training.update(loss=online["loss"], loss_params=dict(online["loss_params"]))
    PreferenceConfig(**{**training, "output_dir": str(out / "check")})  # every round's settings, checked now
    rewards, judge, records = _rewards(online), _judge(online), _records(online)
    policy, tokenizer = _policy_and_tokenizer(m)
    _save_config(out, values, online)

    def load(path: str):
        from prefkit.models.loading import load_policy

        return load_policy(path, dtype=m.dtype, attn_implementation=m.attn_implementation)

    rounds = iterative_dpo(
        policy,
        tokenizer,
        records,
        settings=settings,
        training=training,
        rewards=rewards,
        judge=judge,
        output_dir=out,
        load_policy=load,
        resume=bool(resume),
    )
    last = out / f"round_{settings.rounds}" / "model"
    print(f"\nDone. Output in {out}/ (the final policy: {last})")
    print("  round_N/pairs.jsonl  each round's pairs (a pairwise file prefkit train reads)")
    print("  rounds.jsonl         per round: mean reward of its samples, pairs, training loss")
    for r in rounds:
        reward, pairs = r.get("reward", float("nan")), r.get("pairs", 0)
        print(f"  round {r['round']}: mean reward of its samples {reward:.4f}, {pairs:.0f} pairs")
    return out


def _split(values: dict[str, Any]):
    """``(ModelConfig, training keys)`` of the config's top-level values."""
    from prefkit.train.config import ModelConfig

    model_keys = {f for f in ModelConfig.__dataclass_fields__}
    m = ModelConfig(**{k: v for k, v in values.items() if k in model_keys})
    training = {k: v for k, v in values.items() if k not in model_keys}
    training.setdefault("output_dir", "runs/online")
    return m, training


def _rewards(online: dict[str, Any]):
    from prefkit.online.rewards import CombinedReward, build_reward

    return CombinedReward(
        [
            (
                f"{item['reward']}"
                if item["reward"] != "callable"
                else str(item.get("function", "callable")).split(":")[-1],
                build_reward(item["reward"], **{k: v for k, v in item.items() if k not in ("reward", "weight")}),
                float(item.get("weight", 1.0)),
            )
            for item in online["rewards"]
        ]
    )


def _judge(online: dict[str, Any]):
    """The pairwise judge ``online.judge`` names, or None."""
    from prefkit.online.preference import build_judge

    if online["judge"] is None:
        return None
    spec = dict(online["judge"])
    try:
        return build_judge(spec.pop("judge"), **spec)
    except ValueError as err:
        raise ConfigError(f"online.judge: {err}") from None


def _records(online: dict[str, Any]) -> list[dict[str, Any]]:
    return load_prompt_records(
        online["prompts_file"], online["prompt_field"], template=online["prompt_template"], chat=online["chat"]
    )


def _policy_and_tokenizer(m):
    from prefkit.models.loading import ensure_pad_token, load_policy, load_tokenizer

    tokenizer = ensure_pad_token(load_tokenizer(m.tokenizer or m.model, trust_remote_code=m.trust_remote_code), m.model)
    policy = load_policy(
        m.model,
        dtype=m.dtype,
        trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation,
        tiny=m.tiny_spec,
        vocab_size=len(tokenizer) if m.model == "tiny" else None,
    )
    return policy, tokenizer


def _save_config(out: Path, values: dict[str, Any], online: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({**values, "online": online}, sort_keys=False, allow_unicode=True)
    (out / "config.yaml").write_text("# prefkit online config as run: `prefkit train THIS_FILE` re-runs it.\n" + text)


def _build(values: dict[str, Any], online: dict[str, Any], resume):
    from prefkit.online.trainer import OnlineArguments, OnlineTrainer

    m, training = _split(values)
    out = Path(training["output_dir"])
    if resume:
        _check_resume(values, online, out, resume)
    elif out.is_dir() and any(p.name.startswith("checkpoint-") for p in out.iterdir()):
        raise ConfigError(
            f"output_dir {str(out)!r} already holds checkpoints; pass --resume to continue that run or choose "
            "another output_dir"
        )
    rewards = _rewards(online)
    records = _records(online)
    from prefkit.losses import get_loss
    from prefkit.online.preference import OnlinePreferenceArguments, OnlinePreferenceTrainer

    args_class, trainer_class, extra = OnlineArguments, OnlineTrainer, {}
    if online["critic"] is not None:  # PPO with a critic
        from prefkit.online.ppo import PPOArguments, PPOTrainer

        args_class, trainer_class = PPOArguments, PPOTrainer
        training.update(dict(online["ppo"]))
        online = {**online, "advantage": "reinforce_baseline"}  # unused: PPO's advantages are GAE
        if online["critic"] == "shared":
            training["shared_critic"] = True
        elif online["critic"] != "policy":
            from prefkit.models.reward import load_reward_model

            extra["critic_from"] = getattr(load_reward_model(online["critic"]), "model", None)
    if get_loss(online["loss"]).kind in ("pairwise", "list"):  # online preference optimisation (online DPO, SPPO)
        args_class, trainer_class = OnlinePreferenceArguments, OnlinePreferenceTrainer
        training.update(pairs=online["pairs"], ref_sync_steps=online["ref_sync_steps"])
        extra["judge"] = _judge(online)
    args = args_class(
        **training,
        loss=online["loss"],
        loss_params=dict(online["loss_params"]),
        advantage=online["advantage"],
        advantage_params=dict(online["advantage_params"]),
        num_generations=online["num_generations"],
        max_new_tokens=online["max_new_tokens"],
        temperature=online["temperature"],
        top_p=online["top_p"],
        top_k=online["top_k"],
        max_prompt_length=online["max_prompt_length"],
        rollout_batch_size=online["rollout_batch_size"],
        dynamic_sampling=online["dynamic_sampling"],
        num_iterations=online["num_iterations"],
        overlong_filtering=online["overlong_filtering"],
        refill_rounds=online["refill_rounds"],
        min_new_tokens=online["min_new_tokens"],
        share_prompt=online["share_prompt"],
        kl_reward_coef=online["kl_reward_coef"],
        kl_reward_estimator=online["kl_reward_estimator"],
        rollout_backend=online["rollout_backend"],
        vllm_gpu_memory_utilization=online["vllm_gpu_memory_utilization"],
        vllm_sleep_mode=online["vllm_sleep_mode"],
    )
    policy, tokenizer = _policy_and_tokenizer(m)
    if args.should_save:
        _save_config(out, values, online)
    if m.use_lora:  # adapters name their base: a built one (tiny) is saved beside them
        from prefkit.train.commands import name_the_base

        name_the_base(policy, tokenizer, str(out), args.should_save)
    trainer = trainer_class(
        policy,
        args,
        train_dataset=records,
        processing_class=tokenizer,
        rewards=rewards,
        peft_config=m.lora_config(),
        **extra,
    )
    return trainer, out
