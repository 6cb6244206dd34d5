"""sft: closed form, gradient signs, length handling."""

import pytest
import torch

from prefkit.losses import PairLogps, get_loss
from prefkit.losses.auxiliary import chosen_nll, mean_token_logp


def batch(grad=False):
    t = lambda x: torch.tensor(x, dtype=torch.float64, requires_grad=grad)
    return PairLogps(
        policy_chosen=t([-6.0, -2.5, -9.0]),
        policy_rejected=t([-1.0, -7.0, -3.0]),
        chosen_len=t([3.0, 5.0, 2.0]),
        rejected_len=t([1.0, 2.0, 3.0]),
    )


def test_sft_registry_entry():
    spec = get_loss("sft")
    assert spec.kind == "pairwise" and not spec.needs_reference and spec.hyperparameters == {}


def test_sft_closed_form():
    out = get_loss("sft")(batch())
    assert out.loss.tolist() == pytest.approx([6.0 / 3, 2.5 / 5, 9.0 / 2], rel=1e-15)
    assert out.metrics["nll_loss"].tolist() == out.loss.tolist()
    assert not out.metrics["nll_loss"].requires_grad


def test_sft_gradient_signs():
    b = batch(grad=True)
    get_loss("sft")(b).loss.sum().backward()
    assert (b.policy_chosen.grad < 0).all()
    # the rejected completion plays no part: raising it cannot lower the loss
    assert b.policy_rejected.grad is None or (b.policy_rejected.grad == 0).all()


def test_sft_needs_no_reference_and_ignores_one():
    b = batch()
    plain = get_loss("sft")(b).loss
    b.ref_chosen = torch.full((3,), -100.0, dtype=torch.float64)
    b.ref_rejected = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(get_loss("sft")(b).loss, plain)


def test_length_helpers_clamp_empty_completions():
    logp = torch.tensor([-2.0, 0.0])
    n = torch.tensor([4.0, 0.0])
    assert mean_token_logp(logp, n).tolist() == [-0.5, 0.0]
    b = PairLogps(policy_chosen=logp, policy_rejected=logp, chosen_len=n, rejected_len=n)
    assert chosen_nll(b).tolist() == [0.5, 0.0]


def test_rpo_is_dpo_plus_alpha_sft_by_hand():
    import math

    import torch

    from prefkit.losses import PairLogps, get_loss
    from prefkit.losses.combine import combine_losses

    b = PairLogps(
        policy_chosen=torch.tensor([-4.0, -9.0]),
        policy_rejected=torch.tensor([-6.0, -7.0]),
        chosen_len=torch.tensor([2.0, 3.0]),
        rejected_len=torch.tensor([3.0, 3.0]),
        ref_chosen=torch.tensor([-5.0, -8.0]),
        ref_rejected=torch.tensor([-5.0, -8.0]),
    )
    out = get_loss("rpo")(b, beta=0.5, alpha=0.3)
    # h = (1 - (-1), -1 - 1) = (2, -2); nll = (4/2, 9/3)
    expected = [math.log1p(math.exp(-1.0)) + 0.3 * 2.0, math.log1p(math.exp(1.0)) + 0.3 * 3.0]
    assert out.loss.tolist() == pytest.approx(expected)
    combined = combine_losses(b, ["dpo", "sft"], [1.0, 0.3], {"dpo": {"beta": 0.5}})
    assert torch.allclose(out.loss, combined.loss)
    assert out.metrics["nll_loss"].tolist() == pytest.approx([2.0, 3.0])
    assert torch.allclose(get_loss("rpo")(b, beta=0.5, alpha=0.0).loss, get_loss("dpo")(b, beta=0.5).loss)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        get_loss("rpo")(b, alpha=-1.0)
