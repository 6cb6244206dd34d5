"""`OnlineTrainer`: sample from the policy, score the samples, update the policy (the GRPO family).

Every training step takes a batch of prompt records and, for each prompt, draws ``num_generations``
completions from the current policy (`prefkit.online.rollouts.HFRollouts`), scores them with the rewards
(`prefkit.online.rewards.CombinedReward`), turns the rewards into advantages (an estimator of
`prefkit.losses.advantages`, e.g. ``grpo``: group-normalised) and takes a gradient step on a policy loss
of kind ``policy`` (``grpo``, ``dapo``, ``dr_grpo``, ``bnpo``, ``gspo``, ``cispo``). The per-token
log-probs of the policy (and of the frozen reference when the loss's ``beta`` is > 0) come from the
chunked engine (`prefkit.train.logps.completion_logps`), never from ``[B, T, vocab]`` logits.

It runs on the shared `prefkit.train.checkpointing.CheckpointingTrainer` base: atomic checkpoints,
exact resume (the rollouts of step ``k`` are seeded by ``seed`` and ``k``, so a resumed run samples what
the uninterrupted one did), metric windows, the progress line and ``metrics.jsonl``.

With ``num_iterations`` 1 the sampling policy is the policy being trained, so the importance ratios are
1 and the losses' clipping is inactive; with ``num_iterations`` mu > 1 each rollout batch serves mu
optimizer steps (`RepeatWindowSampler` gives its prompts mu times; the rollouts and the sampling policy's
log-probs are kept), so the ratios move and the clipping acts. Rollouts are sampled at ``temperature`` and
scored by the engine at temperature 1 (use temperature 1 for the exact on-policy gradient). With a
``peft_config`` the policy trains LoRA adapters and the KL's reference is the base with the adapters off.
vLLM rollouts are still to come.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from prefkit.data.collators import SHARED_PREFIX_KEYS, pack_shared_rows, pad_rows
from prefkit.data.tokenize import tokenize_prompt
from prefkit.losses import PolicyLogps, get_loss
from prefkit.losses.advantages import get_advantage
from prefkit.losses.combine import resolve_loss_params
from prefkit.losses.policy_gradient import KL_ESTIMATORS, kl_estimate
from prefkit.online.rewards import CombinedReward, RewardError
from prefkit.online.rollouts import HFRollouts, SamplingSettings
from prefkit.train.checkpointing import CheckpointingTrainer, TrainingStoppedError
from prefkit.train.logps import completion_logps, shared_prefix_logps

__all__ = ["OnlineArguments", "OnlineTrainer"]


@dataclass
class OnlineArguments(TrainingArguments):
    """``TrainingArguments`` plus what to sample, how to score and which loss to train.

    ``per_device_train_batch_size`` counts prompts; each gets ``num_generations`` completions.
    """

    loss: str = field(default="grpo", metadata={"help": "A policy-gradient loss (`prefkit losses --kind policy`)."})
    loss_params: dict[str, Any] = field(default_factory=dict, metadata={"help": "The loss's hyper-parameters."})
    advantage: str = field(default="grpo", metadata={"help": "Advantage estimator (prefkit.losses.advantages)."})
    advantage_params: dict[str, Any] = field(default_factory=dict, metadata={"help": "The estimator's parameters."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (G)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest completion, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Cut prompts to their last N tokens."})
    rollout_batch_size: int = field(default=64, metadata={"help": "Sequences per generate call."})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the prompt records are read."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    bad_step_limit: int = field(default=3, metadata={"help": "Stop after N steps in a row with no update."})
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO: leave out of the loss the groups whose rewards are all equal (no signal)."},
    )
    refill_rounds: int = field(
        default=0,
        metadata={
            "help": "DAPO with dynamic_sampling: up to N rounds of sampling more prompts until every group of "
            "the batch has unequal rewards (0: the batch shrinks instead)."
        },
    )
    overlong_filtering: bool = field(
        default=False,
        metadata={"help": "DAPO: leave out of the loss the completions cut by max_new_tokens."},
    )
    min_new_tokens: int = field(
        default=0, metadata={"help": "No end token before this many tokens (benchmarks force equal lengths)."}
    )
    share_prompt: bool = field(
        default=False,
        metadata={
            "help": "Score the G completions of a prompt in one packed row, so the prompt runs once per group "
            "(needs eager or sdpa attention; the same log-probs up to float rounding)."
        },
    )
    kl_reward_coef: float = field(
        default=0.0,
        metadata={
            "help": "KL as a reward term: subtract coef * sum_t KL_t(sampling policy || reference) from each "
            "completion's reward before the advantages (the loss's beta puts it in the loss instead)."
        },
    )
    kl_reward_estimator: str = field(default="k1", metadata={"help": "KL estimator of kl_reward_coef: k1, k2, k3."})
    rollout_backend: str = field(
        default="hf",
        metadata={"help": "hf (transformers generate, CPU or GPU) or vllm (a colocated vllm.LLM, GPU, prefkit[vllm])."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vllm: the share of GPU memory the colocated engine may take."}
    )
    vllm_sleep_mode: bool = field(
        default=False, metadata={"help": "vllm: free the engine's weights and KV cache between generations."}
    )
    num_iterations: int = field(
        default=1,
        metadata={
            "help": "Optimizer steps per rollout batch (GRPO's mu). > 1: the batch's rollouts, rewards and the "
            "sampling policy's log-probs are kept for mu steps, so the importance ratios move and clipping acts."
        },
    )

    # The kinds of loss this trainer's arguments take (`OnlinePreferenceArguments`: pairwise and list).
    LOSS_KINDS: ClassVar[tuple[str, ...]] = ("policy",)

    def __post_init__(self):
        spec = get_loss(self.loss)
        if spec.kind not in self.LOSS_KINDS:
            raise ValueError(
                f"loss {self.loss!r} is of kind {spec.kind!r}; this online trainer takes a "
                f"{' or '.join(self.LOSS_KINDS)} loss"
            )
        resolve_loss_params([self.loss], self.loss_params)
        advantage = get_advantage(self.advantage)
        if advantage.needs_groups and self.num_generations < 2:
            raise ValueError(
                f"advantage {self.advantage!r} compares completions of one prompt: num_generations must be >= 2, "
                f"got {self.num_generations}"
            )
        if isinstance(self.num_iterations, bool) or not isinstance(self.num_iterations, int) or self.num_iterations < 1:
            raise ValueError(f"num_iterations: expected an integer >= 1, got {self.num_iterations!r}")
        if self.num_iterations > 1 and str(getattr(self.save_strategy, "value", self.save_strategy)) == "steps":
            if float(self.save_steps).is_integer() and int(self.save_steps) % self.num_iterations:
                raise ValueError(
                    f"save_steps: expected a multiple of num_iterations ({self.num_iterations}) so that every "
                    f"checkpoint starts a rollout batch, got {self.save_steps}"
                )
        if isinstance(self.refill_rounds, bool) or not isinstance(self.refill_rounds, int) or self.refill_rounds < 0:
            raise ValueError(f"refill_rounds: expected an integer >= 0, got {self.refill_rounds!r}")
        if self.rollout_backend not in ("hf", "vllm"):
            raise ValueError(f"rollout_backend: expected hf or vllm, got {self.rollout_backend!r}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                f"vllm_gpu_memory_utilization: expected a number in (0, 1], got {self.vllm_gpu_memory_utilization!r}"
            )
        if not (isinstance(self.kl_reward_coef, (int, float)) and 0 <= self.kl_reward_coef < math.inf):
            raise ValueError(f"kl_reward_coef: expected a finite number >= 0, got {self.kl_reward_coef!r}")
        if self.kl_reward_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"kl_reward_estimator: expected one of {', '.join(KL_ESTIMATORS)}, got {self.kl_reward_estimator!r}"
            )
        self.sampling  # noqa: B018 - checks the sampling settings now
        super().__post_init__()

    @property
    def sampling(self) -> SamplingSettings:
        """How completions are drawn (seed 0; the trainer sets each step's seed)."""
        return SamplingSettings(
            n=self.num_generations,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
        )


def _collate(items: Sequence[tuple[int, dict]]) -> dict[str, Any]:
    return {"indices": [i for i, _ in items], "records": [r for _, r in items]}


class RepeatWindowSampler(torch.utils.data.Sampler):
    """Shuffled indices (seeded by ``seed`` and the epoch) in windows of ``window`` (one optimizer step's
    prompts), each window given ``repeats`` times in a row: the batches of ``num_iterations`` steps."""

    def __init__(self, n: int, window: int, repeats: int, seed: int):
        self.n, self.window, self.repeats, self.seed, self.epoch = n, window, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n * self.repeats

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        for start in range(0, self.n, self.window):
            chunk = order[start : start + self.window]
            for _ in range(self.repeats):
                yield from chunk


class OnlineTrainer(CheckpointingTrainer):
    """See the module docstring. ``train_dataset``: prompt records (dicts with ``prompt`` and any fields the
    rewards read, e.g. ``answer``); ``rewards``: a `CombinedReward`; ``ref_model``: the frozen reference
    for the loss's KL term (None: a frozen copy of the initial policy, made only when ``beta`` > 0)."""

    def __init__(
        self,
        model,
        args: OnlineArguments,
        *,
        train_dataset: Sequence[dict],
        processing_class,
        rewards: CombinedReward,
        ref_model=None,
        peft_config=None,
        callbacks=None,
    ):
        records = list(train_dataset)
        for i, record in enumerate(records):
            if not isinstance(record, dict) or record.get("prompt") is None:
                raise ValueError(f"prompt record {i + 1}: expected a dict with a 'prompt', got {record!r}")
        self.rewards = rewards
        self.loss_kwargs = resolve_loss_params([args.loss], args.loss_params)[args.loss]
        self.advantage_fn = get_advantage(args.advantage)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        # The reference of a LoRA policy is its base: the adapters switched off (no copy is held).
        self._ref_is_base = peft_config is not None and ref_model is None
        self._needs_ref = self._wants_reference(args)
        if self._needs_ref and ref_model is None and not self._ref_is_base:
            ref_model = copy.deepcopy(model)
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        super().__init__(
            model=model,
            args=args,
            train_dataset=list(enumerate(records)),  # the index seeds the prompt's completions
            data_collator=_collate,
            processing_class=processing_class,
            callbacks=callbacks,
        )

    def _wants_reference(self, args: OnlineArguments) -> bool:
        """Whether log-probs of a reference are needed: the loss's KL term or the KL reward term."""
        return self.loss_kwargs.get("beta", 0.0) > 0 or args.kl_reward_coef > 0

    def _get_train_sampler(self, train_dataset=None):
        if self.args.num_iterations == 1:
            return super()._get_train_sampler(train_dataset)
        window = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return RepeatWindowSampler(len(self.train_dataset), window, self.args.num_iterations, self.args.seed)

    # A step whose every group had equal rewards has no advantage and so no gradient: that is a solved (or
    # hopeless) batch, not a run that stopped learning, so it does not count toward bad_step_limit.
    _signal_in_step = False

    def _watch_gradient(self, grad_norm) -> None:
        self._micro_in_step = 0
        signal, self._signal_in_step = self._signal_in_step, False
        if signal:
            super()._watch_gradient(grad_norm)

    # The records are not tensors: hand them to compute_loss as they are.
    def _prepare_inputs(self, inputs):
        return inputs

    def floating_point_ops(self, inputs) -> int:
        return 0  # the batch holds prompt records, not token ids

    def _rollouts(self, records: list[dict], indices: list[int], seeds: list[int] | None = None):
        """``num_generations`` completions of each record's prompt. Each completion is seeded by the run's seed,
        the step and its prompt's index in the dataset, so it does not depend on the batch it is in, on resume
        or on the number of processes."""
        tok = self.processing_class
        prompt_ids = [tokenize_prompt(r["prompt"], tok, max_prompt_length=self.args.max_prompt_length) for r in records]
        policy = self.accelerator.unwrap_model(self.model)
        settings = dataclasses.replace(self.args.sampling, seed=self.args.seed * 1_000_003 + self.state.global_step)
        if self.args.rollout_backend == "vllm":
            return self._vllm_engine(policy).generate(prompt_ids, settings, prompt_seeds=seeds or indices)
        rollouts = HFRollouts(policy, tok, batch_size=self.args.rollout_batch_size)
        return rollouts.generate(prompt_ids, settings, prompt_seeds=seeds or indices)

    _vllm = None
    _vllm_step = -1

    def _vllm_engine(self, policy):
        """The colocated vLLM engine, built on first use, its weights synced from the policy once per step."""
        from prefkit.online.vllm_rollouts import VLLMRollouts

        if self._vllm is None:
            self._vllm = VLLMRollouts(
                policy,
                self.processing_class,
                gpu_memory_utilization=self.args.vllm_gpu_memory_utilization,
                sleep_mode=self.args.vllm_sleep_mode,
            )
        if self._vllm_step != self.state.global_step:
            self._vllm.sync_weights(policy)
            self._vllm_step = self.state.global_step
        return self._vllm

    def _rewards(self, records: list[dict], rollouts) -> tuple[torch.Tensor, dict[str, float]]:
        """``[N]`` total rewards (NaN where no reward could score the completion) and their metrics."""
        try:
            totals, per_reward = self.rewards.score_rollouts(records, rollouts)
        except RewardError as err:
            first = records[0].get("id", "")
            raise RewardError(f"{err} (step {self.state.global_step + 1}; batch starting at record {first!r})") from err
        rewards = torch.tensor([math.nan if t is None else t for t in totals], dtype=torch.float32)
        scorable = ~torch.isnan(rewards)
        metrics = {"reward": float(torch.nanmean(rewards)) if scorable.any() else math.nan}
        for name, values in per_reward.items():
            scored = [v for v in values if v is not None]
            if scored:
                metrics[f"rewards/{name}"] = sum(scored) / len(scored)
        return rewards, metrics

    def _advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(advantages, filled rewards)`` of this process's ``[N]`` rewards (NaN: unscorable). The estimator sees
        the rewards of every process (gathered), so batch-level estimators use the global batch; an unscorable
        completion takes its group's mean, so it neither moves the baseline nor gets an advantage."""
        g, n = self.args.num_generations, rewards.numel()
        start = 0
        if self.accelerator.num_processes > 1:
            rewards = self.accelerator.gather(rewards.to(self.accelerator.device)).cpu()
            start = self.accelerator.process_index * n
        scorable = ~torch.isnan(rewards)
        groups = torch.where(scorable, rewards, torch.zeros_like(rewards)).view(-1, g)
        group_mean = torch.nan_to_num(torch.nanmean(rewards.view(-1, g), dim=1, keepdim=True))
        filled = torch.where(scorable.view(-1, g), groups, group_mean).view(-1)
        advantages = self.advantage_fn(filled, g, **self.args.advantage_params)
        advantages = torch.where(scorable, advantages, torch.zeros_like(advantages))
        return advantages[start : start + n], filled[start : start + n]

    def _kept(self, rewards: torch.Tensor, rollouts) -> torch.Tensor:
        """Which completions enter the loss: all, less DAPO's equal-reward groups (``dynamic_sampling``) and
        cut completions (``overlong_filtering``). With ``refill_rounds`` the batch was refilled first
        (`_refill`); without, it is smaller."""
        g = self.args.num_generations
        keep = torch.ones(len(rollouts), dtype=torch.bool)
        if self.args.dynamic_sampling:
            groups = rewards.view(-1, g)
            keep &= ~(groups == groups[:, :1]).all(dim=1).repeat_interleave(g)
        if self.args.overlong_filtering:
            keep &= torch.tensor([r.finish_reason != "length" for r in rollouts])
        return keep

    _micro_in_step = 0
    _cache: dict[int, dict[str, Any]] | None = None

    def _rollout_batch(self, records: list[dict], indices: list[int]) -> tuple[dict[str, Any], bool]:
        """``(batch, new)``: this micro-batch's rollouts, rewards and metrics, new on the first step of a rollout
        batch (``new`` True) and the kept ones (with their advantages and the sampling policy's log-probs) on
        its other ``num_iterations - 1`` steps."""
        mu = self.args.num_iterations
        k = self._micro_in_step
        self._micro_in_step += 1
        if mu > 1 and self.state.global_step % mu and self._cache and k in self._cache:
            cached = self._cache[k]
            if cached["indices"] != indices:
                raise RuntimeError("num_iterations: the repeated batch holds other prompts than the rollout batch")
            return cached, False
        rollouts = self._rollouts(records, indices)
        rewards, metrics = self._rewards(records, rollouts)
        if self.args.dynamic_sampling and self.args.refill_rounds > 0:
            rollouts, rewards, rounds = self._refill(records, indices, rollouts, rewards)
            metrics["refill_rounds"] = float(rounds)
        batch = {"indices": indices, "rollouts": rollouts, "rewards": rewards, "metrics": metrics}
        if mu > 1:
            self._cache = {} if k == 0 or self._cache is None else self._cache
            self._cache[k] = batch
        return batch, True

    def _refill(self, records: list[dict], indices: list[int], rollouts, rewards: torch.Tensor):
        """DAPO's dynamic sampling with refill: while fewer than the batch's ``B`` groups have unequal rewards,
        sample ``B`` more prompts of the dataset (seeded by the run's seed, the step, the round and the
        process) and keep their groups that do, for at most ``refill_rounds`` rounds. Returns ``B`` groups
        (groups without signal fill a batch that is still short; `_kept` leaves them out of the loss), their
        rewards and the rounds taken. ``reward`` keeps logging the first sample, the policy on fresh prompts."""
        g, size = self.args.num_generations, len(records)
        spread = rewards.nan_to_num(nan=-math.inf).view(-1, g)
        signal = ~(spread == spread[:, :1]).all(dim=1)
        groups = [(rollouts[u * g : (u + 1) * g], rewards[u * g : (u + 1) * g]) for u in range(size)]
        kept = [groups[u] for u in range(size) if signal[u]]
        spare = [groups[u] for u in range(size) if not signal[u]]
        generator = torch.Generator().manual_seed(
            (self.args.seed * 1_000_003 + self.state.global_step) * 131 + self.accelerator.process_index
        )
        rounds, n = 0, len(self.train_dataset)
        while len(kept) < size and rounds < self.args.refill_rounds:
            rounds += 1
            extra = torch.randint(n, (size,), generator=generator).tolist()
            extra_records = [self.train_dataset[i][1] for i in extra]
            # seed keys beyond the dataset's indices: a prompt drawn again samples afresh
            new = self._rollouts(extra_records, extra, seeds=[i + rounds * n for i in extra])
            new_rewards, _ = self._rewards(extra_records, new)
            spread = new_rewards.nan_to_num(nan=-math.inf).view(-1, g)
            for u in (~(spread == spread[:, :1]).all(dim=1)).nonzero().flatten().tolist():
                kept.append((new[u * g : (u + 1) * g], new_rewards[u * g : (u + 1) * g]))
        chosen = (kept + spare)[:size]
        out_rollouts = [dataclasses.replace(r, prompt_index=u) for u, (unit, _) in enumerate(chosen) for r in unit]
        return out_rollouts, torch.cat([r for _, r in chosen]), rounds

    def _model_inputs(self, rollouts, *, packed: bool | None = None) -> dict[str, torch.Tensor]:
        """The rollouts as model inputs on the device, built once per step for the policy, the reference (and
        PPO's critic): with ``share_prompt`` (or ``packed``) the packed rows of `pack_shared_rows`, each prompt
        once for its ``num_generations`` completions; else `pad_rows`' rows. ``completion_mask`` is the
        ``[N, T]`` layout of ``pad_rows`` either way."""
        pad = self.processing_class.pad_token_id
        pad = self.processing_class.eos_token_id if pad is None else pad
        device = self.accelerator.device
        if self.args.share_prompt if packed is None else packed:
            g = self.args.num_generations
            units = range(len(rollouts) // g)
            rows = pack_shared_rows(
                [rollouts[u * g].prompt_ids for u in units],
                [[r.completion_ids for r in rollouts[u * g : (u + 1) * g]] for u in units],
                [list(range(u * g, (u + 1) * g)) for u in units],
                pad,
                None,
            )
            return {key: rows[key].to(device) for key in SHARED_PREFIX_KEYS}
        rows = pad_rows([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], pad, None)
        return {key: rows[key].to(device) for key in ("input_ids", "attention_mask", "completion_mask")}

    def _logps(self, model, rows: dict[str, torch.Tensor], *, entropy: bool = False, hidden_hook=None):
        """Per-token log-probs (``[N, T]``) of `_model_inputs` rows under ``model``. ``hidden_hook`` (unpacked
        rows only) receives the final hidden states (`completion_logps`)."""
        if "segment_ids" in rows:
            if hidden_hook is not None:
                raise ValueError("share_prompt packs the rows: a value head on the policy needs unpacked rows")
            return shared_prefix_logps(model, **rows, per_token=True, entropy=entropy)
        return completion_logps(model, **rows, per_token=True, entropy=entropy, hidden_hook=hidden_hook)

    def _ref_logps(self, model, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self._ref_is_base:
                with self.accelerator.unwrap_model(model).disable_adapter():
                    return self._logps(model, rows).per_token
            return self._logps(self.ref_model, rows).per_token

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        records, indices = inputs["records"], inputs["indices"]
        batch, new = self._rollout_batch(records, indices)
        rollouts, metrics = batch["rollouts"], dict(batch["metrics"])
        rows = self._model_inputs(rollouts)
        out = self._logps(model, rows, entropy=True)
        mask = rows["completion_mask"].to(out.per_token.dtype)
        ref = self._ref_logps(model, rows) if self._needs_ref else None
        if new:  # the sampling policy is this one: its log-probs, the KL penalty and the advantages are fixed now
            old_logps = out.per_token.detach()
            rewards = batch["rewards"]
            if self.args.kl_reward_coef > 0:
                kl = (kl_estimate(old_logps, ref, self.args.kl_reward_estimator) * mask).sum(1).cpu()
                rewards = rewards - self.args.kl_reward_coef * kl
                metrics["kl_penalty"] = float(kl.mean())
            batch["advantages"], batch["filled"] = self._advantages(rewards)
            batch["old_logps"] = old_logps if self.args.num_iterations > 1 else None
            batch["metrics"] = metrics
        advantages, old_logps = batch["advantages"], batch["old_logps"]
        keep = self._kept(batch["filled"], rollouts)
        metrics["kept"] = float(keep.float().mean())
        self._signal_in_step = self._signal_in_step or bool((advantages[keep] != 0).any())
        metrics["zero_advantage_groups"] = float(
            (advantages.view(-1, self.args.num_generations) == 0).all(dim=1).float().mean()
        )
        metrics["entropy"] = float((out.entropy * mask).sum() / mask.sum().clamp(min=1))
        device = self.accelerator.device
        rows = keep.nonzero().squeeze(1).to(device)
        if rows.numel() == 0:  # nothing left to learn from in this batch: a zero loss that still has a graph
            loss = out.per_token.sum() * 0.0
            self._store_metrics({k: torch.tensor([v]) for k, v in metrics.items() if not math.isnan(v)}, "train")
            return (loss, None) if return_outputs else loss
        policy = PolicyLogps(
            logps=out.per_token[rows],
            old_logps=None if old_logps is None else old_logps.to(device)[rows],
            advantages=advantages.to(device)[rows],
            mask=mask[rows],
            ref_logps=None if ref is None else ref[rows],
            max_completion_length=self.args.max_new_tokens,
        )
        result = get_loss(self.args.loss)(policy, **self.loss_kwargs)
        loss = result.loss.mean()
        if not torch.isfinite(loss.detach()):
            raise TrainingStoppedError(
                f"non-finite {self.args.loss} loss ({loss.item()}) at step {self.state.global_step + 1}"
            )
        lengths = torch.tensor([float(len(r)) for r in rollouts])
        stored = {k: torch.tensor([v]) for k, v in metrics.items() if not math.isnan(v)}
        stored["completion_length"] = lengths
        stored["finished"] = torch.tensor([float(r.finish_reason != "length") for r in rollouts])
        for key, value in result.metrics.items():
            stored[key] = value.detach().float().cpu()
        self._store_metrics(stored, "train")
        return (loss, result) if return_outputs else loss
