"""Group-robust DPO in the trainer (config groups / group_robust; prefkit.losses.group_robust).

Data: two user groups with opposite tastes, 80 % / 20 % of 40 training pairs. The majority writes
formally ("Dear sir, tell me of X.") and prefers formal answers; the minority writes casually ("hey
whats up with X") and prefers casual ones. A policy can serve both (the prompt tells the groups apart),
but with plain DPO the majority's 32 pairs decide the first steps. Held out: 16 + 16 pairs on new topics.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from transformers import TrainerCallback

from prefkit.data.records import PairwiseRecord
from prefkit.losses.group_robust import exponentiated_gradient_step
from prefkit.models.tiny import build_tiny_llama
from prefkit.train.config import ConfigError, PreferenceConfig, parse_config
from prefkit.train.trainer import PreferenceTrainer

transformers.logging.set_verbosity_error()

FORMAL = ["Indeed, certainly.", "Certainly, indeed so.", "Indeed it is.", "Most certainly."]
CASUAL = ["yeah lol sure", "lol yeah ok", "sure lol", "ok yeah lol"]
TOPICS = ["apples", "rivers", "clocks", "lamps", "boats", "chess", "tea", "snow", "bees", "roads", "kites", "salt"]
TOPICS += ["rain", "music", "bread", "stars", "trains", "maps", "soup", "cells", "goals", "songs", "wind", "hotels"]


def pairs(n_majority: int, n_minority: int, offset: int) -> list[PairwiseRecord]:
    out = []
    for i in range(n_majority + n_minority):
        minority = i >= n_majority
        formal, casual = FORMAL[i % 4], CASUAL[(i // 4) % 4]
        topic = TOPICS[(i + offset) % len(TOPICS)]
        out.append(
            PairwiseRecord(
                prompt=f"hey whats up with {topic}" if minority else f"Dear sir, tell me of {topic}.",
                chosen=casual if minority else formal,
                rejected=formal if minority else casual,
                user_id=f"group:{'minority' if minority else 'majority'}/{i % 3}",
                id=f"x{offset + i}",
            )
        )
    return out


TRAIN, HELD_OUT = pairs(32, 8, 0), pairs(16, 16, 100)


def tiny(tokenizer):
    return build_tiny_llama(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def make_trainer(tokenizer, pref_args, *, train=TRAIN, eval_data=None, callbacks=None, **overrides):
    settings = dict(max_steps=10, per_device_train_batch_size=8, per_device_eval_batch_size=32, groups="lab")
    settings.update(loss_params={"beta": 0.1}, group_robust_step_size=1.0)
    settings.update(overrides)
    return PreferenceTrainer(
        tiny(tokenizer),
        pref_args(**settings),
        train_dataset=train,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


class AlphaTrace(TrainerCallback):
    """group_robust's alpha after every optimizer step."""

    def __init__(self):
        self.trainer, self.alphas = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.alphas.append(self.trainer.group_robust_alpha.tolist())


def test_group_robust_serves_the_minority_better_than_plain_dpo(tokenizer, pref_args):
    results = {}
    for robust in (False, True):
        trace = AlphaTrace()
        trainer = make_trainer(tokenizer, pref_args, eval_data=HELD_OUT, group_robust=robust, callbacks=[trace])
        trace.trainer = trainer
        if not robust:
            trainer.remove_callback(trace)
        trainer.train()
        results[robust] = (trainer.evaluate(), trace.alphas, trainer)
    (plain, _, plain_trainer), (robust, alphas, trainer) = results[False], results[True]
    assert plain_trainer.group_robust_alpha is None and trainer.group_names == ["majority", "minority"]
    # measured (seed 0, 10 steps): plain DPO minority loss 1.09, accuracy 0.0 (the majority's taste won);
    # group-robust 0.58 and 1.0; both serve the majority (plain 0.35 / 1.0, robust 0.67 / 0.62)
    assert robust["eval_group/minority/loss"] < plain["eval_group/minority/loss"] - 0.3
    assert robust["eval_group/minority/accuracy"] > plain["eval_group/minority/accuracy"] + 0.5
    assert robust["eval_worst_group/loss"] < plain["eval_worst_group/loss"] - 0.3
    assert plain["eval_worst_group/loss"] == plain["eval_group/minority/loss"]
    # alpha starts uniform, stays so after step 1 (policy = reference: every loss is log 2), then moves
    # toward the minority, whose loss is the higher one (measured 0.60 after 10 steps)
    assert alphas[0] == [0.5, 0.5]
    assert alphas[-1][1] > 0.55 and sum(alphas[-1]) == pytest.approx(1.0)
    logged = [e for e in trainer.state.log_history if "group_robust/alpha/minority" in e]
    assert len(logged) == 10 and logged[-1]["group_robust/alpha/minority"] == alphas[-1][1]
    assert all("group/majority/loss" in e for e in plain_trainer.state.log_history if "loss" in e)


def test_alpha_follows_the_logged_group_losses(tokenizer, pref_args):
    """Each step's alpha is one exponentiated-gradient step from the last one, with that step's group
    means (logged every step); a group missing from a step's batch keeps its weight."""
    trainer = make_trainer(tokenizer, pref_args, group_robust=True, max_steps=8, per_device_train_batch_size=4)
    trainer.train()
    rows = [e for e in trainer.state.log_history if "group_robust/alpha/majority" in e]
    assert len(rows) == 8
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    absent = 0
    for row in rows:
        losses = [row.get(f"group/{g}/loss", math.nan) for g in ("majority", "minority")]
        present = torch.tensor([not math.isnan(v) for v in losses])
        absent += int(not present.all())
        alpha = exponentiated_gradient_step(alpha, torch.tensor(losses, dtype=torch.float64).nan_to_num(), present, 1.0)
        logged = [row["group_robust/alpha/majority"], row["group_robust/alpha/minority"]]
        assert logged == pytest.approx(alpha.tolist(), rel=1e-5)
        # the logged loss is sum_g alpha_g L_g over the groups in the batch
        expected = sum(a * v for a, v, p in zip(alpha.tolist(), losses, present.tolist()) if p)
        assert row["loss"] == pytest.approx(expected, rel=1e-4)
    assert absent > 0  # batches of 4 from 32 + 8 pairs: some lack the minority


def test_group_metrics_at_the_reference_by_hand(tokenizer, pref_args):
    """Before any step the policy is the reference: every DPO loss is log 2 and no reward is higher."""
    trainer = make_trainer(tokenizer, pref_args, group_robust=True, eval_data=HELD_OUT)
    metrics = trainer.evaluate()
    for group in ("majority", "minority"):
        assert metrics[f"eval_group/{group}/loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert metrics[f"eval_group/{group}/accuracy"] == 0.0
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # 0.5 log 2 + 0.5 log 2
    assert trainer.group_robust_alpha.tolist() == [0.5, 0.5]  # evaluation does not move alpha


def _train_rows(out):
    rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def test_resume_restores_alpha_exactly(tokenizer, pref_args, tmp_path):
    def trainer(out, callbacks=None):
        save = dict(save_strategy="steps", save_steps=3, output_dir=str(out))
        return make_trainer(tokenizer, pref_args, group_robust=True, max_steps=6, callbacks=callbacks, **save)

    full = trainer(tmp_path / "full")
    full.train()
    reference = _train_rows(tmp_path / "full")
    saved = json.loads((tmp_path / "full" / "checkpoint-3" / "prefkit_state.json").read_text())
    assert saved["group_robust"]["groups"] == ["majority", "minority"]
    assert saved["group_robust"]["alpha"] == [
        reference[3]["group_robust/alpha/majority"],
        reference[3]["group_robust/alpha/minority"],
    ]

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        trainer(cut, callbacks=[CrashAt(5)]).train()
    resumed = trainer(cut)
    resumed.train(resume_from_checkpoint=True)
    after = _train_rows(cut)
    assert resumed.group_robust_alpha.tolist() == full.group_robust_alpha.tolist()  # bit for bit
    for step in range(1, 7):
        for key, value in reference[step].items():
            if key.startswith(("loss", "group", "worst_group")):
                assert after[step][key] == value, (step, key)


def test_resume_needs_the_saved_alpha(tokenizer, pref_args):
    args = dict(group_robust=True, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = make_trainer(tokenizer, pref_args, **args)
    trainer.train()
    checkpoint = Path(trainer.args.output_dir, "checkpoint-2")
    state = json.loads((checkpoint / "prefkit_state.json").read_text())
    state["group_robust"]["groups"] = ["a", "b"]
    (checkpoint / "prefkit_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"groups \['a', 'b'\]"):
        make_trainer(tokenizer, pref_args, **args).train(resume_from_checkpoint=str(checkpoint))
    del state["group_robust"]
    (checkpoint / "prefkit_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="no group_robust weights"):
        make_trainer(tokenizer, pref_args, **args).train(resume_from_checkpoint=str(checkpoint))
    (checkpoint / "prefkit_state.json").unlink()
    with pytest.raises(FileNotFoundError, match="group weights alpha"):
        make_trainer(tokenizer, pref_args, **args).train(resume_from_checkpoint=str(checkpoint))


def test_groups_from_a_mapping_file(tokenizer, pref_args, tmp_path):
    mapping = tmp_path / "groups.yaml"
    users = sorted({r.user_id for r in TRAIN})
    mapping.write_text("".join(f"'{u}': {'B' if 'minority' in u else 'A'}\n" for u in users))
    trainer = make_trainer(tokenizer, pref_args, groups=str(mapping), group_robust=True, max_steps=1)
    assert trainer.group_names == ["A", "B"]
    trainer.train()
    assert "group_robust/alpha/B" in trainer.state.log_history[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"group_robust": True}, "group_robust needs each pair's group"),
        ({"groups": "no/such/file.yaml"}, "neither lab nor a file"),
        ({"groups": "lab", "group_robust_step_size": -1.0}, "group_robust_step_size must be a finite number >= 0"),
        ({"groups": "lab", "group_robust_size_adjustment": 1.0}, "set group_robust: true"),
        ({"groups": "lab", "group_robust": True, "group_robust_size_adjustment": -1}, "must be a finite number >= 0"),
        ({"groups": "lab", "loss": "kto"}, "apply to pairwise policy losses"),
        ({"groups": "lab", "loss": "bt"}, "apply to pairwise policy losses"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        PreferenceConfig(output_dir="unused", report_to="none", use_cpu=True, **overrides)


def test_yaml_keys_parse():
    config = parse_config({"groups": "lab", "group_robust": True, "group_robust_step_size": "1e-2"})
    assert (config.train.groups, config.train.group_robust, config.train.group_robust_step_size) == ("lab", True, 0.01)


def test_bad_data_is_refused(tokenizer, pref_args):
    no_user = [PairwiseRecord(prompt="p", chosen="a", rejected="b", id="nobody"), *TRAIN]
    with pytest.raises(ValueError, match=r"no user_id \(0-based rows 0 \(id nobody\)\)"):
        make_trainer(tokenizer, pref_args, train=no_user, group_robust=True)
    not_lab = [PairwiseRecord(prompt="p", chosen="a", rejected="b", user_id="alice"), *TRAIN]
    with pytest.raises(ValueError, match="'alice' is not a lab user id"):
        make_trainer(tokenizer, pref_args, train=not_lab, group_robust=True)
    stranger = [PairwiseRecord(prompt="p", chosen="a", rejected="b", user_id="group:other/0")]
    with pytest.raises(ValueError, match=r"eval data has group\(s\) \['other'\] that the training data lacks"):
        make_trainer(tokenizer, pref_args, eval_data=stranger, group_robust=True)


def test_tokenized_datasets_bring_their_user_ids(tokenizer, pref_args):
    from prefkit.data.tokenize import tokenize_records

    dataset, _ = tokenize_records(TRAIN, tokenizer, max_length=64, max_prompt_length=32, progress=False)
    trainer = make_trainer(tokenizer, pref_args, train=dataset, group_robust=True, max_steps=1)
    assert trainer.group_names == ["majority", "minority"]
    trainer.train()
    with pytest.raises(ValueError, match=r"40 train record\(s\) have no user_id \(0-based rows 0, 1, 2, 3, 4\)"):
        make_trainer(tokenizer, pref_args, train=dataset.remove_columns("user_id"), group_robust=True)


def test_size_adjustment_moves_alpha_with_the_adjusted_losses(tokenizer, pref_args):
    """With group_robust_size_adjustment C, each step's alpha is the EG step on L_g + C / sqrt(N_g), N_g the
    group's training pairs (32 majority, 8 minority)."""
    c = 0.5
    trainer = make_trainer(
        tokenizer,
        pref_args,
        group_robust=True,
        max_steps=4,
        group_robust_size_adjustment=c,
        per_device_train_batch_size=8,
    )
    assert trainer.group_sizes.tolist() == [32.0, 8.0]
    trainer.train()
    rows = [e for e in trainer.state.log_history if "group_robust/alpha/majority" in e]
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for row in rows:
        losses = [row.get(f"group/{g}/loss", math.nan) for g in ("majority", "minority")]
        present = torch.tensor([not math.isnan(v) for v in losses])
        adjusted = torch.tensor(losses, dtype=torch.float64).nan_to_num() + c / torch.tensor([32.0, 8.0]).sqrt()
        alpha = exponentiated_gradient_step(alpha, adjusted.double(), present, 1.0)
        logged = [row["group_robust/alpha/majority"], row["group_robust/alpha/minority"]]
        assert logged == pytest.approx(alpha.tolist(), rel=1e-5)
    assert alpha[1] > 0.5
