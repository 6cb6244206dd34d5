"""`prefkit demo`: DPO and a reward model in the default lab world, measured against the true reward."""

import json

import pytest

from prefkit.cli import main
from prefkit.lab.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # The demo's own settings (default world, DPO, seed 0) with fewer steps; the full reference policy.
    cache = tmp_path_factory.mktemp("demo_cache")
    return out, run_demo(out, steps=100, cache_dir=cache, progress=False)


def test_dpo_raises_the_true_reward(demo):
    _, result = demo
    gain, se = result["true_reward_gain"], result["true_reward_gain_se"]
    assert gain > 0.5 and gain > 4 * se  # a real gain, far outside sampling noise
    assert result["policy"]["win_rate"] > 0.6
    assert result["policy"]["kl"] > 0  # it moved away from the reference to get there


def test_scorers_agree_with_the_truth(demo):
    _, result = demo
    # Chance is 0.5; Bradley-Terry labels at temperature 1 cap label accuracy well below 1.
    assert result["reward_model"]["agreement"] > 0.7
    assert result["implicit_reward"]["agreement"] > 0.6
    assert 0.5 < result["reward_model"]["heldout_label_accuracy"] <= 1


def test_report_and_files(demo):
    out, result = demo
    for name in (
        "report.md",
        "results.json",
        "training_curves.png",
        "reward_vs_kl.png",
        "train.jsonl",
        "heldout.jsonl",
    ):
        assert (out / name).is_file(), name
    assert (out / "policy" / "model.safetensors").is_file()
    assert (out / "reward_model" / "model.safetensors").is_file()
    assert len((out / "train.jsonl").read_text().splitlines()) == 100 * 32
    report = (out / "report.md").read_text()
    assert "True-reward gain" in report and "reward_vs_kl.png" in report
    assert "synthetic world's words" in report
    saved = json.loads((out / "results.json").read_text())
    assert saved["true_reward_gain"] == pytest.approx(result["true_reward_gain"])
    assert [h["step"] for h in saved["trace"]] == [0, 20, 40, 60, 80, 100]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--world", "--loss", "--steps", "--seed", "--output-dir"):
        assert option in text


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["demo", "--loss", "kto", "--output-dir", str(out)]) == 2
    assert "needs a pairwise loss" in capsys.readouterr().err
    assert main(["demo", "--loss", "dpoo", "--output-dir", str(out)]) == 2
    assert "Did you mean 'dpo'" in capsys.readouterr().err
    assert main(["demo", "--steps", "0", "--output-dir", str(out)]) == 2
    assert not out.exists()
    with pytest.raises(ValueError, match="unknown world"):
        run_demo(out, world="mars")


def test_training_curves_label_every_axis_and_keep_margins_apart(tmp_path, monkeypatch):
    from prefkit.lab import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    policy = [{"step": s, "loss": 0.7 - s / 100, "rewards/margins": s / 10} for s in range(1, 4)]
    rm = [{"step": s, "loss": 0.6, "rewards/margins": 5.0 * s, "rewards/accuracies": 0.8} for s in range(1, 4)]
    plots.training_curves(
        {"policy": policy, "rm": rm},
        ["loss", "rewards/accuracies", "rewards/margins"],
        tmp_path / "c.png",
        per_run=["rewards/margins"],
        ylabels={"rewards/margins|policy": "implicit-reward margin"},
    )
    axes = figures[0].axes
    assert len(axes) == 4  # loss, accuracy, and one margins panel per run
    assert all(ax.get_ylabel() for ax in axes)
    assert axes[2].get_ylabel() == "implicit-reward margin" and [t.get_text() for t in axes[2].get_legend().texts] == [
        "policy"
    ]
    assert [t.get_text() for t in axes[3].get_legend().texts] == ["rm"]
