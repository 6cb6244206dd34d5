"""MiCRo: a mixture of reward heads learned from pooled binary preferences, then a context-aware router
that picks the heads' weights per prompt (and user), adapted online from a few labels.

Paper: Shen, Yao, Yang, Sun, Luo, Pan, Zhang, Zhao, "MiCRo: Mixture Modeling and Context-aware
Routing for Personalized Preference Learning" (2025), arXiv:2505.24846 (EMNLP 2025).

Model, on fixed response embeddings (`prefkit.models.embeddings.EmbeddedPairs`):

- ``K`` reward heads ``r_k(e)`` on a response embedding ``e`` (linear, or one shared hidden layer);
- mixture likelihood ``P(a > b | w) = sum_k w_k sigmoid(r_k(e_a) - r_k(e_b))``, ``w`` on the simplex.

Stage 1 (`MiCRo.fit_mixture`) fits the heads on everybody's pairs with mixture weights ``pi`` that
are uniform or learned (``pi = softmax(theta)``), maximising the mixture log-likelihood; with learned
weights an optional load-balancing term ``balance * KL(uniform || pi)`` keeps every head in use. A
single BT reward averages the subpopulations away; the mixture keeps one head per way of judging.

Stage 2 (`MiCRo.fit_router`) freezes the heads and trains a router ``w(c) = softmax(R(c))`` on a
context ``c``: the prompt embedding, optionally followed by user context features. It is trained by
the same mixture likelihood on a (small) set of labelled pairs. `MiCRo.adapt` does the online step:
a copy of the model whose router alone takes a few gradient steps on a new user's handful of labels.

Scores: `MiCRo.prob` is the routed mixture probability above (what the model is trained on and what
accuracy is read from); `MiCRo.reward` is the routed scalar reward ``sum_k w_k(c) r_k(e)`` for
ranking single responses (best-of-n, RL). The two can disagree on a pair the heads split on.

prefkit's reading: the paper's router update is an online learning step over the mixture loss;
here it is plain gradient descent (Adam) on the router's parameters, full batch.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefkit.models.embeddings import EmbeddedPairs, EmbeddingHead

__all__ = ["MiCRo", "mixture_log_likelihood"]

MIXTURES = ("uniform", "learned")


def mixture_log_likelihood(margins: Tensor, log_weights: Tensor) -> Tensor:
    """``[N]`` ``log sum_k w_k sigmoid(margins[:, k])``; ``margins`` ``[N, K]`` are ``r_k(chosen) - r_k(rejected)``,
    ``log_weights`` ``[N, K]`` or ``[K]`` (log of weights on the simplex)."""
    return torch.logsumexp(log_weights + F.logsigmoid(margins), dim=-1)


def _positive_int(owner: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")


class MiCRo(EmbeddingHead):
    """Mixture of ``K`` Bradley-Terry reward heads with a context-aware router.

    Formula: P(a > b | c) = sum_k w_k(c) sigmoid(r_k(e_a) - r_k(e_b)), w(c) = softmax(R(c));
    stage 1: w = pi (uniform or softmax(theta)), loss = -log P + balance * KL(uniform || pi);
    stage 2: heads frozen, loss = -log P

    Paper: Shen, Yao, Yang, Sun, Luo, Pan, Zhang, Zhao (2025), "MiCRo: Mixture Modeling and
    Context-aware Routing for Personalized Preference Learning", arXiv:2505.24846.

    Args:
        dim: size ``H`` of the response embeddings.
        k: number of reward heads.
        context_dim: size of the router's input (prompt embedding, plus user features if any).
        hidden: 0 for ``K`` linear heads; otherwise one shared ReLU layer of this width under them.
        router_hidden: 0 for a linear router; otherwise one ReLU layer of this width.
        mixture: stage-1 weights, ``"uniform"`` (fixed ``1/K``) or ``"learned"``.
    """

    model_type = "prefkit_micro"

    def __init__(
        self,
        dim: int,
        k: int = 2,
        context_dim: int | None = None,
        *,
        hidden: int = 0,
        router_hidden: int = 0,
        mixture: str = "uniform",
    ):
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        for name, value, minimum in (
            ("dim", dim, 1),
            ("k", k, 1),
            ("context_dim", context_dim, 1),
            ("hidden", hidden, 0),
            ("router_hidden", router_hidden, 0),
        ):
            _positive_int("MiCRo", name, value, minimum)
        if mixture not in MIXTURES:
            raise ValueError(f"MiCRo: mixture must be one of {MIXTURES}, got {mixture!r}")
        self.dim, self.k, self.context_dim = dim, k, context_dim
        self.hidden, self.router_hidden, self.mixture = hidden, router_hidden, mixture
        if hidden:
            self.heads = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, k))
        else:
            self.heads = nn.Linear(dim, k)
        self.mixture_logits = nn.Parameter(torch.zeros(k), requires_grad=mixture == "learned")
        if router_hidden:
            self.router = nn.Sequential(nn.Linear(context_dim, router_hidden), nn.ReLU(), nn.Linear(router_hidden, k))
        else:
            self.router = nn.Sequential(nn.Linear(context_dim, k))
        # an untrained router routes uniformly
        nn.init.zeros_(self.router[-1].weight)
        nn.init.zeros_(self.router[-1].bias)

    def config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "k": self.k,
            "context_dim": self.context_dim,
            "hidden": self.hidden,
            "router_hidden": self.router_hidden,
            "mixture": self.mixture,
        }

    def head_rewards(self, emb: Tensor) -> Tensor:
        """``[..., K]`` the heads' rewards of response embeddings ``[..., H]``."""
        return self.heads(emb)

    def mixture_weights(self) -> Tensor:
        """``[K]`` the stage-1 weights ``pi``."""
        return torch.softmax(self.mixture_logits, dim=-1)

    def _router_logits(self, context: Tensor) -> Tensor:
        if context.shape[-1] != self.context_dim:
            raise ValueError(f"router context has {context.shape[-1]} dims, the model expects {self.context_dim}")
        return self.router(context)

    def route(self, context: Tensor) -> Tensor:
        """``[..., K]`` the router's weights on the simplex for contexts ``[..., context_dim]``."""
        return torch.softmax(self._router_logits(context), dim=-1)

    def reward(self, emb: Tensor, context: Tensor) -> Tensor:
        """``[...]`` routed reward ``sum_k w_k(context) r_k(emb)``."""
        return (self.route(context) * self.head_rewards(emb)).sum(dim=-1)

    def prob(self, chosen: Tensor, rejected: Tensor, context: Tensor) -> Tensor:
        """``[...]`` routed mixture probability that ``chosen`` beats ``rejected``."""
        margins = self.head_rewards(chosen) - self.head_rewards(rejected)
        return mixture_log_likelihood(margins, torch.log_softmax(self._router_logits(context), dim=-1)).exp()

    def router_context(self, pairs: EmbeddedPairs, user_features: Tensor | None = None) -> Tensor:
        """``[N, context_dim]``: each row's prompt embedding, followed by its user's row of ``user_features``
        (``[len(pairs.users), F]``) when given."""
        if pairs.prompt is None:
            raise ValueError("MiCRo's router reads the prompt embedding, but these pairs have none (prompt=None)")
        if user_features is None:
            return pairs.prompt.float()
        if user_features.dim() != 2 or user_features.shape[0] != len(pairs.users):
            raise ValueError(
                f"user_features must be [{len(pairs.users)}, F] (one row per user id), got {tuple(user_features.shape)}"
            )
        if bool((pairs.user_index < 0).any()):
            raise ValueError("user_features given, but some rows have no user (user_index -1)")
        return torch.cat([pairs.prompt.float(), user_features[pairs.user_index].float()], dim=-1)

    def accuracy(self, pairs: EmbeddedPairs, user_features: Tensor | None = None) -> float:
        """Share of ``pairs`` whose routed mixture probability of the chosen response is above 1/2."""
        with torch.no_grad():
            p = self.prob(pairs.chosen.float(), pairs.rejected.float(), self.router_context(pairs, user_features))
        return float((p > 0.5).float().mean())

    def _check(self, pairs: EmbeddedPairs) -> None:
        if pairs.dim != self.dim:
            raise ValueError(f"MiCRo: embeddings have {pairs.dim} dims, the model expects {self.dim}")
        if len(pairs) == 0:
            raise ValueError("MiCRo: no pairs to fit")

    def _margins(self, pairs: EmbeddedPairs) -> Tensor:
        """``[N, K]`` each head's ``r_k(chosen) - r_k(rejected)``."""
        return self.head_rewards(pairs.chosen.float()) - self.head_rewards(pairs.rejected.float())

    def fit_mixture(
        self,
        pairs: EmbeddedPairs,
        *,
        steps: int = 300,
        lr: float = 1e-2,
        batch_size: int = 256,
        balance: float = 0.0,
        log_every: int = 50,
        seed: int = 0,
    ) -> list[dict[str, float]]:
        """Stage 1: fit the heads (and learned ``pi``) on all ``pairs`` by the mixture log-likelihood.

        ``balance`` (>= 0) weights ``KL(uniform || pi)``; it needs ``mixture="learned"``. Returns one dict
        per logged step (0, every ``log_every``, the last): ``step``, ``log_likelihood`` (mean over all
        pairs), ``accuracy`` (mixture probability > 1/2), ``weights`` (``pi`` as a list). Adam, seeded.
        """
        for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
            _positive_int("MiCRo.fit_mixture", name, value)
        if not (math.isfinite(balance) and balance >= 0):
            raise ValueError(f"MiCRo.fit_mixture: balance must be a number >= 0, got {balance!r}")
        if balance and self.mixture != "learned":
            raise ValueError("MiCRo.fit_mixture: balance only acts on learned mixture weights (mixture='learned')")
        self._check(pairs)
        params = list(self.heads.parameters()) + ([self.mixture_logits] if self.mixture == "learned" else [])
        optimizer = torch.optim.Adam(params, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        history = []
        for step in range(steps + 1):
            if step % log_every == 0 or step == steps:
                history.append(self._log_mixture(step, pairs))
            if step == steps:
                break
            batch = pairs.subset(torch.randint(len(pairs), (min(batch_size, len(pairs)),), generator=generator))
            loss, _ = self.mixture_objective(batch, balance)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return history

    def mixture_objective(self, pairs: EmbeddedPairs, balance: float = 0.0) -> tuple[Tensor, Tensor]:
        """Stage 1's training objective on a batch: ``(loss, log_likelihood)`` with ``loss`` the mean
        ``-log sum_k pi_k sigmoid(r_k(chosen) - r_k(rejected))`` plus ``balance * KL(uniform || pi)``
        and ``log_likelihood`` ``[N]`` each pair's mixture log-likelihood (detached). Differentiable
        in the heads, ``pi`` and the embeddings (so a backbone trains through it)."""
        log_pi = torch.log_softmax(self.mixture_logits, dim=-1)
        ll = mixture_log_likelihood(self._margins(pairs), log_pi)
        loss = -ll.mean()
        if balance:
            loss = loss + balance * (-math.log(self.k) - log_pi.mean())  # KL(uniform || pi)
        return loss, ll.detach()

    def _log_mixture(self, step: int, pairs: EmbeddedPairs) -> dict:
        with torch.no_grad():
            log_pi = torch.log_softmax(self.mixture_logits, dim=-1)
            ll = mixture_log_likelihood(self._margins(pairs), log_pi)
        return {
            "step": step,
            "log_likelihood": float(ll.mean()),
            "accuracy": float((ll > math.log(0.5)).float().mean()),
            "weights": log_pi.exp().tolist(),
        }

    def fit_router(
        self,
        pairs: EmbeddedPairs,
        *,
        user_features: Tensor | None = None,
        steps: int = 200,
        lr: float = 1e-2,
        log_every: int = 50,
    ) -> list[dict[str, float]]:
        """Stage 2: train the router alone (heads and ``pi`` frozen) on ``pairs``, full batch.

        The router's context is `router_context` (prompt embedding, plus ``user_features`` rows).
        Returns one dict per logged step: ``step``, ``log_likelihood`` (mean), ``accuracy``. Adam.
        """
        for name, value in (("steps", steps), ("log_every", log_every)):
            _positive_int("MiCRo.fit_router", name, value)
        self._check(pairs)
        context = self.router_context(pairs, user_features)
        with torch.no_grad():
            margins = self._margins(pairs)
        optimizer = torch.optim.Adam(self.router.parameters(), lr=lr)
        history = []
        for step in range(steps + 1):
            ll = mixture_log_likelihood(margins, torch.log_softmax(self._router_logits(context), dim=-1))
            if step % log_every == 0 or step == steps:
                history.append(
                    {
                        "step": step,
                        "log_likelihood": float(ll.detach().mean()),
                        "accuracy": float((ll.detach() > math.log(0.5)).float().mean()),
                    }
                )
            if step == steps:
                break
            optimizer.zero_grad()
            (-ll.mean()).backward()
            optimizer.step()
        return history

    def adapt(
        self, pairs: EmbeddedPairs, *, user_features: Tensor | None = None, steps: int = 20, lr: float = 5e-2
    ) -> MiCRo:
        """Online adaptation to one user: a copy of this model whose router (only) took ``steps`` gradient
        steps on the user's few labelled ``pairs``. This model is left unchanged."""
        adapted = copy.deepcopy(self)
        adapted.fit_router(pairs, user_features=user_features, steps=steps, lr=lr, log_every=steps)
        return adapted
