"""Variational Preference Learning (VPL): a reward conditioned on a user latent inferred from a few of
the user's labelled pairs.

Paper: Poddar, Wan, Ivison, Gupta, Jaques, "Personalizing Reinforcement Learning from Human Feedback
with Variational Preference Learning" (2024), arXiv:2408.10075.

Model, on fixed response embeddings (`prefkit.models.embeddings.EmbeddedPairs`):

- encoder: each context pair ``(e_w, e_l)`` of one user (``e_w`` preferred) is mapped by an MLP to
  ``h = f([e_w, e_l])``; the mean over the context set (permutation invariant, any size) gives
  ``q(z | context) = N(mu, diag exp(logvar))`` through a linear layer;
- reward ``r(e, z) = g([e, z])``, an MLP on the response embedding and the latent;
- ``P(a > b | z) = sigmoid(r(e_a, z) - r(e_b, z))``;
- training maximises the ELBO per user, ``E_{z ~ q}[sum_targets log P(y | z)] - beta_kl * KL(q || N(0, I))``,
  with ``z`` reparameterised; the same objective is the registered loss ``vpl_elbo``
  (`prefkit.losses.variational`), for trainers.

Posterior collapse (the encoder ignores the context, ``q = prior``, every user gets the same reward)
shows in two logged numbers: the KL and the number of *active* latent units, those whose posterior
mean varies across users' contexts: ``Var_context(E_q[z_i]) > 0.01`` (Burda, Grosse, Salakhutdinov
(2016), "Importance Weighted Autoencoders", arXiv:1509.00519).

A new user is served from a few of their labelled pairs: `VPL.predict` encodes them and scores
queries under the posterior mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefkit.models.embeddings import EmbeddedPairs, EmbeddingHead

__all__ = ["MIN_STD", "VPL", "active_units"]

MIN_STD = 1e-6  # floor of the per-dimension std used to standardise features (constant dimensions)


def active_units(means: Tensor, threshold: float = 0.01) -> int:
    """Number of latent dimensions ``i`` with ``Var_n(means[n, i]) > threshold``.

    ``means`` ``[N, D]``: the posterior means ``E_q[z]`` of ``N >= 2`` contexts (population variance
    over the rows). Burda et al. (2016)'s activity measure with their threshold 0.01.
    """
    if means.dim() != 2 or means.shape[0] < 2:
        raise ValueError(
            f"active_units needs posterior means of at least 2 contexts, [N>=2, D]; got {tuple(means.shape)}"
        )
    return int((means.var(dim=0, correction=0) > threshold).sum())


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _UserRows:
    """Each user's row indices as a padded ``[U, M]`` table, for sampling context and target sets."""

    def __init__(self, pairs: EmbeddedPairs, min_rows: int):
        users, counts = torch.unique(pairs.user_index[pairs.user_index >= 0], return_counts=True)
        if users.numel() == 0:
            raise ValueError("VPL needs pairs with user ids; every row has user_index -1")
        short = users[counts < min_rows]
        if short.numel():
            names = [pairs.users[i] for i in short[:5].tolist()]
            raise ValueError(
                f"{short.numel()} user(s) have fewer than {min_rows} pairs (context_size and target_size each "
                f"need that many), e.g. {names}; keep only users with enough pairs (EmbeddedPairs.of_users)"
            )
        self.counts = counts
        self.table = torch.zeros(users.numel(), int(counts.max()), dtype=torch.long)
        for slot, user in enumerate(users.tolist()):
            rows = (pairs.user_index == user).nonzero().flatten()
            self.table[slot, : rows.numel()] = rows

    def __len__(self) -> int:
        return self.table.shape[0]

    def sample(self, slots: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """``[len(slots), n]`` rows: for each user slot, ``n`` of its rows without replacement."""
        table, counts = self.table[slots], self.counts[slots]
        keys = torch.rand(table.shape, generator=generator)
        keys[torch.arange(table.shape[1]) >= counts[:, None]] = 2.0  # padding sorts last
        return table.gather(1, keys.argsort(dim=1)[:, :n])


class VPL(EmbeddingHead):
    """Variational Preference Learning head on response embeddings.

    Formula: q(z | C) = N(mu, diag exp(logvar)), [mu, logvar] = W mean_{(e_w, e_l) in C} f([e_w, e_l]) + b;
    r(e, z) = g([e, z]); P(a > b | z) = sigmoid(r(e_a, z) - r(e_b, z));
    loss = -E_q[sum_targets log P(y | z)] + beta_kl * KL(q || N(0, I))

    Paper: Poddar, Wan, Ivison, Gupta, Jaques (2024), "Personalizing Reinforcement Learning from
    Human Feedback with Variational Preference Learning", arXiv:2408.10075.

    Args:
        dim: size ``H`` of the response embeddings.
        latent_dim: size ``D`` of the user latent ``z``.
        hidden: width of the encoder's pair MLP ``f`` and of the reward MLP ``g`` (two hidden layers each).
        standardize: standardise every embedding ``e`` to ``(e - mean) / std`` per dimension before the
            encoder and the reward read it, with ``mean`` and ``std`` (buffers ``feature_mean`` and
            ``feature_std``, saved with the model) set by `fit` from its training pairs (chosen and
            rejected rows; ``std`` at least `MIN_STD`). For features of large or uneven scale, e.g.
            sum-pooled hidden states. Until `fit` runs they are 0 and 1 (no change).
    """

    model_type = "prefkit_vpl"

    def __init__(self, dim: int, latent_dim: int = 8, hidden: int = 64, standardize: bool = False):
        super().__init__()
        for name, value in (("dim", dim), ("latent_dim", latent_dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VPL: {name} must be a positive int, got {value!r}")
        if not isinstance(standardize, bool):
            raise ValueError(f"VPL: standardize must be true or false, got {standardize!r}")
        self.dim, self.latent_dim, self.hidden, self.standardize = dim, latent_dim, hidden, standardize
        self.pair_encoder = _mlp([2 * dim, hidden, hidden])
        self.posterior = nn.Linear(hidden, 2 * latent_dim)
        self.reward_net = _mlp([dim + latent_dim, hidden, hidden, 1])
        if standardize:
            self.register_buffer("feature_mean", torch.zeros(dim))
            self.register_buffer("feature_std", torch.ones(dim))

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "latent_dim": self.latent_dim, "hidden": self.hidden, "standardize": self.standardize}

    def _standardized(self, emb: Tensor) -> Tensor:
        """``emb`` standardised by the fitted per-dimension statistics (``standardize=True``), else itself."""
        if not self.standardize:
            return emb
        return (emb - self.feature_mean) / self.feature_std

    def _fit_feature_statistics(self, pairs: EmbeddedPairs) -> None:
        """Set ``feature_mean`` / ``feature_std`` from the chosen and rejected rows of ``pairs``."""
        with torch.no_grad():
            std, mean = torch.std_mean(torch.cat([pairs.chosen, pairs.rejected]), dim=0, correction=0)
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std.clamp_min(MIN_STD))

    def encode(self, chosen: Tensor, rejected: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Posterior ``(mu, logvar)``, each ``[..., D]``, from context pairs ``chosen``/``rejected`` ``[..., C, H]``.

        ``mask`` ``[..., C]`` (bool) marks the real context pairs of a padded set (default: all).
        The result does not depend on the order of the ``C`` pairs.
        """
        if chosen.shape != rejected.shape or chosen.dim() < 2 or chosen.shape[-1] != self.dim:
            raise ValueError(
                f"context chosen and rejected must both be [..., C, {self.dim}]; got "
                f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
            )
        features = self.pair_encoder(torch.cat([self._standardized(chosen), self._standardized(rejected)], dim=-1))
        if mask is None:
            pooled = features.mean(dim=-2)
        else:
            weights = mask.to(features.dtype).unsqueeze(-1)
            pooled = (features * weights).sum(dim=-2) / weights.sum(dim=-2).clamp(min=1.0)
        mu, logvar = self.posterior(pooled).chunk(2, dim=-1)
        return mu, logvar

    def reward(self, emb: Tensor, z: Tensor) -> Tensor:
        """``[...]`` rewards of response embeddings ``emb`` ``[..., H]`` under latents ``z`` ``[..., D]``
        (broadcast against ``emb``'s leading dimensions)."""
        z = z.expand(*emb.shape[:-1], z.shape[-1])
        return self.reward_net(torch.cat([self._standardized(emb), z], dim=-1)).squeeze(-1)

    def predict(self, context: EmbeddedPairs, query: EmbeddedPairs) -> Tensor:
        """``[Q]`` probabilities that ``query.chosen`` beats ``query.rejected`` for the one user whose
        labelled pairs are ``context`` (all its rows; user ids are not read), under the posterior mean."""
        if len(context) == 0:
            raise ValueError("VPL.predict needs at least one context pair")
        with torch.no_grad():
            mu, _ = self.encode(context.chosen.float(), context.rejected.float())
            margin = self.reward(query.chosen.float(), mu) - self.reward(query.rejected.float(), mu)
        return torch.sigmoid(margin)

    def count_active_units(self, chosen: Tensor, rejected: Tensor, threshold: float = 0.01) -> int:
        """`active_units` of the posterior means of ``N`` contexts ``chosen``/``rejected`` ``[N, C, H]``."""
        with torch.no_grad():
            mu, _ = self.encode(chosen, rejected)
        return active_units(mu, threshold)

    def episode_loss(self, pairs: EmbeddedPairs, context: Tensor, targets: Tensor, beta_kl: float):
        """Mean negative ELBO over a batch of episodes, and its metrics: the training objective.

        Episode ``u`` is one user's context set ``context[u]`` and target set ``targets[u]`` (row indices
        into ``pairs``, ``[U, C]`` and ``[U, n]``). Returns ``(loss, metrics)`` with ``metrics`` ``bt``
        ``[U, n]`` (per target pair), ``kl`` ``[U]`` and ``accuracy`` ``[U, n]`` (margin > 0), detached.

        Per user: ``sum_targets -log sigma(r(e_w, z) - r(e_l, z)) + beta_kl * KL(q || N(0, I))``, the
        registered ``vpl_elbo`` summed over the user's target pairs (written out here because models do
        not import losses; a test checks that the two agree)."""
        mu, logvar = self.encode(pairs.chosen[context], pairs.rejected[context])
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        margin = self.reward(pairs.chosen[targets], z[:, None]) - self.reward(pairs.rejected[targets], z[:, None])
        bt = -F.logsigmoid(margin)  # [U, n]
        kl = 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(-1)  # [U]
        loss = (bt.sum(1) + beta_kl * kl).mean()
        metrics = {"bt": bt.detach(), "kl": kl.detach(), "accuracy": (margin > 0).float().detach()}
        return loss, metrics

    def fit(
        self,
        pairs: EmbeddedPairs,
        *,
        context_size: int = 4,
        target_size: int | None = None,
        steps: int = 500,
        beta_kl: float = 1.0,
        users_per_step: int = 32,
        lr: float = 1e-3,
        log_every: int = 50,
        probe_users: int = 256,
        seed: int = 0,
    ) -> list[dict[str, float]]:
        """Train by the ELBO on episodes: each step draws ``users_per_step`` users (with replacement),
        for each a context set of ``context_size`` of their pairs and, independently, ``target_size``
        (default ``context_size``) target pairs, all without replacement within the set. Rows with no
        user (``user_index`` -1) are not used; every user needs ``max(context_size, target_size)`` pairs.
        With ``standardize=True`` the feature statistics are first set from these rows (population std).

        Returns one dict per logged step (step 0, every ``log_every`` steps and the last): ``step``,
        ``loss`` (negative ELBO per user of that step's batch), ``bt`` (mean Bradley-Terry NLL per
        target pair), ``kl`` (mean KL per user), ``accuracy`` (target pairs ranked right under the
        sampled ``z``) and ``active_units`` (over one fixed context of each of up to ``probe_users``
        users). Adam, seeded.
        """
        target_size = context_size if target_size is None else target_size
        for name, value in (
            ("context_size", context_size),
            ("target_size", target_size),
            ("steps", steps),
            ("users_per_step", users_per_step),
            ("log_every", log_every),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VPL.fit: {name} must be a positive int, got {value!r}")
        if isinstance(probe_users, bool) or not isinstance(probe_users, int) or probe_users < 2:
            raise ValueError(f"VPL.fit: probe_users must be an int >= 2, got {probe_users!r}")
        if pairs.dim != self.dim:
            raise ValueError(f"VPL.fit: embeddings have {pairs.dim} dims, the model expects {self.dim}")
        pairs = pairs.subset(pairs.user_index >= 0)
        pairs = dataclasses.replace(pairs, chosen=pairs.chosen.float(), rejected=pairs.rejected.float())
        rows = _UserRows(pairs, max(context_size, target_size))
        if len(rows) < 2:
            raise ValueError(f"VPL.fit needs pairs of at least 2 users, got {len(rows)}")
        if self.standardize:
            self._fit_feature_statistics(pairs)
        generator = torch.Generator().manual_seed(seed)
        probe = rows.sample(torch.arange(min(len(rows), probe_users)), context_size, generator)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for step in range(steps + 1):
                slots = torch.randint(len(rows), (users_per_step,), generator=generator)
                context = rows.sample(slots, context_size, generator)
                targets = rows.sample(slots, target_size, generator)
                loss, out = self.episode_loss(pairs, context, targets, beta_kl)
                if step % log_every == 0 or step == steps:
                    history.append(self._log(step, loss, out, pairs, probe))
                if step == steps:
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return history

    def _log(self, step: int, loss: Tensor, out: dict, pairs: EmbeddedPairs, probe: Tensor) -> dict:
        return {
            "step": step,
            "loss": float(loss.detach()),
            "bt": float(out["bt"].mean()),
            "kl": float(out["kl"].mean()),
            "accuracy": float(out["accuracy"].mean()),
            "active_units": self.count_active_units(pairs.chosen[probe], pairs.rejected[probe]),
        }
