"""PPOTrainer: the reward rises with a learning critic, critic warm-up leaves the policy alone, resume is
exact (critic, its optimizer and the reward statistics in the checkpoint), bad settings are named."""

import pytest
import torch
import transformers
from online_helpers import ascii_reward, base_args, tiny_policy, train_rows

from prefkit.online.ppo import PPOArguments, PPOTrainer, RunningMoments

transformers.logging.set_verbosity_error()


def _args(tmp_path, **kw):
    return PPOArguments(
        **base_args(tmp_path, **{**dict(max_steps=4, per_device_train_batch_size=8, num_generations=2), **kw})
    )


def _trainer(tmp_path, tokenizer, **kw):
    model, rewards = tiny_policy(tokenizer), ascii_reward()
    records = [{"prompt": f"Write {i}:"} for i in range(16)]
    return PPOTrainer(model, _args(tmp_path, **kw), train_dataset=records, processing_class=tokenizer, rewards=rewards)


_rows = train_rows


def test_ppo_raises_the_reward_and_the_critic_learns(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=20, learning_rate=1e-2, num_iterations=2)
    critic_before = [p.detach().clone() for p in trainer.critic.parameters()]
    trainer.train()
    rows = _rows(tmp_path)
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, trainer.critic.parameters()))
    assert rows[0]["values"] == pytest.approx(0.0, abs=1e-6)  # the head starts at zero
    assert {"value_loss", "returns", "kl_penalty", "score", "entropy"} <= set(rows[-1])


def test_a_value_head_on_the_policy_backbone(tmp_path, tokenizer):
    """shared_critic: the values come from the policy's own hidden states; the head and the reward learn, and
    the value loss (weighted by vf_coef) flows into the policy's backbone."""
    trainer = _trainer(tmp_path, tokenizer, max_steps=16, learning_rate=1e-2, shared_critic=True, vf_coef=0.5)
    assert type(trainer.critic).__name__ == "SharedValueHead"
    head_before = [p.detach().clone() for p in trainer.critic.parameters()]
    trainer.train()
    rows = _rows(tmp_path)
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    assert any(not torch.equal(a, b) for a, b in zip(head_before, trainer.critic.parameters()))
    assert rows[0]["values"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["values"] != pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="shared_critic reads unpacked rows"):
        _args(tmp_path, shared_critic=True, share_prompt=True)


def test_critic_warm_up_trains_only_the_critic(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=2, critic_warmup_steps=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    critic_before = [p.detach().clone() for p in trainer.critic.parameters()]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, trainer.critic.parameters()))


def test_resume_is_exact_with_the_critic(tmp_path, tokenizer):
    straight = _trainer(tmp_path / "a", tokenizer, max_steps=4)
    straight.train()
    first = _trainer(tmp_path / "b", tokenizer, max_steps=4, save_strategy="steps", save_steps=2)
    first.args.max_steps = 2
    first.train()
    assert (tmp_path / "b" / "run" / "checkpoint-2" / "critic.pt").is_file()
    resumed = _trainer(tmp_path / "b", tokenizer, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    a = [r["loss"] for r in _rows(tmp_path / "a")]
    b = [r["loss"] for r in _rows(tmp_path / "b")]
    assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    for p, q in zip(straight.critic.parameters(), resumed.critic.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_running_moments_match_the_whole_sample():
    m = RunningMoments()
    data = torch.tensor([1.0, 4.0, 2.0, 8.0, 5.0, 7.0])
    m.update(data[:2])
    m.update(data[2:5])
    m.update(data[5:])
    assert m.mean == pytest.approx(float(data.mean())) and m.std == pytest.approx(float(data.std()))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"gamma": 1.5}, "gamma: expected a number in"),
        ({"lam": -0.1}, "lam: expected a number in"),
        ({"cliprange_value": 0}, "cliprange_value: expected a number > 0"),
        ({"reward_clip": -1}, "reward_clip: expected a number >= 0"),
        ({"critic_warmup_steps": -1}, "critic_warmup_steps: expected an integer >= 0"),
        ({"vf_coef": 0}, "vf_coef: expected a number > 0"),
        ({"loss": "dpo"}, "takes a policy loss"),
    ],
)
def test_bad_settings_are_named(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kw)
