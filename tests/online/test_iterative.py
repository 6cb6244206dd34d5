"""Iterative DPO: rounds on disk (pairs a normal pairwise file), the reward of the samples rises, resume in the
middle of a round gives the uninterrupted run, bad settings named."""

import json
import shutil

import pytest
import torch
import transformers

from prefkit.data.loaders import load_records
from prefkit.online.iterative import IterativeSettings, iterative_dpo
from prefkit.online.rewards import CombinedReward, build_reward
from prefkit.online.rollouts import SamplingSettings

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The lab's default world and a small reference policy for it (word-level tokenizer: texts round-trip
    to the same tokens, as iterative rounds written as text need)."""
    from prefkit.lab import make_world
    from prefkit.lab.policy import ReferenceSpec, reference_policy

    spec = ReferenceSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=120, heldout_samples=64)
    world = make_world("default", 0)
    return world, reference_policy(world, 0, spec=spec, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def _run(tmp_path, lab, resume=False, rounds=3, **kw):
    import copy

    from transformers import AutoModelForCausalLM

    world, reference = lab
    settings = IterativeSettings(
        rounds=rounds, sampling=SamplingSettings(n=4, max_new_tokens=24, seed=0), same_prompts=True, **kw
    )
    training = dict(
        loss="dpo",
        loss_params={"beta": 0.1},
        num_train_epochs=2,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="epoch",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        report_to="none",
    )
    return iterative_dpo(
        copy.deepcopy(reference.model).requires_grad_(True),
        reference.tokenizer,
        [{"prompt": p} for p in world.prompts],
        settings=settings,
        training=training,
        rewards=CombinedReward([("true", build_reward("lab", world="default"), 1.0)]),
        output_dir=tmp_path / "run",
        load_policy=lambda path: AutoModelForCausalLM.from_pretrained(path),
        resume=resume,
        say=lambda *a: None,
    )


def test_rounds_raise_the_true_reward_and_leave_their_files(tmp_path, lab):
    rounds = _run(tmp_path, lab)
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["pairs"] >= 1 for r in rounds)
    # the lab's true reward of each round's samples: about 0.54 -> 1.46 -> 2.19 here
    assert rounds[1]["reward"] > rounds[0]["reward"] + 0.3 and rounds[2]["reward"] > rounds[1]["reward"], rounds
    out = tmp_path / "run"
    for r in (1, 2, 3):
        for name in ("pairs.jsonl", "labels.json", "round.json", "model/config.json"):
            assert (out / f"round_{r}" / name).is_file(), (r, name)
    pairs = load_records(str(out / "round_1" / "pairs.jsonl"))  # a normal pairwise file prefkit train reads
    assert len(pairs) == rounds[0]["pairs"] and pairs[0].chosen != pairs[0].rejected
    rows = [json.loads(line) for line in (out / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert all(row["chosen_score"] > row["rejected_score"] for row in rows)
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 3


def test_resume_in_the_middle_of_a_round_is_the_same_run(tmp_path, lab):
    straight = _run(tmp_path / "a", lab, rounds=2)
    _run(tmp_path / "b", lab, rounds=2)
    # cut run b back to the middle of round 2: its pairs and first checkpoint kept, the rest gone
    round2 = tmp_path / "b" / "run" / "round_2"
    for name in ("round.json",):
        (round2 / name).unlink()
    shutil.rmtree(round2 / "model")
    checkpoints = sorted((round2 / "train").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for extra in checkpoints[1:]:
        shutil.rmtree(extra)
    lines = (tmp_path / "b" / "run" / "rounds.jsonl").read_text().splitlines()[:1]
    (tmp_path / "b" / "run" / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    resumed = _run(tmp_path / "b", lab, rounds=2, resume=True)
    assert resumed[1]["train_loss"] == pytest.approx(straight[1]["train_loss"], rel=1e-4)
    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "run" / "round_2" / "model").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(round2 / "model").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"rounds": 0}, "rounds: expected an integer >= 1"),
        ({"pairs": "x"}, "pairs: expected one of best_worst, all"),
        ({"ref_update": "ema"}, "ref_update: expected one of previous, initial"),
    ],
)
def test_bad_settings_are_named(kw, message):
    base = {"rounds": 2, "sampling": SamplingSettings(n=4)}
    with pytest.raises(ValueError, match=message):
        IterativeSettings(**{**base, **kw})


def test_momentum_extrapolates_each_rounds_weights(tmp_path, lab):
    """APO: after a round, theta <- theta_hat + alpha (theta_hat - theta_start); the round's training is the same."""
    from transformers import AutoModelForCausalLM

    plain = _run(tmp_path / "plain", lab, rounds=1)
    fast = _run(tmp_path / "fast", lab, rounds=1, momentum=0.5)
    assert fast[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=1e-6) and fast[0]["momentum"] == 0.5
    start = lab[1].model.state_dict()
    hat = AutoModelForCausalLM.from_pretrained(tmp_path / "plain" / "run" / "round_1" / "model").state_dict()
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "fast" / "run" / "round_1" / "model").state_dict()
    moved = 0
    for k in hat:
        assert torch.allclose(new[k], hat[k] + 0.5 * (hat[k] - start[k]), atol=1e-5), k
        moved += int(not torch.equal(hat[k], start[k]))
    assert moved > 0
    with pytest.raises(ValueError, match="momentum: expected a finite number >= 0"):
        IterativeSettings(rounds=1, sampling=SamplingSettings(n=4), momentum=-0.1)


def test_momentum_moves_tied_weights_once():
    """A weight shared by two modules (tied embeddings) appears twice in the state dict; the extrapolation must
    move it once, not twice."""
    from prefkit.online.iterative import _weights, extrapolate

    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight  # tied
    start = _weights(model)
    assert len(start) == 1
    with torch.no_grad():
        model[0].weight.add_(1.0)
    hat = model[0].weight.detach().clone()
    extrapolate(model, start, 0.5)
    assert torch.allclose(model[1].weight, hat + 0.5 * (hat - start["0.weight"]))
