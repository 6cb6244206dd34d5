"""Iterative DPO: rounds of generate -> label -> train offline -> replace the policy (RLHF Workflow).

Xiong et al. 2024, "RLHF Workflow: From Reward Modeling to Online RLHF" (arXiv:2405.07863), and
"Iterative Preference Learning from Human Feedback" (Xiong et al., ICML 2024): each round the current
policy samples K completions of that round's prompts, a judge labels them (best against worst by the
rewards' scores, every unequal pair, or a pairwise judge: as `prefkit.online.preference`), and the policy is
trained offline on those pairs with any pairwise loss by `PreferenceTrainer`; the trained policy starts the
next round. The reference of round ``r`` is the policy that started it (``ref_update="previous"``, the
RLHF Workflow recipe) or the initial policy throughout (``"initial"``). With ``momentum`` > 0 each round
ends with Nesterov's extrapolation of Accelerated Preference Optimization (`extrapolate`; APO, He et al. 2024).

Everything a round makes is on disk, so a round can be inspected and rerun alone::

    OUT/round_1/pairs.jsonl    the round's pairs: a normal pairwise JSONL file `prefkit train` reads
                               (prompt, chosen, rejected, plus chosen_score, rejected_score, round, id)
    OUT/round_1/labels.json    the round's sampling figures (mean reward of the samples, prompts, pairs)
    OUT/round_1/train/         the offline run (checkpoints, metrics.jsonl)
    OUT/round_1/model/         the policy after the round
    OUT/round_1/round.json     written last: the round is done (its figures)
    OUT/rounds.jsonl           one line per finished round

Resume (``resume=True``) skips finished rounds, reuses a round's pairs file when it exists, and resumes its
offline training from its last checkpoint: so a run stopped in the middle of a round picks up there.
Sampling is seeded by the run's seed, the round and each prompt's index, so a regenerated round is the
same. The prompts are split into ``rounds`` consecutive parts after a seeded shuffle (fresh prompts each
round, as in RLHF Workflow), or with ``same_prompts`` every round uses all of them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefkit.data.records import PairwiseRecord
from prefkit.data.tokenize import tokenize_prompt
from prefkit.online.preference import PAIRINGS, judged_pairs, pairs_from_scores
from prefkit.online.rewards import CombinedReward
from prefkit.online.rollouts import HFRollouts, SamplingSettings

__all__ = ["IterativeSettings", "extrapolate", "iterative_dpo"]

REF_UPDATES = ("previous", "initial")


@dataclass
class IterativeSettings:
    """How each round samples and labels. ``sampling.n`` is K (>= 2); ``sampling.seed`` the run's seed."""

    rounds: int
    sampling: SamplingSettings
    pairs: str = "best_worst"
    ref_update: str = "previous"
    same_prompts: bool = False
    max_prompt_length: int | None = None
    momentum: float = 0.0

    def __post_init__(self):
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds: expected an integer >= 1, got {self.rounds!r}")
        if self.sampling.n < 2:
            raise ValueError(
                f"num_generations: expected at least 2 completions per prompt to pair, got {self.sampling.n}"
            )
        if self.pairs not in PAIRINGS:
            raise ValueError(f"pairs: expected one of {', '.join(PAIRINGS)}, got {self.pairs!r}")
        if self.ref_update not in REF_UPDATES:
            raise ValueError(f"ref_update: expected one of {', '.join(REF_UPDATES)}, got {self.ref_update!r}")
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < float("inf"):
            raise ValueError(f"momentum: expected a finite number >= 0, got {m!r}")


def _round_prompts(records: list[dict], settings: IterativeSettings) -> list[list[tuple[int, dict]]]:
    indexed = list(enumerate(records))
    if settings.same_prompts:
        return [indexed] * settings.rounds
    order = indexed[:]
    random.Random(settings.sampling.seed).shuffle(order)
    if len(order) < settings.rounds:
        raise ValueError(f"{len(order)} prompts cannot be split into {settings.rounds} rounds; use same_prompts")
    size = len(order) // settings.rounds
    return [order[r * size : (r + 1) * size] for r in range(settings.rounds)]


def _write_jsonl_atomically(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def label_round(
    policy,
    tokenizer,
    prompts: list[tuple[int, dict]],
    settings: IterativeSettings,
    round_number: int,
    rewards: CombinedReward,
    judge: Callable | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """Sample K completions of each prompt and pair them: the round's pairwise rows and its figures."""
    ids = [tokenize_prompt(r["prompt"], tokenizer, max_prompt_length=settings.max_prompt_length) for _, r in prompts]
    sampling = dataclasses.replace(settings.sampling, seed=settings.sampling.seed * 1_000_003 + round_number)
    rollouts = HFRollouts(policy, tokenizer).generate(ids, sampling, prompt_seeds=[i for i, _ in prompts])
    records = [r for _, r in prompts]
    totals, _ = rewards.score_rollouts(records, rollouts)
    scores = torch.tensor([float("nan") if t is None else t for t in totals])
    k = sampling.n
    if judge is not None:
        pairs = judged_pairs(judge, records, rollouts, k, sampling.seed)
    else:
        pairs = pairs_from_scores(scores, k, settings.pairs)
    rows = []
    for c, r, _w in pairs:
        u = rollouts[c].prompt_index
        rows.append(
            {
                "prompt": records[u]["prompt"],
                "chosen": rollouts[c].text,
                "rejected": rollouts[r].text,
                "chosen_score": None if scores[c].isnan() else float(scores[c]),
                "rejected_score": None if scores[r].isnan() else float(scores[r]),
                "round": round_number,
                "id": f"r{round_number}-p{prompts[u][0]}-{c % k}v{r % k}",
            }
        )
    figures = {
        "reward": float(scores.nanmean()) if (~scores.isnan()).any() else float("nan"),
        "prompts": float(len(records)),
        "pairs": float(len(rows)),
    }
    return rows, figures


def _pairs_of(path: Path) -> list[PairwiseRecord]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out.append(PairwiseRecord(prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"], id=row["id"]))
    return out


def iterative_dpo(
    policy,
    tokenizer,
    prompts: Sequence[dict],
    *,
    settings: IterativeSettings,
    training: dict[str, Any],
    rewards: CombinedReward,
    output_dir: str | os.PathLike,
    load_policy: Callable[[str], Any],
    judge: Callable | None = None,
    resume: bool = False,
    say: Callable[..., None] = print,
) -> list[dict[str, Any]]:
    """Run the rounds (module docstring). ``training``: `PreferenceConfig` keyword arguments of every round's
    offline run (``loss``, ``loss_params``, epochs or steps, batch, learning rate ...; ``output_dir`` is set
    per round); ``load_policy(folder)`` loads a saved round's policy. Returns each round's figures."""
    from prefkit.train.config import PreferenceConfig
    from prefkit.train.trainer import PreferenceTrainer

    out = Path(output_dir)
    initial = None
    if settings.ref_update == "initial":
        initial = copy.deepcopy(policy).eval().requires_grad_(False)
    parts = _round_prompts(list(prompts), settings)
    summaries = []
    for r in range(1, settings.rounds + 1):
        folder = out / f"round_{r}"
        done = folder / "round.json"
        if resume and done.is_file():
            summaries.append(json.loads(done.read_text()))
            policy = load_policy(str(folder / "model"))
            say(f"round {r}: done before, loaded {folder / 'model'}")
            continue
        pairs_file = folder / "pairs.jsonl"
        figures: dict[str, Any] = {"round": r}
        labels = folder / "labels.json"
        if resume and pairs_file.is_file() and labels.is_file():
            figures.update(json.loads(labels.read_text()))
            say(f"round {r}: reusing {pairs_file}")
        else:
            rows, figures_now = label_round(policy, tokenizer, parts[r - 1], settings, r, rewards, judge)
            figures.update(figures_now)
            _write_jsonl_atomically(pairs_file, rows)
            labels.write_text(json.dumps(figures_now) + "\n")
            say(
                f"round {r}: {len(rows)} pairs from {int(figures_now['prompts'])} prompts, "
                f"mean reward of the samples {figures_now['reward']:.4f} -> {pairs_file}"
            )
        records = _pairs_of(pairs_file)
        if not records:
            raise ValueError(f"round {r} produced no pairs (every prompt's samples scored alike); see {pairs_file}")
        args = PreferenceConfig(**{**training, "output_dir": str(folder / "train")})
        start = _weights(policy) if settings.momentum else None
        trainer = PreferenceTrainer(policy, args, train_dataset=records, processing_class=tokenizer, ref_model=initial)
        has_checkpoint = any((folder / "train").glob("checkpoint-*"))
        result = trainer.train(resume_from_checkpoint=True if resume and has_checkpoint else None)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if start is not None:
            extrapolate(policy, start, settings.momentum)
            figures["momentum"] = settings.momentum
        trainer.save_model(str(folder / "model"))
        figures.update(
            train_loss=float(result.metrics.get("train_loss", result.training_loss)), pairs_trained=len(records)
        )
        done.write_text(json.dumps(figures) + "\n")
        with open(out / "rounds.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(figures) + "\n")
        summaries.append(figures)
        say(f"round {r}: trained on {len(records)} pairs, loss {figures['train_loss']:.4f} -> {folder / 'model'}")
    return summaries


def _weights(model) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s floating-point weights (what momentum extrapolates from), one entry per tensor: tied
    weights (an input embedding shared with the LM head) appear under two names but must move once."""
    out, seen = {}, set()
    for name, value in model.state_dict().items():
        if value.is_floating_point() and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            out[name] = value.detach().clone()
    return out


@torch.no_grad()
def extrapolate(model, start: dict[str, torch.Tensor], momentum: float) -> None:
    """Nesterov's extrapolation after a round, in place: ``theta <- theta + momentum * (theta - start)``.

    Accelerated Preference Optimization (He, Yuan, Gu 2024, "Accelerated Preference Optimization for Large Language
    Model Alignment", arXiv:2410.06293) views iterative DPO as a proximal point method and adds Nesterov's momentum:
    after round t trains ``pi_hat`` from ``pi_t``, the next policy is ``pi_{t+1} ~ pi_hat (pi_hat / pi_t)^alpha``,
    i.e. ``log pi_{t+1} = (1 + alpha) log pi_hat - alpha log pi_t`` up to normalisation. prefkit extrapolates the
    weights instead, which is the same step where the log-probabilities are linear in the weights (to first order
    in the change of a round) and keeps one model; ``momentum = 0`` is plain iterative DPO."""
    state = model.state_dict()
    for name, before in start.items():
        after = state[name]
        after.add_(after - before.to(after.device, after.dtype), alpha=momentum)
