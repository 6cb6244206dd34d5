"""VPL: the ELBO loss, the active-units metric, and a pets-style task where two user groups agree on
most pairs but disagree on a contested subset."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from prefkit.losses import get_loss
from prefkit.losses.base import RewardPair
from prefkit.losses.variational import LatentRewardPair, gaussian_kl, vpl_elbo
from prefkit.models.embeddings import EmbeddedPairs
from prefkit.models.vpl import MIN_STD, VPL, active_units

H = 6  # dims 0-4: what every user values (weights SHARED); dim 5: the contested feature
SHARED = torch.tensor([1.0, -1.0, 0.5, 2.0, -1.5])


def pets_pairs(users_per_group: int, agreed: int, contested: int, seed: int, prefix: str = "u") -> EmbeddedPairs:
    """Group 0 likes feature 5, group 1 dislikes it; otherwise all users share one linear reward.

    Agreed pairs: both responses have feature 5 = 0, the winner is the one with the higher shared
    reward (the same for everybody). Contested pairs: both responses share dims 0-4 and have
    feature 5 = +1 / -1, so the winner depends only on the user's group.
    """
    g = torch.Generator().manual_seed(seed)
    chosen, rejected, user_index, group = [], [], [], []
    users = [f"{prefix}{i:03d}" for i in range(2 * users_per_group)]
    for u in range(2 * users_per_group):
        grp = u % 2
        a = torch.cat([torch.randn(agreed, H - 1, generator=g), torch.zeros(agreed, 1)], dim=1)
        b = torch.cat([torch.randn(agreed, H - 1, generator=g), torch.zeros(agreed, 1)], dim=1)
        a_wins = (a[:, :-1] @ SHARED > b[:, :-1] @ SHARED)[:, None]
        base = torch.randn(contested, H - 1, generator=g)
        likes = torch.cat([base, torch.ones(contested, 1)], dim=1)
        dislikes = torch.cat([base, -torch.ones(contested, 1)], dim=1)
        chosen += [torch.where(a_wins, a, b), likes if grp == 0 else dislikes]
        rejected += [torch.where(a_wins, b, a), dislikes if grp == 0 else likes]
        user_index.append(torch.full((agreed + contested,), u))
        group.append(torch.full((agreed + contested,), grp))
    meta = {"agreed": agreed, "contested": contested}
    return EmbeddedPairs(
        torch.cat(chosen), torch.cat(rejected), torch.cat(user_index), users, group=torch.cat(group), meta=meta
    )


def contested_rows(pairs: EmbeddedPairs) -> torch.Tensor:
    """Contested pairs are the ones whose two responses differ in feature 5."""
    return pairs.chosen[:, -1] != pairs.rejected[:, -1]


def test_gaussian_kl_by_hand():
    # standard normal: 0; mu = (1, 2), logvar = 0: 0.5 * (1 + 4) = 2.5;
    # mu = 0, logvar = log 2 (one dim): 0.5 * (2 - 1 - log 2) = 0.1534
    mu = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(2.0), 0.0]])
    expected = torch.tensor([0.0, 2.5, 0.5 * (1.0 - math.log(2.0))])
    assert torch.allclose(gaussian_kl(mu, logvar), expected, atol=1e-6)


def test_vpl_elbo_by_hand():
    # pair 0: margin 0 -> bt = log 2 = 0.6931; kl 2.5 shared by 2 pairs, beta 0.4 -> 0.4 * 2.5 / 2 = 0.5
    mu = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    batch = LatentRewardPair(
        chosen=torch.tensor([0.0, 2.0]),
        rejected=torch.tensor([0.0, 0.0]),
        mu=mu,
        logvar=torch.zeros(2, 2),
        pairs_per_latent=2.0,
    )
    out = vpl_elbo(batch, beta_kl=0.4)
    bt = torch.tensor([math.log(2.0), -F.logsigmoid(torch.tensor(2.0)).item()])  # 0.6931, 0.1269
    assert torch.allclose(out.loss, bt + 0.5, atol=1e-6)
    assert torch.allclose(out.metrics["kl"], torch.tensor([2.5, 2.5]))
    assert out.metrics["rewards/accuracies"].tolist() == [0.0, 1.0]
    spec = get_loss("vpl_elbo")
    assert spec.kind == "reward_pair" and spec.hyperparameters == {"beta_kl": 1.0}
    assert "arXiv:2408.10075" in spec.citation


def test_vpl_elbo_refuses_a_plain_reward_pair_and_bad_beta():
    with pytest.raises(ValueError, match="LatentRewardPair"):
        vpl_elbo(RewardPair(chosen=torch.zeros(2), rejected=torch.zeros(2)))
    batch = LatentRewardPair(
        chosen=torch.zeros(2), rejected=torch.zeros(2), mu=torch.zeros(2, 3), logvar=torch.zeros(2, 3)
    )
    with pytest.raises(ValueError, match="beta_kl"):
        vpl_elbo(batch, beta_kl=0.0)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        vpl_elbo(
            LatentRewardPair(
                chosen=torch.zeros(2), rejected=torch.zeros(2), mu=torch.zeros(3, 3), logvar=torch.zeros(3, 3)
            )
        )


def test_active_units_on_constructed_means():
    # 4 contexts, 4 dims: dims 0 and 2 vary (variance 1 and 0.25 > 0.01), dim 1 is constant,
    # dim 3 varies by +-0.05 (variance 0.0025 < 0.01) -> 2 active
    means = torch.tensor(
        [[1.0, 3.0, 0.5, 0.05], [-1.0, 3.0, -0.5, -0.05], [1.0, 3.0, 0.5, 0.05], [-1.0, 3.0, -0.5, -0.05]]
    )
    assert active_units(means) == 2
    assert active_units(means, threshold=0.001) == 3
    with pytest.raises(ValueError, match="at least 2"):
        active_units(means[:1])


def test_active_units_of_a_hand_built_encoder():
    model = VPL(H, latent_dim=4, hidden=8)
    with torch.no_grad():
        model.posterior.weight.zero_()
        model.posterior.bias.zero_()
        # mu_0 and mu_2 read the pooled pair features, mu_1 and mu_3 are 0 for every context
        model.posterior.weight[0] = 5.0
        model.posterior.weight[2] = -5.0
    data = pets_pairs(users_per_group=10, agreed=4, contested=4, seed=3)
    context = torch.arange(len(data)).view(20, 8)
    mu, logvar = model.encode(data.chosen[context], data.rejected[context])
    assert mu.shape == (20, 4) and logvar.shape == (20, 4)
    assert mu[:, [1, 3]].abs().max() == 0 and mu[:, 0].var() > 0.01
    assert model.count_active_units(data.chosen[context], data.rejected[context]) == 2


def test_encoder_is_permutation_invariant_and_masks_padding():
    model = VPL(H, latent_dim=3, hidden=8)
    data = pets_pairs(users_per_group=1, agreed=3, contested=2, seed=1)
    c, r = data.chosen[:5], data.rejected[:5]
    mu, logvar = model.encode(c, r)
    perm = torch.tensor([4, 2, 0, 3, 1])
    mu_p, logvar_p = model.encode(c[perm], r[perm])
    assert torch.allclose(mu, mu_p, atol=1e-6) and torch.allclose(logvar, logvar_p, atol=1e-6)
    padded_c = torch.cat([c, torch.randn(2, H)])
    padded_r = torch.cat([r, torch.randn(2, H)])
    mask = torch.tensor([True] * 5 + [False] * 2)
    mu_m, _ = model.encode(padded_c, padded_r, mask)
    assert torch.allclose(mu, mu_m, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[\.\.\., C, 6\]"):
        model.encode(c[:, :4], r[:, :4])


def test_fit_input_errors():
    model = VPL(H, latent_dim=2, hidden=8)
    data = pets_pairs(users_per_group=2, agreed=2, contested=1, seed=0)
    with pytest.raises(ValueError, match="fewer than 4 pairs"):
        model.fit(data, context_size=4, steps=1)
    no_users = EmbeddedPairs(data.chosen, data.rejected, torch.full((len(data),), -1), [])
    with pytest.raises(ValueError, match="user_index -1"):
        model.fit(no_users, context_size=2, steps=1)
    with pytest.raises(ValueError, match="context_size"):
        model.fit(data, context_size=0, steps=1)


@pytest.fixture(scope="module")
def trained():
    """A VPL fitted on 60 pets users (30 per group; 12 agreed + 4 contested pairs each)."""
    torch.manual_seed(0)
    train = pets_pairs(users_per_group=30, agreed=12, contested=4, seed=0)
    model = VPL(H, latent_dim=4, hidden=32)
    history = model.fit(train, context_size=4, target_size=8, steps=400, beta_kl=0.05, lr=3e-3, log_every=20)
    return train, model, history


def test_elbo_decreases_and_latent_is_used(trained):
    _, _, history = trained
    assert [h["step"] for h in history[:3]] == [0, 20, 40] and history[-1]["step"] == 400
    assert set(history[0]) == {"step", "loss", "bt", "kl", "accuracy", "active_units"}
    first = history[0]["loss"]
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    # at initialisation every target pair is a coin flip: BT about log 2 per pair
    assert abs(history[0]["bt"] - math.log(2.0)) < 0.1
    assert history[-1]["active_units"] >= 1 and history[-1]["kl"] > 0.1


def pooled_bt_accuracy(train: EmbeddedPairs, test: EmbeddedPairs) -> float:
    """A linear Bradley-Terry reward fitted on everybody's pairs, its accuracy on ``test``."""
    w = torch.zeros(H, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=0.05)
    diff = train.chosen - train.rejected
    for _ in range(300):
        loss = -F.logsigmoid(diff @ w).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(((test.chosen - test.rejected) @ w.detach() > 0).float().mean())


def new_user_accuracy(model: VPL, new: EmbeddedPairs) -> float:
    """Each user of ``new`` gives 2 contested + 2 agreed labelled pairs, then is asked its other contested
    pairs: the share of those ``model.predict`` gets right."""
    correct, total = 0.0, 0
    for user in new.users:
        rows = new.of_users([user])
        contested = contested_rows(rows).nonzero().flatten()
        agreed = (~contested_rows(rows)).nonzero().flatten()
        context = rows.subset(torch.cat([contested[:2], agreed[:2]]))
        query = rows.subset(contested[2:])
        correct += float((model.predict(context, query) > 0.5).sum())
        total += len(query)
    return correct / total


def test_vpl_serves_both_groups_on_contested_pairs_where_pooled_bt_cannot(trained):
    train, model, _ = trained
    # unseen users; each gives 2 contested + 2 agreed labelled pairs, then is asked 8 new contested pairs
    new = pets_pairs(users_per_group=10, agreed=2, contested=10, seed=7, prefix="new")
    vpl_accuracy = new_user_accuracy(model, new)
    pooled = pooled_bt_accuracy(train, new.subset(contested_rows(new)))
    # pooled BT gets one group's contested pairs right and the other's wrong: 50 % on balanced groups
    assert abs(pooled - 0.5) < 0.1, pooled
    assert vpl_accuracy > 0.9, vpl_accuracy


def test_strong_kl_weight_collapses_the_posterior():
    torch.manual_seed(0)
    train = pets_pairs(users_per_group=10, agreed=6, contested=2, seed=0)
    model = VPL(H, latent_dim=4, hidden=16)
    history = model.fit(train, context_size=4, steps=150, beta_kl=50.0, lr=3e-3, log_every=50)
    assert history[-1]["active_units"] == 0 and history[-1]["kl"] < 0.05


def test_save_and_load_round_trip(trained, tmp_path):
    train, model, _ = trained
    model.save_pretrained(tmp_path / "vpl")
    loaded = VPL.from_pretrained(tmp_path / "vpl")
    context, query = train.subset(range(4)), train.subset(range(4, 16))
    assert torch.equal(model.predict(context, query), loaded.predict(context, query))
    (tmp_path / "vpl" / "config.json").write_text('{"model_type": "other"}')
    with pytest.raises(ValueError, match="prefkit_vpl"):
        VPL.from_pretrained(tmp_path / "vpl")


def test_fit_objective_equals_the_registered_vpl_elbo():
    """`VPL.fit` writes the ELBO out (models do not import losses): per user it must equal the registered
    ``vpl_elbo`` summed over that user's target pairs."""
    pairs = pets_pairs(users_per_group=2, agreed=3, contested=2, seed=0)
    model = VPL(H, latent_dim=3, hidden=8)
    context = torch.tensor([[0, 1, 3], [5, 6, 8], [10, 11, 13], [15, 16, 18]])
    targets = torch.tensor([[2, 4], [7, 9], [12, 14], [17, 19]])
    torch.manual_seed(3)
    loss, metrics = model.episode_loss(pairs, context, targets, beta_kl=0.7)
    torch.manual_seed(3)  # the same reparameterisation noise
    mu, logvar = model.encode(pairs.chosen[context], pairs.rejected[context])
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    batch = LatentRewardPair(
        chosen=model.reward(pairs.chosen[targets], z[:, None]).flatten(),
        rejected=model.reward(pairs.rejected[targets], z[:, None]).flatten(),
        mu=mu.repeat_interleave(2, dim=0),
        logvar=logvar.repeat_interleave(2, dim=0),
        pairs_per_latent=2.0,
    )
    expected = vpl_elbo(batch, beta_kl=0.7).loss.sum() / 4
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(metrics["kl"], gaussian_kl(mu, logvar).detach(), atol=1e-6)


# ---- standardize: per-dimension feature statistics -------------------------------------------


def scaled(pairs: EmbeddedPairs) -> EmbeddedPairs:
    """``pairs`` with every embedding mapped to ``100 * e + (50, 60, ..., 100)``: unnormalised features
    (like sum-pooled hidden states) with the same information."""
    offset = torch.arange(H) * 10.0 + 50.0
    return dataclasses.replace(pairs, chosen=100 * pairs.chosen + offset, rejected=100 * pairs.rejected + offset)


def test_feature_statistics_by_hand():
    # 2 users x 2 pairs; dim 0 takes chosen (1, 3, 1, 3) and rejected (5, 7, 5, 7): mean 4,
    # population variance (9 + 1 + 1 + 9) / 4 = 5 -> std sqrt(5) = 2.2361; dim 1 is constant 2: std MIN_STD
    chosen = torch.tensor([[1.0, 2.0], [3.0, 2.0], [1.0, 2.0], [3.0, 2.0]])
    rejected = chosen + torch.tensor([4.0, 0.0])
    pairs = EmbeddedPairs(chosen, rejected, torch.tensor([0, 0, 1, 1]), ["a", "b"])
    model = VPL(2, latent_dim=2, hidden=4, standardize=True)
    assert model.feature_mean.tolist() == [0.0, 0.0] and model.feature_std.tolist() == [1.0, 1.0]  # unfitted
    model.fit(pairs, context_size=2, steps=1)
    assert model.feature_mean.tolist() == [4.0, 2.0]
    assert torch.allclose(model.feature_std, torch.tensor([math.sqrt(5.0), MIN_STD]))
    # the reward reads (e - mean) / std: (7, 2) and (4, 2) become (3 / sqrt 5, 0) and (0, 0)
    z = torch.zeros(2)
    expected = model.reward_net(torch.tensor([[3.0 / math.sqrt(5.0), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(model.reward(torch.tensor([[7.0, 2.0], [4.0, 2.0]]), z), expected.squeeze(-1), atol=1e-6)
    with pytest.raises(ValueError, match="standardize"):
        VPL(2, standardize="yes")


def test_standardize_recovers_the_accuracy_of_unscaled_features(trained):
    """On the pets task scaled by 100 plus an offset, VPL without standardize starts with a huge KL and
    stays at chance on new users' contested pairs; with it, it serves them as well as VPL does on the
    unscaled features (the `trained` fixture: > 0.9)."""
    train = scaled(pets_pairs(users_per_group=30, agreed=12, contested=4, seed=0))
    new = pets_pairs(users_per_group=10, agreed=2, contested=10, seed=7, prefix="new")
    accuracy = {}
    for standardize in (False, True):
        torch.manual_seed(0)
        model = VPL(H, latent_dim=4, hidden=32, standardize=standardize)
        history = model.fit(train, context_size=4, target_size=8, steps=400, beta_kl=0.05, lr=3e-3, log_every=400)
        accuracy[standardize] = new_user_accuracy(model, scaled(new))
        if not standardize:
            assert history[0]["kl"] > 1e4, history[0]  # the encoder's first outputs are in the hundreds
    unscaled = new_user_accuracy(trained[1], new)
    assert unscaled > 0.9 and accuracy[True] > 0.9, (unscaled, accuracy)
    assert abs(accuracy[False] - 0.5) < 0.15, accuracy  # a coin flip on the contested pairs


def test_standardize_statistics_are_saved_and_applied_after_loading(tmp_path):
    torch.manual_seed(0)
    train = scaled(pets_pairs(users_per_group=4, agreed=3, contested=2, seed=0))
    model = VPL(H, latent_dim=2, hidden=8, standardize=True)
    model.fit(train, context_size=2, steps=5)
    model.save_pretrained(tmp_path / "vpl")
    written = json.loads((tmp_path / "vpl" / "config.json").read_text())
    assert written == {"model_type": "prefkit_vpl", "dim": H, "latent_dim": 2, "hidden": 8, "standardize": True}
    loaded = VPL.from_pretrained(tmp_path / "vpl")
    assert loaded.standardize and torch.equal(loaded.feature_mean, model.feature_mean)
    assert torch.equal(loaded.feature_std, model.feature_std) and float(loaded.feature_mean[5]) == 50 + 10 * 5
    context, query = train.subset(range(4)), train.subset(range(4, 10))
    assert torch.equal(loaded.predict(context, query), model.predict(context, query))


def test_default_applies_no_transform_and_reads_folders_without_standardize(tmp_path):
    """Without standardize the model has no feature buffers and its outputs equal those of the same weights
    under an identity standardisation (mean 0, std 1); a config.json without the key (written before the
    option existed) loads as standardize=False with identical outputs."""
    torch.manual_seed(0)
    default = VPL(H, latent_dim=3, hidden=8)
    assert not default.standardize
    assert not any(name.startswith("feature_") for name in default.state_dict())
    identity = VPL(H, latent_dim=3, hidden=8, standardize=True)
    identity.load_state_dict({**default.state_dict(), "feature_mean": torch.zeros(H), "feature_std": torch.ones(H)})
    data = scaled(pets_pairs(users_per_group=1, agreed=3, contested=2, seed=1))
    context, query = data.subset(range(4)), data.subset(range(4, 10))
    assert torch.equal(default.predict(context, query), identity.predict(context, query))
    default.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["standardize"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = VPL.from_pretrained(tmp_path / "old")
    assert not loaded.standardize and torch.equal(loaded.predict(context, query), default.predict(context, query))


def test_standardize_is_refused_for_end_to_end_training(tiny_model, tokenizer, tmp_path):
    """The statistics are fixed at fit time; end to end the backbone moves under them. The run stops when
    it builds the head (`fit_end_to_end`, ConfigError), and the wrapper refuses such a head (ValueError)."""
    from prefkit.data.records import PairwiseRecord
    from prefkit.models.end_to_end import EndToEndRewardModel
    from prefkit.train.config import ConfigError
    from prefkit.train.personalized import fit_end_to_end, parse_personalized_config

    section = {"method": "vpl", "end_to_end": True, "standardize": True, "steps": 1}
    config = parse_personalized_config({"personalized": section, "output_dir": str(tmp_path)})
    records = [PairwiseRecord("q?", "yes", "no", user_id=user) for user in ("a", "b")]
    with pytest.raises(ConfigError, match="standardize.*end_to_end: true"):
        fit_end_to_end(records, (tiny_model, tokenizer), config, say=lambda _: None)
    head = VPL(tiny_model.config.hidden_size, latent_dim=2, hidden=4, standardize=True)
    with pytest.raises(ValueError, match="standardize=True"):
        EndToEndRewardModel(tiny_model, head, users=["a", "b"])
