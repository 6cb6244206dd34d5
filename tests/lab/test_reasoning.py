"""The arithmetic world: answers, per-step correctness and the first wrong step, checked by hand."""

import numpy as np
import pytest

from prefkit.lab.reasoning import ArithmeticWorld

W = ArithmeticWorld()
PROBLEM = "start 3 add 4 sub 2"


def test_the_answer_and_the_correct_solution():
    assert W.answer(PROBLEM) == 5
    assert W.answer("start 1 sub 4") == 7  # (1 - 4) mod 10
    assert W.solution(PROBLEM) == "3 add 4 is 7 ; 7 sub 2 is 5 ; answer 5"
    assert W.step_labels(PROBLEM, W.solution(PROBLEM)) == [True, True]
    assert W.first_error(PROBLEM, W.solution(PROBLEM)) == -1


def test_a_wrong_step_propagates_and_is_the_first_error():
    completion = "3 add 4 is 8 ; 8 sub 2 is 6 ; answer 6"
    assert W.step_labels(PROBLEM, completion) == [False, True]  # step 2 is locally right, off the true path
    assert W.first_error(PROBLEM, completion) == 0
    assert W.reward([PROBLEM], [completion]) == [0.0]
    late = "3 add 4 is 7 ; 7 sub 2 is 4 ; answer 4"
    assert W.step_labels(PROBLEM, late) == [True, False] and W.first_error(PROBLEM, late) == 1


def test_steps_that_do_not_follow_the_problem_are_wrong():
    assert W.step_labels(PROBLEM, "3 sub 4 is 9 ; answer 9") == [False]  # wrong operation
    assert W.step_labels(PROBLEM, "3 add 5 is 8 ; 8 sub 2 is 6 ; answer 6")[0] is False  # wrong operand
    assert W.step_labels(PROBLEM, "3 add 4 is 7 ; 7 sub 2 is 5 ; 5 add 1 is 6 ; answer 6") == [True, True, False]
    assert W.step_labels(PROBLEM, "4 add 4 is 8") == [False]  # wrong start


def test_the_answer_reward_reads_the_word_after_answer():
    assert W.reward([PROBLEM] * 4, ["answer 5", "x ; answer 5 ; answer 6", "answer", "5"]) == [1.0, 1.0, 0.0, 0.0]


def test_noisy_solutions_are_wrong_at_the_set_rates():
    world = ArithmeticWorld(min_ops=1, max_ops=1, add_error=0.0, sub_error=0.5)
    rng = np.random.default_rng(0)
    adds = [world.is_correct("start 2 add 3", world.solution("start 2 add 3", rng)) for _ in range(400)]
    subs = [world.is_correct("start 2 sub 3", world.solution("start 2 sub 3", rng)) for _ in range(400)]
    assert all(adds) and 0.4 < np.mean(subs) < 0.6


def test_problems_are_parsed_strictly():
    for bad in ("", "start", "start 3 mul 2", "begin 3 add 2", "start x add 2"):
        with pytest.raises(ValueError, match="not an arithmetic problem"):
            W.parse_problem(bad)
    with pytest.raises(ValueError, match="sub_error"):
        ArithmeticWorld(sub_error=1.0)
    rng = np.random.default_rng(1)
    for p in W.sample_problems(50, rng):
        start, ops = W.parse_problem(p)
        assert 0 <= start <= 9 and W.min_ops <= len(ops) <= W.max_ops
        assert len(W.solution(p).split()) <= W.max_len


def test_online_study_runs_both_parts(tmp_path, lab_cache, small_spec):
    """A small run of `prefkit lab study online`: every method, its evaluation points, the proxy part, the
    files. (The full study, whose figures are in benchmarks/RESULTS.md, runs from the README under -m slow.)"""
    import json

    from prefkit.lab.online_study import METHODS, online_study
    from prefkit.lab.policy import ReferenceSpec

    tiny = ReferenceSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=60)
    r = online_study(
        seeds=[0],
        steps=2,
        prompts=2,
        generations=4,
        eval_every=1,
        eval_problems=8,
        overopt_steps=2,
        proxy_pairs=32,
        output_dir=tmp_path / "online",
        cache_dir=lab_cache,
        progress=False,
        arithmetic_spec=tiny,
        world_spec=small_spec,
    )
    runs = r["methods"]["runs"]
    assert [x["method"] for x in runs] == list(METHODS)
    assert all([p["step"] for p in x["points"]] == [0, 1, 2] for x in runs)
    assert all(0 <= p["accuracy"] <= 1 and 0 <= p["step_accuracy"] <= 1 for x in runs for p in x["points"])
    assert [x["trained_on"] for x in r["overopt"]["runs"]] == ["true", "proxy"]
    first = r["overopt"]["runs"][0]["points"]
    assert first[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    for name in ("results.json", "results.md", "online.png"):
        assert (tmp_path / "online" / name).is_file()
    assert json.loads((tmp_path / "online" / "results.json").read_text())["study"] == "online"
    assert "## The GRPO family on the arithmetic world" in (tmp_path / "online" / "results.md").read_text()


def test_online_study_names_bad_settings(tmp_path):
    from prefkit.lab.online_study import online_study

    with pytest.raises(ValueError, match="unknown method"):
        online_study(methods=["ppo"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="generations must be at least 2"):
        online_study(generations=1, output_dir=tmp_path)


def test_rlhf_study_runs(tmp_path, lab_cache, small_spec):
    """A small run of `prefkit lab study rlhf`: every method on a single and a min-ensemble proxy."""
    from prefkit.lab.rlhf_study import METHODS, rlhf_study

    r = rlhf_study(
        proxies=["single", "min"],
        seeds=[0],
        steps=1,
        completions_per_step=4,
        eval_every=1,
        proxy_pairs=32,
        ensemble=2,
        output_dir=tmp_path / "rlhf",
        cache_dir=lab_cache,
        progress=False,
        world_spec=small_spec,
    )
    assert [(x["proxy"], x["method"]) for x in r["runs"]] == [(p, m) for p in ("single", "min") for m in METHODS]
    assert all([p["step"] for p in x["points"]] == [0, 1] for x in r["runs"])
    assert set(r["agreement"]) == {"single", "mean", "min"}
    for name in ("results.json", "results.md", "rlhf.png"):
        assert (tmp_path / "rlhf" / name).is_file()
    with pytest.raises(ValueError, match="unknown proxy kind"):
        rlhf_study(proxies=["max"], output_dir=tmp_path / "x")


def test_budget_study_runs(tmp_path, lab_cache, small_spec):
    """A small run of `prefkit lab study budget`: every method at the smallest budget, and the coverage case's
    offline pairs contain no good word."""
    from prefkit.lab.budget_study import METHODS, _offline_pairs, budget_study
    from prefkit.lab.policy import reference_policy
    from prefkit.lab.world import GOOD_WORDS, make_world

    r = budget_study(
        budget=48, seeds=[0], output_dir=tmp_path / "b", cache_dir=lab_cache, progress=False, world_spec=small_spec
    )
    assert [(x["method"], x["coverage"]) for x in r["runs"]] == [(m, False) for m in METHODS] + [("offline_dpo", True)]
    assert (tmp_path / "b" / "results.md").is_file()
    world = make_world("default", 0)
    ref = reference_policy(world, 0, spec=small_spec, cache_dir=lab_cache, progress=False)
    pairs = _offline_pairs(world, ref, 20, seed=0, coverage=True)
    assert len(pairs) == 20 and not any(w in GOOD_WORDS for p in pairs for w in (p.chosen + " " + p.rejected).split())


@pytest.mark.parametrize("method", ["ppo", "online_dpo", "sppo"])
def test_each_online_method_raises_the_lab_true_reward(method, tmp_path, lab_cache, small_spec):
    """PPO, online DPO and SPPO (win probabilities from the lab's Bradley-Terry judge) trained on the lab world
    raise its true reward (measured on fresh samples of every prompt)."""
    import numpy as np

    from prefkit.lab.online_study import _args, _train_online, world_evaluator
    from prefkit.lab.policy import reference_policy
    from prefkit.lab.rewards import lab_judge, lab_reward
    from prefkit.lab.world import make_world
    from prefkit.online.ppo import PPOArguments, PPOTrainer
    from prefkit.online.preference import OnlinePreferenceArguments, OnlinePreferenceTrainer
    from prefkit.online.rewards import CombinedReward

    world = make_world("default", 0)
    ref = reference_policy(world, 0, spec=small_spec, cache_dir=lab_cache, progress=False)

    def true_scores(items):
        return np.array([world.true_reward(p, t) for p, t in items])

    evaluate = world_evaluator(world, ref, true_scores)
    settings = {
        "ppo": (PPOArguments, PPOTrainer, {}, 2),
        "online_dpo": (OnlinePreferenceArguments, OnlinePreferenceTrainer, {"loss": "dpo"}, 4),
        "sppo": (OnlinePreferenceArguments, OnlinePreferenceTrainer, {"loss": "sppo"}, 4),
    }
    args_class, trainer_class, method_args, k = settings[method]
    judge = lab_judge("default", temperature=1.0) if method == "sppo" else None

    def build(*a, **kw):
        return trainer_class(*a, judge=judge, **kw) if judge else trainer_class(*a, **kw)

    records = [{"prompt": p} for p in world.prompts] * 2
    args = _args(
        str(tmp_path),
        steps=12,
        prompts=4,
        generations=k,
        max_new_tokens=3 * world.max_len,
        lr=3e-3,
        seed=0,
        args_class=args_class,
        **method_args,
    )
    points = _train_online(
        ref, records, CombinedReward([("true", lab_reward("default"), 1.0)]), args, evaluate, 12, trainer_class=build
    )
    assert points[-1]["true"] > points[0]["true"] + 0.2, points


def test_world_steps_and_their_true_labels():
    from prefkit.lab.process_study import world_labels, world_steps

    text = "3 add 4 is 8 ; 8 sub 2 is 6 ; answer 6"
    assert world_steps(text) == ["3 add 4 is 8", "8 sub 2 is 6", "answer 6"]
    assert world_labels(W, PROBLEM, text) == [False, True, False]  # the answer step is right when the answer is
    assert world_labels(W, PROBLEM, W.solution(PROBLEM)) == [True, True, True]
    assert world_steps("3 add 4 is 7 ;") == ["3 add 4 is 7"] and world_labels(W, PROBLEM, "3 add 4 is 7 ;") == [True]


def test_process_study_runs(tmp_path, lab_cache):
    """A small run of `prefkit lab study process`: every scorer's best-of-N curve, step quality, Monte-Carlo
    labels, beam search and MCTS, the files. (The full study's figures are in benchmarks/RESULTS.md.)"""
    import json

    from prefkit.lab.policy import ReferenceSpec
    from prefkit.lab.process_study import SCORERS, process_study

    tiny = ReferenceSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=60)
    r = process_study(
        seeds=[0],
        train_problems=8,
        samples=2,
        test_problems=6,
        pool=4,
        mc_rollouts=2,
        rm_steps=3,
        implicit_steps=2,
        search_problems=2,
        mcts_simulations=2,
        binary_search_solutions=4,
        output_dir=tmp_path / "process",
        cache_dir=lab_cache,
        progress=False,
        arithmetic_spec=tiny,
    )
    curves = r["summary"]["curves"]
    assert set(curves) == set(SCORERS) and all(set(c) == {"1", "2", "4"} for c in curves.values())
    assert all(0 <= v["mean"] <= 1 for c in curves.values() for v in c.values())
    # every picker at N = 1 is one random sample: the same expected accuracy (majority: a Monte-Carlo estimate)
    ones = [curves[name]["1"]["mean"] for name in ("orm", "prm", "prm_mc", "implicit", "oracle")]
    assert max(ones) - min(ones) < 1e-9
    assert curves["oracle"]["4"]["mean"] >= max(curves[n]["4"]["mean"] for n in SCORERS)
    run = r["runs"][0]
    assert run["search"]["beam"]["tokens"] > 0 and run["search"]["mcts"]["tokens"] > 0
    labels = run["mc_labels"]
    assert labels["rollouts"] >= labels["per_step_rollouts_on_subset"] >= labels["binary_search_rollouts"] > 0
    for name in ("results.json", "results.md", "process.png"):
        assert (tmp_path / "process" / name).is_file()
    assert json.loads((tmp_path / "process" / "results.json").read_text())["study"] == "process"
    with pytest.raises(ValueError, match="pool must be at least 1"):
        process_study(pool=0, output_dir=tmp_path)
