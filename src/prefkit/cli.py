"""`prefkit` command line.

Each subcommand lives in the package it belongs to, as a module with two functions:
``configure(parser)`` adds its arguments and ``run(args) -> int`` does the work and returns the
exit code. This file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command words, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (
        ("demo",),
        "prefkit.lab.demo",
        "DPO and a reward model in a lab world with a known true reward, end to end (no download)",
    ),
    (
        ("train",),
        "prefkit.train.commands",
        "train from a YAML config (preference, listwise, reward, process reward, personalized or online): "
        "prefkit train CONFIG key=value ...",
    ),
    (
        ("losses",),
        "prefkit.losses.commands",
        "list every registered loss (policy-gradient ones included) with formula, citation and parameter ranges",
    ),
    (("data", "validate"), "prefkit.data.commands_validate", "report every bad row of a feedback file"),
    (("data", "stats"), "prefkit.data.commands_stats", "counts and token-length percentiles of a file"),
    (("data", "convert"), "prefkit.data.commands_convert", "convert between feedback kinds and formats"),
    (("data", "recipe"), "prefkit.data.commands_recipe", "build a set from public data by a recipe (hh-two-groups)"),
    (("eval", "rm"), "prefkit.eval.commands", "evaluate a reward model: accuracy, best-of-N, calibration, length bias"),
    (("eval", "prm"), "prefkit.eval.process", "evaluate a process reward model: ProcessBench, PRMBench, step AUROC"),
    (
        ("eval", "judge"),
        "prefkit.eval.judge_commands",
        "a causal LM as a pairwise judge: accuracy, position bias, consistency, self-preference (verdicts from "
        "label log-probs or parsed from its text)",
    ),
    (
        ("lab", "study"),
        "prefkit.lab.commands",
        "lab studies against a known true reward: losses, lists, noise, overopt, pluralism, online, rlhf, budget, "
        "process, judge",
    ),
    (("lab", "draw"), "prefkit.lab.commands_draw", "save a dataset drawn from a lab world by simulated annotators"),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``prefkit`` parser. With ``argv``, only the command it names is configured (its module, and
    with it torch and transformers, is imported); the others are listed by name and help text only, so
    ``prefkit --help`` and ``prefkit data ...`` start fast. Without ``argv``, every command is configured."""
    from prefkit import __version__

    parser = argparse.ArgumentParser(
        prog="prefkit",
        description="Learn from preferences: feedback data, preference losses, trainers, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"prefkit {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module_name, help_text in COMMANDS:
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in groups:
                group_parser = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            sub = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        if argv is None or tuple(argv[: len(words)]) == words:
            module = importlib.import_module(module_name)
            module.configure(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    if args.command == "train":
        from prefkit.train.commands import overrides_and_resume
        from prefkit.train.online_settings import is_online_config
        from prefkit.train.settings import is_personalized_config

        if is_online_config(args.config):
            # An `online:` config samples from the policy and trains on rewards (prefkit.online, above the
            # trainers); its settings are checked before torch is imported.
            from prefkit.train.online_settings import read_online_settings
            from prefkit.train.settings import ConfigError

            overrides, resume = overrides_and_resume(args)
            try:
                read_online_settings(args.config, overrides)
            except ConfigError as err:
                print(f"prefkit train: error: {err}", file=sys.stderr)
                return 2
            from prefkit.online.commands import run_online

            return run_online(args.config, overrides, resume)
        if is_personalized_config(args.config):
            # A `personalized:` config trains a head and then evaluates it per user and group
            # (prefkit.eval.personalized, above the trainers).
            from prefkit.eval.personalized import run_personalized

            overrides, resume = overrides_and_resume(args)
            return run_personalized(args.config, overrides, resume)
    return int(args._run(args) or 0)


def _entry() -> int:
    """The console script: ``main`` with a closed pipe (``prefkit losses | head``) ending quietly."""
    try:
        return main()
    except BrokenPipeError:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 0


if __name__ == "__main__":
    sys.exit(_entry())
