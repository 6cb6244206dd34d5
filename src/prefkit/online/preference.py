"""`OnlinePreferenceTrainer`: preference optimisation on the policy's own samples (online DPO and family).

Each step samples ``K = num_generations`` completions of every prompt from the current policy (the
rollouts of `OnlineTrainer`), labels them, and updates the policy with **any registered pairwise loss**
(``dpo``: online DPO, Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
arXiv:2402.04792; ``ipo``, ``simpo``, ...) on the labelled pairs, through the chunked log-prob engine.

Labels. A judge turns the K completions of a prompt into pairs ``(chosen, rejected, weight)``:

- from scores (the default): the configured rewards score each completion (a reward model, the lab's true
  reward, a verifier, any callable); ``pairs="best_worst"``: the highest- against the lowest-scored
  completion (weight 1; ties broken by sample order), as in Guo et al. and in RLHF Workflow's rejection
  sampling; ``pairs="all"``: every pair with unequal scores, each weighted ``1 / (number of the prompt's
  pairs)`` so that every prompt counts once. A prompt whose K scores are all equal gives no pair.
- a pairwise judge (Python: ``judge=``), ``judge(prompts, first, second) -> P(first preferred)`` per pair:
  a general preference model, a simulated annotator with its noise; each prompt's completions 1 and 2 are
  compared and the label is drawn from that probability (seeded by the run, the step and the prompt).

The batch loss is ``sum_p w_p loss_p / sum_p w_p`` over the pairs (the registered loss's per-pair values);
under several processes the denominator is every process's weights (so ties, which give a process fewer
pairs, do not reweight it: a 2-process run equals one process, tested).

Reference: the initial policy, frozen (the default), or with ``ref_sync_steps = N`` the policy itself every
N steps (TR-DPO's hard update, Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
Alignment", arXiv:2404.09656). ``save_steps`` must then be a multiple of N, so that every checkpoint is
taken right after a sync and resume rebuilds the reference from the saved policy exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback

from prefkit.data.judge_prompts import round_robin_scores
from prefkit.losses import ListLogps, PairLogps, get_loss
from prefkit.online.trainer import OnlineArguments, OnlineTrainer
from prefkit.train.checkpointing import TrainingStoppedError

__all__ = ["OnlinePreferenceArguments", "OnlinePreferenceTrainer", "build_judge", "judge_names", "pairs_from_scores"]

PAIRINGS = ("best_worst", "all")
# Judges that packages above this one provide (the lab's annotators): entry points, each a factory
# ``(**params) -> judge``; a judge is ``(prompts, first, second) -> [P(first preferred)]``.
JUDGE_ENTRY_POINTS = "prefkit.judges"


def judge_names() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(ep.name for ep in entry_points(group=JUDGE_ENTRY_POINTS))


def build_judge(name: str, **params: Any):
    """The pairwise judge registered as ``name`` (``lab``: a simulated annotator), built with ``params``."""
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=JUDGE_ENTRY_POINTS)}
    if name not in found:
        raise ValueError(f"unknown judge {name!r}; expected one of {', '.join(sorted(found)) or 'none registered'}")
    try:
        return found[name].load()(**params)
    except TypeError as err:
        raise ValueError(f"judge {name!r}: {err}") from err


@dataclass
class OnlinePreferenceArguments(OnlineArguments):
    """`OnlineArguments` with a pairwise loss (default ``dpo``), K = ``num_generations`` (default 2), how
    pairs are formed and how the reference moves."""

    LOSS_KINDS: ClassVar[tuple[str, ...]] = ("pairwise", "list")

    loss: str = field(default="dpo", metadata={"help": "A pairwise loss (`prefkit losses --kind pairwise`)."})
    num_generations: int = field(default=2, metadata={"help": "Completions sampled per prompt (K >= 2)."})
    pairs: str = field(default="best_worst", metadata={"help": "best_worst or all (pairs from the scores)."})
    ref_sync_steps: int = field(
        default=0, metadata={"help": "Every N steps the reference takes the policy's weights (0: frozen, TR-DPO)."}
    )

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations: expected at least 2 completions per prompt to pair, got {self.num_generations}"
            )
        if self.pairs not in PAIRINGS:
            raise ValueError(f"pairs: expected one of {', '.join(PAIRINGS)}, got {self.pairs!r}")
        if isinstance(self.ref_sync_steps, bool) or not isinstance(self.ref_sync_steps, int) or self.ref_sync_steps < 0:
            raise ValueError(f"ref_sync_steps: expected an integer >= 0, got {self.ref_sync_steps!r}")
        super().__post_init__()
        if self.ref_sync_steps and str(getattr(self.save_strategy, "value", self.save_strategy)) == "steps":
            if float(self.save_steps).is_integer() and int(self.save_steps) % self.ref_sync_steps:
                raise ValueError(
                    f"save_steps: expected a multiple of ref_sync_steps ({self.ref_sync_steps}) so that resume "
                    f"rebuilds the moving reference exactly, got {self.save_steps}"
                )


def pairs_from_scores(scores: torch.Tensor, k: int, how: str = "best_worst") -> list[tuple[int, int, float]]:
    """``(chosen row, rejected row, weight)`` from ``[U * K]`` scores (NaN: unscorable, never paired), rows
    prompt-major. ``best_worst``: per prompt, its highest against its lowest score (the first of equal
    ones), when they differ; ``all``: every pair of unequal scores, weight ``1 / its prompt's pairs``."""
    if how not in PAIRINGS:
        raise ValueError(f"pairs: expected one of {', '.join(PAIRINGS)}, got {how!r}")
    out: list[tuple[int, int, float]] = []
    for u, group in enumerate(scores.view(-1, k).tolist()):
        scored = [(v, i) for i, v in enumerate(group) if not math.isnan(v)]
        if len(scored) < 2:
            continue
        if how == "best_worst":
            best = max(scored, key=lambda x: (x[0], -x[1]))
            worst = min(scored, key=lambda x: (x[0], x[1]))
            if best[0] > worst[0]:
                out.append((u * k + best[1], u * k + worst[1], 1.0))
            continue
        mine = [(u * k + i, u * k + j) for vi, i in scored for vj, j in scored if vi > vj]
        out.extend((c, r, 1.0 / len(mine)) for c, r in mine)
    return out


def judged_pairs(judge, records: list[dict], rollouts, k: int, seed: int) -> list[tuple[int, int, float]]:
    """``(chosen row, rejected row, 1.0)`` per prompt: the judge compares each prompt's first two of its ``k``
    samples (rows prompt-major) and the label is drawn from its probability with a generator seeded by
    ``seed``."""
    probs = judge(
        [r["prompt"] for r in records],
        [rollouts[u * k].text for u in range(len(records))],
        [rollouts[u * k + 1].text for u in range(len(records))],
    )
    probs = [float(p) for p in probs]
    if len(probs) != len(records) or any(not 0 <= p <= 1 for p in probs):
        raise ValueError(f"the judge must return one probability in [0, 1] per prompt, got {probs!r}")
    draws = torch.rand(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [(u * k, u * k + 1, 1.0) if draws[u] < p else (u * k + 1, u * k, 1.0) for u, p in enumerate(probs)]


class OnlinePreferenceTrainer(OnlineTrainer):
    """See the module docstring. As `OnlineTrainer`, plus ``judge``: a pairwise judge used instead of the
    rewards' scores (it compares each prompt's first two completions)."""

    def __init__(self, model, args: OnlinePreferenceArguments, *, judge=None, **kwargs):
        if not isinstance(args, OnlinePreferenceArguments):
            raise TypeError("OnlinePreferenceTrainer takes OnlinePreferenceArguments")
        self.spec = get_loss(args.loss)
        self.judge = judge
        if args.ref_sync_steps and (kwargs.get("peft_config") is not None or not self.spec.needs_reference):
            raise ValueError(
                "ref_sync_steps: a moving reference needs a reference model of its own (not LoRA's base, not a "
                f"reference-free loss; loss {args.loss!r})"
            )
        super().__init__(model, args, **kwargs)
        if args.ref_sync_steps:
            shapes = [p.shape for p in self.ref_model.parameters()]
            if shapes != [p.shape for p in self.model.parameters()]:
                raise ValueError(
                    "ref_sync_steps: the reference must have the policy's architecture to take its weights"
                )
            self.add_callback(_SyncReference(self))

    def _wants_reference(self, args) -> bool:
        return get_loss(args.loss).needs_reference

    def _judged_pairs(self, records: list[dict], rollouts) -> list[tuple[int, int, float]]:
        seed = self.args.seed * 1_000_003 + self.state.global_step
        return judged_pairs(self.judge, records, rollouts, self.args.num_generations, seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        records, indices = inputs["records"], inputs["indices"]
        batch, _ = self._rollout_batch(records, indices)
        rollouts, scores, metrics = batch["rollouts"], batch["rewards"], dict(batch["metrics"])
        if self.spec.kind == "list":
            return self._list_loss(model, records, rollouts, scores, metrics, return_outputs)
        if self.judge is not None:
            pairs = self._judged_pairs(records, rollouts)
        else:
            pairs = pairs_from_scores(scores, self.args.num_generations, self.args.pairs)
        rows = self._model_inputs(rollouts)
        out = self._logps(model, rows, entropy=True)
        mask = rows["completion_mask"].to(out.per_token.dtype)
        metrics["pairs"] = float(len(pairs))
        metrics["entropy"] = float((out.entropy * mask).sum() / mask.sum().clamp(min=1))
        self._signal_in_step = self._signal_in_step or bool(pairs)
        # The loss is a weighted mean over the pairs of every process (DDP averages the processes' losses), so
        # a process with fewer pairs (tied samples give none) does not count its pairs more.
        normaliser = float(sum(w for _, _, w in pairs))
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(torch.tensor([normaliser], device=self.accelerator.device)).sum()
            normaliser = float(total) / self.accelerator.num_processes
        if not pairs:  # no prompt gave a pair: a zero loss that keeps the graph
            self._store_metrics({k: torch.tensor([v]) for k, v in metrics.items() if not math.isnan(v)}, "train")
            loss = out.per_token.sum() * 0.0
            return (loss, None) if return_outputs else loss
        device = self.accelerator.device
        chosen = torch.tensor([c for c, _, _ in pairs], device=device)
        rejected = torch.tensor([r for _, r, _ in pairs], device=device)
        weights = torch.tensor([w for _, _, w in pairs], device=device, dtype=out.sum.dtype)
        ref_sums = ref_tokens = None
        if self._needs_ref:
            ref_tokens = self._ref_logps(model, rows)
            ref_sums = (ref_tokens * mask).sum(1)
        pair = PairLogps(
            policy_chosen=out.sum[chosen],
            policy_rejected=out.sum[rejected],
            chosen_len=out.n_tokens[chosen],
            rejected_len=out.n_tokens[rejected],
            ref_chosen=None if ref_sums is None else ref_sums[chosen],
            ref_rejected=None if ref_sums is None else ref_sums[rejected],
        )
        if self.spec.needs_tokens:
            pair.policy_chosen_tokens, pair.policy_rejected_tokens = out.per_token[chosen], out.per_token[rejected]
            pair.chosen_mask, pair.rejected_mask = mask[chosen], mask[rejected]
            if ref_tokens is not None:
                pair.ref_chosen_tokens, pair.ref_rejected_tokens = ref_tokens[chosen], ref_tokens[rejected]
        result = self.spec.fn(pair, **self.loss_kwargs)
        loss = (result.loss * weights).sum() / normaliser
        if not torch.isfinite(loss.detach()):
            raise TrainingStoppedError(
                f"non-finite {self.args.loss} loss ({loss.item()}) at step {self.state.global_step + 1}"
            )
        chosen_scores = scores[chosen.cpu()].nan_to_num()
        rejected_scores = scores[rejected.cpu()].nan_to_num()
        stored: dict[str, torch.Tensor] = {k: torch.tensor([v]) for k, v in metrics.items() if not math.isnan(v)}
        stored["completion_length"] = torch.tensor([float(len(r)) for r in rollouts])
        stored["score_gap"] = (chosen_scores - rejected_scores).float()
        for key, value in result.metrics.items():  # the loss's implicit rewards, apart from the task's rewards/NAME
            stored[key.replace("rewards/", "implicit_rewards/", 1)] = value.detach().float().cpu()
        self._store_metrics(stored, "train")
        return (loss, result) if return_outputs else loss

    def _win_probs(self, records: list[dict], rollouts, scores: torch.Tensor) -> torch.Tensor:
        """``[U, K]``: each sample's mean probability of beating the prompt's other K - 1 samples, from the judge
        (every pair judged once, ``P(j > i) = 1 - P(i > j)``) or from the scores by Bradley-Terry,
        ``P(i > j) = sigmoid(s_i - s_j)`` (unscorable samples count as a coin flip)."""
        k, units = self.args.num_generations, len(records)
        if self.judge is None:
            s = scores.view(units, k)
            prob = torch.sigmoid(s[:, :, None] - s[:, None, :])
            prob = torch.where(torch.isnan(prob), torch.full_like(prob, 0.5), prob)
        else:
            groups = [[rollouts[u * k + i].text for i in range(k)] for u in range(units)]
            prompts = [record["prompt"] for record in records]
            return torch.tensor(round_robin_scores(self.judge, prompts, groups), dtype=torch.float32)
        off_diagonal = 1.0 - torch.eye(k)
        return (prob * off_diagonal).sum(-1) / (k - 1)

    def _list_loss(self, model, records, rollouts, scores, metrics, return_outputs):
        """A list loss (``sppo``) on all K samples of each prompt, ranked by win probability."""
        k, units = self.args.num_generations, len(records)
        rows = self._model_inputs(rollouts)
        out = self._logps(model, rows, entropy=True)
        mask = rows["completion_mask"].to(out.per_token.dtype)
        win = self._win_probs(records, rollouts, scores).to(out.sum.device)
        ref = (self._ref_logps(model, rows) * mask).sum(1) if self._needs_ref else None
        batch = ListLogps(
            policy=out.sum.view(units, k),
            ranking=win.argsort(dim=1, descending=True),
            length=out.n_tokens.view(units, k),
            ref=None if ref is None else ref.view(units, k),
            win_prob=win.to(out.sum.dtype),
        )
        result = self.spec.fn(batch, **self.loss_kwargs)
        loss = result.loss.mean()
        if not torch.isfinite(loss.detach()):
            raise TrainingStoppedError(
                f"non-finite {self.args.loss} loss ({loss.item()}) at step {self.state.global_step + 1}"
            )
        self._signal_in_step = True
        stored = {key: torch.tensor([v]) for key, v in metrics.items() if not math.isnan(v)}
        stored["entropy"] = ((out.entropy * mask).sum() / mask.sum().clamp(min=1)).reshape(1).cpu()
        stored["completion_length"] = torch.tensor([float(len(r)) for r in rollouts])
        for key, value in result.metrics.items():
            stored[key] = value.detach().float().cpu()
        self._store_metrics(stored, "train")
        return (loss, result) if return_outputs else loss


class _SyncReference(TrainerCallback):
    """TR-DPO's hard update: every ``ref_sync_steps`` steps (and when training resumes past a sync) the
    reference takes the policy's weights."""

    def __init__(self, trainer: OnlinePreferenceTrainer):
        self.trainer = trainer

    def _sync(self) -> None:
        t = self.trainer
        policy = t.accelerator.unwrap_model(t.model)
        with torch.no_grad():
            for target, source in zip(t.ref_model.parameters(), policy.parameters()):
                target.copy_(source)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.trainer.args.ref_sync_steps:  # resumed after a sync (save_steps is a multiple)
            self._sync()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.trainer.args.ref_sync_steps == 0:
            self._sync()
