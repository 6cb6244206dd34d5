"""``prefkit lab study losses|noise|overopt|pluralism``: the lab studies (`prefkit.lab.studies`, `.pluralism`).

Each study trains and measures in a lab world with a known true reward and writes ``results.md``,
``results.json`` and PNG plots into ``--output-dir`` (default ``runs/lab/<study>``).
"""

from __future__ import annotations

import argparse
import sys

from prefkit.lab.world import PRESETS

# argparse expands "%" in help texts, so the world descriptions' "%" are doubled
WORLDS_HELP = (
    "the lab world: "
    + "; ".join(f"{k}: {v[1]}" for k, v in PRESETS.items()).replace("%", "%%")
    + (" (default: default)")
)

STUDIES = {
    "losses": "every registered pairwise loss on the same world and data over seeds: true-reward gain, KL, win rate, "
    "implicit-reward agreement with the true preferences, wall time",
    "noise": "labels flipped at set rates: dpo against the noise-aware losses (cdpo, robust_dpo, lcpo) at matched KL, "
    "mean ± SE over seeds",
    "overopt": "best-of-N against a proxy reward model learned from few pairs: true and proxy reward against "
    "KL = log N - (N-1)/N (Gao et al. 2023)",
    "online": "GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++ on a verifiable arithmetic world (accuracy against "
    "completions generated, mean ± SE over seeds), and GRPO on a true against a proxy reward (reward against KL)",
    "rlhf": "PPO, GRPO and online DPO trained on a proxy reward model (single, ensemble mean, ensemble min): true "
    "and proxy reward against KL, mean ± SE over seeds",
    "budget": "online against offline preference learning at one label budget: offline DPO, iterative DPO, online "
    "DPO, GRPO; and offline data without the high-reward region (coverage)",
    "process": "process against outcome rewards on verifiable arithmetic: PRM (true and Monte-Carlo labels), ORM, "
    "implicit PRM and majority vote in best-of-N, step-level quality, beam search and MCTS, mean ± SE over seeds",
    "lists": "listwise losses (pl_dpo, pro, lipo) against DPO on pairs cut from the same ranked lists: true-reward "
    "gain, KL, agreement, mean ± SE over seeds",
    "judge": "a generative judge (the reference policy supervised on verdicts) against a reward model trained on "
    "the same annotated pairs: agreement with the true preferences by training-set size, position bias, mean ± SE",
    "pluralism": "user groups of unequal shares: pooled BT against MixtureBT, PAL, VPL, MiCRo per group, for seen "
    "and unseen users; PAL on planted ideal points, a pets task, GPM against BT on cyclic preferences",
}


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _common(parser: argparse.ArgumentParser, study: str) -> None:
    parser.add_argument(
        "--world",
        default="default",
        choices=list(PRESETS),
        help=WORLDS_HELP,
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and its reference policy (default: 0)")
    parser.add_argument(
        "--output-dir", default=f"runs/lab/{study}", help=f"where results go (default: runs/lab/{study})"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where reference policies are cached (default: $PREFKIT_CACHE/lab or ~/.cache/prefkit/lab)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output; the results are still written")


def _training(parser: argparse.ArgumentParser, samples_per_prompt: int) -> None:
    parser.add_argument(
        "--steps", type=int, default=200, help="optimizer steps per run; each sees fresh pairs (default: 200)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step (default: 32)")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="learning rate of every run (default: 5e-4)")
    parser.add_argument(
        "--beta", type=float, default=0.1, help="the shared beta of losses that take DPO's beta (default: 0.1)"
    )
    parser.add_argument(
        "--heldout-pairs",
        type=int,
        default=500,
        help="fresh pairs on which implicit rewards are checked against the true preferences (default: 500)",
    )
    parser.add_argument(
        "--samples-per-prompt",
        type=int,
        default=samples_per_prompt,
        help=f"samples of each prompt for true reward, KL and win rate (default: {samples_per_prompt})",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    studies = parser.add_subparsers(dest="study", metavar="STUDY")
    losses = studies.add_parser("losses", help=STUDIES["losses"], description=STUDIES["losses"])
    _common(losses, "losses")
    losses.add_argument(
        "--losses",
        type=_names,
        default=None,
        help="comma-separated pairwise losses (default: every registered one; `prefkit losses`)",
    )
    losses.add_argument(
        "--seeds", type=_ints, default=[0, 1, 2], help="data and training seeds, one run per loss each (default: 0,1,2)"
    )
    losses.add_argument(
        "--kl-budgets",
        type=_floats,
        default=[],
        help="also compare the losses' true rewards at these KL values (nats), each run evaluated along the way "
        "(default: none)",
    )
    losses.add_argument(
        "--eval-every", type=int, default=10, help="with --kl-budgets: steps between evaluations (default: 10)"
    )
    _training(losses, samples_per_prompt=16)

    noise = studies.add_parser("noise", help=STUDIES["noise"], description=STUDIES["noise"])
    _common(noise, "noise")
    noise.add_argument(
        "--losses",
        type=_names,
        default=["dpo", "cdpo", "robust_dpo", "lcpo"],
        help="comma-separated pairwise losses; noise-aware ones get label_smoothing = the flip rate "
        "(default: dpo,cdpo,robust_dpo,lcpo)",
    )
    noise.add_argument(
        "--rates", type=_floats, default=[0.0, 0.1, 0.2, 0.3], help="flip rates in [0, 0.5) (default: 0,0.1,0.2,0.3)"
    )
    noise.add_argument(
        "--seeds", type=_ints, default=[0, 1, 2], help="data and training seeds, one run each (default: 0,1,2)"
    )
    noise.add_argument(
        "--annotator",
        choices=["argmax", "bt"],
        default="bt",
        help="labels before flipping: bt (Bradley-Terry, temperature 1) or argmax (noise-free, so the flip rate is "
        "all the noise) (default: bt)",
    )
    noise.add_argument(
        "--kl-budgets",
        type=_floats,
        default=[0.5, 1.0, 2.0, 4.0],
        help="KL values (nats) at which the losses' true rewards are compared (default: 0.5,1,2,4)",
    )
    noise.add_argument(
        "--eval-every", type=int, default=10, help="steps between evaluations of each run's path (default: 10)"
    )
    _training(noise, samples_per_prompt=8)

    overopt = studies.add_parser("overopt", help=STUDIES["overopt"], description=STUDIES["overopt"])
    _common(overopt, "overopt")
    overopt.add_argument(
        "--proxy-pairs", type=int, default=300, help="pairs the proxy reward model learns from (default: 300)"
    )
    overopt.add_argument(
        "--proxy-steps", type=int, default=100, help="training steps of 32 pairs for the proxy (default: 100)"
    )
    overopt.add_argument("--pool", type=int, default=512, help="reference samples per prompt (default: 512)")
    overopt.add_argument("--n-max", type=int, default=256, help="largest N, a power of 2 <= --pool (default: 256)")
    overopt.add_argument(
        "--heldout-pairs", type=int, default=500, help="fresh pairs to measure the proxy on (default: 500)"
    )
    _pluralism(studies.add_parser("pluralism", help=STUDIES["pluralism"], description=STUDIES["pluralism"]))
    _online(studies.add_parser("online", help=STUDIES["online"], description=STUDIES["online"]))
    _rlhf(studies.add_parser("rlhf", help=STUDIES["rlhf"], description=STUDIES["rlhf"]))
    _budget(studies.add_parser("budget", help=STUDIES["budget"], description=STUDIES["budget"]))
    _process(studies.add_parser("process", help=STUDIES["process"], description=STUDIES["process"]))
    _lists(studies.add_parser("lists", help=STUDIES["lists"], description=STUDIES["lists"]))
    _judge(studies.add_parser("judge", help=STUDIES["judge"], description=STUDIES["judge"]))


def _judge(parser: argparse.ArgumentParser) -> None:
    _common(parser, "judge")
    parser.add_argument(
        "--sizes", type=_ints, default=[250, 1000, 4000], help="training pairs per run (default: 250,1000,4000)"
    )
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="one run per seed and size (default: 0,1,2)")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training data (default: 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="learning rate of both (default: 1e-3)")


def _lists(parser: argparse.ArgumentParser) -> None:
    from prefkit.lab.list_study import METHODS

    _common(parser, "lists")
    parser.add_argument("--methods", type=_names, default=list(METHODS), help=f"default: {','.join(METHODS)}")
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="one run per seed and method (default: 0,1,2)")
    parser.add_argument("--k", type=int, default=4, help="responses per ranked list (default: 4)")
    parser.add_argument("--lists-per-step", type=int, default=8, help="lists per optimizer step (default: 8)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default: 200)")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="learning rate of every run (default: 5e-4)")
    parser.add_argument("--beta", type=float, default=0.1, help="the shared beta (default: 0.1)")


def _process(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="one run per seed (default: 0,1,2)")
    parser.add_argument("--train-problems", type=int, default=2048, help="training problems (default: 2048)")
    parser.add_argument("--samples", type=int, default=4, help="training solutions per problem (default: 4)")
    parser.add_argument("--test-problems", type=int, default=128, help="test problems (default: 128)")
    parser.add_argument("--pool", type=int, default=16, help="test solutions per problem, the largest N (default: 16)")
    parser.add_argument("--mc-rollouts", type=int, default=4, help="Monte-Carlo rollouts per prefix (default: 4)")
    parser.add_argument(
        "--rm-steps", type=int, default=3000, help="training steps of 32 solutions per reward model (default: 3000)"
    )
    parser.add_argument(
        "--search-problems", type=int, default=64, help="problems for beam search and MCTS (default: 64)"
    )
    parser.add_argument("--output-dir", default="runs/lab/process", help="where results go (default: runs/lab/process)")
    parser.add_argument("--cache-dir", default=None, help="where reference policies are cached")
    parser.add_argument("--quiet", action="store_true", help="no progress output; the results are still written")


def _budget(parser: argparse.ArgumentParser) -> None:
    from prefkit.lab.budget_study import METHODS

    parser.add_argument("--methods", type=_names, default=list(METHODS), help=f"default: {','.join(METHODS)}")
    parser.add_argument("--budget", type=int, default=384, help="annotator calls per method (default: 384)")
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="one run per seed (default: 0,1,2)")
    parser.add_argument("--no-coverage", action="store_true", help="skip the coverage case")
    parser.add_argument("--output-dir", default="runs/lab/budget", help="where results go (default: runs/lab/budget)")
    parser.add_argument("--cache-dir", default=None, help="where reference policies are cached")
    parser.add_argument("--quiet", action="store_true", help="no progress output; the results are still written")


def _rlhf(parser: argparse.ArgumentParser) -> None:
    from prefkit.lab.rlhf_study import METHODS, PROXIES

    parser.add_argument("--methods", type=_names, default=list(METHODS), help=f"default: {','.join(METHODS)}")
    parser.add_argument("--proxies", type=_names, default=list(PROXIES), help=f"default: {','.join(PROXIES)}")
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="one run per seed (default: 0,1,2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: 40)")
    parser.add_argument("--output-dir", default="runs/lab/rlhf", help="where results go (default: runs/lab/rlhf)")
    parser.add_argument("--cache-dir", default=None, help="where reference policies are cached")
    parser.add_argument("--quiet", action="store_true", help="no progress output; the results are still written")


def _online(parser: argparse.ArgumentParser) -> None:
    from prefkit.lab.online_study import METHODS

    parser.add_argument(
        "--methods",
        type=_names,
        default=list(METHODS),
        help=f"comma-separated methods (default: {','.join(METHODS)})",
    )
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="one run per seed and method (default: 0,1,2)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: 60)")
    parser.add_argument("--prompts", type=int, default=8, help="problems per step (default: 8)")
    parser.add_argument("--generations", type=int, default=8, help="completions per problem, G (default: 8)")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-4,
        help="learning rate of the arithmetic runs (default: 1e-4; at 3e-4 and above AdamW's steps on sparse "
        "rewards wreck the small reference's copying and accuracy falls)",
    )
    parser.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps (default: 10)")
    parser.add_argument(
        "--no-overopt", action="store_true", help="skip the true-against-proxy reward part on the default world"
    )
    parser.add_argument("--output-dir", default="runs/lab/online", help="where results go (default: runs/lab/online)")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where reference policies are cached (default: $PREFKIT_CACHE/lab or ~/.cache/prefkit/lab)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output; the results are still written")


def _pluralism(parser: argparse.ArgumentParser) -> None:
    from prefkit.lab.pluralism import SECTIONS

    _common(parser, "pluralism")
    parser.set_defaults(world="groups")
    parser.add_argument(
        "--shares",
        type=_floats,
        default=[0.8, 0.2],
        help="the world's group shares, in its group order; an empty string keeps the preset's (default: 0.8,0.2)",
    )
    parser.add_argument(
        "--sections",
        type=_names,
        default=list(SECTIONS),
        help=f"comma-separated sections (default: {','.join(SECTIONS)})",
    )
    parser.add_argument("--users", type=int, default=50, help="users of the groups section, all groups (default: 50)")
    parser.add_argument("--train-pairs", type=int, default=100, help="training pairs per user (default: 100)")
    parser.add_argument("--test-pairs", type=int, default=50, help="held-out pairs per user (default: 50)")
    parser.add_argument(
        "--temperature", type=float, default=0.5, help="Bradley-Terry temperature of the annotators (default: 0.5)"
    )
    parser.add_argument(
        "--backbone-layers",
        type=int,
        default=0,
        help="transformer layers of the reference kept for the embeddings (default: 0, the token embeddings)",
    )


def _problem(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, or None."""
    from prefkit.losses import get_loss

    for name in getattr(args, "losses", None) or []:
        try:
            kind = get_loss(name).kind
        except KeyError as err:
            return str(err.args[0])
        if kind != "pairwise":
            return f"loss {name!r} is {kind}; the studies train on pairs and need pairwise losses"
    for name in (
        "steps",
        "batch_size",
        "heldout_pairs",
        "samples_per_prompt",
        "proxy_pairs",
        "proxy_steps",
        "pool",
        "n_max",
        "users",
        "train_pairs",
        "test_pairs",
        "prompts",
        "eval_every",
    ):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {value}"
    if args.study == "noise" and (not args.rates or any(not 0 <= r < 0.5 for r in args.rates)):
        return f"--rates must be one or more flip rates in [0, 0.5), got {args.rates}"
    if args.study in ("noise", "losses") and not args.seeds:
        return "--seeds must name at least one seed"
    if args.study == "online":
        from prefkit.lab.online_study import METHODS

        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            return f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}"
        if args.generations < 2:
            return f"--generations must be at least 2 (group advantages), got {args.generations}"
        if not args.seeds:
            return "--seeds must name at least one seed"
    if args.study == "overopt" and args.n_max > args.pool:
        return f"--n-max ({args.n_max}) must be <= --pool ({args.pool})"
    return None


def run(args: argparse.Namespace) -> int:
    from prefkit.lab import studies

    if args.study is None:
        print(
            "prefkit lab study: error: name a study: " + ", ".join(STUDIES) + " (prefkit lab study -h)", file=sys.stderr
        )
        return 2
    problem = _problem(args)
    if problem:
        print(f"prefkit lab study {args.study}: error: {problem}", file=sys.stderr)
        return 2
    if args.study == "judge":
        from prefkit.lab.judge_study import judge_study

        try:
            judge_study(
                args.world,
                args.sizes,
                args.seeds,
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                seed=args.seed,
                output_dir=args.output_dir,
                cache_dir=args.cache_dir,
                progress=not args.quiet,
            )
        except ValueError as err:
            print(f"prefkit lab study judge: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.study == "lists":
        from prefkit.lab.list_study import list_study

        try:
            list_study(
                args.world,
                args.methods,
                args.seeds,
                k=args.k,
                lists_per_step=args.lists_per_step,
                steps=args.steps,
                learning_rate=args.learning_rate,
                beta=args.beta,
                seed=args.seed,
                output_dir=args.output_dir,
                cache_dir=args.cache_dir,
                progress=not args.quiet,
            )
        except ValueError as err:
            print(f"prefkit lab study lists: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.study == "process":
        from prefkit.lab.process_study import process_study

        try:
            process_study(
                seeds=args.seeds,
                train_problems=args.train_problems,
                samples=args.samples,
                test_problems=args.test_problems,
                pool=args.pool,
                mc_rollouts=args.mc_rollouts,
                rm_steps=args.rm_steps,
                search_problems=args.search_problems,
                output_dir=args.output_dir,
                cache_dir=args.cache_dir,
                progress=not args.quiet,
            )
        except ValueError as err:
            print(f"prefkit lab study process: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.study == "budget":
        from prefkit.lab.budget_study import budget_study

        try:
            budget_study(
                methods=args.methods,
                budget=args.budget,
                seeds=args.seeds,
                coverage=(False,) if args.no_coverage else (False, True),
                output_dir=args.output_dir,
                cache_dir=args.cache_dir,
                progress=not args.quiet,
            )
        except ValueError as err:
            print(f"prefkit lab study budget: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.study == "rlhf":
        from prefkit.lab.rlhf_study import rlhf_study

        try:
            rlhf_study(
                methods=args.methods,
                proxies=args.proxies,
                seeds=args.seeds,
                steps=args.steps,
                output_dir=args.output_dir,
                cache_dir=args.cache_dir,
                progress=not args.quiet,
            )
        except ValueError as err:
            print(f"prefkit lab study rlhf: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.study == "online":
        from prefkit.lab.online_study import online_study

        online_study(
            methods=args.methods,
            seeds=args.seeds,
            steps=args.steps,
            prompts=args.prompts,
            generations=args.generations,
            learning_rate=args.learning_rate,
            eval_every=args.eval_every,
            overopt=not args.no_overopt,
            output_dir=args.output_dir,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
        )
        return 0
    common = dict(seed=args.seed, output_dir=args.output_dir, cache_dir=args.cache_dir, progress=not args.quiet)
    if args.study == "pluralism":
        return _run_pluralism(args, common)
    if args.study == "overopt":
        studies.overoptimization(
            args.world,
            proxy_pairs=args.proxy_pairs,
            proxy_steps=args.proxy_steps,
            pool=args.pool,
            n_max=args.n_max,
            heldout_pairs=args.heldout_pairs,
            **common,
        )
        return 0
    training = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        beta=args.beta,
        heldout_pairs=args.heldout_pairs,
        samples_per_prompt=args.samples_per_prompt,
    )
    if args.study == "losses":
        studies.loss_comparison(
            args.world,
            args.losses,
            seeds=args.seeds,
            kl_budgets=args.kl_budgets,
            eval_every=args.eval_every,
            **training,
            **common,
        )
    else:
        studies.noise_study(
            args.world,
            args.rates,
            args.losses,
            args.seeds,
            annotator=args.annotator,
            kl_budgets=args.kl_budgets,
            eval_every=args.eval_every,
            **training,
            **common,
        )
    return 0


def _run_pluralism(args: argparse.Namespace, common: dict) -> int:
    from prefkit.lab.pluralism import pluralism_study

    try:
        pluralism_study(
            args.world,
            shares=args.shares or None,
            sections=args.sections,
            users=args.users,
            train_pairs=args.train_pairs,
            test_pairs=args.test_pairs,
            temperature=args.temperature,
            backbone_layers=args.backbone_layers,
            **common,
        )
    except ValueError as err:
        print(f"prefkit lab study pluralism: error: {err}", file=sys.stderr)
        return 2
    return 0
