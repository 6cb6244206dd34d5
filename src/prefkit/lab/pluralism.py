"""Pluralism study: whose preference is it? (`prefkit lab study pluralism`)

Four sections, each measured against a truth the lab knows:

- ``groups``: a lab world with user groups of unequal shares (default: world ``groups`` reweighted to
  80/20). Each user belongs to one group and labels pairs with that group's true reward (Bradley-Terry
  annotators). A pooled Bradley-Terry reward (one linear head for everybody) is compared with the
  personalized heads of `prefkit.models` (MixtureBT, PAL, VPL, MiCRo) and with an oracle that knows
  every user's group (one BT head per true group): accuracy per group against the labels and against
  the group's true preference, on all pairs and on the *contested* pairs (where the groups' true
  preferences disagree), for seen users and for unseen users given k = 0, 1, 2, 4, 8 of their pairs.
- ``pal``: PAL on planted ideal points (synthetic): held-out accuracy against the number of prototypes K,
  and the recovered user weights at the planted K.
- ``pets``: a VPL "pets"-style task (synthetic): two equal groups agree on most pairs and disagree on a
  contested subset; pooled BT can get only one group's contested pairs right (about 50 %), a
  user-conditioned model given a few of the user's pairs can get them all.
- ``cyclic``: GPM against BT in the lab's ``cyclic`` world, on natural pairs and on style probes whose
  true preference is purely the rock-paper-scissors term (a scalar reward gets at most 2 of the 3
  style match-ups right).

Embeddings of the lab sections come from the world's reference policy with only its first
``backbone_layers`` transformer layers (default 0: the token embeddings and the final norm), mean-pooled
over the response (`prefkit.models.embeddings.embed_pairs`, cached on disk). The full reference is a poor
backbone here: it models i.i.d. words, so its last layers need not remember which words came before
(measured: a per-group BT head on its final states reaches only 0.60-0.65 true-preference accuracy,
on its token embeddings 0.82).

Writes ``results.json``, ``results.md`` (tables and a "What this shows" paragraph computed from the
numbers) and PNG plots into the output folder; returns the results as a dict. See docs/lab.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prefkit.lab.annotators import Annotator, BradleyTerry
from prefkit.lab.world import STYLES, World, response_style
from prefkit.models.embeddings import EmbeddedPairs, truncated_backbone

__all__ = ["SECTIONS", "cyclic_gpm", "groups_section", "pal_ideal_points", "pets_task", "pluralism_study"]

SECTIONS = ("groups", "pal", "pets", "cyclic")
SHOTS = (1, 2, 4, 8)
POOLED, ORACLE = "pooled BT", "oracle: BT per true group"
METHODS = (POOLED, "MixtureBT", "PAL", "VPL", "MiCRo", ORACLE)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global generator inside the block (model inits draw from it) and restore it after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _accuracy(logits: Tensor, mask: Tensor | None = None) -> float:
    """Share of rows (where ``mask``) with ``logits > 0``; NaN for no rows."""
    right = logits > 0 if mask is None else (logits > 0)[mask]
    return float(right.float().mean()) if right.numel() else float("nan")


def _bt(pairs: EmbeddedPairs, seed: int):
    """A linear Bradley-Terry head on ``pairs``: `MixtureBT` with one group (L-BFGS, l2 = 1e-3)."""
    from prefkit.models.mixture import MixtureBT

    model = MixtureBT(pairs.dim, 1)
    model.fit(_one_user(pairs), iters=20, m_steps=20, seed=seed)
    return model


def _one_user(pairs: EmbeddedPairs) -> EmbeddedPairs:
    """``pairs`` with every row given to one user ``"all"`` (what a pooled model sees)."""
    return dataclasses.replace(pairs, user_index=torch.zeros(len(pairs), dtype=torch.long), users=["all"])


def _bt_logits(model, pairs: EmbeddedPairs) -> Tensor:
    with torch.no_grad():
        return model.pair_logits(pairs)[:, 0]


# =====================================================================================================
# groups: pooled BT against the personalized heads in a lab world with user groups
# =====================================================================================================


class _OneUser(Annotator):
    """``base``'s labels, every record from one user of one group."""

    def __init__(self, base: Annotator, group: str, user: str):
        self.base, self.group, self.user = base, group, user
        self.kinds = base.kinds

    def draw_user(self, world, rng):
        return self.group, self.user

    def prefer(self, world, prompt, a, b, rng, group=None) -> bool:
        return self.base.prefer(world, prompt, a, b, rng, group)


def with_shares(world: World, shares: Sequence[float] | None) -> World:
    """``world`` with its groups' shares replaced by ``shares`` (in the order of ``world.groups``)."""
    if shares is None:
        return world
    if len(shares) != len(world.groups):
        raise ValueError(f"world {world.name!r} has {len(world.groups)} groups, got {len(shares)} shares {shares}")
    groups = [dataclasses.replace(g, share=float(s)) for g, s in zip(world.groups, shares)]
    return World(world.name, groups, world.cyclic_weight, world.max_len, world.on_topic_weight, world.off_topic_weight)


def users_per_group(world: World, users: int, unseen_fraction: float) -> dict[str, tuple[int, int]]:
    """``{group: (seen, unseen)}`` user counts: ``round(share * users)`` users per group (at least 2),
    of which ``round(unseen_fraction * n)`` (at least 1) are unseen."""
    out = {}
    for g in world.groups:
        n = max(2, round(g.share * users))
        unseen = min(n - 1, max(1, round(unseen_fraction * n)))
        out[g.name] = (n - unseen, unseen)
    return out


def _draw_users(world: World, counts, pairs_per_user: int, temperature: float, seed: int):
    """Records of every user (``user_id = "<group>/<k>"``, ``pairs_per_user`` each, Bradley-Terry labels
    with the group's true reward), and ``{user: (group, seen)}``."""
    from prefkit.lab.datasets import draw_dataset

    records, users = [], {}
    for gi, (group, (seen, unseen)) in enumerate(counts.items()):
        for u in range(seen + unseen):
            user = f"{group}/{u}"
            annotator = _OneUser(BradleyTerry(temperature), group, user)
            drawn = draw_dataset(world, "pairwise", pairs_per_user, annotator, seed=seed * 100_003 + gi * 1009 + u)
            records += [dataclasses.replace(r, id=f"{user}/{i}") for i, r in enumerate(drawn)]
            users[user] = (group, u < seen)
    return records, users


def _embed(records, backbone, tokenizer, cache_root: Path | None, progress: bool) -> EmbeddedPairs:
    """`embed_pairs` (mean pooling), cached in ``<cache_root>/embeddings-<hash of the records and backbone>``."""
    from prefkit.models.embeddings import embed_pairs
    from prefkit.models.fingerprint import model_hash

    cache = None
    if cache_root is not None:
        text = json.dumps([(r.prompt, r.chosen, r.rejected, r.user_id) for r in records])
        key = hashlib.sha256((text + model_hash(backbone)).encode()).hexdigest()[:16]
        cache = str(cache_root / f"embeddings-{key}")
    return embed_pairs(records, backbone, tokenizer, pooling="mean", batch_size=256, cache_dir=cache, progress=progress)


def _only(pairs: EmbeddedPairs, users: Sequence[str]) -> EmbeddedPairs:
    """The rows of ``users``, with ``users`` (sorted) as the whole user index space."""
    rows = pairs.of_users(users)
    users = sorted(users)
    position = torch.tensor([users.index(u) if u in users else -1 for u in rows.users])
    return dataclasses.replace(rows, user_index=position[rows.user_index], users=users)


# ----- the methods: each gives logits r(chosen) - r(rejected) for a seen user or an unseen one -----


class _Pooled:
    """One linear BT head for everybody: the same logits for every user, seen or not."""

    def __init__(self, train: EmbeddedPairs, groups: list[str], h: dict, seed: int):
        self.model = _bt(train, seed)

    def seen(self, user, context, test):
        return _bt_logits(self.model, test)

    def unseen(self, context, test):
        return _bt_logits(self.model, test)


class _Oracle:
    """One linear BT head per true group, each fit on its group's pairs; a user is served by its group's head."""

    def __init__(self, train: EmbeddedPairs, groups: list[str], h: dict, seed: int):
        self.heads = [_bt(train.subset(train.group == g), seed) for g in range(len(groups))]

    def seen(self, user, context, test):
        return _bt_logits(self.heads[int(test.group[0])], test)

    def unseen(self, context, test):
        return self.seen(None, context, test)


def _mixture_logits(model, context: EmbeddedPairs | None, test: EmbeddedPairs) -> Tensor:
    """A fitted `MixtureBT`'s logits of ``test`` for a new user: the head of the group most likely given
    the user's ``context`` pairs, ``argmax_g log pi_g + sum_i log sigma(r_g(c_i) - r_g(r_i))`` (the
    E-step; no context: argmax pi)."""
    with torch.no_grad():
        log_post = model.mixing_weights.log()
        if context is not None:
            log_post = log_post + F.logsigmoid(model.pair_logits(context)).sum(0)
        return model.pair_logits(test)[:, int(log_post.argmax())]


class _Mixture:
    """MixtureBT (EM) with one head per group; a seen user is served by the head of its most likely group,
    an unseen one by `_mixture_logits` of its k pairs."""

    def __init__(self, train: EmbeddedPairs, groups: list[str], h: dict, seed: int):
        from prefkit.models.mixture import MixtureBT

        self.model = MixtureBT(train.dim, len(groups))
        self.model.fit(train, iters=h["em_iters"], m_steps=20, seed=seed)

    def seen(self, user, context, test):
        with torch.no_grad():
            return self.model.pair_logits(test)[:, int(self.model.predict_group([user])[0])]

    def unseen(self, context, test):
        return _mixture_logits(self.model, context, test)


class _PAL:
    """PAL (mixture variant, K = number of groups); an unseen user's weights are fit on its k pairs
    (`PAL.fit_new_user`; k = 0: the seen users' mean weights)."""

    def __init__(self, train: EmbeddedPairs, groups: list[str], h: dict, seed: int):
        from prefkit.models.pal import PAL

        with _seeded(seed):
            self.model = PAL(train.dim, len(groups), variant="mixture")
            self.model.fit(train, epochs=h["pal_epochs"], lr=0.03, batch_size=256, seed=seed)

    def seen(self, user, context, test):
        with torch.no_grad():
            return self.model.pair_logits(test, self.model.user_weights([user])[0])

    def unseen(self, context, test):
        weights = self.model.mean_weights() if context is None else self.model.fit_new_user(context, steps=50)
        with torch.no_grad():
            return self.model.pair_logits(test, weights)


class _VPL:
    """VPL; a user's latent is inferred from pairs of theirs (a seen user: all its training pairs; an
    unseen user: its k pairs; k = 0: the prior mean z = 0)."""

    def __init__(self, train: EmbeddedPairs, groups: list[str], h: dict, seed: int):
        from prefkit.models.vpl import VPL

        with _seeded(seed):
            self.model = VPL(train.dim, latent_dim=4, hidden=64)
        self.history = self.model.fit(
            train, context_size=8, target_size=16, steps=h["vpl_steps"], beta_kl=0.01, lr=3e-3, seed=seed
        )

    def seen(self, user, context, test):
        return self.unseen(context, test)

    def unseen(self, context, test):
        with torch.no_grad():
            if context is None:
                z = torch.zeros(self.model.latent_dim)
            else:
                z, _ = self.model.encode(context.chosen.float(), context.rejected.float())
            return self.model.reward(test.chosen.float(), z) - self.model.reward(test.rejected.float(), z)


class _MiCRo:
    """MiCRo with one head per group (learned mixture weights), router on the prompt embedding, adapted to
    a user on pairs of theirs (`MiCRo.adapt`: a seen user's training pairs, an unseen user's k pairs;
    k = 0: the base router). Logit: ``P(chosen > rejected) - 1/2``."""

    def __init__(self, train: EmbeddedPairs, groups: list[str], h: dict, seed: int):
        from prefkit.models.micro import MiCRo

        with _seeded(seed):
            self.model = MiCRo(train.dim, len(groups), context_dim=train.prompt.shape[1], mixture="learned")
        self.model.fit_mixture(train, steps=h["micro_steps"], lr=0.03, seed=seed)
        self.model.fit_router(train, steps=100, lr=0.03)

    def seen(self, user, context, test):
        return self.unseen(context, test)

    def unseen(self, context, test):
        model = self.model if context is None else self.model.adapt(context, steps=30, lr=0.1)
        with torch.no_grad():
            prob = model.prob(test.chosen.float(), test.rejected.float(), model.router_context(test))
        return prob - 0.5


_METHOD_CLASSES = {
    POOLED: _Pooled,
    "MixtureBT": _Mixture,
    "PAL": _PAL,
    "VPL": _VPL,
    "MiCRo": _MiCRo,
    ORACLE: _Oracle,
}


def _truth(world: World, records, groups: list[str]) -> Tensor:
    """``[N, G]`` each group's true preference logit of chosen over rejected."""
    return torch.tensor(
        [[world.preference_logit(r.prompt, r.chosen, r.rejected, g) for g in groups] for r in records],
        dtype=torch.float64,
    )


def _scores(logits: Tensor, group: Tensor, truth: Tensor, groups: list[str]) -> dict[str, Any]:
    """Per group: accuracy against the labels (``label``), against the group's true preference (``true``,
    rows with a true tie left out) and against it on the contested rows (``contested``: rows where the
    groups' true preferences disagree); the unweighted average over groups and the worst group (of ``true``)."""
    own = truth.gather(1, group[:, None]).squeeze(1)
    signs = torch.sign(truth)
    contested = (signs > 0).any(1) & (signs < 0).any(1)
    agree = (logits > 0) == (own > 0)
    per_group = {}
    for g, name in enumerate(groups):
        rows, valid = group == g, (group == g) & (own != 0)
        per_group[name] = {
            "label": _accuracy(logits, rows),
            "true": float(agree[valid].float().mean()),
            "contested": float(agree[valid & contested].float().mean()) if (valid & contested).any() else float("nan"),
            "pairs": int(rows.sum()),
            "contested_pairs": int((valid & contested).sum()),
        }
    true = {name: v["true"] for name, v in per_group.items()}
    worst = min(true, key=true.get)
    return {
        "per_group": per_group,
        "average": float(np.mean(list(true.values()))),
        "worst_group": worst,
        "worst": true[worst],
    }


def _evaluate(method, pairs, users, truth, groups, split, shots: int | None):
    """Logits of every user's test rows (seen users: ``shots`` None; unseen users: given their first
    ``shots`` pairs), scored by `_scores`."""
    logits, rows = [], []
    for user in users:
        idx = (pairs.user_index == pairs.users.index(user)).nonzero().flatten()
        train_rows, test_rows = idx[:split], idx[split:]
        test = pairs.subset(test_rows)
        if shots is None:
            logits.append(method.seen(user, pairs.subset(train_rows), test))
        else:
            logits.append(method.unseen(pairs.subset(train_rows[:shots]) if shots else None, test))
        rows.append(test_rows)
    rows = torch.cat(rows)
    return _scores(torch.cat(logits).double(), pairs.group[rows], truth[rows], groups)


def groups_section(
    world: World,
    reference,
    *,
    users: int = 50,
    unseen_fraction: float = 0.25,
    train_pairs: int = 100,
    test_pairs: int = 50,
    shots: Sequence[int] = SHOTS,
    temperature: float = 0.5,
    backbone_layers: int = 0,
    hyper: dict | None = None,
    seed: int = 0,
    cache_root: Path | None = None,
    say=print,
) -> dict[str, Any]:
    """Pooled BT against the personalized heads in ``world`` (its groups and shares), per group.

    ``users`` users in all, ``round(share * users)`` per group (at least 2, at least one unseen); each
    labels ``train_pairs + test_pairs`` pairs with its group's true reward (`BradleyTerry`
    (``temperature``)). The methods (`METHODS`) train on the seen users' first ``train_pairs`` pairs and
    are scored on every user's last ``test_pairs``; an unseen user is served from its first k pairs,
    k in ``(0, *shots)``. ``hyper``: training lengths (`HYPER`). ``reference``: the world's `LabPolicy`.
    """
    if len(world.groups) < 2:
        raise ValueError(f"world {world.name!r} has one group; the groups section needs a world with user groups")
    if any(k > train_pairs for k in shots) or any(k < 1 for k in shots):
        raise ValueError(f"shots must be in [1, train_pairs={train_pairs}], got {list(shots)}")
    h = {**HYPER, **(hyper or {})}
    groups = [g.name for g in world.groups]
    counts = users_per_group(world, users, unseen_fraction)
    records, who = _draw_users(world, counts, train_pairs + test_pairs, temperature, seed)
    start = time.perf_counter()
    backbone = truncated_backbone(reference.model, backbone_layers)
    pairs = _embed(records, backbone, reference.tokenizer, cache_root, progress=False)
    pairs.group = torch.tensor([groups.index(who[r.user_id][0]) for r in records])
    say(f"  groups: {len(records)} pairs of {len(who)} users embedded ({time.perf_counter() - start:.1f} s)")
    truth = _truth(world, records, groups)
    seen = sorted(u for u, (_, s) in who.items() if s)
    unseen = sorted(u for u, (_, s) in who.items() if not s)
    is_train = torch.zeros(len(pairs), dtype=torch.bool)
    for u in seen:
        is_train[(pairs.user_index == pairs.users.index(u)).nonzero().flatten()[:train_pairs]] = True
    train = _only(pairs.subset(is_train), seen)
    out = {"seen": {}, "unseen": {}, "seconds": {}}
    for name, cls in _METHOD_CLASSES.items():
        start = time.perf_counter()
        method = cls(train, groups, h, seed)
        out["seen"][name] = _evaluate(method, pairs, seen, truth, groups, train_pairs, None)
        out["unseen"][name] = {k: _evaluate(method, pairs, unseen, truth, groups, train_pairs, k) for k in (0, *shots)}
        out["seconds"][name] = time.perf_counter() - start
        if name == "VPL":
            out["vpl_last_log"] = method.history[-1]
        s = out["seen"][name]
        say(
            f"  {name}: seen users "
            + ", ".join(f"{g} {v['true']:.3f}" for g, v in s["per_group"].items())
            + f"; worst {s['worst']:.3f} ({out['seconds'][name]:.1f} s)"
        )
    shares = world.shares
    return {
        "world": world.name,
        "shares": shares,
        "groups": groups,
        "users": {g: {"seen": s, "unseen": n} for g, (s, n) in counts.items()},
        "train_pairs": train_pairs,
        "test_pairs": test_pairs,
        "shots": [0, *shots],
        "temperature": temperature,
        "backbone_layers": backbone_layers,
        "embedding_dim": pairs.dim,
        "hyper": h,
        **out,
    }


# Training lengths of the groups section's heads (the other hyper-parameters are fixed in the method classes).
HYPER = {"em_iters": 30, "pal_epochs": 150, "vpl_steps": 600, "micro_steps": 400}


def _groups_table(r: dict[str, Any]) -> list[str]:
    groups = r["groups"]
    lines = [
        "| method | "
        + " | ".join(groups)
        + " | average | worst group | "
        + " | ".join(f"{g}, contested" for g in groups)
        + " | labels (all) |",
        "|---|" + "---|" * (2 * len(groups) + 3),
    ]
    for name, s in r["seen"].items():
        pg = s["per_group"]
        label = np.mean([v["label"] for v in pg.values()])
        lines.append(
            f"| {name} | "
            + " | ".join(f"{pg[g]['true']:.3f}" for g in groups)
            + f" | {s['average']:.3f} | {s['worst']:.3f} ({s['worst_group']}) | "
            + " | ".join(_fmt(pg[g]["contested"]) for g in groups)
            + f" | {label:.3f} |"
        )
    return lines


def _unseen_table(r: dict[str, Any]) -> list[str]:
    ks = r["shots"]
    lines = ["| method | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, by_k in r["unseen"].items():
        lines.append(
            f"| {name} | " + " | ".join(f"{by_k[k]['average']:.3f} / {by_k[k]['worst']:.3f}" for k in ks) + " |"
        )
    return lines


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _groups_summary(r: dict[str, Any]) -> list[str]:
    shares = r["shares"]
    minority = min(shares, key=shares.get)
    seen = r["seen"]
    pooled = seen[POOLED]["per_group"]
    personal = {m: s for m, s in seen.items() if m not in (POOLED, ORACLE)}
    best = max(personal, key=lambda m: personal[m]["per_group"][minority]["true"])
    best_min = personal[best]["per_group"][minority]
    majority = max(shares, key=shares.get)
    text = [
        f"Pooled BT serves the majority ({majority}, {shares[majority]:.0%}): "
        f"{pooled[majority]['true']:.3f} true-preference accuracy against {pooled[minority]['true']:.3f} for the "
        f"minority ({minority}, {shares[minority]:.0%}); on the contested pairs, where the groups' true preferences "
        f"disagree, it gets {_fmt(pooled[majority]['contested'])} of the majority's and "
        f"{_fmt(pooled[minority]['contested'])} of the minority's right.",
        f"The best personalized method for the minority is {best}: {best_min['true']:.3f} on all of its pairs, "
        f"{_fmt(best_min['contested'])} on the contested ones "
        f"({best_min['true'] - pooled[minority]['true']:+.3f} and "
        f"{best_min['contested'] - pooled[minority]['contested']:+.3f} against pooled BT).",
    ]
    beat = [m for m, s in personal.items() if s["worst"] > seen[POOLED]["worst"]]
    text.append(
        f"Worst-group accuracy of seen users: pooled BT {seen[POOLED]['worst']:.3f}; "
        + ", ".join(f"{m} {s['worst']:.3f}" for m, s in personal.items())
        + f"; the oracle (BT per true group) {seen[ORACLE]['worst']:.3f}. "
        + (f"{', '.join(beat)} beat pooled BT on the worst group." if beat else "No method beats pooled BT on it.")
    )
    ks = r["shots"]
    unseen = r["unseen"]
    trend = ", ".join(f"{m} {unseen[m][ks[0]]['worst']:.3f} -> {unseen[m][ks[-1]]['worst']:.3f}" for m in personal)
    text.append(f"Unseen users, worst group from k = {ks[0]} to k = {ks[-1]} of their pairs: {trend}.")
    return text


# =====================================================================================================
# pal: planted ideal points
# =====================================================================================================


def _planted_weights(n_users: int, k: int, g: torch.Generator) -> Tensor:
    """``[U, K]``: every third user at a vertex (one-hot, cycling), the others uniform on the simplex."""
    rows = []
    for u in range(n_users):
        if u % 3 == 0:
            rows.append(F.one_hot(torch.tensor((u // 3) % k), k).float())
        else:
            e = -torch.rand(k, generator=g).log()  # Exp(1) draws, normalised: uniform on the simplex
            rows.append(e / e.sum())
    return torch.stack(rows)


def _ideal_point_reward(x: Tensor, weights: Tensor, prototypes: Tensor, scale: float) -> Tensor:
    return -scale * (x - weights @ prototypes).pow(2).sum(-1)


def _ideal_point_pairs(prototypes, weights, per_user, scale, g, prefix="u"):
    """``per_user`` random items pairs per user in R^d, Bradley-Terry labels; and the true logits."""
    n_users, dim = weights.shape[0], prototypes.shape[1]
    index = torch.arange(n_users).repeat_interleave(per_user)
    a, b = torch.randn(len(index), dim, generator=g), torch.randn(len(index), dim, generator=g)
    w = weights[index]
    logit = _ideal_point_reward(a, w, prototypes, scale) - _ideal_point_reward(b, w, prototypes, scale)
    a_first = (torch.rand(len(index), generator=g) < torch.sigmoid(logit))[:, None]
    pairs = EmbeddedPairs(
        torch.where(a_first, a, b), torch.where(a_first, b, a), index, [f"{prefix}{u:03d}" for u in range(n_users)]
    )
    return pairs, torch.where(a_first[:, 0], logit, -logit)


def _matched_error(true: Tensor, estimate: Tensor) -> float:
    """Mean absolute weight error under the best relabelling of the prototypes."""
    k = true.shape[1]
    return min(float((true - estimate[:, list(p)]).abs().mean()) for p in itertools.permutations(range(k)))


def pal_ideal_points(
    *,
    planted_k: int = 3,
    ks: Sequence[int] = (1, 2, 3, 4, 5),
    users: int = 60,
    per_user: int = 40,
    dim: int = 6,
    scale: float = 4.0,
    epochs: int = 150,
    seed: int = 0,
) -> dict[str, Any]:
    """PAL (ideal-point variant) on planted ideal points: ``planted_k`` prototypes in ``R^dim``, ``users``
    users (every third at a vertex, the others uniform on the simplex), ``per_user`` training and as many
    held-out pairs each, Bradley-Terry labels with ``r_u(x) = -scale ||x - a_u||^2``. For each K in ``ks``:
    held-out accuracy against the labels and against the true preference; at ``K = planted_k`` also the
    recovered weights' mean absolute error (best prototype matching) against uniform weights'."""
    from prefkit.models.pal import PAL

    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(planted_k, dim, generator=g)
    weights = _planted_weights(users, planted_k, g)
    train, _ = _ideal_point_pairs(prototypes, weights, per_user, scale, g)
    test, test_truth = _ideal_point_pairs(prototypes, weights, per_user, scale, g)
    rows = []
    for k in ks:
        with _seeded(seed):
            model = PAL(dim, k, variant="ideal_point")
            model.fit(train, epochs=epochs, lr=0.03, batch_size=400, seed=seed)
        with torch.no_grad():
            logits = model.pair_logits(test)
        row = {"k": k, "label": _accuracy(logits), "true": float(((logits > 0) == (test_truth > 0)).float().mean())}
        if k == planted_k:
            estimate = model.user_weights().detach()
            row["weight_error"] = _matched_error(weights, estimate)
            row["uniform_weight_error"] = _matched_error(weights, torch.full_like(weights, 1 / k))
        rows.append(row)
    return {
        "planted_k": planted_k,
        "users": users,
        "per_user": per_user,
        "dim": dim,
        "scale": scale,
        "oracle_label": _accuracy(test_truth),
        "rows": rows,
    }


# =====================================================================================================
# pets: agree on most pairs, disagree on a contested subset
# =====================================================================================================

_PETS_DIM = 6  # dims 0-4: the shared reward; dim 5: the contested feature ("cats" +1, "dogs" -1)


def _pets_users(n_users: int, agreed: int, contested: int, shared: Tensor, g: torch.Generator, prefix: str):
    """Users alternate between two groups that share the linear reward ``shared`` on dims 0-4 and disagree on dim 5.
    Per user: ``contested`` pairs first (two responses equal on dims 0-4, one with dim 5 = +1, the other
    -1: group 0 prefers +1, group 1 -1), then ``agreed`` pairs (dim 5 = 0; winner by the shared reward)."""
    chosen, rejected, index, group, is_contested = [], [], [], [], []
    for u in range(n_users):
        base = torch.randn(contested, _PETS_DIM - 1, generator=g)
        plus, minus = F.pad(base, (0, 1), value=1.0), F.pad(base, (0, 1), value=-1.0)
        a, b = (F.pad(torch.randn(agreed, _PETS_DIM - 1, generator=g), (0, 1)) for _ in range(2))
        a_wins = (a[:, :-1] @ shared > b[:, :-1] @ shared)[:, None]
        chosen += [plus if u % 2 == 0 else minus, torch.where(a_wins, a, b)]
        rejected += [minus if u % 2 == 0 else plus, torch.where(a_wins, b, a)]
        index.append(torch.full((agreed + contested,), u))
        group.append(torch.full((agreed + contested,), u % 2))
        is_contested.append(torch.arange(agreed + contested) < contested)
    pairs = EmbeddedPairs(
        torch.cat(chosen),
        torch.cat(rejected),
        torch.cat(index),
        [f"{prefix}{u:03d}" for u in range(n_users)],
        group=torch.cat(group),
    )
    return pairs, torch.cat(is_contested)


def _context(pairs, contested, user, shots):
    """An unseen user's ``shots`` context pairs (half of them, rounded up, contested) and its other pairs."""
    rows = (pairs.user_index == user).nonzero().flatten()
    c_rows, a_rows = rows[contested[rows]], rows[~contested[rows]]
    n_c = (shots + 1) // 2
    context = torch.cat([c_rows[:n_c], a_rows[: shots - n_c]])
    return pairs.subset(context), torch.cat([c_rows[n_c:], a_rows[shots - n_c :]])


def pets_task(
    *,
    users: int = 60,
    unseen: int = 20,
    agreed: int = 12,
    contested: int = 4,
    test_per_user: int = 40,
    shots: int = 4,
    vpl_steps: int = 400,
    seed: int = 0,
) -> dict[str, Any]:
    """A VPL "pets"-style task. ``users`` seen users (``agreed`` + ``contested`` training pairs each) and
    ``unseen`` users, two equal groups. Each unseen user gives ``shots`` labelled pairs (half contested,
    rounded up) and is scored on ``test_per_user`` further pairs of its own (a quarter contested).
    Pooled BT (one linear head), MixtureBT (k = 2, group from the shots' posterior), PAL (mixture, K = 2,
    weights fit on the shots) and VPL (latent from the shots): accuracy on contested and agreed pairs."""
    from prefkit.models.mixture import MixtureBT
    from prefkit.models.pal import PAL
    from prefkit.models.vpl import VPL

    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(_PETS_DIM - 1, generator=g)
    train, _ = _pets_users(users, agreed, contested, shared, g, "seen")
    n_contested = (shots + 1) // 2 + test_per_user // 4  # the context's contested pairs plus the test's
    fresh, fresh_contested = _pets_users(unseen, test_per_user + shots - n_contested, n_contested, shared, g, "new")
    pooled = _bt(train, seed)
    mixture = MixtureBT(_PETS_DIM, 2)
    mixture.fit(train, iters=30, seed=seed)
    with _seeded(seed):
        pal, vpl = PAL(_PETS_DIM, 2, variant="mixture"), VPL(_PETS_DIM, latent_dim=4, hidden=32)
    pal.fit(train, epochs=200, lr=0.03, batch_size=256, seed=seed)
    history = vpl.fit(train, context_size=4, target_size=8, steps=vpl_steps, beta_kl=0.05, lr=3e-3, seed=seed)
    methods = {
        POOLED: lambda ctx, test: _bt_logits(pooled, test),
        "MixtureBT": lambda ctx, test: _mixture_logits(mixture, ctx, test),
        "PAL": lambda ctx, test: pal.pair_logits(test, pal.fit_new_user(ctx, steps=50)).detach(),
        "VPL": lambda ctx, test: torch.logit(vpl.predict(ctx, test), eps=1e-6),
    }
    logits = {m: [] for m in methods}
    kinds = []
    for u in range(unseen):
        ctx, test_rows = _context(fresh, fresh_contested, u, shots)
        for name, fn in methods.items():
            logits[name].append(fn(ctx, fresh.subset(test_rows)))
        kinds.append(fresh_contested[test_rows])
    kinds = torch.cat(kinds)
    rows = {
        name: {"contested": _accuracy(torch.cat(v), kinds), "agreed": _accuracy(torch.cat(v), ~kinds)}
        for name, v in logits.items()
    }
    return {
        "users": users,
        "unseen": unseen,
        "agreed": agreed,
        "contested": contested,
        "shots": shots,
        "test_pairs": int(kinds.numel()),
        "test_contested": int(kinds.sum()),
        "rows": rows,
        "vpl_last_log": history[-1],
    }


# =====================================================================================================
# cyclic: GPM against BT on rock-paper-scissors style preferences
# =====================================================================================================


def _style_probes(world: World, n: int, rng: np.random.Generator):
    """``n`` probe pairs: one marker word of style s and one of style t != s appended to the same base
    response (which has no style marker). Their true preference is the cyclic term alone (markers have
    utility 0 in the cyclic world), ``+-gamma``. Returns pairwise records, the preferred one first."""
    from prefkit.data import PairwiseRecord

    styles, records = list(STYLES), []
    while len(records) < n:
        (prompt,) = world.sample_prompts(1, rng)
        (base,) = world.sample_responses(prompt, 1, rng, max_len=world.max_len - 1)
        if response_style(base) is not None or any(w in sum(STYLES.values(), ()) for w in base.split()):
            continue
        s, t = rng.choice(len(styles), size=2, replace=False)
        a = f"{base} {STYLES[styles[s]][rng.integers(3)]}"
        b = f"{base} {STYLES[styles[t]][rng.integers(3)]}"
        chosen, rejected = (a, b) if world.preference_logit(prompt, a, b) > 0 else (b, a)
        records.append(PairwiseRecord(prompt=prompt, chosen=chosen, rejected=rejected, id=f"probe-{len(records)}"))
    return records


def cyclic_gpm(
    world: World,
    reference,
    *,
    train_pairs: int = 2000,
    test_pairs: int = 500,
    probes: int = 600,
    contrast_pairs: int = 1000,
    backbone_layers: int = 0,
    embed_dim: int = 8,
    epochs: int = 100,
    seed: int = 0,
    cache_root: Path | None = None,
) -> dict[str, Any]:
    """GPM against BT in a world with a cyclic term. Both heads train on the same ``train_pairs`` pairs
    (`BradleyTerry` (1) labels with the population's preference) embedded like the groups section; scored
    against the true preference on ``test_pairs`` fresh pairs and on ``probes`` style probes
    (`_style_probes`), per style match-up. Both are also trained on ``contrast_pairs`` style-contrast pairs (more
    probes, drawn apart from the test probes): what the natural pairs lack, since few of them set two styles
    against each other and there the transitive reward outweighs the cyclic term (``style_contrasts`` counts
    them)."""
    from prefkit.lab.datasets import draw_dataset
    from prefkit.models.gpm import fit_gpm_head

    if world.cyclic_weight == 0:
        raise ValueError(f"world {world.name!r} has no cyclic term; use the 'cyclic' world")
    rng = np.random.default_rng([seed, 11])
    train = draw_dataset(world, "pairwise", train_pairs, BradleyTerry(1.0), seed=seed + 21)
    test = draw_dataset(world, "pairwise", test_pairs, BradleyTerry(1.0), seed=seed + 22)
    probe = _style_probes(world, probes, rng)
    contrast = _style_probes(world, contrast_pairs, np.random.default_rng([seed, 12]))
    backbone = truncated_backbone(reference.model, backbone_layers)
    emb = _embed(train + test + probe + contrast, backbone, reference.tokenizer, cache_root, progress=False)
    parts = np.cumsum([0, train_pairs, test_pairs, probes, contrast_pairs])
    names = ("train", "test", "probe", "contrast")
    sets = {name: emb.subset(range(parts[i], parts[i + 1])) for i, name in enumerate(names)}
    truth = {
        "test": torch.tensor([world.preference_logit(r.prompt, r.chosen, r.rejected) for r in test]),
        "probe": torch.ones(probes),  # probes are stored preferred first
    }
    logits = {}
    for suffix, part in (("", "train"), (" (style-contrast training)", "contrast")):
        bt = _bt(sets[part], seed)
        head = fit_gpm_head(sets[part].chosen, sets[part].rejected, embed_dim=embed_dim, epochs=epochs, seed=seed)
        with torch.no_grad():
            logits["BT" + suffix] = {s: _bt_logits(bt, sets[s]) for s in ("test", "probe")}
            logits["GPM" + suffix] = {s: head.score(sets[s].chosen, sets[s].rejected) for s in ("test", "probe")}
    matchups = [f"{response_style(r.chosen)} > {response_style(r.rejected)}" for r in probe]
    rows = {}
    for name, by_set in logits.items():
        agree = (by_set["test"] > 0) == (truth["test"] > 0)
        rows[name] = {
            "test": float(agree[truth["test"] != 0].float().mean()),
            "probe": _accuracy(by_set["probe"]),
            "matchups": {
                m: _accuracy(by_set["probe"], torch.tensor([x == m for x in matchups])) for m in sorted(set(matchups))
            },
        }
    return {
        "world": world.name,
        "gamma": world.cyclic_weight,
        "train_pairs": train_pairs,
        "test_pairs": test_pairs,
        "probes": probes,
        "contrast_pairs": contrast_pairs,
        "style_contrasts": sum(
            1
            for r in train
            if None not in (response_style(r.chosen), response_style(r.rejected))
            and response_style(r.chosen) != response_style(r.rejected)
        ),
        "embed_dim": embed_dim,
        "rows": rows,
    }


# =====================================================================================================
# the study: every section, results.md / results.json / plots
# =====================================================================================================


def pluralism_study(
    world: str = "groups",
    *,
    shares: Sequence[float] | None = (0.8, 0.2),
    sections: Sequence[str] = SECTIONS,
    users: int = 50,
    train_pairs: int = 100,
    test_pairs: int = 50,
    shots: Sequence[int] = SHOTS,
    temperature: float = 0.5,
    backbone_layers: int = 0,
    hyper: dict | None = None,
    seed: int = 0,
    output_dir: str | Path = "runs/lab/pluralism",
    spec=None,
    cache_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the ``sections`` (`SECTIONS`) and write ``results.json``, ``results.md`` and plots.

    ``world``/``shares``: the groups section's world, its group shares replaced by ``shares`` (None: the
    preset's). ``users``, ``train_pairs``, ``test_pairs``, ``shots``, ``temperature``, ``backbone_layers``,
    ``hyper``: see `groups_section`. The cyclic section runs in the ``cyclic`` world. ``spec``/``cache_dir``:
    the reference policy's `ReferenceSpec` and cache root (embeddings are cached under it too;
    ``cache_dir=False``: no cache). Prints the per-group table of the groups section.
    """
    from prefkit.lab.policy import ReferenceSpec, default_cache_dir, reference_policy
    from prefkit.lab.studies import _check_positive, _setup, _write
    from prefkit.lab.world import make_world

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise ValueError(f"unknown or no sections {unknown or list(sections)}; expected some of {', '.join(SECTIONS)}")
    _check_positive(users=users, train_pairs=train_pairs, test_pairs=test_pairs)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    start = time.perf_counter()
    setup = _setup(world, seed, output_dir, spec, cache_dir, progress, "pluralism")
    say = setup.say
    cache_root = None if cache_dir is False else Path(cache_dir or default_cache_dir())
    results: dict[str, Any] = {"study": "pluralism", "seed": seed, "sections": list(sections)}
    if "groups" in sections:
        the_world = with_shares(setup.world, shares)
        say("  group shares: " + ", ".join(f"{g} {s:.0%}" for g, s in the_world.shares.items()))
        results["groups"] = groups_section(
            the_world,
            setup.reference,
            users=users,
            train_pairs=train_pairs,
            test_pairs=test_pairs,
            shots=shots,
            temperature=temperature,
            backbone_layers=backbone_layers,
            hyper=hyper,
            seed=seed,
            cache_root=cache_root,
            say=say,
        )
    if "pal" in sections:
        say("  pal: planted ideal points")
        results["pal"] = pal_ideal_points(seed=seed)
    if "pets" in sections:
        say("  pets: agreed and contested pairs")
        results["pets"] = pets_task(seed=seed)
    if "cyclic" in sections:
        say("  cyclic: GPM against BT in the 'cyclic' world")
        cyclic = make_world("cyclic", seed)
        ref = reference_policy(cyclic, seed, spec=spec or ReferenceSpec(), cache_dir=cache_dir, progress=progress)
        results["cyclic"] = cyclic_gpm(cyclic, ref, backbone_layers=backbone_layers, seed=seed, cache_root=cache_root)
    results["seconds"] = time.perf_counter() - start
    files = _plots(results, setup.out)
    markdown = _markdown(results, files)
    _write(setup.out, results, markdown)
    if "groups" in results:
        say("\n".join(["", "Seen users, true-preference accuracy per group:", *_groups_table(results["groups"]), ""]))
    say(f"  wrote {setup.out}/results.md, results.json, {', '.join(files)} ({results['seconds']:.0f} s)")
    return results


def _markdown(r: dict[str, Any], files: list[str]) -> list[str]:
    lines = [f"# Pluralism: whose preference is it? (seed {r['seed']})", ""]
    if "groups" in r:
        lines += _groups_markdown(r["groups"], "groups_seen.png" in files)
    if "pal" in r:
        lines += _pal_markdown(r["pal"])
    if "pets" in r:
        lines += _pets_markdown(r["pets"])
    if "cyclic" in r:
        lines += _cyclic_markdown(r["cyclic"])
    return lines + [f"Run time {r['seconds'] / 60:.1f} min."]


def _groups_markdown(g: dict[str, Any], plots: bool) -> list[str]:
    users = ", ".join(f"{n}: {v['seen']} seen + {v['unseen']} unseen" for n, v in g["users"].items())
    shares = ", ".join(f"{n} {s:.0%}" for n, s in g["shares"].items())
    vpl = g.get("vpl_last_log", {})
    lines = [
        f"## User groups in the lab world `{g['world']}` ({shares})",
        "",
        f"Users per group ({users}); each labels {g['train_pairs'] + g['test_pairs']} pairs with its group's true "
        f"reward (Bradley-Terry, temperature {g['temperature']}). Heads train on the seen users' first "
        f"{g['train_pairs']} pairs and are scored on every user's last {g['test_pairs']}. Embeddings: the "
        f"reference policy with {g['backbone_layers']} of its transformer layers (token embeddings and final norm), "
        f"mean-pooled over the response ({g['embedding_dim']} dims). Pooled BT is one linear Bradley-Terry head "
        "for everybody (`MixtureBT` with one group, L-BFGS, l2 = 1e-3); MixtureBT (EM), PAL (mixture variant) and "
        "MiCRo use one head / prototype per group; the oracle fits one BT head per true group. Hyper-parameters: "
        f"{g['hyper']}; VPL at the end of training: KL {vpl.get('kl', float('nan')):.3f}, "
        f"{vpl.get('active_units', 'n/a')} active latent units of 4.",
        "",
        "**Seen users**: accuracy against each group's true preference (true ties left out), the unweighted "
        "average and the worst group; contested: the pairs on which the groups' true preferences disagree; "
        "labels: accuracy against the annotators' (noisy) labels, averaged over groups.",
        "",
        *_groups_table(g),
        "",
        "**Unseen users** given k of their pairs (average / worst group; k = 0: the population prior; pooled BT "
        "and the oracle do not use the k pairs):",
        "",
        *_unseen_table(g),
        "",
    ]
    if plots:
        lines += ["![per-group accuracy](groups_seen.png)", "", "![unseen users against k](groups_unseen.png)", ""]
    return lines + ["### What this shows", "", " ".join(_groups_summary(g)), ""]


def _pal_markdown(p: dict[str, Any]) -> list[str]:
    planted = next(row for row in p["rows"] if row["k"] == p["planted_k"])
    best = max(p["rows"], key=lambda row: row["true"])
    return [
        "## PAL on planted ideal points (synthetic)",
        "",
        f"{p['planted_k']} planted prototypes in R^{p['dim']}; {p['users']} users (every third at a prototype, "
        f"the others uniform on the simplex), {p['per_user']} training and {p['per_user']} held-out pairs each, "
        f"Bradley-Terry labels with r_u(x) = -{p['scale']} ||x - a_u||^2. PAL (ideal-point variant) with K "
        "prototypes:",
        "",
        "| K | held-out accuracy (labels) | (true preference) |",
        "|---|---|---|",
        *[f"| {row['k']} | {row['label']:.3f} | {row['true']:.3f} |" for row in p["rows"]],
        "",
        "### What this shows",
        "",
        f"The true model labels {p['oracle_label']:.3f} of the held-out labels right. Accuracy is highest at "
        f"K = {best['k']} ({best['true']:.3f} against the true preference); at the planted K = {p['planted_k']} "
        f"the recovered user weights are off by {planted['weight_error']:.3f} on average (best matching of the "
        f"prototypes), against {planted['uniform_weight_error']:.3f} for uniform weights.",
        "",
    ]


def _pets_markdown(p: dict[str, Any]) -> list[str]:
    rows = p["rows"]
    best = max((m for m in rows if m != POOLED), key=lambda m: rows[m]["contested"])
    vpl = p["vpl_last_log"]
    return [
        "## Pets: agree on most pairs, disagree on a few (synthetic)",
        "",
        f"Two equal groups share a linear reward on five features and disagree on a sixth. {p['users']} seen users "
        f"with {p['agreed']} agreed + {p['contested']} contested training pairs each; {p['unseen']} unseen users, "
        f"each given {p['shots']} labelled pairs (half contested) and scored on {p['test_pairs'] // p['unseen']} "
        f"new pairs of theirs ({p['test_contested']} contested of {p['test_pairs']} in all).",
        "",
        "| method | contested pairs | agreed pairs |",
        "|---|---|---|",
        *[f"| {m} | {v['contested']:.3f} | {v['agreed']:.3f} |" for m, v in rows.items()],
        "",
        "### What this shows",
        "",
        f"Pooled BT gets {rows[POOLED]['contested']:.3f} of the contested pairs (one group's: a single reward "
        f"cannot do better than 50 % with two equal groups) and {rows[POOLED]['agreed']:.3f} of the agreed ones. "
        f"Given {p['shots']} of a user's pairs, {best} reaches {rows[best]['contested']:.3f} on the contested pairs; "
        f"VPL {rows['VPL']['contested']:.3f} (KL {vpl['kl']:.2f}, {vpl['active_units']} active latent units).",
        "",
    ]


def _cyclic_markdown(c: dict[str, Any]) -> list[str]:
    rows = c["rows"]
    matchups = list(rows["BT"]["matchups"])
    return [
        f"## GPM against BT on cyclic preferences (lab world `{c['world']}`, gamma = {c['gamma']})",
        "",
        f"Both heads train on the same {c['train_pairs']} Bradley-Terry pairs (embedded like the groups section): "
        f"BT a linear reward, GPM a preference embedding of {c['embed_dim']} dims (`fit_gpm_head`). Scored against "
        f"the true preference on {c['test_pairs']} fresh pairs and on {c['probes']} style probes: one style "
        "marker appended to the same marker-free response, so the true preference is the rock-paper-scissors "
        "term alone.",
        "",
        "| head | fresh pairs | style probes | " + " | ".join(matchups) + " |",
        "|---|---|---|" + "---|" * len(matchups),
        *[
            f"| {name} | {v['test']:.3f} | {v['probe']:.3f} | "
            + " | ".join(f"{v['matchups'][m]:.3f}" for m in matchups)
            + " |"
            for name, v in rows.items()
        ],
        "",
        "### What this shows",
        "",
        f"A scalar reward orders the three styles transitively, so it can get at most two of the three match-ups "
        f"right: BT gets {rows['BT']['probe']:.3f} of the probes, GPM {rows['GPM']['probe']:.3f}; on fresh pairs "
        f"BT {rows['BT']['test']:.3f} and GPM {rows['GPM']['test']:.3f}."
        + (
            f" Only {c['style_contrasts']} of the {c['train_pairs']} natural pairs set two styles against each "
            "other, and in those the transitive reward difference outweighs the cyclic term, so little of the "
            f"cycle is in the data. Trained on {c['contrast_pairs']} style-contrast pairs instead, GPM gets "
            f"{rows['GPM (style-contrast training)']['probe']:.3f} of the test probes and BT "
            f"{rows['BT (style-contrast training)']['probe']:.3f}: the paper's direction (a scalar reward near "
            "chance on a cycle, a preference embedding near perfect) appears once the training pairs carry the "
            "cycle; the GPM head's size and the frozen features were not the limit."
            if "GPM (style-contrast training)" in rows
            else ""
        ),
        "",
    ]


def _bars(panels: dict[str, dict[str, dict[str, float]]], path: Path, ylabel: str) -> None:
    """One panel per entry: ``panels[title][series][category]`` as grouped bars."""
    from prefkit.lab.plots import plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        categories = list(next(iter(series.values())))
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
            ax.bar(xs, [values[c] for c in categories], width, label=name)
        ax.set_xticks(range(len(categories)), categories)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set(ylim=(0, 1.3), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0], ylabel=ylabel, title=title)
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plots(r: dict[str, Any], out: Path) -> list[str]:
    from prefkit.lab.plots import metric_panels

    files = []
    if "groups" in r:
        g = r["groups"]
        panels = {
            f"seen users, {what}": {m: {n: s["per_group"][n][key] for n in g["groups"]} for m, s in g["seen"].items()}
            for what, key in (("all pairs", "true"), ("contested pairs", "contested"))
        }
        _bars(panels, out / "groups_seen.png", "accuracy against the group's true preference")
        ks = g["shots"]
        metric_panels(
            ks,
            {
                what: {m: {"y": [by_k[k][key] for k in ks]} for m, by_k in g["unseen"].items()}
                for what, key in (("average over groups", "average"), ("worst group", "worst"))
            },
            out / "groups_unseen.png",
            xlabel="k: pairs of the unseen user",
            title="Unseen users: true-preference accuracy",
        )
        files += ["groups_seen.png", "groups_unseen.png"]
    synthetic = {}
    if "pets" in r:
        synthetic["pets (unseen users)"] = {m: dict(v) for m, v in r["pets"]["rows"].items()}
    if "cyclic" in r:
        synthetic["cyclic world"] = {
            m: {"fresh pairs": v["test"], "style probes": v["probe"]} for m, v in r["cyclic"]["rows"].items()
        }
    if "pal" in r:
        synthetic[f"PAL, planted K = {r['pal']['planted_k']}"] = {
            "held-out accuracy": {f"K={row['k']}": row["true"] for row in r["pal"]["rows"]}
        }
    if synthetic:
        _bars(synthetic, out / "synthetic.png", "accuracy")
        files.append("synthetic.png")
    return files
