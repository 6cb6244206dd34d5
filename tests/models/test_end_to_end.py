"""Personalized heads (PAL, MixtureBT, VPL, MiCRo) trained end to end on a tiny Llama: gradients reach the
backbone, the frozen backbone reproduces the embedding path, and two users with opposite preferences are
both served. The trainer itself (accumulation, resume, two processes) is tested in
tests/train/test_end_to_end_trainer.py."""

import json
from pathlib import Path

import pytest
import torch

from prefkit.data.records import PairwiseRecord
from prefkit.models.embeddings import embed_pairs
from prefkit.models.end_to_end import EndToEndRewardModel, tokenize_pairs
from prefkit.models.micro import MiCRo
from prefkit.models.mixture import MixtureBT
from prefkit.models.pal import PAL
from prefkit.models.tiny import build_tiny_llama
from prefkit.models.vpl import VPL
from prefkit.train.config import ConfigError
from prefkit.train.end_to_end import Episodes
from prefkit.train.end_to_end import train_end_to_end as _train
from prefkit.train.personalized import load_personalized_config, parse_personalized_config

USERS = ["alice", "bob"]
HIDDEN = 32


def opposite_records(n_prompts=6):
    """Every pair labelled by both users, alice preferring the "yes" answer and bob the "no" one."""
    records = []
    for i in range(n_prompts):
        yes, no = f"yes, sure {i}", f"no way {i}"
        records.append(PairwiseRecord(f"q{i}?", yes, no, user_id="alice", id=f"a{i}"))
        records.append(PairwiseRecord(f"q{i}?", no, yes, user_id="bob", id=f"b{i}"))
    return records


def backbone(tokenizer):
    return build_tiny_llama(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_layers=1, num_heads=2, intermediate_size=64, seed=0
    )


def train_end_to_end(model, data, tokenizer, **kwargs):
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        return [row["loss"] for row in _train(model, data, tokenizer, output_dir=out, **kwargs)]


def make_head(kind, k=2):
    torch.manual_seed(0)
    if kind == "pal":
        return PAL(HIDDEN, k, variant="mixture", users=USERS)
    return MixtureBT(HIDDEN, k, users=USERS)


def per_user_accuracy(model, data, tokenizer):
    """``{user: fraction of their pairs ranked right}`` with each user's own reward."""
    pairs = model.embed_pairs(data, tokenizer)
    if isinstance(model.head, PAL):
        correct = model.head.pair_logits(pairs) > 0
    else:
        correct = model.head.pair_correct(pairs)
    return {u: float(correct[pairs.user_index == i].float().mean()) for i, u in enumerate(USERS)}


@pytest.mark.parametrize("kind", ["pal", "mixture"])
def test_gradients_reach_backbone_and_head_and_loss_decreases(tokenizer, kind):
    model = EndToEndRewardModel(backbone(tokenizer), make_head(kind), pooling="mean")
    data = tokenize_pairs(opposite_records(), tokenizer, model.users)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = train_end_to_end(model, data, tokenizer, epochs=10, batch_size=len(data), lr=0.05, backbone_lr=1e-2)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("backbone.") for name in changed)
    assert any(name.startswith("head.") for name in changed)
    assert ("mixing_logits" in changed) == (kind == "mixture")
    assert len(history) == 10 and history[-1] < history[0]


@pytest.mark.parametrize("kind", ["pal", "mixture"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_frozen_backbone_matches_embedding_path(tokenizer, kind, pooling):
    lm = backbone(tokenizer)
    model = EndToEndRewardModel(lm, make_head(kind), pooling=pooling)
    records = opposite_records()
    data = tokenize_pairs(records, tokenizer, model.users)
    frozen = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    train_end_to_end(model, data, tokenizer, epochs=3, batch_size=4, lr=0.05, backbone_lr=0.0)
    assert all(torch.equal(p, frozen[name]) for name, p in model.backbone.named_parameters())
    cached = embed_pairs(records, lm, tokenizer, pooling=pooling, progress=False)
    with torch.no_grad():
        end_to_end = model(data.batch(list(range(len(data))), tokenizer.pad_token_id))["loss"]
        if kind == "pal":
            embedding_path = model.head.objective(cached)
        else:
            embedding_path = model.head.marginal_nll(cached, model.mixing_logits.log_softmax(-1))
    assert float(end_to_end) == pytest.approx(float(embedding_path), abs=1e-5)


def test_opposite_users_beat_pooled_bt(tokenizer):
    """Each pair is labelled both ways, so a pooled reward is right for exactly one of the two users on
    every pair: its two per-user accuracies sum to at most 1 and the worse one is <= 0.5. A
    personalized head can rank every pair right for both users."""
    records = opposite_records()
    scores = {}
    for name, head in [
        ("pooled", make_head("mixture", k=1)),
        ("pal", make_head("pal")),
        ("mixture", make_head("mixture")),
    ]:
        model = EndToEndRewardModel(backbone(tokenizer), head, pooling="mean")
        data = tokenize_pairs(records, tokenizer, model.users)
        train_end_to_end(model, data, tokenizer, epochs=30, batch_size=len(data), lr=0.05, backbone_lr=1e-2)
        scores[name] = min(per_user_accuracy(model, data, tokenizer).values())
    assert scores["pooled"] <= 0.5
    assert scores["pal"] == 1.0
    assert scores["mixture"] == 1.0


def test_mixture_posterior_separates_users(tokenizer):
    model = EndToEndRewardModel(backbone(tokenizer), make_head("mixture"), pooling="mean")
    data = tokenize_pairs(opposite_records(), tokenizer, model.users)
    train_end_to_end(model, data, tokenizer, epochs=30, batch_size=len(data), lr=0.05, backbone_lr=1e-2)
    groups = model.head.predict_group(USERS)
    assert groups[0] != groups[1]
    assert torch.allclose(model.head.mixing_weights, model.mixing_logits.softmax(-1))


def test_save_and_load_round_trip(tokenizer, tmp_path):
    model = EndToEndRewardModel(backbone(tokenizer), make_head("pal"), pooling="mean")
    data = tokenize_pairs(opposite_records(2), tokenizer, model.users)
    train_end_to_end(model, data, tokenizer, epochs=2, batch_size=4, lr=0.05)
    model.save_pretrained(str(tmp_path / "rm"))
    loaded = EndToEndRewardModel.from_pretrained(str(tmp_path / "rm"))
    batch = data.batch([0, 1, 2, 3], tokenizer.pad_token_id)
    with torch.no_grad():
        assert float(loaded(batch)["loss"]) == pytest.approx(float(model(batch)["loss"]), abs=1e-6)
    assert loaded.pooling == "mean" and loaded.users == USERS


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match="hidden size is 32"):
        EndToEndRewardModel(backbone(tokenizer), PAL(8, 2, users=USERS))
    with pytest.raises(ValueError, match="no users"):
        EndToEndRewardModel(backbone(tokenizer), PAL(HIDDEN, 2))
    with pytest.raises(ValueError, match="no users"):
        EndToEndRewardModel(backbone(tokenizer), VPL(HIDDEN))
    with pytest.raises(ValueError, match="balance acts on MiCRo's learned"):
        EndToEndRewardModel(backbone(tokenizer), MiCRo(HIDDEN), users=USERS, balance=0.1)
    stranger = [PairwiseRecord("q?", "a", "b", user_id="carol", id="c0")]
    with pytest.raises(ValueError, match="record 0 \\(id 'c0'\\) has user_id 'carol', unknown"):
        tokenize_pairs(stranger, tokenizer, USERS)


# ---- VPL and MiCRo -----------------------------------------------------------------------------


def vpl_model(tokenizer, lm=None, beta_kl=0.1):
    torch.manual_seed(0)
    return EndToEndRewardModel(lm or backbone(tokenizer), VPL(HIDDEN, 4, 16), "mean", users=USERS, beta_kl=beta_kl)


def micro_model(tokenizer, lm=None):
    torch.manual_seed(0)
    return EndToEndRewardModel(lm or backbone(tokenizer), MiCRo(HIDDEN, 2, HIDDEN + 2), "mean", users=USERS)


def test_episodes_are_fixed_by_seed_and_index(tokenizer):
    data = tokenize_pairs(opposite_records(), tokenizer, USERS)
    episodes = Episodes(data, tokenizer.pad_token_id, length=20, context_size=2, target_size=3, seed=5)
    again = Episodes(data, tokenizer.pad_token_id, length=20, context_size=2, target_size=3, seed=5)
    assert [episodes[i] for i in range(20)] == [again[i] for i in range(20)]
    assert len({str(episodes[i]) for i in range(20)}) > 10  # episodes differ
    users = data.user_index.tolist()
    for context, targets in (episodes[i] for i in range(20)):
        assert len(context) == len(set(context)) == 2 and len(targets) == len(set(targets)) == 3
        assert len({users[r] for r in context + targets}) == 1  # one user per episode
    batch = episodes.collate([episodes[0], episodes[1]])
    rows = batch["user_index"].shape[0]
    assert batch["input_ids"].shape[0] == 2 * rows and batch["context"].shape == (2, 2)
    assert int(batch["targets"].max()) < rows  # indices into the union of the episodes' pairs
    with pytest.raises(ValueError, match="fewer than 7 pairs"):
        Episodes(data, tokenizer.pad_token_id, length=4, context_size=7, target_size=1, seed=0)


@pytest.mark.parametrize("kind", ["vpl", "micro"])
def test_vpl_and_micro_frozen_backbone_match_embedding_path(tokenizer, kind):
    lm = backbone(tokenizer)
    model = vpl_model(tokenizer, lm) if kind == "vpl" else micro_model(tokenizer, lm)
    records = opposite_records()
    data = tokenize_pairs(records, tokenizer, USERS)
    cached = embed_pairs(records, lm, tokenizer, pooling="mean", progress=False)
    with torch.no_grad():
        if kind == "micro":
            end_to_end = model(data.batch(list(range(len(data))), tokenizer.pad_token_id))["loss"]
            embedding_path = model.head.mixture_objective(cached)[0]
        else:
            episodes = Episodes(data, tokenizer.pad_token_id, length=3, context_size=2, target_size=2, seed=0)
            torch.manual_seed(1)
            end_to_end = model(episodes.collate([episodes[i] for i in range(3)]))["loss"]
            context = torch.tensor([episodes[i][0] for i in range(3)])
            targets = torch.tensor([episodes[i][1] for i in range(3)])
            torch.manual_seed(1)  # the same draw of z
            embedding_path = model.head.episode_loss(cached, context, targets, model.beta_kl)[0]
    assert float(end_to_end) == pytest.approx(float(embedding_path), abs=1e-5)


def test_vpl_end_to_end_serves_opposite_users(tokenizer):
    """The latent inferred from a user's own pairs must flip the reward between the two users."""
    model = vpl_model(tokenizer, beta_kl=0.01)
    data = tokenize_pairs(opposite_records(), tokenizer, USERS)
    history = train_end_to_end(
        model, data, tokenizer, max_steps=80, batch_size=4, lr=0.03, backbone_lr=1e-2, context_size=3
    )
    assert history[-1] < history[0]
    pairs = model.embed_pairs(data, tokenizer)
    for u in range(2):
        mine = pairs.subset(pairs.user_index == u)
        assert float((model.head.predict(mine, mine) > 0.5).float().mean()) == 1.0


def test_micro_end_to_end_then_router_serves_both_users(tokenizer):
    """Alice, asked q-prompts, prefers "yes" answers; bob, asked r-prompts, prefers "no" answers. Stage 1
    trains heads and backbone end to end; the router (stage 2), on the trained backbone's prompt
    embeddings and the one-hot user, then ranks every pair of both users right."""
    records = []
    for i in range(6):
        yes, no = f"yes, sure {i}", f"no way {i}"
        records.append(PairwiseRecord(f"q{i}?", yes, no, user_id="alice", id=f"a{i}"))
        records.append(PairwiseRecord(f"r{i}?", no, yes, user_id="bob", id=f"b{i}"))
    model = micro_model(tokenizer)
    data = tokenize_pairs(records, tokenizer, USERS)
    history = train_end_to_end(model, data, tokenizer, epochs=30, batch_size=len(data), lr=0.05, backbone_lr=1e-2)
    assert history[-1] < history[0]
    pairs = model.embed_pairs(data, tokenizer)
    assert pairs.prompt is not None and pairs.prompt.shape == pairs.chosen.shape
    features = torch.eye(2)
    model.head.fit_router(pairs, user_features=features, steps=200, lr=0.1)
    for u in range(2):
        assert model.head.accuracy(pairs.subset(pairs.user_index == u), features) == 1.0


# ---- `prefkit train` with `end_to_end: true`, then `prefkit eval rm` --------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = ["model=tiny", "tiny_hidden_size=16", "tiny_num_layers=1", "progress=false", "shot_draws=1", "shots=[1]"]


def test_config_end_to_end_trains_saves_backbone_and_eval_reloads_it(tmp_path):
    from prefkit.cli import main

    out, report = tmp_path / "run", tmp_path / "eval"
    argv = [
        "train",
        str(EXAMPLES / "personalized_mixture_bt.yaml"),
        *TINY,
        f"train_file={EXAMPLES / 'data' / 'groups_pairs.jsonl'}",
        f"output_dir={out}",
        "personalized.end_to_end=true",
        "personalized.epochs=1",
        "personalized.batch_size=32",
        "personalized.backbone_lr=1e-3",
    ]
    assert main(argv) == 0
    config = load_personalized_config(out / "personalized.yaml")
    assert config.model == str((out / "backbone").resolve()) and config.end_to_end.end_to_end
    assert (config.end_to_end.epochs, config.end_to_end.batch_size, config.end_to_end.backbone_lr) == (1, 32, 1e-3)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["stage"] == "end_to_end" and history[-1]["stage"] == "final"
    # `prefkit eval rm` embeds with the trained backbone: the same seen-user accuracy as the run's own eval
    assert main(["eval", "rm", "--model", str(out), "--data", str(out / "heldout.jsonl"), "--output", str(report)]) == 0
    ours = json.loads((out / "eval" / "results.json").read_text())["seen"]["accuracy"]
    assert json.loads((report / "results.json").read_text())["seen"]["accuracy"] == pytest.approx(ours)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"method": "pal", "backbone_lr": 0.1}, "backbone_lr set\\(s\\) end-to-end training; add end_to_end: true"),
        ({"method": "mixture_bt", "epochs": 3}, "epochs set\\(s\\) end-to-end training"),
        ({"method": "vpl", "end_to_end": True, "max_steps": 5}, "vpl's own key 'steps' sets max_steps"),
        ({"method": "micro", "end_to_end": True, "epochs": 2}, "epochs does not apply to micro end to end"),
        ({"method": "pal", "end_to_end": "yes"}, "must be true or false"),
        ({"method": "pal", "end_to_end": True, "epoch": 2}, "unknown config key 'epoch'.*Did you mean 'epochs'"),
    ],
)
def test_config_end_to_end_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_personalized_config({"personalized": section})


def test_config_end_to_end_shares_the_methods_own_hyper_parameters():
    from prefkit.train.personalized import config_to_dict

    config = parse_personalized_config({"personalized": {"method": "pal", "end_to_end": True, "epochs": 4}})
    assert (config.params.epochs, config.end_to_end.epochs) == (4, 4)
    assert config.end_to_end.lr == config.params.lr  # PAL's own default learning rate
    mixture = parse_personalized_config({"personalized": {"method": "mixture_bt", "end_to_end": True, "epochs": 4}})
    assert mixture.end_to_end.epochs == 4 and mixture.end_to_end.backbone_lr is None
    section = {"method": "vpl", "end_to_end": True, "steps": 7, "users_per_step": 3, "log_every": 2, "bf16": True}
    vpl = parse_personalized_config({"personalized": section})
    e = vpl.end_to_end
    assert (e.max_steps, e.batch_size, e.logging_steps, e.lr, e.bf16) == (7, 3, 2, vpl.params.lr, True)
    written = config_to_dict(vpl)["personalized"]
    assert "max_steps" not in written and "epochs" not in written and written["steps"] == 7
    assert parse_personalized_config(config_to_dict(vpl)).end_to_end == e  # the written config reads back
    micro = parse_personalized_config({"personalized": {"method": "micro", "end_to_end": True, "steps": 9}})
    assert (micro.end_to_end.max_steps, micro.end_to_end.batch_size) == (9, micro.params.batch_size)


def test_lora_backbone_trains_only_adapters_and_merges(tokenizer):
    from peft import LoraConfig, get_peft_model

    lm = backbone(tokenizer)
    base_before = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="FEATURE_EXTRACTION")
    model = EndToEndRewardModel(get_peft_model(lm.model, lora), make_head("pal"), pooling="mean")
    assert model.has_lora
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("head.") for name in trainable)
    data = tokenize_pairs(opposite_records(), tokenizer, model.users)
    history = train_end_to_end(model, data, tokenizer, epochs=10, batch_size=len(data), lr=0.05, backbone_lr=1e-2)
    assert history[-1] < history[0]
    batch = data.batch(list(range(len(data))), tokenizer.pad_token_id)
    with torch.no_grad():
        before_merge = model(batch)["loss"]
    with pytest.raises(ValueError, match="merge them first"):
        model.save_pretrained("unused")
    model.merge_lora()
    assert not model.has_lora and type(model.backbone).__name__ == "LlamaModel"
    with torch.no_grad():
        assert float(model(batch)["loss"]) == pytest.approx(float(before_merge), abs=1e-5)
    merged = lm.model.state_dict()  # merged in place: the language model's decoder carries the update
    assert set(merged) == set(base_before)
    assert not torch.equal(merged["layers.0.self_attn.q_proj.weight"], base_before["layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["layers.0.self_attn.k_proj.weight"], base_before["layers.0.self_attn.k_proj.weight"])
