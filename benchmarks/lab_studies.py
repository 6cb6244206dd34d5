"""Run the lab studies with their default settings (`prefkit.lab.studies`).

    python benchmarks/lab_studies.py                    # all of them
    python benchmarks/lab_studies.py --only noise       # or losses, lists, overopt, pluralism, online, rlhf, budget,
                                                        # process, judge

Each study writes results.md, results.json and PNG plots into benchmarks/results/lab_<study>/ (the same
as `prefkit lab study <study> --output-dir benchmarks/results/lab_<study>`). The reference policy is
pre-trained once (about 12 s) and then loaded from the cache. Studies run one after another; to use
two cores on two studies, start two processes with ``--only``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from prefkit.lab import (
    budget_study,
    judge_study,
    list_study,
    online_study,
    pluralism,
    process_study,
    rlhf_study,
    studies,
)

RESULTS = Path(__file__).resolve().parent / "results"
STUDIES = {
    "losses": studies.loss_comparison,
    "lists": list_study.list_study,
    "noise": studies.noise_study,
    "overopt": studies.overoptimization,
    "pluralism": pluralism.pluralism_study,
    "online": online_study.online_study,
    "rlhf": rlhf_study.rlhf_study,
    "budget": budget_study.budget_study,
    "process": process_study.process_study,
    "judge": judge_study.judge_study,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(STUDIES), action="append", help="run only this study (repeatable)")
    parser.add_argument("--cache-dir", default=None, help="reference policy cache (default: prefkit's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; the models are tiny, and one thread avoids thread contention when the "
        "machine is shared: a short training took 2 s with one thread against 7.5 s with two on a busy 2-core machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    for name in args.only or list(STUDIES):
        start = time.perf_counter()
        STUDIES[name](output_dir=RESULTS / f"lab_{name}", cache_dir=args.cache_dir)
        print(f"{name}: {time.perf_counter() - start:.0f} s\n")


if __name__ == "__main__":
    main()
