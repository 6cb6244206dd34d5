"""MiCRo: the mixture likelihood, stage 1 (mixture of heads on pooled pairs), stage 2 (a router on the
prompt) and online adaptation of the router to a new user."""

import copy
import json
import math

import pytest
import torch

from prefkit.models.embeddings import EmbeddedPairs
from prefkit.models.micro import MiCRo, mixture_log_likelihood
from prefkit.models.vpl import VPL

H = 6  # response embedding size
C = 4  # prompt embedding: one-hot prompt type in dims 0-1, noise in dims 2-3
# prompt type 0 is judged by U, type 1 by V; they agree on dim 0 and disagree on dim 1. U and V are
# orthogonal, so they order a random pair alike half the time, and a single BT reward (at best their
# average, 45 degrees from each) ranks 1 - 45/180 = 75 % of the pairs right
U = torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0, 0.0])
V = torch.tensor([2.0, -2.0, 0.0, 0.0, 0.0, 0.0])


def routed_pairs(n: int, seed: int, judges=(U, V)) -> EmbeddedPairs:
    """``n`` pairs, half per prompt type; prompt type t is judged by ``judges[t]`` (no label noise)."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.arange(n) % 2
    prompt = torch.cat([torch.nn.functional.one_hot(kind, 2).float(), 0.3 * torch.randn(n, C - 2, generator=g)], 1)
    a, b = torch.randn(n, H, generator=g), torch.randn(n, H, generator=g)
    weights = torch.stack(judges)[kind]
    a_wins = ((a * weights).sum(1) > (b * weights).sum(1))[:, None]
    return EmbeddedPairs(
        torch.where(a_wins, a, b), torch.where(a_wins, b, a), torch.full((n,), -1), [], prompt=prompt, group=kind
    )


def test_mixture_log_likelihood_by_hand():
    # margins (0, 0): each head gives 1/2 -> log 1/2 for any weights;
    # margins (+inf-ish, -inf-ish) with weights (0.25, 0.75): log(0.25 * 1 + 0.75 * 0) = log 0.25
    margins = torch.tensor([[0.0, 0.0], [50.0, -50.0]])
    log_w = torch.tensor([0.25, 0.75]).log()
    out = mixture_log_likelihood(margins, log_w)
    assert torch.allclose(out, torch.tensor([math.log(0.5), math.log(0.25)]), atol=1e-6)


def test_an_untrained_router_is_uniform_and_reward_mixes_heads():
    model = MiCRo(H, k=3, context_dim=C)
    context = torch.randn(5, C)
    assert torch.allclose(model.route(context), torch.full((5, 3), 1 / 3))
    emb = torch.randn(5, H)
    assert torch.allclose(model.reward(emb, context), model.head_rewards(emb).mean(-1), atol=1e-6)
    with pytest.raises(ValueError, match="expects 4"):
        model.route(torch.randn(5, 3))


def test_input_errors():
    with pytest.raises(ValueError, match="mixture"):
        MiCRo(H, mixture="dirichlet")
    with pytest.raises(ValueError, match="k must be"):
        MiCRo(H, k=0)
    model = MiCRo(H, k=2, context_dim=C)
    pairs = routed_pairs(8, seed=0)
    with pytest.raises(ValueError, match="mixture='learned'"):
        model.fit_mixture(pairs, steps=1, balance=0.1)
    no_prompt = EmbeddedPairs(pairs.chosen, pairs.rejected, pairs.user_index, [])
    with pytest.raises(ValueError, match="prompt=None"):
        model.fit_router(no_prompt, steps=1)
    with pytest.raises(ValueError, match="user_index -1"):
        model.router_context(pairs, user_features=torch.zeros(0, 2))  # 0 users, rows without users


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(0)
    pooled = routed_pairs(2000, seed=0)
    model = MiCRo(H, k=2, context_dim=C)
    history = model.fit_mixture(pooled, steps=300, lr=0.05, log_every=50)
    baseline = MiCRo(H, k=1, context_dim=C)  # one head: a plain pooled Bradley-Terry reward
    baseline.fit_mixture(pooled, steps=300, lr=0.05, log_every=300)
    return model, baseline, history


def test_stage1_mixture_likelihood_increases_and_heads_find_the_two_judges(stage1):
    model, _, history = stage1
    assert [h["step"] for h in history] == [0, 50, 100, 150, 200, 250, 300]
    # a fresh mixture is near log 1/2 per pair; the fitted one far above
    assert abs(history[0]["log_likelihood"] - math.log(0.5)) < 0.15
    assert history[-1]["log_likelihood"] > history[0]["log_likelihood"] + 0.3
    assert history[-1]["weights"] == [0.5, 0.5]  # uniform mixture stays uniform
    # each planted reward is matched by one head (cosine > 0.95), in some order
    heads = torch.nn.functional.normalize(model.heads.weight.detach(), dim=1)
    cos = heads @ torch.nn.functional.normalize(torch.stack([U, V]), dim=1).T
    assert max(cos[0, 0] * cos[1, 1], cos[0, 1] * cos[1, 0]) > 0.9, cos


def test_routed_model_beats_a_single_bt_head(stage1):
    model, baseline, _ = stage1
    routed = copy.deepcopy(model)
    few = routed_pairs(64, seed=1)  # stage 2: a few labelled pairs with their prompts
    history = routed.fit_router(few, steps=150, lr=0.1)
    assert history[-1]["log_likelihood"] > history[0]["log_likelihood"]
    held_out = routed_pairs(1000, seed=2)
    bt_accuracy = baseline.accuracy(held_out)
    routed_accuracy = routed.accuracy(held_out)
    # the single head can only agree with both judges on dim 0: about 75 %
    assert 0.65 < bt_accuracy < 0.85, bt_accuracy
    assert routed_accuracy > 0.93 and routed_accuracy > bt_accuracy + 0.12, (routed_accuracy, bt_accuracy)
    # the router sends prompt type 0 to one head and type 1 to the other
    w = routed.route(held_out.prompt).detach()
    top = w.argmax(1)
    assert (top[held_out.group == 0] == top[0]).float().mean() > 0.95
    assert (top[held_out.group == 1] != top[0]).float().mean() > 0.95


def test_adapting_the_router_to_a_new_user_with_few_labels(stage1, tmp_path):
    model = copy.deepcopy(stage1[0])
    model.fit_router(routed_pairs(64, seed=1), steps=150, lr=0.1)
    # a new user who judges the two prompt types the other way round (V on type 0, U on type 1)
    labels = routed_pairs(8, seed=3, judges=(V, U))
    test = routed_pairs(1000, seed=4, judges=(V, U))
    before = model.accuracy(test)
    adapted = model.adapt(labels, steps=50, lr=0.2)
    after = adapted.accuracy(test)
    # routed to the wrong head for both prompt types: U and V agree on half the pairs -> ~50 %
    assert before < 0.6 and after > 0.85, (before, after)
    assert model.accuracy(test) == before  # the base model is untouched
    assert torch.equal(adapted.heads.weight, model.heads.weight)  # only the router moved
    # save / load keeps the adapted router
    adapted.save_pretrained(tmp_path / "micro")
    loaded = MiCRo.from_pretrained(tmp_path / "micro")
    assert loaded.config() == adapted.config() and loaded.accuracy(test) == after


def test_learned_mixture_weights_follow_group_shares_and_balance_pulls_them_to_uniform():
    torch.manual_seed(0)
    # 80 % of the pairs are judged by U, 20 % by V
    major, minor = routed_pairs(1600, seed=5, judges=(U, U)), routed_pairs(400, seed=6, judges=(V, V))
    pooled = EmbeddedPairs(
        torch.cat([major.chosen, minor.chosen]),
        torch.cat([major.rejected, minor.rejected]),
        torch.full((2000,), -1),
        [],
        prompt=torch.cat([major.prompt, minor.prompt]),
    )
    free = MiCRo(H, k=2, context_dim=C, mixture="learned")
    weights = sorted(free.fit_mixture(pooled, steps=300, lr=0.05, log_every=300)[-1]["weights"])
    assert weights[1] > 0.65, weights
    torch.manual_seed(0)
    balanced = MiCRo(H, k=2, context_dim=C, mixture="learned")
    weights_b = sorted(balanced.fit_mixture(pooled, steps=300, lr=0.05, balance=5.0, log_every=300)[-1]["weights"])
    assert weights_b[1] < weights[1], (weights_b, weights)


def test_user_features_extend_the_router_context():
    pairs = routed_pairs(4, seed=0)
    pairs = EmbeddedPairs(pairs.chosen, pairs.rejected, torch.tensor([0, 1, 1, 0]), ["a", "b"], prompt=pairs.prompt)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    context = MiCRo(H, k=2, context_dim=C + 2).router_context(pairs, features)
    assert context.shape == (4, C + 2)
    assert context[:, C:].tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match=r"\[2, F\]"):
        MiCRo(H, k=2, context_dim=C + 2).router_context(pairs, features[:1])


def test_saved_folder_format_and_round_trip(tmp_path):
    """config.json holds model_type and the constructor's keyword arguments (the format written before
    MiCRo moved onto EmbeddingHead, so older folders load); the weights round-trip exactly."""
    torch.manual_seed(0)
    model = MiCRo(H, k=3, context_dim=C, hidden=5, router_hidden=7, mixture="learned")
    torch.nn.init.normal_(model.router[-1].weight)  # a non-zero router, so routing is checked too
    model.save_pretrained(tmp_path / "micro")
    written = json.loads((tmp_path / "micro" / "config.json").read_text())
    assert written == {
        "model_type": "prefkit_micro",
        "dim": H,
        "k": 3,
        "context_dim": C,
        "hidden": 5,
        "router_hidden": 7,
        "mixture": "learned",
    }
    loaded = MiCRo.from_pretrained(tmp_path / "micro")
    assert not loaded.training and loaded.mixture == "learned" and (loaded.dim, loaded.k) == (H, 3)
    emb, context = torch.randn(4, H), torch.randn(4, C)
    assert torch.equal(loaded.reward(emb, context), model.reward(emb, context))
    assert loaded.mixture_logits.requires_grad  # learned weights stay trainable
    with pytest.raises(ValueError, match="prefkit_micro"):
        VPL.from_pretrained(tmp_path / "micro")
