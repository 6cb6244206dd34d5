"""kto, bco and their reference-point helpers."""

import math

import pytest
import torch

from prefkit.losses import PairLogps, UnpairedLogps, get_loss, list_losses
from prefkit.losses.unpaired import bco_update_reward_shift, kto_kl_estimate

POLICY = [-5.0, -7.5, -3.0, -9.0]
REF = [-6.0, -7.0, -4.5, -8.0]
LABEL = [True, False, True, False]


def batch(ref_point=0.0, grad=False, policy=POLICY, ref=REF, label=LABEL):
    return UnpairedLogps(
        policy=torch.tensor(policy, dtype=torch.float64, requires_grad=grad),
        ref=torch.tensor(ref, dtype=torch.float64),
        label=torch.tensor(label),
        length=torch.tensor([3.0] * len(policy), dtype=torch.float64),
        ref_point=None if ref_point is None else torch.tensor(ref_point, dtype=torch.float64),
    )


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def close(tensor, expected, rel=1e-12):
    assert tensor.tolist() == pytest.approx(expected, rel=rel, abs=1e-15)


@pytest.mark.parametrize("name", ["kto", "bco"])
def test_registered_unpaired(name):
    spec = get_loss(name)
    assert spec.kind == "unpaired" and spec.needs_reference
    assert spec in list_losses("unpaired")


def test_published_defaults():
    assert get_loss("kto").hyperparameters == {
        "beta": 0.1,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
    }
    assert get_loss("bco").hyperparameters == {"beta": 0.1}


# ---------------------------------------------------------------- kto


def test_kto_closed_form_and_rewards():
    beta, z0, wd, wu = 0.5, 0.3, 1.0, 1.5
    out = get_loss("kto")(batch(z0), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    expected = []
    for p, r, good in zip(POLICY, REF, LABEL):
        lr = p - r
        expected.append(wd * (1 - sigmoid(beta * (lr - z0))) if good else wu * (1 - sigmoid(beta * (z0 - lr))))
    close(out.loss, expected)
    close(out.metrics["rewards"], [beta * (p - r) for p, r in zip(POLICY, REF)])
    assert not out.metrics["rewards"].requires_grad


def test_kto_gradient_signs():
    b = batch(0.2, grad=True)
    get_loss("kto")(b).loss.sum().backward()
    g = b.policy.grad
    desirable = torch.tensor(LABEL)
    assert (g[desirable] < 0).all() and (g[~desirable] > 0).all()


def test_kto_zero_reference_point_limit():
    # z0 = 0, unit weights: the desirable and the undesirable value of the same completion sum to 1
    beta = 0.7
    good = get_loss("kto")(batch(0.0, label=[True] * 4), beta=beta).loss
    bad = get_loss("kto")(batch(0.0, label=[False] * 4), beta=beta).loss
    close(good + bad, [1.0] * 4)
    close(good, [1 - sigmoid(beta * (p - r)) for p, r in zip(POLICY, REF)])


def test_kto_weights_scale_each_class():
    base = get_loss("kto")(batch(0.1)).loss
    scaled = get_loss("kto")(batch(0.1), desirable_weight=2.0, undesirable_weight=0.5).loss
    close(scaled, [x * (2.0 if good else 0.5) for x, good in zip(base.tolist(), LABEL)])


def test_kto_accepts_python_float_reference_point():
    b = batch(None)
    b.ref_point = 0.25
    assert torch.allclose(get_loss("kto")(b).loss, get_loss("kto")(batch(0.25)).loss)


def test_kto_reference_point_gets_no_gradient():
    b = batch(None, grad=True)
    b.ref_point = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    get_loss("kto")(b).loss.sum().backward()
    assert b.ref_point.grad is None


def test_kto_requires_reference_point_and_reference():
    with pytest.raises(ValueError, match="ref_point"):
        get_loss("kto")(batch(None))
    b = batch(0.0)
    b.ref = None
    with pytest.raises(ValueError, match="reference"):
        get_loss("kto")(b)


def test_kto_kl_estimate():
    policy = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    ref = torch.tensor([-4.0, -5.5, -2.0])
    kl = kto_kl_estimate(policy, ref)
    assert kl.shape == () and not kl.requires_grad
    assert kl.item() == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    # a negative estimate is clamped to 0
    assert kto_kl_estimate(ref, policy.detach()).item() == 0.0


# ---------------------------------------------------------------- bco


def test_bco_closed_form():
    beta, delta = 0.2, 0.05
    out = get_loss("bco")(batch(delta), beta=beta)
    expected = []
    for p, r, good in zip(POLICY, REF, LABEL):
        rew = beta * (p - r)
        expected.append(-log_sigmoid(rew - delta) if good else -log_sigmoid(-(rew - delta)))
    close(out.loss, expected)
    close(out.metrics["rewards"], [beta * (p - r) for p, r in zip(POLICY, REF)])


def test_bco_gradient_signs():
    b = batch(0.1, grad=True)
    get_loss("bco")(b).loss.sum().backward()
    g = b.policy.grad
    desirable = torch.tensor(LABEL)
    assert (g[desirable] < 0).all() and (g[~desirable] > 0).all()


def test_bco_zero_shift_limit_is_logistic_regression():
    # delta = 0: desirable -> -log sigmoid(r), undesirable -> -log(1 - sigmoid(r))
    out = get_loss("bco")(batch(0.0), beta=1.0)
    expected = [
        -math.log(sigmoid(p - r)) if good else -math.log(1 - sigmoid(p - r)) for p, r, good in zip(POLICY, REF, LABEL)
    ]
    close(out.loss, expected, rel=1e-10)


def test_bco_on_a_pair_matches_paired_form():
    # a chosen completion labelled desirable plus a rejected one labelled undesirable is the
    # paired BCO loss with the same shift
    if "bco_pair" not in {s.name for s in list_losses()}:
        pytest.skip("bco_pair not registered")
    beta, delta = 0.1, 0.3
    unpaired = get_loss("bco")(
        batch(delta, policy=[-5.0, -7.5], ref=[-6.0, -7.0], label=[True, False]), beta=beta
    ).loss.sum()
    pair = PairLogps(
        policy_chosen=torch.tensor([-5.0], dtype=torch.float64),
        policy_rejected=torch.tensor([-7.5], dtype=torch.float64),
        chosen_len=torch.tensor([3.0]),
        rejected_len=torch.tensor([3.0]),
        ref_chosen=torch.tensor([-6.0], dtype=torch.float64),
        ref_rejected=torch.tensor([-7.0], dtype=torch.float64),
    )
    paired = get_loss("bco_pair")(pair, beta=beta, reward_shift=delta).loss
    assert unpaired.item() == pytest.approx(paired.item(), rel=1e-12)


def test_bco_requires_reward_shift():
    with pytest.raises(ValueError, match="ref_point"):
        get_loss("bco")(batch(None))


def test_bco_update_reward_shift_is_a_cumulative_mean():
    delta, count = bco_update_reward_shift(0.0, 0, torch.tensor([1.0, 2.0]), torch.tensor([3.0]))
    assert (delta.item(), count) == (pytest.approx(2.0), 3)
    delta, count = bco_update_reward_shift(delta, count, torch.tensor([6.0]), None)
    assert (delta.item(), count) == (pytest.approx(3.0), 4)
    # nothing new: unchanged
    same, same_count = bco_update_reward_shift(delta, count, None, torch.zeros(0))
    assert (same.item(), same_count) == (pytest.approx(3.0), 4)

    torch.manual_seed(0)
    seen = []
    delta, count = torch.tensor(0.0), 0
    for _ in range(5):
        chosen, rejected = torch.randn(3, requires_grad=True), torch.randn(2)
        delta, count = bco_update_reward_shift(delta, count, chosen, rejected)
        seen += chosen.tolist() + rejected.tolist()
        assert not delta.requires_grad and delta.dtype == torch.float32
        assert delta.item() == pytest.approx(sum(seen) / len(seen), rel=1e-6)
    assert count == len(seen)
