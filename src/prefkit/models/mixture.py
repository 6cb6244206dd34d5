"""Mixture of Bradley-Terry reward models over latent user groups, fit by EM (MaxMin-RLHF).

Paper: Chakraborty, Qiu, Yuan, Koppel, Huang, Manocha, Bedi, Wang, "MaxMin-RLHF: Alignment with
Diverse Human Preferences" (2024), arXiv:2402.08925.

A single Bradley-Terry reward fitted to the pooled pairs of several user groups serves the
majority: MaxMin-RLHF shows that its error on a minority group cannot be made small. The remedy is
one reward per group, with the group of each user latent and learned by expectation-maximisation:

- ``K`` reward heads ``r_k(x) = w_k . phi(x)`` on the frozen embeddings ``phi(x)`` of
  `prefkit.models.embeddings.EmbeddedPairs` (or a small MLP per head);
- every pair of user ``u`` shares the user's group ``z_u``, ``P(z_u = k) = pi_k``, and
  ``P(c > r | z_u = k) = sigma(r_k(c) - r_k(r))``;
- log-likelihood ``L = sum_u log sum_k pi_k prod_{i in u} sigma(r_k(c_i) - r_k(r_i))``.

`MixtureBT.fit` runs EM. E-step: responsibilities ``gamma_uk`` proportional to
``pi_k prod_{i in u} sigma(r_k(c_i) - r_k(r_i))``. M-step: ``pi_k = mean_u gamma_uk`` and each head
a weighted Bradley-Terry fit, ``min_w -sum_i gamma_{u(i)k} log sigma(r_k(c_i) - r_k(r_i)) / N +
(l2 / 2) sum_k ||w_k||^2`` by a few L-BFGS iterations, kept only if it lowers that objective (a
generalised EM step). So the fitted objective ``J = L / N - (l2 / 2) sum_k ||w_k||^2`` (the
log-posterior per pair under a Gaussian prior on the weights; `MixtureBT.fit` returns its history)
never decreases. The penalty keeps the weights finite on separable data.

prefkit's EM is soft (responsibilities); the paper assigns each user to its most likely group
(hard EM), which `MixtureBT.predict_group` gives after fitting. Initialisation: spherical k-means
(k-means++ seeding) of the users' mean embedding differences ``mean_i (phi(c_i) - phi(r_i))``, the
direction a linear reward of that user must point in.

MaxMin alignment then serves the worst-off group: the policy maximises ``min_k E[r_k]``.
`maxmin_weights` gives the weight of each group's reward in that objective (one-hot on the worst
group, MaxMin-RLHF's update; or a soft-min), `group_accuracy` and `worst_group` report per group.
The policy optimisation itself belongs to the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefkit.models.embeddings import EmbeddedPairs, EmbeddingHead

__all__ = [
    "MixtureBT",
    "group_accuracy",
    "maxmin_weights",
    "reward_head",
    "spherical_kmeans",
    "user_rows",
    "worst_group",
]


def reward_head(dim: int, hidden_size: int | None) -> nn.Module:
    """``[N, dim] -> [N, 1]``: linear without bias (a bias cancels in ``r(c) - r(r)``), or a one-hidden-layer
    ReLU MLP when ``hidden_size`` is set."""
    if hidden_size is None:
        return nn.Linear(dim, 1, bias=False)
    return nn.Sequential(nn.Linear(dim, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1, bias=False))


def user_rows(pairs: EmbeddedPairs, users: Sequence[str]) -> Tensor:
    """``[N]`` each row's user as an index into ``users`` (a model's users), matched by id.

    Raises ValueError for rows without a user and KeyError for users not in ``users``.
    """
    if bool((pairs.user_index < 0).any()):
        n = int((pairs.user_index < 0).sum())
        raise ValueError(
            f"{n} of {len(pairs)} pairs have no user_id; personalized models need one on every pair "
            "(drop them with pairs.subset(pairs.user_index >= 0))"
        )
    position = {u: i for i, u in enumerate(users)}
    present = sorted({pairs.users[i] for i in pairs.user_index.unique().tolist()})
    unknown = [u for u in present if u not in position]
    if unknown:
        raise KeyError(f"users unknown to the model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    mapping = torch.tensor([position.get(u, -1) for u in pairs.users], dtype=torch.long)
    return mapping.to(pairs.user_index.device)[pairs.user_index]  # on the rows' device (a GPU batch)


def user_positions(model_users: Sequence[str], users: Sequence[str]) -> Tensor:
    """``[len(users)]`` the position of each of ``users`` in ``model_users`` (a model's users).

    Raises KeyError naming the users the model does not know.
    """
    position = {u: i for i, u in enumerate(model_users)}
    unknown = [u for u in users if u not in position]
    if unknown:
        raise KeyError(f"users unknown to the model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return torch.tensor([position[u] for u in users], dtype=torch.long)


class MixtureBT(EmbeddingHead):
    """``K`` Bradley-Terry reward heads on embeddings with a latent group per user, fit by EM.

    Formula: L = sum_u log sum_k pi_k prod_{i in u} sigma(r_k(c_i) - r_k(r_i)),  r_k(x) = w_k . phi(x)

    Paper: Chakraborty et al. (2024), "MaxMin-RLHF: Alignment with Diverse Human Preferences",
    arXiv:2402.08925 (see the module docstring for the EM steps).

    Args:
        dim: embedding size ``H``.
        k: number of groups (heads).
        hidden_size: None for linear heads, else the hidden width of each head's MLP.
        users: the user ids of the fitted responsibilities (set by `fit`).

    After `fit`: ``users``; buffers ``mixing_weights`` ``[K]`` (``pi``) and ``responsibilities``
    ``[U, K]`` (``gamma``, rows in ``users`` order; a user without pairs in the fitted data keeps
    ``pi``); ``history``: the objective ``J`` after each E-step.
    """

    model_type = "prefkit_mixture_bt"

    def __init__(self, dim: int, k: int, hidden_size: int | None = None, users: Sequence[str] = ()):
        super().__init__()
        if k < 1 or dim < 1:
            raise ValueError(f"dim and k must be >= 1, got dim={dim}, k={k}")
        self.dim, self.k, self.hidden_size = dim, k, hidden_size
        self.users = list(users)
        self.heads = nn.ModuleList(reward_head(dim, hidden_size) for _ in range(k))
        self.register_buffer("mixing_weights", torch.full((k,), 1.0 / k))
        self.register_buffer("responsibilities", torch.full((len(self.users), k), 1.0 / k))
        self.history: list[float] = []

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "k": self.k, "hidden_size": self.hidden_size, "users": self.users}

    # ---- rewards ---------------------------------------------------------------------------

    def reward(self, emb: Tensor, k: int | None = None) -> Tensor:
        """``[N]`` reward of head ``k``, or ``[N, K]`` of every head when ``k`` is None."""
        if k is not None:
            return self.heads[k](emb).squeeze(-1)
        return torch.cat([head(emb) for head in self.heads], dim=-1)

    def pair_logits(self, pairs: EmbeddedPairs) -> Tensor:
        """``[N, K]`` ``r_k(chosen) - r_k(rejected)`` per head."""
        return self.reward(pairs.chosen) - self.reward(pairs.rejected)

    def user_reward(self, emb: Tensor, users: Sequence[str]) -> Tensor:
        """``[N]`` reward of row ``i`` for user ``users[i]``: ``sum_k gamma_uk r_k(x)``."""
        gamma = self.responsibilities[user_positions(self.users, users)]
        return (gamma * self.reward(emb)).sum(-1)

    def predict_group(self, users: Sequence[str]) -> Tensor:
        """``[len(users)]`` each user's most likely group, ``argmax_k gamma_uk``."""
        return self.responsibilities[user_positions(self.users, users)].argmax(-1)

    def pair_correct(self, pairs: EmbeddedPairs) -> Tensor:
        """``[N]`` bool: the head of the row's user's most likely group ranks chosen above rejected."""
        rows = user_rows(pairs, self.users)
        group = self.responsibilities.argmax(-1)[rows]
        with torch.no_grad():
            logits = self.pair_logits(pairs)
        return logits.gather(1, group[:, None]).squeeze(1) > 0

    # ---- EM ---------------------------------------------------------------------------------

    def _user_loglik(self, pairs: EmbeddedPairs, rows: Tensor) -> Tensor:
        """``[U, K]`` ``sum_{i in u} log sigma(r_k(c_i) - r_k(r_i))``."""
        per_row = F.logsigmoid(self.pair_logits(pairs))
        return per_row.new_zeros(len(self.users), self.k).index_add(0, rows, per_row)

    def marginal_nll(self, pairs: EmbeddedPairs, log_mixing: Tensor | None = None) -> Tensor:
        """Scalar ``-(1/N) sum_u log sum_k pi_k prod_{i in u} sigma(r_k(c_i) - r_k(r_i))`` over the users
        with rows in ``pairs`` (``N`` rows): minus the mixture's log-likelihood per pair, the quantity
        `fit` maximises by EM. Differentiable in the heads, the embeddings and ``log_mixing`` (``[K]``
        log-probabilities; default ``log(mixing_weights)``), for gradient training
        (`prefkit.models.end_to_end`)."""
        rows = user_rows(pairs, self.users)
        present = torch.bincount(rows, minlength=len(self.users)) > 0
        log_pi = self.mixing_weights.log() if log_mixing is None else log_mixing
        joint = log_pi + self._user_loglik(pairs, rows)
        return -torch.logsumexp(joint[present], -1).sum() / len(pairs)

    def set_posterior(self, pairs: EmbeddedPairs, mixing_weights: Tensor) -> None:
        """Set ``pi`` to ``mixing_weights`` ``[K]`` and the responsibilities to each user's posterior over
        the groups given ``pairs`` (an E-step; users without rows keep ``pi``): after gradient training."""
        self.mixing_weights = mixing_weights.detach().clone()
        rows = user_rows(pairs, self.users)
        self._e_step(pairs, rows, torch.bincount(rows, minlength=len(self.users)) > 0, 0.0)

    def _penalty(self, l2: float) -> Tensor:
        return 0.5 * l2 * sum(p.pow(2).sum() for p in self.heads.parameters())

    def _e_step(self, pairs: EmbeddedPairs, rows: Tensor, present: Tensor, l2: float) -> float:
        """Set the responsibilities; return the objective ``J`` at the current parameters."""
        with torch.no_grad():
            joint = self.mixing_weights.log() + self._user_loglik(pairs, rows)
            self.responsibilities = torch.where(present[:, None], joint.softmax(-1), self.mixing_weights)
            return float(torch.logsumexp(joint[present], -1).sum() / len(pairs) - self._penalty(l2))

    def _m_step(self, pairs: EmbeddedPairs, rows: Tensor, present: Tensor, l2: float, m_steps: int) -> None:
        self.mixing_weights = self.responsibilities[present].mean(0)
        weights = self.responsibilities[rows]

        def objective() -> Tensor:
            fit = (weights * F.logsigmoid(self.pair_logits(pairs))).sum() / len(pairs)
            return self._penalty(l2) - fit

        before = {k: v.clone() for k, v in self.heads.state_dict().items()}
        with torch.no_grad():
            start = float(objective())
        optimizer = torch.optim.LBFGS(self.heads.parameters(), max_iter=m_steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            end = float(objective())
        if not end <= start:  # a generalised EM step never makes the M-step objective worse (NaN included)
            self.heads.load_state_dict(before)

    def fit(
        self,
        pairs: EmbeddedPairs,
        iters: int = 50,
        *,
        m_steps: int = 20,
        l2: float = 1e-3,
        tol: float = 1e-6,
        n_init: int = 4,
        seed: int = 0,
    ) -> list[float]:
        """Fit by EM on ``pairs`` (every row needs a user); return the objective history.

        ``iters``: at most this many EM iterations, fewer when ``J`` improves by less than ``tol``.
        ``m_steps``: L-BFGS iterations per M-step. ``l2``: weight penalty. ``n_init``: k-means
        restarts of the initial grouping (the best one is kept). ``history[t]`` is ``J`` after the
        ``t``-th E-step (``history[0]`` after the first M-step from the k-means grouping); it never
        decreases (up to float rounding).
        """
        if len(pairs) == 0:
            raise ValueError("no pairs to fit")
        if pairs.dim != self.dim:
            raise ValueError(f"the pairs' embeddings have size {pairs.dim}, the model's dim is {self.dim}")
        if not (math.isfinite(l2) and l2 >= 0) or iters < 1 or m_steps < 1:
            raise ValueError(f"need l2 >= 0, iters >= 1, m_steps >= 1; got l2={l2}, iters={iters}, m_steps={m_steps}")
        self.users = list(pairs.users)
        rows = user_rows(pairs, self.users)
        present = torch.bincount(rows, minlength=len(self.users)) > 0
        self.responsibilities = self._kmeans_start(pairs, rows, present, n_init, seed)
        self.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self.heads.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        self._m_step(pairs, rows, present, l2, m_steps)
        self.history = [self._e_step(pairs, rows, present, l2)]
        for _ in range(iters - 1):
            self._m_step(pairs, rows, present, l2, m_steps)
            self.history.append(self._e_step(pairs, rows, present, l2))
            if self.history[-1] - self.history[-2] < tol:
                break
        self.eval()
        return self.history

    def _kmeans_start(self, pairs: EmbeddedPairs, rows: Tensor, present: Tensor, n_init: int, seed: int) -> Tensor:
        """``[U, K]`` one-hot groups from spherical k-means of the users' mean embedding differences."""
        diff = (pairs.chosen - pairs.rejected).float()
        sums = diff.new_zeros(len(self.users), self.dim).index_add(0, rows, diff)
        directions = F.normalize(sums[present], dim=-1)
        labels = spherical_kmeans(directions, self.k, n_init=n_init, seed=seed)
        start = torch.full((len(self.users), self.k), 1.0 / self.k)
        start[present] = F.one_hot(labels, self.k).float()
        return start


def spherical_kmeans(x: Tensor, k: int, *, n_init: int = 4, iters: int = 20, seed: int = 0) -> Tensor:
    """``[N]`` cluster labels of unit rows ``x`` ``[N, D]`` by cosine k-means, k-means++ seeding;
    the restart with the largest total cosine to its centre wins."""
    generator = torch.Generator().manual_seed(seed)
    best, best_score = None, -math.inf
    for _ in range(max(1, n_init)):
        centres = _kmeanspp(x, k, generator)
        for _ in range(iters):
            labels = (x @ centres.T).argmax(-1)
            sums = x.new_zeros(k, x.shape[1]).index_add(0, labels, x)
            centres = torch.where(sums.norm(dim=-1, keepdim=True) > 0, F.normalize(sums, dim=-1), centres)
        labels = (x @ centres.T).argmax(-1)
        score = float((x * centres[labels]).sum())
        if score > best_score:
            best, best_score = labels, score
    return best


def _kmeanspp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``[k, D]`` initial centres: the first at random, each next one with probability proportional
    to its squared cosine distance ``(1 - cos)^2`` to the nearest centre chosen so far."""
    chosen = [int(torch.randint(x.shape[0], (1,), generator=generator))]
    for _ in range(1, k):
        distance = (1 - (x @ x[chosen].T).max(-1).values).clamp_min(0) ** 2
        if float(distance.sum()) <= 0:  # fewer distinct directions than groups
            chosen.append(int(torch.randint(x.shape[0], (1,), generator=generator)))
        else:
            chosen.append(int(torch.multinomial(distance, 1, generator=generator)))
    return x[chosen].clone()


# ---- MaxMin reporting ------------------------------------------------------------------------


def group_accuracy(correct: Tensor, group: Tensor) -> dict[int, float]:
    """Pairwise accuracy per group: ``{g: mean(correct[group == g])}`` over the groups present
    (``group`` ``[N]`` long; rows with ``-1`` are left out)."""
    if correct.shape != group.shape:
        raise ValueError(f"correct {tuple(correct.shape)} and group {tuple(group.shape)} must have the same shape")
    return {g: float(correct[group == g].float().mean()) for g in sorted(set(group.tolist())) if g >= 0}


def worst_group(values: Mapping[int, float]) -> tuple[int, float]:
    """``(group, value)`` of the smallest value: the MaxMin objective ``min_k v_k`` and its argmin."""
    if not values:
        raise ValueError("no groups")
    group = min(values, key=lambda g: values[g])
    return group, values[group]


def maxmin_weights(group_rewards: Tensor, temperature: float = 0.0) -> Tensor:
    """Weights ``[K]`` on the groups' expected rewards ``[K]`` in the MaxMin policy objective.

    Formula: max_pi min_k E_{x ~ pi}[r_k(x)];  objective = sum_k weights_k * E[r_k]

    Paper: Chakraborty et al. (2024), "MaxMin-RLHF", arXiv:2402.08925 (each policy update uses
    the reward of the group whose expected reward is lowest).

    ``temperature = 0``: one-hot on the worst group (the paper's update, a subgradient of the min;
    ties go to the lowest index). ``temperature > 0``: ``softmax(-group_rewards / temperature)``,
    a smooth soft-min that tends to the one-hot as ``temperature -> 0``. The weights are constants
    (detached): multiply them into the per-group policy losses.
    """
    if group_rewards.ndim != 1 or group_rewards.numel() == 0:
        raise ValueError(f"group_rewards must be a non-empty [K] tensor, got {tuple(group_rewards.shape)}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    values = group_rewards.detach()
    if temperature == 0:
        return F.one_hot(values.argmin(), values.numel()).to(values.dtype)
    return torch.softmax(-values / temperature, dim=0)
