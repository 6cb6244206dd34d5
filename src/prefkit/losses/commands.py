"""`prefkit losses [NAME] [--kind K] [--name N] [--markdown]`: show the loss registry.

Without options it lists every registered loss, grouped by kind, with whether it needs a
reference model, its formula, its paper and its hyper-parameters with their defaults.
``prefkit losses NAME`` (or ``--name NAME``) prints one loss in full, docstring included. ``--markdown`` prints the same
information as the Markdown page ``docs/losses.md`` is generated from.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import textwrap

from prefkit.losses import KINDS, LossSpec, get_loss, list_losses
from prefkit.losses.base import BATCH_TYPES

BATCH_NAMES = {kind: cls.__name__ for kind, cls in BATCH_TYPES.items()}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("loss", nargs="?", metavar="NAME", help="show this loss in full (as --name does)")
    parser.add_argument("--kind", choices=KINDS, help="only losses of this input kind")
    parser.add_argument("--name", metavar="NAME", help="show one loss in full, with its docstring")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (the source of docs/losses.md)")


def format_params(spec: LossSpec) -> str:
    params = spec.hyperparameters
    if not params:
        return "(none)"
    return ", ".join(f"{k}={'(required)' if v is inspect.Parameter.empty else v!r}" for k, v in params.items())


def _field(label: str, text: str, width: int, indent: int = 4) -> list[str]:
    head = " " * indent + f"{label:<10}"
    return textwrap.wrap(
        text, width=width, initial_indent=head, subsequent_indent=" " * len(head), break_on_hyphens=False
    ) or [head.rstrip()]


def format_spec(spec: LossSpec, width: int) -> list[str]:
    ref = "needs a reference model" if spec.needs_reference else "reference-free"
    extra = ", per-token log-probs" if spec.needs_tokens else ""
    lines = [f"  {spec.name}  ({ref}{extra})"]
    lines += _field("formula", spec.formula, width)
    lines += _field("paper", spec.citation, width)
    lines += _field("params", format_params(spec), width)
    if spec.ranges:
        lines += _field("ranges", ", ".join(f"{k} {v}" for k, v in spec.ranges.items()), width)
    return lines


def render_text(specs: list[LossSpec], width: int) -> str:
    out: list[str] = []
    for kind in KINDS:
        group = sorted((s for s in specs if s.kind == kind), key=lambda s: s.name)
        if not group:
            continue
        if out:
            out.append("")
        out.append(f"{kind} losses (batch: {BATCH_NAMES.get(kind, kind)})")
        for spec in group:
            out.append("")
            out.extend(format_spec(spec, width))
    return "\n".join(out)


def render_one(spec: LossSpec, width: int) -> str:
    lines = [f"{spec.name}", ""]
    lines += _field("kind", f"{spec.kind} (batch: {BATCH_NAMES.get(spec.kind, spec.kind)})", width, 0)
    lines += _field("reference", "needed" if spec.needs_reference else "not needed (reference-free)", width, 0)
    lines += _field("tokens", "per-token log-probs needed" if spec.needs_tokens else "sums only", width, 0)
    lines += _field("formula", spec.formula, width, 0)
    lines += _field("paper", spec.citation, width, 0)
    lines += _field("params", format_params(spec), width, 0)
    if spec.ranges:
        lines += _field("ranges", ", ".join(f"{k} {v}" for k, v in spec.ranges.items()), width, 0)
    doc = inspect.cleandoc(spec.fn.__doc__ or "")
    lines += ["", doc]
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(specs: list[LossSpec]) -> str:
    out = [
        "| name | kind | reference | formula | paper | hyper-parameters (defaults) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        for spec in sorted((s for s in specs if s.kind == kind), key=lambda s: s.name):
            params = ", ".join(f"`{k}={v!r}`" for k, v in spec.hyperparameters.items()) or "none"
            out.append(
                f"| `{spec.name}` | {spec.kind} | {'yes' if spec.needs_reference else 'no'} | "
                f"`{_md(spec.formula)}` | {_md(spec.citation)} | {params} |"
            )
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    kind = getattr(args, "kind", None)
    name, positional = getattr(args, "name", None), getattr(args, "loss", None)
    if name and positional and name != positional:
        print(f"prefkit losses: name one loss, got {positional!r} and --name {name!r}", file=sys.stderr)
        return 2
    name = name or positional
    if name:
        try:
            spec = get_loss(name)
        except KeyError as err:
            print(f"prefkit losses: {err.args[0]}", file=sys.stderr)
            return 2
        if kind and spec.kind != kind:
            print(f"prefkit losses: loss {name!r} is of kind {spec.kind!r}, not {kind!r}", file=sys.stderr)
            return 2
        print(render_one(spec, width))
        return 0
    specs = list_losses(kind)
    if not specs:
        print(f"no {kind} losses are registered" if kind else "no losses are registered")
        return 0
    print(render_markdown(specs) if getattr(args, "markdown", False) else render_text(specs, width))
    return 0


if __name__ == "__main__":  # python -m prefkit.losses.commands [--markdown], without the full CLI
    _parser = argparse.ArgumentParser(prog="prefkit losses", description=__doc__.splitlines()[0])
    configure(_parser)
    sys.exit(run(_parser.parse_args()))
