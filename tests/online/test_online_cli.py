"""`prefkit train` with an `online:` config: the example raises its reward; bad settings answer before torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml

from prefkit.cli import main
from prefkit.losses.advantages import list_advantages
from prefkit.train.online_settings import ADVANTAGES
from prefkit.train.online_settings import REWARDS as REWARD_NAMES

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "grpo_tiny.yaml"


def test_the_example_raises_its_reward(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["train", str(EXAMPLE), f"output_dir={tmp_path / 'run'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 20 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "checkpoint-20").is_dir()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["online"]["loss"] == "grpo" and saved["max_steps"] == 20
    assert "reward:" in capsys.readouterr().out
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| reward |" in report and "curves.png" in report and (tmp_path / "run" / "curves.png").is_file()
    # resume: more steps may be asked for; another loss may not
    assert main(["train", str(EXAMPLE), f"output_dir={tmp_path / 'run'}", "max_steps=22", "--resume"]) == 0
    assert (tmp_path / "run" / "checkpoint-22").is_dir() or (tmp_path / "run" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["train", str(EXAMPLE), f"output_dir={tmp_path / 'run'}", "online.loss=dapo", "--resume"]) == 2
    assert "online.loss: 'grpo' -> 'dapo'" in capsys.readouterr().err


def test_the_online_dpo_example_raises_its_reward(tmp_path, monkeypatch):
    """An online: config with a pairwise loss trains OnlinePreferenceTrainer (online DPO) from the CLI."""
    monkeypatch.chdir(REPO)
    assert main(["train", "examples/online_dpo_tiny.yaml", f"output_dir={tmp_path / 'run'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    rewards = [r["reward"] for r in train]
    assert len(rewards) == 24 and sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards
    assert "implicit_rewards/margins" in train[-1] and "pairs" in train[-1]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "pairs `best_worst`" in report and "implicit_rewards" not in report.split("![")[0].split("| reward |")[0]


BAD = [
    ("online.loss=bt", "online.loss: expected a policy loss (bnpo, cispo, dapo, dr_grpo, grpo, gspo), a pairwise"),
    ("online.ppo={gamma: 0.9}", "online.ppo sets PPO's switches: name the critic too (online.critic: policy)"),
    ("online.critic=policy && online.loss=dpo", "online.critic (PPO) trains a policy loss"),
    ("online.pairs=random", "online.pairs: expected best_worst or all, got 'random'"),
    ("online.ref_sync_steps=4", "online.pairs and online.ref_sync_steps are settings of online preference losses"),
    ("online.num_generations=1", "online.num_generations: expected at least 2 for advantage grpo"),
    ("online.temperature=0", "online.temperature: expected a finite number > 0, got 0"),
    ("online.loss_params.beta=-1", "online.loss_params.beta: expected a finite number >= 0, got -1.0 (loss 'grpo')"),
    ("online.advantage=ppo", "online.advantage: expected one of grpo, dr_grpo, rloo"),
    ("online.prompts_file=nope.jsonl", "online.prompts_file: expected an existing file, got 'nope.jsonl'"),
    ("online.rewards=[]", "online.rewards: expected a list of {reward: NAME"),
    ("online.rewards=[{reward: maths}]", "online.rewards[0].reward: expected one of math, exact_match"),
    ("online.num_gens=4", "unknown key 'online.num_gens'. Did you mean 'online.num_generations'?"),
    ("learning_rate=-1", "learning_rate: expected a finite number > 0, got -1"),
    ("num_generations=4", "online training keys go in the online: section"),
    ("online.min_new_tokens=99", "online.min_new_tokens: expected at most max_new_tokens (8), got 99"),
    ("online.kl_reward_coef=-1", "online.kl_reward_coef: expected a finite number >= 0, got -1"),
    ("online.kl_reward_estimator=k5", "online.kl_reward_estimator: expected one of k1, k2, k3, got 'k5'"),
    ("online.share_prompt=maybe", "online.share_prompt: expected true or false, got 'maybe'"),
    ("online.loss=dpo && online.momentum=0.3", "online.momentum extrapolates between iterative DPO rounds"),
    ("online.loss=dpo && online.rounds=2 && online.momentum=-1", "online.momentum: expected a finite number >= 0"),
    ("online.loss=tdpo2", "online.loss: expected a loss without the token-level KL for online DPO"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_online_settings_are_one_line(override, message, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["train", str(EXAMPLE), *override.split(" && ")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefkit train: error: ") and err.count("\n") == 1 and message in err, err


def test_online_settings_are_checked_without_torch():
    code = (
        "import sys; from prefkit.cli import main; "
        f"rc = main(['train', {str(EXAMPLE)!r}, 'online.temperature=0']); print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr


def test_a_prompt_row_without_a_prompt_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"question": "no prompt"}\n')
    assert main(["train", str(EXAMPLE), f"online.prompts_file={prompts}", f"output_dir={tmp_path / 'r'}"]) == 2
    assert "p.jsonl:2: field 'prompt': expected a prompt" in capsys.readouterr().err


def test_the_names_the_check_knows_are_the_registries():
    assert set(ADVANTAGES) == {a.name for a in list_advantages()}
    from prefkit.online.rewards import reward_names

    assert set(REWARD_NAMES) == set(reward_names())  # the built-ins and the lab's, registered by entry point


def test_online_dpo_with_a_lab_annotator_as_judge(tmp_path, monkeypatch):
    """online.judge names a registered pairwise judge (the lab's Bradley-Terry annotator, entry point
    prefkit.judges); the reward is then only logged. A bad judge is one line."""
    monkeypatch.chdir(REPO)
    args = [
        "train",
        "examples/online_dpo_tiny.yaml",
        f"output_dir={tmp_path / 'run'}",
        "max_steps=2",
        "online.judge={judge: lab, world: default, temperature: 0.5, flip: 0.1}",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs"] for r in rows if r.get("split") == "train"] == [4.0, 4.0]  # one judged pair per prompt
    assert main([*args[:2], f"output_dir={tmp_path / 'bad'}", "online.judge={judge: lab, flip: 0.7}"]) == 2


def test_the_lab_judge_is_bradley_terry_with_flips():
    from prefkit.lab.world import make_world, sigmoid
    from prefkit.online.preference import build_judge

    world = make_world("default", 0)
    prompt, a, b = world.prompts[0], "clear helpful sun", "rude wrong"
    logit = world.preference_logit(prompt, a, b)
    assert build_judge("lab", temperature=2.0)([prompt], [a], [b]) == pytest.approx([sigmoid(logit / 2.0)])
    assert build_judge("lab", temperature=0, flip=0.2)([prompt], [a], [b]) == pytest.approx([0.8 if logit > 0 else 0.2])
    with pytest.raises(ValueError, match="unknown judge 'gpt'"):
        build_judge("gpt")


def test_iterative_dpo_from_a_config_and_its_resume(tmp_path, monkeypatch, capsys):
    """online.rounds: iterative DPO from the CLI on the lab world (model lab:default, reward lab); a second
    run into the same folder is refused without --resume; with it, the finished rounds are kept."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    args = ["train", "examples/iterative_dpo_lab.yaml", f"output_dir={out}", "online.rounds=2", "num_train_epochs=1"]
    assert main(args) == 0
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and (out / "round_2" / "model" / "config.json").is_file()
    assert rounds[1]["reward"] > rounds[0]["reward"]
    capsys.readouterr()
    assert main(args) == 2 and "already holds rounds; pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "round 2: done before" in capsys.readouterr().out
    assert main([*args, "online.loss=ipo", "--resume"]) == 2
    assert "online.loss: 'dpo' -> 'ipo'" in capsys.readouterr().err


def test_the_ppo_example_raises_its_reward_and_saves_the_critic(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    assert main(["train", "examples/ppo_tiny.yaml", f"output_dir={out}", "max_steps=16", "save_steps=8"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if r.get("split") == "train"]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    assert (out / "critic.pt").is_file() and (out / "checkpoint-8" / "critic.pt").is_file()
    assert "PPO with a critic" in (out / "report.md").read_text()
    capsys.readouterr()
    bad = ["train", "examples/ppo_tiny.yaml", f"output_dir={tmp_path / 'bad'}", "online.ppo={gama: 0.9}"]
    assert (
        main(bad) == 2 and "unknown key 'online.ppo.gama'. Did you mean 'online.ppo.gamma'?" in capsys.readouterr().err
    )


def test_ppo_with_a_value_head_on_the_policy_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    args = ["train", "examples/ppo_tiny.yaml", f"output_dir={out}", "max_steps=2", "save_steps=2"]
    assert main([*args, "online.critic=shared", "online.ppo={vf_coef: 0.2}"]) == 0
    assert (out / "critic.pt").is_file()
