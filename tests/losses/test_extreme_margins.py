"""Every registered loss at |margin| = 1e4: finite loss and finite gradients (float32).

A margin this large is where a naive formula computes 0 * inf (NaN) or exp(88+) (inf): DiscoPOP's
exponential branch did before it moved to log space. For policy-gradient losses the advantage plays the
margin's part (advantages of +-1e4).
"""

import pytest
import torch

from prefkit.losses import (
    ListLogps,
    PairLogps,
    PreferenceLogits,
    RewardList,
    UnpairedLogps,
    get_loss,
    list_losses,
)
from prefkit.losses.variational import LatentRewardPair

BIG = 1e4


def _leaf(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def _batch(kind: str, sign: float):
    """A batch whose margin (log-ratio difference, reward or logit difference) is ``sign * 1e4``;
    returns the batch and the leaves whose gradients must be finite."""
    if kind == "pairwise":
        # per-token log-probs; policy chosen / rejected sums -1 and -1 - 1e4 (or swapped)
        small, large = [-0.5, -0.5, 0.0], [-0.5, -0.5 - BIG, 0.0]
        pc_t, pr_t = (small, large) if sign > 0 else (large, small)
        pct, prt = _leaf([pc_t, pc_t]), _leaf([pr_t, pr_t])
        weights = _leaf([[0.5, 1.5, 0.0]] * 2)  # token masks (sparsepo, mapo), learned ones take gradients too
        ref = torch.tensor([[-0.5, -0.5, 0.0]] * 2)
        mask = torch.tensor([[1.0, 1.0, 0.0]] * 2)
        batch = PairLogps(
            policy_chosen=pct.sum(1),
            policy_rejected=prt.sum(1),
            ref_chosen=ref.sum(1),
            ref_rejected=ref.sum(1),
            chosen_len=mask.sum(1),
            rejected_len=mask.sum(1),
            policy_chosen_tokens=pct,
            policy_rejected_tokens=prt,
            ref_chosen_tokens=ref,
            ref_rejected_tokens=ref,
            chosen_mask=mask,
            rejected_mask=mask,
            chosen_logsumsq=torch.full((2, 3), -0.7),
            rejected_logsumsq=torch.full((2, 3), -0.7),
            margin=torch.tensor([1.0, 1.0]),
            chosen_kl=torch.full((2, 3), 0.1),
            rejected_kl=torch.full((2, 3), 0.1),
            chosen_weights=weights,
            rejected_weights=weights,
            chosen_kl_weights=weights,
            rejected_kl_weights=weights,
        )
        return batch, [pct, prt, weights]
    if kind == "unpaired":
        policy = _leaf([-1.0 + sign * BIG, -1.0 - sign * BIG])
        batch = UnpairedLogps(
            policy=policy,
            ref=torch.tensor([-1.0, -1.0]),
            label=torch.tensor([True, False]),
            length=torch.tensor([3.0, 3.0]),
            ref_point=torch.tensor(0.0),
        )
        return batch, [policy]
    if kind == "reward_pair":
        chosen, rejected = _leaf([sign * BIG / 2, 0.0]), _leaf([-sign * BIG / 2, 0.0])
        batch = LatentRewardPair(
            chosen=chosen,
            rejected=rejected,
            margin=torch.tensor([1.0, 1.0]),
            mu=torch.zeros(2, 2),
            logvar=torch.zeros(2, 2),
        )
        return batch, [chosen, rejected]
    if kind == "reward_list":
        scores = _leaf([[sign * BIG, 0.0, -sign * BIG], [0.0, sign * BIG, -sign * BIG]])
        batch = RewardList(scores=scores, ranking=torch.tensor([[0, 1, 2], [1, 0, 2]]))
        return batch, [scores]
    if kind == "judge":
        logits = _leaf([sign * BIG, -sign * BIG])
        return PreferenceLogits(logits=logits, margin=torch.tensor([1.0, 1.0])), [logits]
    if kind == "policy":
        from prefkit.losses.policy_gradient import PolicyLogps

        logps = _leaf([[-0.5, -1.5, 0.0], [-2.0, -0.1, -0.3]])
        batch = PolicyLogps(
            logps=logps,
            advantages=torch.tensor([sign * BIG, -sign * BIG]),
            mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
            old_logps=logps.detach() + 0.1,
            ref_logps=logps.detach() - 0.2,
        )
        return batch, [logps]
    if kind == "list":
        policy = _leaf([[sign * BIG, 0.0], [0.0, sign * BIG]])
        batch = ListLogps(
            policy=policy,
            ranking=torch.tensor([[0, 1], [1, 0]]),
            length=torch.ones(2, 2),
            ref=torch.zeros(2, 2),
            win_prob=torch.tensor([[0.9, 0.1], [0.2, 0.8]]),
        )
        return batch, [policy]
    if kind == "process":
        from prefkit.losses import StepScores

        logits = _leaf([sign * BIG, -sign * BIG, sign * BIG])
        return StepScores(logits, torch.tensor([1.0, 0.0, 0.3]), torch.tensor([0, 0, 1]), 2), [logits]
    raise AssertionError(kind)


CASES = [(spec.name, sign) for spec in list_losses() for sign in (1.0, -1.0)]


@pytest.mark.parametrize(("name", "sign"), CASES, ids=[f"{n}-{'pos' if s > 0 else 'neg'}" for n, s in CASES])
def test_loss_and_gradient_are_finite_at_margin_1e4(name, sign):
    spec = get_loss(name)
    batch, leaves = _batch(spec.kind, sign)
    out = spec(batch, **spec.hyperparameters)
    assert torch.isfinite(out.loss).all(), f"{name}: loss {out.loss.tolist()} at margin {sign * BIG}"
    out.loss.sum().backward()
    grads = [leaf.grad for leaf in leaves if leaf.grad is not None]  # sft reads only the chosen side
    assert grads, f"{name}: no gradient"
    for grad in grads:
        assert torch.isfinite(grad).all(), f"{name}: gradient {grad}"


def test_discopop_is_finite_where_the_direct_formula_is_nan():
    """beta * h = -100: the direct form (1 - m) * -log sig(z) + m * exp(-z) gives 0 * inf = NaN in float32."""
    z = torch.tensor([-100.0])
    m = torch.sigmoid(z / 0.05)
    direct = (1.0 - m) * (-torch.nn.functional.logsigmoid(z)) + m * torch.exp(-z)
    assert torch.isnan(direct).all()  # the failure this guards against
    batch, _ = _batch("pairwise", 1.0)
    h = torch.tensor([-1000.0, -1000.0], requires_grad=True)  # beta 0.1 -> z = -100
    zeros = torch.zeros(2)
    b = PairLogps(
        policy_chosen=h,
        policy_rejected=zeros,
        ref_chosen=zeros,
        ref_rejected=zeros,
        chosen_len=torch.ones(2),
        rejected_len=torch.ones(2),
    )
    out = get_loss("discopop")(b, beta=0.1, tau=0.05)
    # sigma(-z/tau) = 1 and sigma(z/tau) * e^{-z} = e^{-2000 + 100} = 0: the loss is softplus(100) = 100
    assert torch.allclose(out.loss, torch.tensor([100.0, 100.0]))
    out.loss.sum().backward()
    assert torch.allclose(h.grad, torch.tensor([-0.1, -0.1]))
