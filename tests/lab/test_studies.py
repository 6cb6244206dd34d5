"""The lab studies on a tiny reference policy: each writes its files and gives sane values."""

import json
import math

import pytest
import transformers

from prefkit.lab.policy import ReferenceSpec, reference_policy
from prefkit.lab.studies import loss_comparison, noise_study, overoptimization
from prefkit.lab.world import make_world
from prefkit.losses.base import _REGISTRY, LossSpec

transformers.logging.set_verbosity_error()

SPEC = ReferenceSpec(hidden_size=32, num_heads=2, intermediate_size=64, steps=30, batch_size=32, heldout_samples=64)
TINY = dict(steps=3, batch_size=8, heldout_pairs=20, samples_per_prompt=2, spec=SPEC, progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder holding the tiny reference policy of the default world (pre-trained once)."""
    folder = tmp_path_factory.mktemp("lab-cache")
    reference_policy(make_world("default", 0), 0, spec=SPEC, cache_dir=folder, progress=False)
    return folder


def _boom(b, *, beta: float = 0.1):
    """A loss that always fails.

    Formula: none
    Paper: none
    """
    raise RuntimeError("boom")


def test_loss_comparison_records_every_loss(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(_REGISTRY, "boom", LossSpec("boom", "pairwise", _boom, True, False, "none", "none"))
    out = tmp_path / "losses"
    r = loss_comparison(losses=["dpo", "simpo", "boom"], seeds=(0, 1), output_dir=out, cache_dir=cache, **TINY)
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "reward_vs_kl.png"}
    rows = {row["loss"]: row for row in r["rows"]}
    # the shared beta replaces dpo's; simpo keeps its published beta (2.0)
    assert rows["dpo"]["params"] == {"beta": 0.1} and rows["simpo"]["params"] == {}
    assert rows["boom"]["error"] == "RuntimeError: boom"
    for name in ("dpo", "simpo"):
        row = rows[name]
        assert row["error"] is None
        assert 0 <= row["agreement"] <= 1 and 0 <= row["win_rate"] <= 1
        assert row["gain"] == pytest.approx(row["mean_reward"] - r["reference"]["mean_reward"])
        assert math.isfinite(row["kl"]) and row["train_seconds"] > 0
        # two seeds: means over the runs, standard errors over the runs
        runs = row["runs"]
        assert [run["seed"] for run in runs] == [0, 1]
        assert row["mean_reward"] == pytest.approx((runs[0]["mean_reward"] + runs[1]["mean_reward"]) / 2)
        assert row["reward_se"] == pytest.approx(abs(runs[0]["mean_reward"] - runs[1]["mean_reward"]) / 2)
        assert row["gain_se"] == row["reward_se"]
    md = (out / "results.md").read_text()
    assert "| dpo | beta=0.1 |" in md and "failed: RuntimeError: boom" in md and "## What this shows" in md
    assert "over the 2 seeds 0, 1" in md
    assert json.loads((out / "results.json").read_text())["rows"][0]["loss"] == "dpo"


def test_loss_comparison_rejects_bad_losses(tmp_path):
    with pytest.raises(KeyError, match="unknown loss 'dpoo'"):
        loss_comparison(losses=["dpoo"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="kto' is unpaired"):
        loss_comparison(losses=["kto"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown world"):
        loss_comparison("nowhere", losses=["dpo"], output_dir=tmp_path)


def test_noise_study_compares_losses_at_matched_kl(tmp_path, cache):
    out = tmp_path / "noise"
    r = noise_study(
        rates=(0.0, 0.2), losses=("dpo", "robust_dpo"), seeds=(0,), kl_budgets=(1e-6, 1e6), eval_every=1,
        output_dir=out, cache_dir=cache, **TINY,
    )  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "noise.png"}
    assert len(r["runs"]) == 2 * 2
    robust = [run for run in r["runs"] if run["loss"] == "robust_dpo"]
    assert {run["params"]["label_smoothing"] for run in robust} == {0.0, 0.2}  # told the flip rate
    run = r["runs"][0]
    # the path: the reference at step 0, then every step; the final numbers are its last point
    assert [p["step"] for p in run["path"]] == [0, 1, 2, 3] and run["path"][0]["kl"] == 0.0
    assert run["mean_reward"] == run["path"][-1]["mean_reward"]
    # every budget is read off the path (the crossing itself: test_reward_at_kl_...); one no run reaches is missing
    assert set(run["at_kl"]) == {"1e-06", "1e+06"} and math.isnan(run["at_kl"]["1e+06"])
    # at flip rate 0 robust_dpo's loss is dpo's, so the runs match exactly
    at_zero = r["table"]["robust_dpo"][0]
    assert at_zero["rate"] == 0.0 and at_zero["reward_minus_dpo"] == pytest.approx(0.0, abs=1e-9)
    assert at_zero["n"] == 1 and math.isnan(at_zero["mean_reward_se"])  # one seed: no standard error
    assert at_zero["n_at_kl_1e+06"] == 0
    md = (out / "results.md").read_text()
    assert "robust_dpo − dpo at KL 1e-06" in md and "(0/1 runs)" in md and "Only 1 data seed(s)" in md
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        noise_study(rates=(0.5,), output_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown annotator"):
        noise_study(annotator="oracle", output_dir=tmp_path)
    with pytest.raises(ValueError, match="kl_budgets"):
        noise_study(kl_budgets=(0.0,), output_dir=tmp_path)


def test_reward_at_kl_interpolates_the_first_crossing():
    from prefkit.lab.studies import _reward_at_kl

    path = [{"kl": 0.0, "mean_reward": 1.0}, {"kl": 2.0, "mean_reward": 3.0}, {"kl": 1.0, "mean_reward": 0.0}]
    assert _reward_at_kl(path, 1.0) == pytest.approx(2.0)  # halfway along the first segment
    assert _reward_at_kl(path, 1.5) == pytest.approx(2.5)
    assert math.isnan(_reward_at_kl(path, 5.0))


def test_overoptimization(tmp_path, cache):
    out = tmp_path / "overopt"
    world = make_world("default", 0)
    r = overoptimization(
        proxy_pairs=16,
        proxy_steps=2,
        pool=8,
        n_max=8,
        prompts=world.prompts[:3],
        heldout_pairs=20,
        output_dir=out,
        spec=SPEC,
        cache_dir=cache,
        progress=False,
    )
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "overoptimization.png"}
    rows = r["rows"]
    assert [row["n"] for row in rows] == [1, 2, 4, 8]
    assert rows[1]["kl"] == pytest.approx(math.log(2) - 0.5)
    # N = 1 is a uniformly random pool sample: both standardised rewards average to 0
    assert rows[0]["true"] == pytest.approx(0.0, abs=1e-9) and rows[0]["proxy"] == pytest.approx(0.0, abs=1e-9)
    assert rows[0]["true_raw"] == pytest.approx(r["pool_true_mean"])
    # selecting by a reward can only raise that reward's best-of-N value
    for a, b in zip(rows, rows[1:]):
        assert b["proxy"] >= a["proxy"] - 1e-9 and b["oracle"] >= a["oracle"] - 1e-9
    assert 0 <= r["proxy_agreement"] <= 1
    with pytest.raises(ValueError, match="must be <= pool"):
        overoptimization(pool=4, n_max=8, output_dir=tmp_path)


def test_list_study_trains_listwise_and_pairwise_methods_on_the_same_lists(tmp_path, cache):
    from prefkit.lab.list_study import list_study

    out = tmp_path / "lists"
    r = list_study(
        seeds=(0,), steps=2, lists_per_step=2, heldout_pairs=20, samples_per_prompt=2, spec=SPEC, progress=False,
        output_dir=out, cache_dir=cache,
    )  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "reward_vs_kl.png"}
    rows = {row["method"]: row for row in r["rows"]}
    assert set(rows) == {"pl_dpo", "pro", "lipo", "dpo_all_pairs", "dpo_best_pairs"}
    # 2 steps x 2 lists of 4 per seed: the pair methods get 6 and 3 pairs per list
    assert [run["examples"] for run in rows["pl_dpo"]["runs"]] == [4]
    assert rows["dpo_all_pairs"]["runs"][0]["examples"] == 24 and rows["dpo_best_pairs"]["runs"][0]["examples"] == 12
    assert rows["pro"]["params"] == {} and rows["lipo"]["params"] == {"beta": 0.1}
    for row in rows.values():
        assert math.isfinite(row["gain"]) and 0 <= row["agreement"] <= 1
    assert "dpo_all_pairs" in (out / "results.md").read_text()
    run = rows["lipo"]["runs"][0]
    assert run["path"][0] == {"step": 0, "mean_reward": run["path"][0]["mean_reward"], "kl": 0.0}
    assert set(run["at_kl"]) == {"0.5", "1", "2"} and "n_at_kl_1" in rows["lipo"]
    with pytest.raises(ValueError, match="unknown method"):
        list_study(methods=["nope"], output_dir=tmp_path)


def test_judge_study_trains_a_judge_and_a_reward_model_on_the_same_pairs(tmp_path, cache):
    from prefkit.lab.judge_study import judge_study

    out = tmp_path / "judge"
    r = judge_study(
        sizes=(8, 16), seeds=(0, 1), epochs=1, batch_size=8, heldout_pairs=20, spec=SPEC, progress=False,
        output_dir=out, cache_dir=cache,
    )  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "agreement.png"}
    assert [row["pairs"] for row in r["rows"]] == [8, 16] and len(r["runs"]) == 4
    # the judge sees each pair in both orders: twice the reward model's steps for the same passes
    assert [(run["rm_steps"], run["judge_steps"]) for run in r["runs"][:2]] == [(1, 2), (2, 4)]
    for row in r["rows"]:
        for key in ("rm_agreement", "judge_order_averaged", "judge_one_order", "judge_position_bias", "labels_right"):
            assert 0 <= row[key] <= 1
    assert "reward model" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="size 0 must be a positive int"):
        judge_study(sizes=(0,), output_dir=tmp_path)


def test_loss_comparison_reads_each_run_at_matched_kl(tmp_path, cache):
    out = tmp_path / "losses_kl"
    r = loss_comparison(
        losses=["dpo"], seeds=(0,), kl_budgets=(1e-9, 1e6), eval_every=1, output_dir=out, cache_dir=cache, **TINY
    )
    row = r["rows"][0]
    # every run's path starts at the reference (KL 0) and is evaluated after each of its 3 steps
    assert [p["step"] for p in row["runs"][0]["path"]] == [0, 1, 2, 3]
    path = row["runs"][0]["path"]
    reached = any(a["kl"] <= 1e-9 <= b["kl"] and b["kl"] > a["kl"] for a, b in zip(path, path[1:]))
    assert row["n_at_kl_1e-09"] == int(reached) and math.isfinite(row["runs"][0]["at_kl"]["1e-09"]) == reached
    assert row["n_at_kl_1e+06"] == 0 and math.isnan(row["runs"][0]["at_kl"]["1e+06"])  # never reached: counted
    assert "At matched KL" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="kl_budgets must be > 0"):
        loss_comparison(losses=["dpo"], seeds=(0,), kl_budgets=(0.0,), output_dir=out, cache_dir=cache, **TINY)
