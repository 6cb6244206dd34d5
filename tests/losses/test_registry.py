"""The registry's contents and the `prefkit losses` command."""

import argparse
import re

import pytest

from prefkit.losses import commands, get_loss, list_losses

MINE = ["simpo", "cpo", "orpo", "sft", "kto", "bco"]


def run(capsys, *argv):
    parser = argparse.ArgumentParser(prog="prefkit losses")
    commands.configure(parser)
    code = commands.run(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", MINE)
def test_docstrings_cite_and_document_every_hyperparameter(name):
    spec = get_loss(name)
    assert spec.formula.startswith(("loss =", "r ="))
    assert re.search(r"\(20\d\d\)", spec.citation) and re.search(r"arXiv:\d{4}\.\d{4,5}", spec.citation)
    doc = spec.fn.__doc__
    for param, default in spec.hyperparameters.items():
        assert f"``{param}`` ({default}" in doc, f"{name}: {param} and its default undocumented"


def test_every_registered_loss_has_formula_and_citation():
    specs = list_losses()
    assert {s.name for s in specs} >= set(MINE)
    for spec in specs:
        assert spec.formula and spec.citation


def test_list_shows_every_loss(capsys):
    code, out, err = run(capsys)
    assert code == 0 and err == ""
    for spec in list_losses():
        assert re.search(rf"^  {re.escape(spec.name)}  \(", out, re.MULTILINE), spec.name
    assert "pairwise losses" in out and "unpaired losses" in out
    assert "beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.0" in out
    assert "arXiv:2405.14734" in out and "reference-free" in out


def test_list_filters_by_kind(capsys):
    code, out, _ = run(capsys, "--kind", "unpaired")
    assert code == 0
    names = re.findall(r"^  (\S+)  \(", out, re.MULTILINE)
    assert sorted(names) == sorted(s.name for s in list_losses("unpaired"))
    assert "simpo" not in names and {"kto", "bco"} <= set(names)


def test_one_loss_in_full(capsys):
    code, out, _ = run(capsys, "--name", "kto")
    assert code == 0
    assert out.startswith("kto\n")
    assert "needed" in out and "beta=0.1, desirable_weight=1.0, undesirable_weight=1.0" in out
    assert "Kahneman-Tversky Optimization" in out  # the docstring
    assert "kto_kl_estimate" in out


def test_one_loss_by_positional_name(capsys):
    code, out, _ = run(capsys, "kto")
    assert code == 0 and out.startswith("kto\n") and "Kahneman-Tversky Optimization" in out
    code, _, err = run(capsys, "kto", "--name", "bco")
    assert code == 2 and "name one loss" in err


def test_unknown_name_suggests(capsys):
    code, out, err = run(capsys, "--name", "simpoo")
    assert code == 2 and out == ""
    assert "Did you mean 'simpo'" in err


def test_name_of_another_kind(capsys):
    code, _, err = run(capsys, "--name", "kto", "--kind", "pairwise")
    assert code == 2 and "unpaired" in err


def test_markdown_table(capsys):
    code, out, _ = run(capsys, "--markdown")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == len(list_losses())
    # pipes inside formulas are escaped so the table keeps six columns
    for row in rows:
        assert len(re.split(r"(?<!\\)\|", row)) == 8


def test_only_batch_sorting_losses_are_batch_coupled():
    from prefkit.losses import list_losses

    assert {s.name for s in list_losses() if s.batch_coupled} == {"aot", "aot_pair"}


def test_every_hyperparameter_has_a_declared_range():
    for spec in list_losses():
        assert set(spec.ranges) == set(spec.hyperparameters), spec.name


@pytest.mark.parametrize(
    ("loss", "params", "message"),
    [
        ("dpo", {"beta": -1}, "beta: expected a finite number > 0, got -1.0 (loss 'dpo')"),
        ("cdpo", {"label_smoothing": 0.5}, "label_smoothing: expected a finite number in [0, 0.5), got 0.5"),
        ("f_dpo", {"divergence": "kl"}, "divergence: expected one of reverse_kl, forward_kl"),
        ("orpo", {"beta": float("nan")}, "beta: expected a finite number >= 0, got nan (loss 'orpo')"),
    ],
)
def test_resolve_refuses_a_value_outside_its_range(loss, params, message):
    from prefkit.losses.combine import resolve_loss_params

    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_loss_params([loss], params)


def test_range_notation():
    from prefkit.ranges import range_problem

    assert range_problem(0.0, ">= 0") is None and range_problem(0.0, "> 0")
    assert range_problem(1.0, "[0, 1]") is None and range_problem(1.0, "[0, 1)")
    assert range_problem(True, "> 0")  # a boolean is not a number
    assert range_problem(float("inf"), "any") and range_problem(-3, "any") is None
