"""Best-of-N on GSM8K's published model solutions, checked by an outcome verifier.

    python benchmarks/gsm8k_best_of_n.py --data ../shared/data/gsm8k/example_model_solutions.jsonl
    python benchmarks/gsm8k_best_of_n.py --data ../shared/data/gsm8k/example_model_solutions.jsonl --prm runs/prm_tiny

``example_model_solutions.jsonl`` (openai/grade-school-math) holds, per test question, four solutions written by
6B and 175B models, each marked correct or not. Each solution is graded again by prefkit's outcome verifier (the
``math`` reward: ``math-verify`` on the last number against the reference answer), and the script reports how
often the verifier agrees with the published marks, then the accuracy of the answer picked from the pool by

- ``random`` (best-of-1), ``majority`` (self-consistency over the stated answers), ``oracle`` (pass@N);
- with ``--prm``, a process reward model (its step separator splits a solution into steps: one line each
  when it is a newline; step probabilities aggregated by ``--aggregate``, default min);

for N = 1..4, from the pool of four (`prefkit.online.best_of_n`: unbiased best-of-N, majority vote over random
N-subsets, pass@N). A PRM trained on the lab's arithmetic world (``runs/prm_tiny``) is near chance here: the point
is the path from public solutions to a best-of-N table with a verifier.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load(path: Path, limit: int | None) -> tuple[list[str], list[str], list[list[str]], list[list[bool]]]:
    """``(questions, references, solutions [P][4], published marks [P][4])``."""
    questions, references, solutions, marks = [], [], [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            row = json.loads(line)
            models = sorted(k for k, v in row.items() if isinstance(v, dict) and "solution" in v)
            if not models or "question" not in row or "ground_truth" not in row:
                raise SystemExit(
                    f"{path}:{n}: expected question, ground_truth and model solutions {{solution, is_correct}}"
                )
            questions.append(row["question"])
            references.append(row["ground_truth"])
            solutions.append([row[k]["solution"] for k in models])
            marks.append([bool(row[k]["is_correct"]) for k in models])
            if limit and len(questions) >= limit:
                break
    return questions, references, solutions, marks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="example_model_solutions.jsonl")
    parser.add_argument("--prm", default=None, help="a process reward model folder (prefkit train with prm_bce)")
    parser.add_argument("--aggregate", default="min", help="min, product, last or mean (default: min)")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions only")
    args = parser.parse_args(argv)
    path = Path(args.data)
    if not path.is_file():
        print(f"error: --data: no such file {path}", file=sys.stderr)
        return 2

    from math_verify import parse

    from prefkit.online.best_of_n import best_of_n_expectation, majority_vote_accuracy, pass_at_n
    from prefkit.online.rewards import MathReward

    questions, references, solutions, marks = load(path, args.limit)
    m = len(solutions[0])
    verify = MathReward(reference_field="answer")
    correct = np.array(
        [verify([q] * m, sols, answer=[ref] * m) for q, ref, sols in zip(questions, references, solutions)], dtype=float
    )
    agreement = float(np.mean((correct > 0.5) == np.array(marks)))
    answers = [[str(parse(s.split("A:")[-1])) or None for s in sols] for sols in solutions]
    ns = list(range(1, m + 1))
    rows = {
        "random": [best_of_n_expectation(np.zeros_like(correct), correct, 1)] * len(ns),
        "majority": [majority_vote_accuracy(answers, correct, n) for n in ns],
        "oracle": [pass_at_n(correct, n) for n in ns],
    }
    if args.prm:
        from prefkit.models.loading import load_tokenizer
        from prefkit.models.process import PRMScorer, load_process_reward_model, step_separator
        from prefkit.online.search import prm_scores, split_steps

        model = load_process_reward_model(args.prm)
        separator = step_separator(model)
        splitter = "\n" if "\n" in separator else separator
        scores = prm_scores(
            PRMScorer(model, load_tokenizer(args.prm), batch_size=32),
            questions,
            solutions,
            lambda text: split_steps(text, splitter),
            args.aggregate,
        )
        rows[f"prm ({args.aggregate})"] = [best_of_n_expectation(scores, correct, n) for n in ns]
    print(f"{len(questions)} questions x {m} solutions; verifier agrees with the published marks on {agreement:.3f}")
    print("accuracy of the verified answer picked from N solutions:\n")
    print("| picked by | " + " | ".join(f"N = {n}" for n in ns) + " |")
    print("|---|" + "---|" * len(ns))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
