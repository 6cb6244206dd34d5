"""A verifiable reasoning world: chains of digit arithmetic whose answers and steps can be checked.

A problem is a start digit and 2..4 operations, each adding or subtracting a digit modulo 10::

    start 3 add 4 sub 2

and its solution states one step per operation, then the answer::

    3 add 4 is 7 ; 7 sub 2 is 5 ; answer 5

Ground truth (`ArithmeticWorld`):

- the final-answer reward (`ArithmeticWorld.reward`): 1 when the text after ``answer`` is the true result,
  else 0 (a completion without an answer gets 0);
- per-step correctness (`ArithmeticWorld.step_labels`): step ``k`` is correct when it restates the previous
  step's stated result (the start for step 1), the problem's ``k``-th operation and operand, and the right
  value of that operation. A wrong value makes that step wrong; the next step, which starts from the wrong
  value, is locally right, but the chain has left the true path (`ArithmeticWorld.first_error`: the index of
  the first wrong step, ProcessBench's label; -1 when every step is right).

The reference policy (`arithmetic_reference`) is a tiny Llama pre-trained by maximum likelihood on solutions
whose steps are each wrong with a probability (``add_error``, ``sub_error``: the value is then another
digit, uniformly), and whose later steps continue from the wrong value: it learns to solve the problems
imperfectly, mistakes propagate, and its accuracy is well below 1 and well above chance, which is what RL on
the answer reward can improve. It is cached on disk like the preference worlds' reference policies.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prefkit.data.collators import pad_rows
from prefkit.lab.policy import (
    LabPolicy,
    ReferenceSpec,
    _save_atomically,
    build_world_tokenizer,
    default_cache_dir,
    load_lab_policy,
    new_policy,
    pretrain,
)

__all__ = ["ArithmeticWorld", "arithmetic_reference"]

OPS = {"add": lambda a, b: (a + b) % 10, "sub": lambda a, b: (a - b) % 10}
DIGITS = tuple(str(d) for d in range(10))
# Bump when the pre-training recipe changes, so old caches are not reused.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ArithmeticWorld:
    """Digit-arithmetic chains (see the module docstring). ``add_error`` / ``sub_error``: the chance that a
    step of the reference's pre-training data states a wrong value."""

    min_ops: int = 2
    max_ops: int = 4
    add_error: float = 0.1
    sub_error: float = 0.3
    name: str = "arithmetic"

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"expected 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        for key in ("add_error", "sub_error"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key}: expected a probability in [0, 1), got {getattr(self, key)!r}")

    @property
    def vocabulary(self) -> list[str]:
        return [*DIGITS, "start", "add", "sub", "is", ";", "answer"]

    @property
    def max_len(self) -> int:
        """Words of the longest solution: 5 per step, ``;`` between steps, then ``; answer D``."""
        return 5 * self.max_ops + self.max_ops + 2

    # ----- problems and their truth -----

    def sample_problem(self, rng: np.random.Generator) -> str:
        n = int(rng.integers(self.min_ops, self.max_ops + 1))
        words = ["start", str(int(rng.integers(10)))]
        for _ in range(n):
            words += [str(rng.choice(list(OPS))), str(int(rng.integers(10)))]
        return " ".join(words)

    def sample_problems(self, n: int, rng: np.random.Generator) -> list[str]:
        return [self.sample_problem(rng) for _ in range(n)]

    @staticmethod
    def parse_problem(problem: str) -> tuple[int, list[tuple[str, int]]]:
        """``(start, [(op, operand), ...])``; ValueError for a text that is not a problem."""
        words = problem.split()
        if len(words) < 4 or len(words) % 2 or words[0] != "start":
            raise ValueError(f"not an arithmetic problem: {problem!r}")
        try:
            start = int(words[1])
            ops = [(words[i], int(words[i + 1])) for i in range(2, len(words), 2)]
        except ValueError:
            raise ValueError(f"not an arithmetic problem: {problem!r}") from None
        if any(op not in OPS for op, _ in ops):
            raise ValueError(f"not an arithmetic problem: {problem!r}")
        return start, ops

    def answer(self, problem: str) -> int:
        value, ops = self.parse_problem(problem)
        for op, b in ops:
            value = OPS[op](value, b)
        return value

    def solution(self, problem: str, rng: np.random.Generator | None = None) -> str:
        """The correct solution, or with ``rng`` one with the pre-training data's step errors."""
        value, ops = self.parse_problem(problem)
        steps = []
        for op, b in ops:
            result = OPS[op](value, b)
            rate = self.add_error if op == "add" else self.sub_error
            if rng is not None and rng.random() < rate:
                result = int((result + rng.integers(1, 10)) % 10)  # another digit, uniformly
            steps.append(f"{value} {op} {b} is {result}")
            value = result
        return " ; ".join(steps) + f" ; answer {value}"

    # ----- checking completions -----

    @staticmethod
    def stated_answer(completion: str) -> int | None:
        words = completion.split()
        if "answer" not in words:
            return None
        i = words.index("answer")
        return int(words[i + 1]) if i + 1 < len(words) and words[i + 1] in DIGITS else None

    def is_correct(self, problem: str, completion: str) -> bool:
        return self.stated_answer(completion) == self.answer(problem)

    def reward(self, prompts, completions, **fields) -> list[float]:
        """The final-answer reward in prefkit's reward protocol: 1.0 for the true answer, else 0.0."""
        return [float(self.is_correct(p, c)) for p, c in zip(prompts, completions)]

    def step_labels(self, problem: str, completion: str) -> list[bool]:
        """Correctness of each step the completion states (the text before ``answer``, split at ``;``); a
        step that does not parse, or a step beyond the problem's operations, is wrong."""
        value, ops = self.parse_problem(problem)
        body = completion.split("answer")[0]
        labels = []
        for k, step in enumerate(s for s in body.split(";") if s.strip()):
            words = step.split()
            ok = (
                k < len(ops)
                and len(words) == 5
                and words[0] == str(value)
                and words[1] == ops[k][0]
                and words[2] == str(ops[k][1])
                and words[3] == "is"
                and words[4] in DIGITS
            )
            if ok:
                ok = int(words[4]) == OPS[ops[k][0]](value, ops[k][1])
            labels.append(ok)
            value = int(words[4]) if len(words) == 5 and words[4] in DIGITS else value
        return labels

    def first_error(self, problem: str, completion: str) -> int:
        """Index of the first wrong step (ProcessBench's label), -1 when every stated step is right."""
        labels = self.step_labels(problem, completion)
        return labels.index(False) if False in labels else -1


# ----- the reference policy -----


def _cache_key(world: ArithmeticWorld, spec: ReferenceSpec, seed: int) -> str:
    key = {"world": asdict(world), "spec": asdict(spec), "seed": seed, "recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _batch(world: ArithmeticWorld, tokenizer, problems: list[str], rng: np.random.Generator):
    eos = tokenizer.eos_token_id
    prompts = [list(tokenizer(p)["input_ids"]) for p in problems]
    answers = [list(tokenizer(world.solution(p, rng), add_special_tokens=False)["input_ids"]) + [eos] for p in problems]
    return pad_rows(prompts, answers, tokenizer.pad_token_id, None)


def _greedy_accuracy(world: ArithmeticWorld, model, tokenizer, problems: list[str]) -> float:
    from prefkit.online.rollouts import HFRollouts, SamplingSettings

    ids = [list(tokenizer(p)["input_ids"]) for p in problems]
    out = HFRollouts(model, tokenizer, batch_size=512).generate(
        ids, SamplingSettings(n=1, top_k=1, max_new_tokens=world.max_len + 1)
    )
    return float(np.mean([world.is_correct(p, r.text) for p, r in zip(problems, out)]))


ARITHMETIC_SPEC = ReferenceSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, steps=800)


def arithmetic_reference(
    world: ArithmeticWorld | None = None,
    seed: int = 0,
    *,
    spec: ReferenceSpec = ARITHMETIC_SPEC,
    cache_dir=None,
    progress: bool = True,
) -> LabPolicy:
    """The arithmetic world's reference policy: loaded from ``<cache_dir>/arithmetic-<key>`` or pre-trained
    (``spec.steps`` AdamW steps of ``spec.batch_size`` fresh noisy solutions, warm-up then cosine decay) and
    saved there atomically. ``info`` reports the greedy accuracy on 256 fresh problems."""
    world = world or ArithmeticWorld()
    root = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
    folder = None if cache_dir is False else root / f"arithmetic-{_cache_key(world, spec, seed)}"
    if folder is not None and (folder / "lab_reference.json").exists():
        return load_lab_policy(folder)
    start = time.perf_counter()
    tokenizer = build_world_tokenizer(world)
    model = new_policy(tokenizer, spec, seed, max_positions=64)
    rng = np.random.default_rng([seed, 11])
    losses = pretrain(
        model,
        lambda: _batch(world, tokenizer, world.sample_problems(spec.batch_size, rng), rng),
        spec,
        seed,
        "pre-training the arithmetic reference policy",
        progress,
    )
    heldout = world.sample_problems(256, np.random.default_rng([seed, 13]))
    info = {
        "world": world.name,
        "world_settings": asdict(world),
        "seed": seed,
        "spec": asdict(spec),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": spec.steps,
        "final_loss": float(np.mean(losses[-20:])),
        "greedy_accuracy": _greedy_accuracy(world, model, tokenizer, heldout),
        # the share of pre-training solutions with the right answer (what imitation alone would reach)
        "data_accuracy": float(np.mean([world.is_correct(p, world.solution(p, rng)) for p in heldout])),
        "seconds": time.perf_counter() - start,
    }
    if folder is not None:
        _save_atomically(folder, model, tokenizer, info)
    return LabPolicy(model, tokenizer, folder, info)
