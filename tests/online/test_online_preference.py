"""OnlinePreferenceTrainer: pairs from scores by hand, the loss's closed form at step 1, the reward rises,
a pairwise judge, TR-DPO's moving reference with exact resume, bad settings named."""

import math

import pytest
import torch
import transformers
from online_helpers import ascii_reward, base_args, tiny_policy, train_rows

from prefkit.online.preference import OnlinePreferenceArguments, OnlinePreferenceTrainer, pairs_from_scores

transformers.logging.set_verbosity_error()


def _args(tmp_path, **kw):
    return OnlinePreferenceArguments(
        **base_args(tmp_path, **{**dict(max_steps=3, per_device_train_batch_size=4, num_generations=4), **kw})
    )


def _trainer(tmp_path, tokenizer, judge=None, **kw):
    model, rewards = tiny_policy(tokenizer), ascii_reward()
    records = [{"prompt": f"Write {i}:"} for i in range(16)]
    return OnlinePreferenceTrainer(
        model, _args(tmp_path, **kw), train_dataset=records, processing_class=tokenizer, rewards=rewards, judge=judge
    )


_rows = train_rows


def test_pairs_from_scores_by_hand():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 2.0, 2.0, 2.0, 2.0, 1.0, float("nan"), 0.0, 3.0])
    # prompt 0: best is row 1 (first of the equal 0.9s), worst row 0; prompt 1: all equal, no pair;
    # prompt 2: NaN is never paired, best row 11 against worst row 10
    assert pairs_from_scores(scores, 4) == [(1, 0, 1.0), (11, 10, 1.0)]
    everything = pairs_from_scores(torch.tensor([3.0, 1.0, 2.0, 2.0]), 4, "all")
    assert sorted((c, r) for c, r, _ in everything) == [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)]
    assert all(w == pytest.approx(1 / 5) for _, _, w in everything)
    with pytest.raises(ValueError, match="pairs: expected one of best_worst, all"):
        pairs_from_scores(scores, 4, "random")


@pytest.mark.parametrize(
    ("loss", "params", "expected"), [("dpo", {"beta": 0.1}, math.log(2)), ("ipo", {"beta": 0.1}, 25.0)]
)
def test_step_one_loss_is_the_closed_form(tmp_path, tokenizer, loss, params, expected):
    """At step 1 the reference is the policy, so every pair's log-ratio margin is 0: DPO's loss is log 2 and
    IPO's (0 - 1 / (2 beta))^2 = 25 at beta 0.1, whatever the pairs."""
    trainer = _trainer(tmp_path, tokenizer, max_steps=1, loss=loss, loss_params=params)
    trainer.train()
    row = _rows(tmp_path)[0]
    assert row["loss"] == pytest.approx(expected, rel=1e-4) and row["pairs"] >= 1


def test_online_dpo_raises_the_reward(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=16, learning_rate=1e-2, loss_params={"beta": 0.1})
    trainer.train()
    rewards = [r["reward"] for r in _rows(tmp_path)]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    assert all(r["score_gap"] >= 0 for r in _rows(tmp_path))  # the chosen one never scores below the rejected


def test_all_pairs_and_a_token_level_loss_train(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, pairs="all", loss="simpo")
    trainer.train()
    assert trainer.ref_model is None  # simpo is reference-free: no copy is made
    assert _rows(tmp_path)[0]["pairs"] > 4


def test_a_pairwise_judge_labels_the_first_two_completions(tmp_path, tokenizer):
    """A judge that always prefers the second completion: every pair is (row 1, row 0) of its prompt."""
    seen = []

    def second_is_better(prompts, first, second):
        return [0.0] * len(prompts)

    trainer = _trainer(tmp_path, tokenizer, judge=second_is_better, num_generations=2, max_steps=1)
    original = trainer._judged_pairs

    def spy(records, rollouts):
        pairs = original(records, rollouts)
        seen.extend(pairs)
        return pairs

    trainer._judged_pairs = spy
    trainer.train()
    assert seen == [(1, 0, 1.0), (3, 2, 1.0), (5, 4, 1.0), (7, 6, 1.0)]


def test_a_moving_reference_syncs_and_resumes_exactly(tmp_path, tokenizer):
    """ref_sync_steps 2: after steps 2 and 4 the reference equals the policy (so the step-3 loss is DPO's log 2
    again); a run stopped at its step-2 checkpoint and resumed matches the straight run."""
    straight = _trainer(tmp_path / "a", tokenizer, max_steps=4, ref_sync_steps=2)
    straight.train()
    for p, q in zip(straight.model.parameters(), straight.ref_model.parameters()):
        assert torch.equal(p, q)
    losses = [r["loss"] for r in _rows(tmp_path / "a")]
    assert losses[0] == pytest.approx(math.log(2), rel=1e-4) and losses[2] == pytest.approx(math.log(2), rel=1e-4)
    assert losses[1] != pytest.approx(math.log(2), rel=1e-4)
    first = _trainer(tmp_path / "b", tokenizer, max_steps=4, ref_sync_steps=2, save_strategy="steps", save_steps=2)
    first.args.max_steps = 2
    first.train()
    resumed = _trainer(tmp_path / "b", tokenizer, max_steps=4, ref_sync_steps=2, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert [r["loss"] for r in _rows(tmp_path / "b")] == pytest.approx(losses, rel=1e-5)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"loss": "grpo"}, "takes a pairwise or list loss"),
        ({"num_generations": 1}, "num_generations: expected at least 2"),
        ({"pairs": "random"}, "pairs: expected one of best_worst, all"),
        ({"ref_sync_steps": -1}, "ref_sync_steps: expected an integer >= 0"),
        ({"ref_sync_steps": 2, "save_strategy": "steps", "save_steps": 3}, "save_steps: expected a multiple of"),
    ],
)
def test_bad_settings_are_named(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kw)


def test_win_probabilities_by_hand(tmp_path, tokenizer):
    """From scores by Bradley-Terry: P(i > j) = sigmoid(s_i - s_j), averaged over the other samples."""
    trainer = _trainer(tmp_path, tokenizer, loss="sppo", num_generations=3)
    scores = torch.tensor([1.0, 0.0, float("nan")])
    win = trainer._win_probs([{"prompt": "x"}], None, scores)[0]
    s = 1 / (1 + math.exp(-1.0))  # sigmoid(1)
    assert win.tolist() == pytest.approx([(s + 0.5) / 2, (1 - s + 0.5) / 2, 0.5], abs=1e-6)


def sharp_judge(prompts, first, second):
    """A preference model that is sure: sigmoid(20 x the difference of the ASCII shares)."""
    from online_helpers import ascii_share

    a, b = ascii_share(prompts, first), ascii_share(prompts, second)
    return [1 / (1 + math.exp(-20 * (x - y))) for x, y in zip(a, b)]


def test_online_sppo_raises_the_reward(tmp_path, tokenizer):
    """SPPO on K = 4 samples per prompt, win probabilities from a pairwise judge over all 6 pairs of each."""
    trainer = _trainer(
        tmp_path, tokenizer, judge=sharp_judge, loss="sppo", loss_params={"beta": 0.1}, max_steps=16, learning_rate=1e-2
    )
    trainer.train()
    rewards = [r["reward"] for r in _rows(tmp_path)]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    assert "win_prob" in _rows(tmp_path)[-1]
