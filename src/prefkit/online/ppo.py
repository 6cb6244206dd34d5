"""`PPOTrainer`: PPO with a critic, as the RLHF papers ran it (Ziegler et al. 2019; Ouyang et al. 2022;
Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO", arXiv:2307.04964).

Each step samples completions (`OnlineTrainer`'s rollouts; ``num_generations`` per prompt, 1 by default),
scores them with the rewards, and builds per-token rewards: the KL penalty ``-kl_reward_coef * KL_t`` to
the reference on every completion token (estimator ``kl_reward_estimator``, k1 by default) plus the score
on the last one. A critic (`prefkit.models.value.ValueModel`, a separate model: a copy of the policy's
backbone with a zero head, or a reward model's backbone and head with ``critic_from``; or with
``shared_critic`` a `SharedValueHead` on the policy's own backbone, trained through the policy's backward
with ``vf_coef`` x the value loss) gives each token's value;
GAE(gamma, lam) gives advantages and returns (`prefkit.losses.value.gae`). The policy takes the
registered policy loss (``dapo`` with a symmetric 0.2 clip range by default: PPO-clip averaged over all
completion tokens) on those per-token advantages; the critic the clipped value loss
(`prefkit.losses.value.value_loss`) with its own AdamW. ``num_iterations`` (PPO epochs) reuses a rollout
batch as `OnlineTrainer` does (old log-probs, old values, advantages and returns kept).

Each piece is switchable, defaults from the paper named:

==========================  ========  ==============================================================
``kl_reward_coef``          0.05      per-token KL penalty in the reward (Ziegler et al.; TRL: 0.05)
``gamma``, ``lam``          1, 0.95   GAE (Ouyang et al.; TRL)
``cliprange_value``         0.2       clipped value loss (Schulman et al. 2017; None: unclipped)
``reward_normalization``    True      scores normalised by their running mean and std (Secrets of RLHF)
``reward_clip``             5.0       normalised scores clipped to +-5 (Secrets of RLHF; 0: off)
``whiten_advantages``       True      advantages whitened over the batch's tokens (Ziegler et al.)
``critic_warmup_steps``     0         steps that train only the critic first (Secrets of RLHF)
``critic_learning_rate``    None      the critic's AdamW learning rate (None: ``learning_rate``)
``shared_critic``           False     a value head on the policy's backbone instead of a separate critic
``vf_coef``                 0.1       the value loss's weight in the shared backward (TRL's vf_coef)
==========================  ========  ==============================================================

Checkpoints carry the critic, its optimizer and the running reward statistics (``critic.pt``), so resume is
exact; the final model folder holds the policy, and ``critic.pt`` beside it the critic. Under several
processes (accelerate) the critic's gradients are averaged over the processes before its step, and the
reward statistics and the advantage whitening use every process's values; with the per-sequence ``grpo``
policy loss a 2-process run equals one process (tested; ``dapo``'s token mean is per process).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from prefkit.losses import PolicyLogps, get_loss
from prefkit.losses.policy_gradient import kl_estimate
from prefkit.losses.value import gae, masked_moments, value_loss, whiten
from prefkit.models.value import SharedValueHead, build_value_model
from prefkit.online.trainer import OnlineArguments, OnlineTrainer
from prefkit.train.checkpointing import TrainingStoppedError

__all__ = ["PPOArguments", "PPOTrainer", "RunningMoments"]

CRITIC_FILE = "critic.pt"


@dataclass
class PPOArguments(OnlineArguments):
    """`OnlineArguments` with PPO's defaults and switches (module docstring)."""

    loss: str = field(default="dapo", metadata={"help": "The policy loss (dapo: PPO-clip, token mean)."})
    loss_params: dict[str, Any] = field(
        default_factory=lambda: {"epsilon_low": 0.2, "epsilon_high": 0.2},
        metadata={"help": "The policy loss's parameters (PPO: a symmetric clip range 0.2)."},
    )
    advantage: str = field(default="reinforce_baseline", metadata={"help": "Unused: PPO's advantages are GAE."})
    num_generations: int = field(default=1, metadata={"help": "Completions per prompt (PPO needs no group)."})
    kl_reward_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty in the reward."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange_value: float | None = field(default=0.2, metadata={"help": "Value clip range (None: unclipped)."})
    reward_normalization: bool = field(default=True, metadata={"help": "Normalise scores by running moments."})
    reward_clip: float = field(default=5.0, metadata={"help": "Clip normalised scores to +-N (0: off)."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over the batch."})
    critic_warmup_steps: int = field(default=0, metadata={"help": "Steps that train only the critic first."})
    critic_learning_rate: float | None = field(default=None, metadata={"help": "Critic lr (None: learning_rate)."})
    shared_critic: bool = field(
        default=False,
        metadata={"help": "A value head on the policy's own backbone (trained by vf_coef x the value loss)."},
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss with a shared critic."})

    def __post_init__(self):
        for key in ("gamma", "lam"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{key}: expected a number in [0, 1], got {value!r}")
        if self.cliprange_value is not None and not self.cliprange_value > 0:
            raise ValueError(f"cliprange_value: expected a number > 0 or None, got {self.cliprange_value!r}")
        if not (isinstance(self.reward_clip, (int, float)) and self.reward_clip >= 0):
            raise ValueError(f"reward_clip: expected a number >= 0 (0: off), got {self.reward_clip!r}")
        if isinstance(self.critic_warmup_steps, bool) or not isinstance(self.critic_warmup_steps, int):
            raise ValueError(f"critic_warmup_steps: expected an integer >= 0, got {self.critic_warmup_steps!r}")
        if self.critic_warmup_steps < 0:
            raise ValueError(f"critic_warmup_steps: expected an integer >= 0, got {self.critic_warmup_steps!r}")
        if not (isinstance(self.vf_coef, (int, float)) and self.vf_coef > 0):
            raise ValueError(f"vf_coef: expected a number > 0, got {self.vf_coef!r}")
        if self.shared_critic and self.share_prompt:
            raise ValueError("shared_critic reads unpacked rows: it cannot be combined with share_prompt")
        if self.critic_learning_rate is not None and not self.critic_learning_rate > 0:
            raise ValueError(f"critic_learning_rate: expected a number > 0, got {self.critic_learning_rate!r}")
        super().__post_init__()


class RunningMoments:
    """Running mean and standard deviation of every value seen (Chan et al.'s parallel update)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.double()
        n = values.numel()
        if n == 0:
            return
        mean, m2 = float(values.mean()), float(((values - values.mean()) ** 2).sum())
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class PPOTrainer(OnlineTrainer):
    """See the module docstring. ``critic``: a `ValueModel` to train (None: built from ``critic_from`` — a
    reward model, already loaded — or from the policy)."""

    def __init__(self, model, args: PPOArguments, *, critic=None, critic_from=None, **kwargs):
        if not isinstance(args, PPOArguments):
            raise TypeError("PPOTrainer takes PPOArguments")
        if kwargs.get("peft_config") is not None:
            raise ValueError("PPO with LoRA is not supported yet: train the whole policy")
        super().__init__(model, args, **kwargs)
        policy = self.accelerator.unwrap_model(self.model)
        if args.shared_critic:
            if critic is not None or critic_from is not None:
                raise ValueError("shared_critic puts a value head on the policy: give no critic or critic_from")
            critic = SharedValueHead(policy.config.get_text_config().hidden_size)
        self.critic = (critic or build_value_model(policy, critic_from)).to(self.args.device)
        self.shared = isinstance(self.critic, SharedValueHead)
        self.critic_optimizer = torch.optim.AdamW(
            self.critic.parameters(), lr=args.critic_learning_rate or args.learning_rate, weight_decay=0.0
        )
        self.score_moments = RunningMoments()

    def _wants_reference(self, args) -> bool:
        return args.kl_reward_coef > 0 or self.loss_kwargs.get("beta", 0.0) > 0

    # ----- the critic's optimizer step, checkpoints and final save -----

    def _watch_gradient(self, grad_norm) -> None:
        if self.accelerator.num_processes > 1:  # the critic is not wrapped: average its gradients as DDP would
            for p in self.critic.parameters():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.args.max_grad_norm)
        self.critic_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)
        super()._watch_gradient(grad_norm)

    def _critic_state(self) -> dict[str, Any]:
        return {
            "critic": self.critic.state_dict(),
            "optimizer": self.critic_optimizer.state_dict(),
            "score_moments": self.score_moments.state(),
        }

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self._critic_state(), os.path.join(output_dir, CRITIC_FILE))

    def _required_checkpoint_files(self) -> list[str]:
        return [*super()._required_checkpoint_files(), CRITIC_FILE]

    def load_prefkit_state(self, checkpoint: str) -> None:
        super().load_prefkit_state(checkpoint)
        state = torch.load(os.path.join(checkpoint, CRITIC_FILE), map_location=self.args.device, weights_only=False)
        self.critic.load_state_dict(state["critic"])
        self.critic_optimizer.load_state_dict(state["optimizer"])
        self.score_moments.load(state["score_moments"])

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            out = output_dir or self.args.output_dir
            torch.save({"critic": self.critic.state_dict()}, os.path.join(out, CRITIC_FILE))

    # ----- one step -----

    def _scores(self, raw: torch.Tensor) -> torch.Tensor:
        """The scores PPO learns from: unscorable ones 0, then normalised and clipped as configured."""
        scores = torch.nan_to_num(raw, nan=0.0)
        if self.args.reward_normalization:  # the statistics of every process's scores
            seen = scores
            if self.accelerator.num_processes > 1:
                seen = self.accelerator.gather(scores.to(self.accelerator.device)).cpu()
            self.score_moments.update(seen)
            scores = (scores - self.score_moments.mean) / max(self.score_moments.std, 1e-8)
        if self.args.reward_clip:
            scores = scores.clamp(-self.args.reward_clip, self.args.reward_clip)
        return scores.float()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        records, indices = inputs["records"], inputs["indices"]
        batch, new = self._rollout_batch(records, indices)
        rollouts, metrics = batch["rollouts"], dict(batch["metrics"])
        device = self.accelerator.device
        rows = self._model_inputs(rollouts)
        # the critic reads unpacked rows: the same ones unless share_prompt packed them for the policy
        plain = rows if "attention_mask" in rows else self._model_inputs(rollouts, packed=False)
        ids, attn, comp = plain["input_ids"], plain["attention_mask"], plain["completion_mask"]
        hidden: dict[str, torch.Tensor] = {}
        hook = (lambda h: hidden.__setitem__("h", h)) if self.shared else None
        out = self._logps(model, rows, entropy=True, hidden_hook=hook)
        mask = comp.to(out.per_token.dtype)
        if self.shared:
            values = self.critic.token_values_from(hidden["h"], comp)
        if new:  # the sampling policy is this one: fix its log-probs, the values, advantages and returns
            if self.shared:
                old_values = values.detach()
            else:
                with torch.no_grad():
                    old_values = self.critic.token_values(ids, attn, comp)
            old_logps = out.per_token.detach()
            token_rewards = torch.zeros_like(old_logps)
            if self.args.kl_reward_coef > 0:
                ref = self._ref_logps(model, rows)
                kl = kl_estimate(old_logps, ref, self.args.kl_reward_estimator) * mask
                token_rewards = token_rewards - self.args.kl_reward_coef * kl
                metrics["kl_penalty"] = float(kl.sum(1).mean())  # as OnlineTrainer's kl_reward_coef logs it
            last = (mask.cumsum(1) * mask).argmax(1)  # the last completion token of each row
            scores = self._scores(batch["rewards"]).to(device)
            token_rewards[torch.arange(len(rollouts), device=device), last] += scores
            advantages, returns = gae(token_rewards, old_values, mask, gamma=self.args.gamma, lam=self.args.lam)
            if self.args.whiten_advantages:  # over every process's completion tokens
                moments = masked_moments(advantages, mask)
                if self.accelerator.num_processes > 1:
                    moments = self.accelerator.reduce(moments, reduction="sum")
                advantages = whiten(advantages, mask, moments=moments)
            batch.update(old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns)
            metrics["score"] = float(scores.mean())
            batch["metrics"] = dict(metrics)  # the later PPO epochs on this batch log the same
        if not self.shared:
            values = self.critic.token_values(ids, attn, comp)
        v_loss = value_loss(values, batch["old_values"], batch["returns"], mask, clip=self.args.cliprange_value)
        if self.accelerator.num_processes > 1:  # a mean over every process's tokens once the gradients are averaged
            tokens = mask.sum().detach().reshape(1)
            everyone = self.accelerator.gather(tokens).sum()
            v_loss = v_loss * tokens[0] * self.accelerator.num_processes / everyone
        if not self.shared:  # the critic's own graph; its optimizer steps with the policy's
            (v_loss / self.args.gradient_accumulation_steps).backward()
        warming_up = self.state.global_step < self.args.critic_warmup_steps
        policy = PolicyLogps(
            logps=out.per_token,
            old_logps=batch["old_logps"],
            advantages=batch["advantages"],
            mask=mask,
            max_completion_length=self.args.max_new_tokens,
        )
        result = get_loss(self.args.loss)(policy, **self.loss_kwargs)
        loss = result.loss.mean() * (0.0 if warming_up else 1.0)
        if self.shared:  # one backward through the shared backbone trains the policy and the value head
            loss = loss + self.args.vf_coef * v_loss
        self._signal_in_step = self._signal_in_step or not warming_up
        if not torch.isfinite(loss.detach()) or not torch.isfinite(v_loss.detach()):
            raise TrainingStoppedError(
                f"non-finite PPO loss (policy {loss.item()}, value {v_loss.item()}) at step "
                f"{self.state.global_step + 1}"
            )
        stored = {k: torch.tensor([v]) for k, v in metrics.items() if not math.isnan(v)}
        stored["value_loss"] = v_loss.detach().reshape(1).cpu()
        stored["values"] = ((values.detach() * mask).sum() / mask.sum()).reshape(1).cpu()
        stored["returns"] = ((batch["returns"] * mask).sum() / mask.sum()).reshape(1).cpu()
        stored["entropy"] = ((out.entropy * mask).sum() / mask.sum().clamp(min=1)).reshape(1).cpu()
        stored["completion_length"] = torch.tensor([float(len(r)) for r in rollouts])
        for key, value in result.metrics.items():
            stored[key] = value.detach().float().cpu()
        self._store_metrics(stored, "train")
        return (loss, result) if return_outputs else loss
