"""`prefkit train examples/personalized_*.yaml` and `prefkit eval rm` on a personalized run folder, end to end
on the shipped lab-drawn file (examples/data/groups_pairs.jsonl) with a tiny random backbone."""

import json
from pathlib import Path

import pytest
import torch

from prefkit.cli import main
from prefkit.eval.personalized import PersonalizedModel, resolve_groups, summarize
from prefkit.models.embeddings import EmbeddedPairs
from prefkit.models.mixture import MixtureBT
from prefkit.train.personalized import (
    ConfigError,
    load_personalized_config,
    parse_personalized_config,
    reindex_users,
    split_users,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "groups_pairs.jsonl"
TINY = ["model=tiny", "tiny_hidden_size=16", "tiny_num_layers=1", "progress=false", "shot_draws=1"]
# Few steps: these tests check the plumbing, not the methods (tests/models/ does that).
FAST = {
    "mixture_bt": ["personalized.iters=5", "personalized.m_steps=5"],
    "pal": ["personalized.epochs=5", "personalized.new_user_steps=5"],
    "vpl": ["personalized.steps=20", "personalized.log_every=10", "personalized.hidden=8"],
    "micro": ["personalized.steps=20", "personalized.router_steps=20", "personalized.adapt_steps=3"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """Each method trained once from its example config: ``{method: (exit code, output_dir)}``."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method, fast in FAST.items():
        folder = root / method
        argv = [
            "train",
            str(ROOT / "examples" / f"personalized_{method}.yaml"),
            *TINY,
            *fast,
            f"train_file={DATA}",
            f"output_dir={folder}",
            f"embedding_cache_dir={cache}",
        ]
        out[method] = (main(argv), folder)
    return out


@pytest.mark.parametrize("method", list(FAST))
def test_train_writes_head_config_history_card_and_eval(runs, method, capsys):
    code, folder = runs[method]
    assert code == 0
    for name in ("config.json", "model.safetensors", "users.json", "personalized.yaml", "metrics.jsonl", "README.md"):
        assert (folder / name).is_file(), name
    # 16 of the 20 users train; the example holds out 4 (2 majority, 2 minority) as unseen.
    users = json.loads((folder / "users.json").read_text())["users"]
    assert len(users) == 16 and "group:minority/9" not in users
    results = json.loads((folder / "eval" / "results.json").read_text())
    assert results["method"] == method
    assert set(results["seen"]["per_group"]) == {"majority", "minority"}
    assert results["seen"]["worst_group"]["accuracy"] == min(
        g["accuracy"] for g in results["seen"]["per_group"].values()
    )
    assert results["unseen"]["shots"] == [0, 1, 2, 4, 8]
    assert results["unseen"]["by_k"]["8"]["users"] == 4
    assert (folder / "eval" / "accuracy_vs_k.png").stat().st_size > 0
    assert "paper" in (folder / "README.md").read_text().lower()
    # The resolved config reads back and holds the overrides.
    config = load_personalized_config(folder / "personalized.yaml")
    assert config.method == method and config.model == "tiny" and config.tiny_hidden_size == 16


@pytest.mark.parametrize("method", ["mixture_bt", "pal"])
def test_eval_rm_on_run_folder_prints_group_table_and_matches_training_eval(runs, method, tmp_path, capsys, cache):
    _, folder = runs[method]
    capsys.readouterr()
    argv = ["eval", "rm", "--model", str(folder), "--data", str(folder / "heldout.jsonl"), "--groups", "lab"]
    assert main([*argv, "--output", str(tmp_path / "eval"), "--no-progress", "--shot-draws", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Seen users: 16 users" in printed and "majority" in printed and "minority" in printed
    assert "worst group" in printed and "Unseen users" in printed
    ours = json.loads((tmp_path / "eval" / "results.json").read_text())
    trained = json.loads((folder / "eval" / "results.json").read_text())
    # Same pairs, same backbone, same seeds: the same accuracies as the end-of-training evaluation.
    assert ours["seen"]["accuracy"] == pytest.approx(trained["seen"]["accuracy"])
    for k in ("0", "1", "8"):
        assert ours["unseen"]["by_k"][k]["accuracy"] == pytest.approx(trained["unseen"]["by_k"][k]["accuracy"])
    assert (tmp_path / "eval" / "report.md").read_text().startswith("# Personalized evaluation")


def _train(tmp_path, *overrides):
    argv = ["train", str(ROOT / "examples" / "personalized_pal.yaml"), *TINY, f"train_file={DATA}"]
    return main([*argv, f"output_dir={tmp_path / 'out'}", f"embedding_cache_dir={tmp_path / 'emb'}", *overrides])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("personalized.kk=3", "unknown config key 'kk' personalized (pal)"),
        ("embeding_cache_dir=x", "Did you mean 'embedding_cache_dir'?"),
        ("personalized.method=bt", "personalized.method must be one of mixture_bt, pal, vpl, micro"),
        ("personalized.epochs=many", "config key 'epochs'"),
        ("pooling=max", "pooling must be one of"),
        ("pooling=last", "pooling: last with backbone_layers: 0 gives every response the same vector"),
        ("unseen_users=[nobody]", "unseen_users ['nobody'] are not users of"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, capsys, override, expected):
    assert _train(tmp_path, override) == 2
    assert expected in capsys.readouterr().err


def test_variant_of_a_method_is_checked_by_the_model(tmp_path, capsys):
    assert _train(tmp_path, "personalized.variant=nope") == 2
    assert "variant must be one of" in capsys.readouterr().err


def test_personalized_options_on_a_plain_model_are_an_error(tmp_path, capsys):
    assert main(["eval", "rm", "--model", "tiny", "--data", str(DATA), "--groups", "lab"]) == 2
    assert "apply to personalized run folders" in capsys.readouterr().err


def test_method_without_section_is_an_error():
    with pytest.raises(ConfigError, match="'personalized' must be a mapping with a 'method'"):
        parse_personalized_config({"personalized": {"k": 2}})


# ---- pieces, with hand-checked numbers ------------------------------------------------------


def test_summarize_pools_over_pairs_and_finds_the_worst_group():
    counts = {"a": (3, 4), "b": (1, 2), "c": (0, 2)}
    out = summarize(counts, {"a": "g1", "b": "g1", "c": "g2"})
    assert out["accuracy"] == 0.5  # (3 + 1 + 0) / (4 + 2 + 2)
    assert out["user_mean"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert out["per_group"]["g1"] == {"users": 2, "pairs": 6, "accuracy": pytest.approx(4 / 6)}
    assert out["worst_group"] == {"group": "g2", "accuracy": 0.0}
    assert out["worst_user"] == {"user": "c", "accuracy": 0.0}


def test_resolve_groups_from_lab_ids_and_from_a_file(tmp_path):
    assert resolve_groups("lab", ["group:majority/3", "group:minority/0"]) == {
        "group:majority/3": "majority",
        "group:minority/0": "minority",
    }
    with pytest.raises(ValueError, match="not a lab user id"):
        resolve_groups("lab", ["alice"])
    path = tmp_path / "groups.yaml"
    path.write_text("alice: long\nbob: short\n")
    assert resolve_groups(str(path), ["bob"]) == {"bob": "short"}
    with pytest.raises(ValueError, match="no group for 1 user"):
        resolve_groups(str(path), ["carol"])


def _pairs(diffs, users, user_index):
    """1-d embeddings: chosen = diff, rejected = 0."""
    chosen = torch.tensor(diffs, dtype=torch.float32)[:, None]
    return EmbeddedPairs(chosen, torch.zeros_like(chosen), torch.tensor(user_index), users)


def test_mixture_few_shot_uses_the_posterior_over_groups():
    head = MixtureBT(dim=1, k=2)
    with torch.no_grad():
        head.heads[0].weight.fill_(1.0)
        head.heads[1].weight.fill_(-1.0)
    head.mixing_weights = torch.tensor([0.7, 0.3])
    config = parse_personalized_config({"personalized": {"method": "mixture_bt"}})
    model = PersonalizedModel(config, head, [], {})
    query = _pairs([1.0], ["u"], [0])  # head 0 ranks it right (margin +1), head 1 wrong (-1)
    context = _pairs([-1.0], ["u"], [0])
    # No pairs: the prior, group 0 (pi 0.7). One pair favouring head 1:
    # log 0.7 + log sigma(-1) = -0.357 - 1.313 = -1.670 < log 0.3 + log sigma(1) = -1.204 - 0.313 = -1.517.
    assert model.few_shot_correct(None, query).tolist() == [True]
    assert model.few_shot_correct(context, query).tolist() == [False]


def test_split_and_reindex_users():
    from prefkit.data.records import PairwiseRecord

    records = [PairwiseRecord(prompt="p", chosen="a", rejected="b", user_id=u) for u in "xxxxyyyyz"]
    config = parse_personalized_config({"personalized": {"method": "pal"}, "unseen_users": ["z"], "eval_fraction": 0.5})
    train, held, unseen = split_users(records, config)
    assert unseen == ["z"] and 8 in held  # every pair of z held out
    assert len(held) == 1 + 2 + 2  # z's pair, and half of x's 4 and y's 4
    pairs = _pairs([1.0, 1.0, 1.0], ["x", "y", "z"], [0, 2, 2])
    assert reindex_users(pairs).users == ["x", "z"]
    assert reindex_users(pairs).user_index.tolist() == [0, 1, 1]


def test_frozen_heads_refuse_a_multi_process_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch / torchrun set in every process
    assert _train(tmp_path) == 2
    assert "heads on frozen embeddings fit in one process" in capsys.readouterr().err
