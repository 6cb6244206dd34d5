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
