"""Group-robust reduction (prefkit.losses.group_robust): values checked by hand."""

import math

import pytest
import torch

from prefkit.losses.group_robust import (
    exponentiated_gradient_step,
    group_loss_sums,
    group_mean_losses,
    group_robust_objective,
)


def test_group_sums_and_means_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0])
    groups = torch.tensor([0, 2, 0, 0, 2])
    sums, counts = group_loss_sums(losses, groups, 3)
    # group 0: 1 + 3 + 5 = 9 over 3; group 1: absent; group 2: 2 + 4 = 6 over 2
    assert sums.tolist() == [9.0, 0.0, 6.0]
    assert counts.tolist() == [3.0, 0.0, 2.0]
    means, counts = group_mean_losses(losses, groups, 3)
    assert means.tolist() == [3.0, 0.0, 3.0]  # the absent group's 0 is no loss: counts says it is absent
    assert counts.tolist() == [3.0, 0.0, 2.0]


def test_group_means_carry_gradients_to_each_example():
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    means, _ = group_mean_losses(losses, torch.tensor([0, 1, 1]), 2)
    means.sum().backward()
    assert losses.grad.tolist() == [1.0, 0.5, 0.5]  # d(L_0 + L_1)/d loss_i = 1 / n_{g(i)}


def test_one_eg_step_from_uniform_by_hand():
    alpha = torch.full((2,), 0.5, dtype=torch.float64)
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64)
    new = exponentiated_gradient_step(alpha, losses, torch.tensor([True, True]), 1.0)
    # alpha'_g = 0.5 e^{L_g} / (0.5 e^1 + 0.5 e^2): (1 / (1 + e), e / (1 + e)) = (0.268941, 0.731059)
    e = math.e
    assert new.tolist() == pytest.approx([1 / (1 + e), e / (1 + e)], rel=1e-12)
    assert new.dtype == torch.float64
    # step 0 keeps alpha
    assert exponentiated_gradient_step(alpha, losses, torch.tensor([True, True]), 0.0).tolist() == [0.5, 0.5]


def test_eg_step_keeps_an_absent_groups_weight():
    alpha = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    losses = torch.tensor([math.log(3.0), 123.0, 0.0], dtype=torch.float64)  # group 1 absent: its 123 is unused
    new = exponentiated_gradient_step(alpha, losses, torch.tensor([True, False, True]), 1.0)
    # present groups 0 and 2 share their weight 0.75: unnormalised 0.25 * 3 = 0.75 and 0.5 * 1 = 0.5,
    # so 0.75 * (0.6, 0.4) = (0.45, 0.3); group 1 keeps 0.25
    assert new.tolist() == pytest.approx([0.45, 0.25, 0.3], rel=1e-12)
    # no group present: nothing changes
    none = exponentiated_gradient_step(alpha, losses, torch.tensor([False, False, False]), 1.0)
    assert none.tolist() == alpha.tolist()


def test_eg_step_does_not_overflow():
    alpha = torch.full((2,), 0.5)
    new = exponentiated_gradient_step(alpha, torch.tensor([1000.0, 999.0]), torch.tensor([True, True]), 10.0)
    # exp(10000) overflows, the softmax of log alpha + eta L does not: (1, e^-10 / (1 + e^-10))
    assert new[1].item() == pytest.approx(math.exp(-10) / (1 + math.exp(-10)), rel=1e-4)
    assert torch.isfinite(new).all()


def test_objective_by_hand_and_absent_groups_add_nothing():
    group_losses = torch.tensor([2.0, float("nan"), 4.0], requires_grad=True)
    alpha = torch.tensor([0.25, 0.5, 0.25])
    value = group_robust_objective(group_losses, alpha, torch.tensor([True, False, True]))
    assert value.item() == pytest.approx(0.25 * 2 + 0.25 * 4)  # 1.5; the absent group's nan is not read
    value.backward()
    assert group_losses.grad.tolist() == [0.25, 0.0, 0.25]


@pytest.mark.parametrize("eta", [0.0, 1.0, 10.0, 100.0])
def test_gradient_goes_to_the_worst_group_as_eta_grows(eta):
    # group 0: examples 0, 1 (mean loss 1.0); group 1 (the worst): example 2 (loss 1.5)
    losses = torch.tensor([0.8, 1.2, 1.5], requires_grad=True)
    groups = torch.tensor([0, 0, 1])
    means, counts = group_mean_losses(losses, groups, 2)
    present = counts > 0
    alpha = exponentiated_gradient_step(torch.full((2,), 0.5, dtype=torch.float64), means, present, eta)
    group_robust_objective(means, alpha, present).backward()
    # d objective / d loss_i = alpha_{g(i)} / n_{g(i)}, alpha_1 = 1 / (1 + e^{-0.5 eta})
    alpha_worst = 1 / (1 + math.exp(-0.5 * eta))
    expected = [(1 - alpha_worst) / 2, (1 - alpha_worst) / 2, alpha_worst]
    assert losses.grad.tolist() == pytest.approx(expected, rel=1e-5)
    if eta == 100.0:
        assert losses.grad.tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)  # all on the worst group


def test_bad_inputs_are_refused():
    losses = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"group indices must lie in \[0, 2\)"):
        group_loss_sums(losses, torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="integer group indices"):
        group_loss_sums(losses, torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="one shape"):
        group_loss_sums(losses, torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="n_groups"):
        group_loss_sums(losses, torch.tensor([0, 0]), 0)
    present = torch.tensor([True, True])
    with pytest.raises(ValueError, match="simplex"):
        exponentiated_gradient_step(torch.tensor([0.7, 0.7]), losses, present, 1.0)
    with pytest.raises(ValueError, match="step_size must be >= 0"):
        exponentiated_gradient_step(torch.tensor([0.5, 0.5]), losses, present, -1.0)
    with pytest.raises(ValueError, match="finite"):
        exponentiated_gradient_step(torch.tensor([0.5, 0.5]), torch.tensor([1.0, float("inf")]), present, 1.0)
    with pytest.raises(ValueError, match="bool tensor"):
        group_robust_objective(losses, torch.tensor([0.5, 0.5]), torch.tensor([1, 1]))


def test_size_adjustment_by_hand():
    from prefkit.losses.group_robust import size_adjusted_losses

    losses = torch.tensor([0.5, 0.5], dtype=torch.float64)
    sizes = torch.tensor([100.0, 4.0], dtype=torch.float64)
    # L + C / sqrt(N): 0.5 + 1/10 and 0.5 + 1/2
    assert size_adjusted_losses(losses, sizes, 1.0).tolist() == pytest.approx([0.6, 1.0])
    assert torch.equal(size_adjusted_losses(losses, sizes, 0.0), losses)
    # equal losses: the adjusted step moves weight to the small group, exp(0.4) : 1 from uniform
    alpha = exponentiated_gradient_step(
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        size_adjusted_losses(losses, sizes, 1.0),
        torch.tensor([1, 1]).bool(),
        1.0,
    )
    assert alpha[1] / alpha[0] == pytest.approx(math.exp(0.4))
    with pytest.raises(ValueError, match="C must be a finite number >= 0"):
        size_adjusted_losses(losses, sizes, -1.0)
    with pytest.raises(ValueError, match="group sizes must be positive"):
        size_adjusted_losses(losses, torch.tensor([3.0, 0.0], dtype=torch.float64), 1.0)
