"""PAL: K shared prototype rewards, each user a point on the simplex over them.

Paper: Chen, Chen, Rege, Vinayak, "PAL: Pluralistic Alignment Framework for Learning from
Heterogeneous Preferences" (2024), arXiv:2406.08469.

Users differ, but not arbitrarily: PAL assumes ``K`` prototypical preferences shared by the
population, and each user ``u`` a mixture of them with weights ``a_u = softmax(theta_u)`` on the
simplex. A shared map ``f`` (identity, linear, or a two-layer MLP) takes the frozen embedding
``phi(x)`` of a (prompt, response) (`prefkit.models.embeddings.EmbeddedPairs`) to a preference
space ``R^d``; the prototypes are ``p_1, ..., p_K`` in ``R^d``. Two variants:

- ``"ideal_point"`` (the paper's model A, Coombs' ideal-point model): the user's ideal point is
  ``a_u = sum_k a_uk p_k`` and the closer a response lies to it the better,
  ``r_u(x) = -s ||f(x) - a_u||^2``;
- ``"mixture"`` (the paper's model B with the inner-product score, here with prompt-free
  prototypes): ``K`` prototype rewards ``r_k(x) = <p_k, f(x)>`` and ``r_u(x) = s sum_k a_uk r_k(x)``.

``s = exp(log_scale)`` is a learned temperature. Both are trained end to end on the pairs with the
Bradley-Terry loss ``-log sigma(r_u(c) - r_u(r))`` (`prefkit.losses.reward.bt`), Adam.

Few-shot: `PAL.fit_new_user` fits only an unseen user's ``theta`` from a handful of their pairs,
``f`` and the prototypes frozen, starting from the population's mean weights (the prediction for
a user with no pairs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefkit.models.embeddings import EmbeddedPairs, EmbeddingHead
from prefkit.models.mixture import user_positions, user_rows

__all__ = ["PAL", "VARIANTS"]

VARIANTS = ("ideal_point", "mixture")


def _projector(dim: int, pref_dim: int | None, hidden_size: int | None) -> nn.Module:
    if hidden_size is not None:
        if pref_dim is None:
            raise ValueError("hidden_size needs pref_dim (the MLP's output size)")
        return nn.Sequential(nn.Linear(dim, hidden_size), nn.ReLU(), nn.Linear(hidden_size, pref_dim))
    return nn.Identity() if pref_dim is None else nn.Linear(dim, pref_dim)


class PAL(EmbeddingHead):
    """PAL reward model on embeddings: ``K`` prototypes, user weights on the simplex.

    Formula: ideal_point: r_u(x) = -s ||f(x) - sum_k a_uk p_k||^2;  mixture: r_u(x) = s sum_k a_uk <p_k, f(x)>;
    a_u = softmax(theta_u);  P(c > r | u) = sigma(r_u(c) - r_u(r))

    Paper: Chen et al. (2024), "PAL: Pluralistic Alignment Framework for Learning from
    Heterogeneous Preferences", arXiv:2406.08469.

    Args:
        dim: embedding size ``H``.
        k: number of prototypes.
        variant: ``"ideal_point"`` or ``"mixture"``.
        pref_dim: size ``d`` of the preference space; None: ``f`` is the identity (``d = H``).
        hidden_size: with ``pref_dim``, ``f`` is a ReLU MLP ``H -> hidden_size -> d``; else linear.
        users: the seen users' ids (set by `fit` when empty), one row of ``user_logits`` each.
    """

    model_type = "prefkit_pal"

    def __init__(
        self,
        dim: int,
        k: int,
        variant: str = "ideal_point",
        pref_dim: int | None = None,
        hidden_size: int | None = None,
        users: Sequence[str] = (),
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if k < 1 or dim < 1:
            raise ValueError(f"dim and k must be >= 1, got dim={dim}, k={k}")
        self.dim, self.k, self.variant, self.pref_dim, self.hidden_size = dim, k, variant, pref_dim, hidden_size
        self.users = list(users)
        self.f = _projector(dim, pref_dim, hidden_size)
        self.prototypes = nn.Parameter(torch.randn(k, pref_dim or dim) / math.sqrt(pref_dim or dim))
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.user_logits = nn.Parameter(torch.zeros(len(self.users), k))

    def config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "k": self.k,
            "variant": self.variant,
            "pref_dim": self.pref_dim,
            "hidden_size": self.hidden_size,
            "users": self.users,
        }

    # ---- rewards ---------------------------------------------------------------------------

    def user_weights(self, users: Sequence[str] | None = None) -> Tensor:
        """``[U, K]`` simplex weights ``softmax(theta_u)`` of ``users`` (default: all, in order)."""
        weights = self.user_logits.softmax(-1)
        return weights if users is None else weights[user_positions(self.users, users)]

    def mean_weights(self) -> Tensor:
        """``[K]`` the seen users' mean weights: the prior for a user with no pairs."""
        if not self.users:
            raise ValueError("the model has no users yet; fit it first")
        return self.user_weights().mean(0).detach()

    def prototype_rewards(self, emb: Tensor) -> Tensor:
        """``[N, K]`` the reward of a user at each prototype (unscaled): ``<p_k, f(x)>`` or
        ``-||f(x) - p_k||^2``."""
        z = self.f(emb)
        if self.variant == "mixture":
            return z @ self.prototypes.T
        return -(z[:, None, :] - self.prototypes).pow(2).sum(-1)

    def reward(self, emb: Tensor, weights: Tensor) -> Tensor:
        """``[N]`` reward of rows ``emb`` ``[N, H]`` for simplex ``weights`` ``[N, K]`` or ``[K]``."""
        weights = weights.expand(emb.shape[0], self.k)
        z = self.f(emb)
        if self.variant == "mixture":
            raw = ((z @ self.prototypes.T) * weights).sum(-1)
        else:
            raw = -(z - weights @ self.prototypes).pow(2).sum(-1)
        return self.log_scale.exp() * raw

    def user_reward(self, emb: Tensor, users: Sequence[str]) -> Tensor:
        """``[N]`` reward of row ``i`` for seen user ``users[i]``."""
        return self.reward(emb, self.user_weights(users))

    def pair_logits(self, pairs: EmbeddedPairs, weights: Tensor | None = None) -> Tensor:
        """``[N]`` ``r(c) - r(r)`` with each row's own user's weights, or with ``weights`` (``[K]``
        or ``[N, K]``) for every row."""
        if weights is None:
            weights = self.user_logits.softmax(-1)[user_rows(pairs, self.users)]
        return self.reward(pairs.chosen, weights) - self.reward(pairs.rejected, weights)

    # ---- training ---------------------------------------------------------------------------

    def fit(
        self,
        pairs: EmbeddedPairs,
        epochs: int = 100,
        *,
        lr: float = 1e-2,
        batch_size: int = 256,
        seed: int = 0,
    ) -> list[float]:
        """Train ``f``, the prototypes, the scale and every user's weights end to end with the
        Bradley-Terry loss (Adam); return the mean loss of each epoch.

        The first fit takes its users from ``pairs.users``; later fits need every row's user to
        be one of the model's users. Every row needs a user.
        """
        if pairs.dim != self.dim:
            raise ValueError(f"the pairs' embeddings have size {pairs.dim}, the model's dim is {self.dim}")
        if len(pairs) == 0 or epochs < 1:
            raise ValueError(f"need at least one pair and one epoch, got {len(pairs)} pairs, epochs={epochs}")
        if not self.users:
            self.users = list(pairs.users)
            self.user_logits = nn.Parameter(torch.zeros(len(self.users), self.k))
        rows = user_rows(pairs, self.users)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.train()
        history = []
        for _ in range(epochs):
            total = 0.0
            for batch in torch.randperm(len(pairs), generator=generator).split(batch_size):
                weights = self.user_logits.softmax(-1)[rows[batch]]
                loss = self._bt_loss(pairs.chosen[batch], pairs.rejected[batch], weights).sum() / len(pairs)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
            history.append(total)
        self.eval()
        return history

    def objective(self, pairs: EmbeddedPairs) -> Tensor:
        """Scalar mean Bradley-Terry loss of ``pairs``, each row with its own user's weights: the loss
        `fit` minimises, differentiable in the head and in the embeddings (so a backbone can be trained
        through it, `prefkit.models.end_to_end`)."""
        weights = self.user_logits.softmax(-1)[user_rows(pairs, self.users)]
        return self._bt_loss(pairs.chosen, pairs.rejected, weights).mean()

    def _bt_loss(self, chosen: Tensor, rejected: Tensor, weights: Tensor) -> Tensor:
        """Per-pair Bradley-Terry negative log-likelihood ``-log sigma(r_u(chosen) - r_u(rejected))`` (the
        registered ``bt`` loss; written out here because models do not import losses)."""
        return -F.logsigmoid(self.reward(chosen, weights) - self.reward(rejected, weights))

    def fit_new_user(
        self, pairs: EmbeddedPairs, steps: int = 100, *, lr: float = 0.1, user: str | None = None
    ) -> Tensor:
        """Fit an unseen user's simplex weights ``[K]`` from their few pairs (all rows of ``pairs``
        are taken as theirs; user ids are ignored), everything else frozen.

        Starts from the seen users' mean weights (`mean_weights`, the prediction for zero pairs)
        and minimises the summed Bradley-Terry loss of the pairs with Adam for ``steps`` steps.
        ``user``: also add the user to the model under this id (then `user_reward` serves them).
        """
        if len(pairs) == 0:
            raise ValueError("no pairs for the new user; use mean_weights() for a user without pairs")
        if user is not None and user in self.users:
            raise ValueError(f"user {user!r} is already one of the model's users")
        theta = nn.Parameter(self.mean_weights().log())
        optimizer = torch.optim.Adam([theta], lr=lr)
        frozen = [p for p in self.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            for _ in range(steps):
                loss = self._bt_loss(pairs.chosen, pairs.rejected, theta.softmax(-1)).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        if user is not None:
            self.users.append(user)
            self.user_logits = nn.Parameter(torch.cat([self.user_logits.detach(), theta.detach()[None]]))
        return theta.detach().softmax(-1)
