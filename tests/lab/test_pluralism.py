"""The pluralism study on tiny settings: pooled BT fails the minority of an 80/20 world where the
personalized heads do not; the pets task; PAL on planted ideal points; the cyclic probes; the CLI."""

import pytest
import torch
import transformers

from prefkit.cli import main
from prefkit.lab import pluralism
from prefkit.lab.pluralism import (
    POOLED,
    cyclic_gpm,
    groups_section,
    pal_ideal_points,
    pets_task,
    pluralism_study,
    users_per_group,
    with_shares,
)
from prefkit.lab.world import make_world

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

TINY = dict(users=30, train_pairs=80, test_pairs=30, shots=(1, 8))
HYPER = {"em_iters": 15, "pal_epochs": 100, "vpl_steps": 60, "micro_steps": 60}


def test_with_shares_and_users_per_group():
    world = with_shares(make_world("groups", 0), (0.8, 0.2))
    assert world.shares == {"majority": 0.8, "minority": 0.2}
    # 20 users: round(0.8 * 20) = 16 and round(0.2 * 20) = 4; unseen round(0.25 * 16) = 4, round(0.25 * 4) = 1
    assert users_per_group(world, 20, 0.25) == {"majority": (12, 4), "minority": (3, 1)}
    with pytest.raises(ValueError, match="has 2 groups, got 3 shares"):
        with_shares(world, (0.5, 0.3, 0.2))
    with pytest.raises(ValueError, match="sum to 1"):
        with_shares(world, (0.5, 0.2))


def test_pooled_bt_fails_the_minority_and_personalized_heads_do_not(small_reference, lab_cache):
    _, ref = small_reference  # every preset shares the base distribution, hence the reference policy
    world = with_shares(make_world("groups", 0), (0.8, 0.2))
    r = groups_section(world, ref, hyper=HYPER, cache_root=lab_cache, say=lambda *a: None, **TINY)
    seen = r["seen"]
    assert set(seen) == set(pluralism.METHODS) and r["shots"] == [0, 1, 8]
    pooled = seen[POOLED]["per_group"]["minority"]
    # the pooled head follows the majority: on the contested pairs it gets the minority mostly wrong
    # (measured with the small reference: pooled 0.407; MixtureBT 0.667, PAL 0.778, oracle 0.704)
    assert pooled["contested"] < 0.5 and pooled["contested_pairs"] > 20
    for name in ("MixtureBT", "PAL", pluralism.ORACLE):
        ours = seen[name]["per_group"]["minority"]
        assert ours["contested"] > pooled["contested"] + 0.15, (name, ours, pooled)
    # pooled BT ignores the unseen user's pairs: the same scores at every k
    unseen = r["unseen"][POOLED]
    assert unseen[0]["average"] == unseen[8]["average"]


def test_pets_pooled_is_half_right_on_contested_pairs():
    r = pets_task(users=30, unseen=6, vpl_steps=250, seed=0)
    rows = r["rows"]
    # two equal groups: one scalar reward gets exactly one group's contested pairs right
    assert rows[POOLED]["contested"] == pytest.approx(0.5, abs=0.1)
    for name in ("VPL", "PAL", "MixtureBT"):
        assert rows[name]["contested"] > 0.9, (name, rows[name])
    assert r["test_contested"] == 6 * (1 + 1 + 40 // 4) - 6 * 2  # per user: 12 contested, 2 in the context


def test_pal_recovers_planted_ideal_points():
    r = pal_ideal_points(ks=(1, 3), users=30, epochs=60, seed=0)
    one, three = r["rows"]
    assert three["true"] > one["true"] + 0.05
    assert three["weight_error"] < three["uniform_weight_error"]


def test_cyclic_probes_defeat_a_scalar_reward(small_reference, lab_cache):
    _, ref = small_reference
    r = cyclic_gpm(
        make_world("cyclic", 0), ref, train_pairs=300, test_pairs=100, probes=150, contrast_pairs=300, epochs=60,
        cache_root=lab_cache,
    )  # fmt: skip
    bt = r["rows"]["BT"]
    assert 0 < r["style_contrasts"] < 300
    # trained on pairs that carry the cycle, the preference embedding gets past the 2/3 a scalar reward can reach
    # (1.0 at the study's sizes); BT cannot
    assert r["rows"]["GPM (style-contrast training)"]["probe"] > 0.75
    assert r["rows"]["BT (style-contrast training)"]["probe"] < 0.75
    # a linear reward on mean-pooled token embeddings orders the probe's two markers the same way for
    # every base response, so at most 2 of 3 style match-ups (2/3 of the probes, up to sampling) are right
    assert bt["probe"] < 0.75
    assert set(bt["matchups"]) <= {"formal > casual", "casual > poetic", "poetic > formal"}
    with pytest.raises(ValueError, match="no cyclic term"):
        cyclic_gpm(make_world("default", 0), ref)


def test_study_writes_files_and_prints_the_table(small_reference, lab_cache, small_spec, tmp_path, capsys):
    out = tmp_path / "pluralism"
    r = pluralism_study(sections=("groups",), spec=small_spec, cache_dir=lab_cache, output_dir=out, hyper=HYPER, **TINY)
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "groups_seen.png", "groups_unseen.png"}
    printed = capsys.readouterr().out
    assert "| method | majority | minority | average | worst group |" in printed
    assert f"| {POOLED} |" in printed and r["groups"]["shares"] == {"majority": 0.8, "minority": 0.2}
    md = (out / "results.md").read_text()
    assert "### What this shows" in md and "Unseen users" in md
    with pytest.raises(ValueError, match="unknown or no sections"):
        pluralism_study(sections=("nope",), output_dir=out)


def test_cli_passes_the_options(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(pluralism, "pluralism_study", lambda world, **kw: seen.update(world=world, **kw))
    argv = [
        "lab",
        "study",
        "pluralism",
        "--shares",
        "0.9,0.1",
        "--sections",
        "groups,pets",
        "--users",
        "12",
        "--output-dir",
        str(tmp_path),
        "--quiet",
    ]
    assert main(argv) == 0
    assert seen["world"] == "groups" and seen["shares"] == [0.9, 0.1] and seen["sections"] == ["groups", "pets"]
    assert seen["users"] == 12 and seen["progress"] is False
    assert main(["lab", "study", "pluralism", "--users", "0"]) == 2
