"""RewardTrainer: one forward per batch, weights, list and judge losses, `prefkit train` on reward configs.

The end-to-end run (learn a planted preference, save, reload) is in test_reward_e2e.py."""

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from prefkit.cli import main
from prefkit.data.records import PairwiseRecord, RankedRecord
from prefkit.losses import get_loss
from prefkit.models.loading import TinySpec
from prefkit.models.reward import build_reward_model, load_reward_model, reward_scores
from prefkit.train.reward_trainer import RewardTrainer

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]
SMALL = TinySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
WORDS = ["the cat", "a dog", "blue sky", "green tea", "red car", "old man", "sea shell", "hot sun"]


def _rm(tokenizer):
    return build_reward_model("tiny", tiny=SMALL, vocab_size=len(tokenizer))


def _good_bad(n, seed):
    """Pairs whose chosen reply ends with "good" and rejected with "bad" (else random words)."""
    rng = random.Random(seed)
    return [
        PairwiseRecord(prompt=f"Q{i}?", chosen=f"{rng.choice(WORDS)} good", rejected=f"{rng.choice(WORDS)} bad")
        for i in range(n)
    ]


def _ranked(n):
    return [
        RankedRecord(
            prompt=f"Q{i}?",
            completions=["fine answer", "bad", "great answer!"][: 2 + i % 2],
            scores=[1.0, 0.0, 2.0][: 2 + i % 2] if i % 4 else [1.0, 1.0, 2.0][: 2 + i % 2],  # some ties
        )
        for i in range(n)
    ]


class _CountingForward:
    """Records the batch size of every forward of ``model``."""

    def __init__(self, model):
        self.sizes = []
        model.register_forward_hook(
            lambda module, args, kwargs, out: self.sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )


def test_pairwise_loss_is_one_forward_and_honours_weights(tokenizer, pref_args):
    records = _good_bad(4, seed=0)
    for record, w in zip(records, (1.0, 2.0, 0.5, 3.0)):
        record.weight = w
    model = _rm(tokenizer)
    trainer = RewardTrainer(model, pref_args(loss="bt"), train_dataset=records, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        expected_scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    counter = _CountingForward(model)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    assert counter.sizes == [8]  # chosen and rejected of 4 pairs in one [2B, T] forward
    c, r = expected_scores[:4], expected_scores[4:]
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert loss.item() == pytest.approx((weights * -F.logsigmoid(c - r)).mean().item(), abs=1e-6)


def test_list_loss_scores_all_completions_in_one_forward(tokenizer, pref_args):
    model = _rm(tokenizer)
    args = pref_args(loss="ranknet", per_device_train_batch_size=4)
    trainer = RewardTrainer(model, args, train_dataset=_ranked(8), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 * 3  # B * K rows, K = longest list
    counter = _CountingForward(model)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        assert counter.sizes == [12]
        scores = reward_scores(model, batch["input_ids"], batch["attention_mask"]).view(4, 3)
    from prefkit.losses import RewardList

    manual = get_loss("ranknet")(RewardList(scores, batch["ranking"], batch["levels"])).loss.mean()
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)
    assert trainer.train().training_loss > 0  # two steps of training run


def test_judge_loss_uses_compare_or_the_reward_difference(tokenizer, pref_args):
    if "gpm" not in {s.name for s in __import__("prefkit.losses", fromlist=["x"]).list_losses("judge")}:
        pytest.skip("no judge loss registered")
    model = _rm(tokenizer)
    trainer = RewardTrainer(model, pref_args(loss="gpm"), train_dataset=_good_bad(4, 0), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        s = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    # a scalar model judges by r_w - r_l; gpm's loss on a logit z is -log sigmoid(z)
    assert loss.item() == pytest.approx(-F.logsigmoid(s[:4] - s[4:]).mean().item(), abs=1e-6)

    calls = []
    model.compare = lambda ia, ma, ib, mb, ca=None, cb=None: calls.append(ia.shape) or torch.zeros(ia.shape[0])
    with torch.no_grad():
        assert trainer.compute_loss(model, batch).item() == pytest.approx(0.6931472, abs=1e-6)  # log 2
    assert calls == [batch["input_ids"][:4].shape]


def test_preference_trainer_points_reward_losses_to_reward_trainer(tokenizer, tiny_model, pref_args):
    from prefkit.train.trainer import PreferenceTrainer

    with pytest.raises(ValueError, match="RewardTrainer"):
        PreferenceTrainer(tiny_model, pref_args(loss="bt"), train_dataset=_good_bad(4, 0), processing_class=tokenizer)
    with pytest.raises(ValueError, match="RewardTrainer trains losses of kind reward_pair"):
        RewardTrainer(_rm(tokenizer), pref_args(loss="dpo"), train_dataset=_good_bad(4, 0), processing_class=tokenizer)
    with pytest.raises(ValueError, match="need RankedRecords"):
        RewardTrainer(
            _rm(tokenizer), pref_args(loss="listmle"), train_dataset=_good_bad(4, 0), processing_class=tokenizer
        )


@pytest.mark.parametrize("config", ["rm_tiny.yaml", "rm_list_tiny.yaml"])
def test_example_reward_configs_train(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the examples name their data relative to the repository
    overrides = [f"output_dir={tmp_path / 'run'}", "max_steps=2", "eval_steps=2", "save_steps=2", "disable_tqdm=true"]
    assert main(["train", f"examples/{config}", *overrides]) == 0
    assert "held-out reward-model accuracy" in capsys.readouterr().out
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rewards/accuracies" in r for r in rows)
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["architectures"] == ["LlamaForSequenceClassification"] and len(config_json["id2label"]) == 1
    assert load_reward_model(str(out)).config.pad_token_id == 0


def test_reward_config_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    run = ["train", "examples/rm_tiny.yaml", f"output_dir={tmp_path / 'run'}"]
    assert main([*run, "train_file=examples/data/ranked_tiny.jsonl"]) == 2
    assert "holds ranked records" in capsys.readouterr().err
    assert main([*run, "ref_model=tiny"]) == 2
    assert "uses no reference model" in capsys.readouterr().err
    assert main([*run, "loss_params.center_cof=0.1"]) == 2
    assert "Did you mean 'center_coef'" in capsys.readouterr().err
