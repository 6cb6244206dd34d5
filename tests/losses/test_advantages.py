"""Advantage estimators by hand, and GRPO's against TRL's own std (Bessel-corrected, eps 1e-4)."""

import math

import pytest
import torch

from prefkit.losses.advantages import get_advantage, list_advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])  # two prompts, G = 4


def test_grpo_by_hand():
    a = get_advantage("grpo")(REWARDS, 4).tolist()
    std0 = math.sqrt(sum((r - 0.5) ** 2 for r in (1, 0, 0, 1)) / 3)
    std1 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    assert a[:4] == pytest.approx(
        [0.5 / (std0 + 1e-4), -0.5 / (std0 + 1e-4)] * 1 + [-0.5 / (std0 + 1e-4), 0.5 / (std0 + 1e-4)]
    )
    assert a[4:] == pytest.approx([-0.75 / (std1 + 1e-4)] * 3 + [2.25 / (std1 + 1e-4)])
    assert get_advantage("grpo")(REWARDS, 4, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]


def test_grpo_uses_trls_std():
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    grouped = REWARDS.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    trl = (REWARDS - mean) / (std + 1e-4)  # GRPOTrainer, scale_rewards="group"
    assert torch.allclose(get_advantage("grpo")(REWARDS, 4), trl)


def test_equal_rewards_give_zero_advantage():
    for name in ("grpo", "dr_grpo", "rloo"):
        assert get_advantage(name)(torch.full((4,), 3.0), 4).tolist() == [0.0] * 4, name


def test_dr_grpo_rloo_reinforce_by_hand():
    assert get_advantage("dr_grpo")(REWARDS, 4).tolist() == [0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]
    # RLOO: r_i - mean of the other three
    assert get_advantage("rloo")(REWARDS, 4).tolist() == pytest.approx(
        [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 2 - 3, 2 - 3, 2 - 3, 5 - 2]
    )
    mean, std = REWARDS.mean().item(), REWARDS.std().item()
    assert get_advantage("reinforce_pp")(REWARDS, 4).tolist() == pytest.approx(
        [(r - mean) / (std + 1e-8) for r in REWARDS.tolist()]
    )
    assert get_advantage("reinforce_baseline")(REWARDS, 4).tolist() == pytest.approx(
        [r - mean for r in REWARDS.tolist()]
    )
    assert get_advantage("reinforce_baseline")(REWARDS, 4, baseline=1.0).tolist() == [r - 1 for r in REWARDS.tolist()]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        get_advantage("grpo")(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        get_advantage("rloo")(torch.tensor([1.0, 2.0, 3.0]), 4)
    with pytest.raises(ValueError, match="must be finite"):
        get_advantage("dr_grpo")(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(KeyError, match="Did you mean 'rloo'"):
        get_advantage("rlo")


def test_every_estimator_has_formula_and_paper():
    names = {s.name for s in list_advantages()}
    assert names == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_baseline"}
    for spec in list_advantages():
        assert spec.formula.startswith("A_i") and spec.citation
