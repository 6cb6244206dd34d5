"""OnlineTrainer: the reward rises, resume is exact, bad settings are named."""

import json

import pytest
import torch
import transformers

from prefkit.models.tiny import build_tiny_llama
from prefkit.online.rewards import CombinedReward, build_reward
from prefkit.online.trainer import OnlineArguments, OnlineTrainer

transformers.logging.set_verbosity_error()


def ascii_share(prompts, completions, **fields):
    """A verifiable reward a random byte-level model can learn fast: the share of ASCII characters."""
    return [sum(ch.isascii() for ch in c) / max(len(c), 1) for c in completions]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=12,
        per_device_train_batch_size=2,
        num_generations=8,
        max_new_tokens=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    base.update(kw)
    return OnlineArguments(**base)


def _trainer(tmp_path, tokenizer, **kw):
    model = build_tiny_llama(vocab_size=len(tokenizer), seed=0, hidden_size=32, num_heads=2, intermediate_size=64)
    rewards = CombinedReward([("ascii", build_reward("callable", function=f"{__name__}:ascii_share"), 1.0)])
    records = [{"prompt": f"Write {i}:", "id": f"p{i}"} for i in range(8)]
    return OnlineTrainer(
        model, _args(tmp_path, **kw), train_dataset=records, processing_class=tokenizer, rewards=rewards
    )


def _rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_a_verifiable_reward(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, learning_rate=1e-2, max_steps=20)
    trainer.train()
    rewards = [r["reward"] for r in _rows(tmp_path) if r["split"] == "train"]
    assert len(rewards) == 20
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards  # about 0.53 -> 0.82 here
    row = [r for r in _rows(tmp_path) if r["split"] == "train"][-1]
    assert {"rewards/ascii", "completion_length", "ratio", "clip_fraction"} <= set(row)


@pytest.mark.parametrize("loss", ["dapo", "dr_grpo", "cispo", "gspo", "bnpo"])
def test_every_policy_loss_trains(tmp_path, tokenizer, loss):
    trainer = _trainer(tmp_path, tokenizer, loss=loss, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2


def always_one(prompts, completions, **fields):
    return [1.0] * len(completions)


def test_a_solved_batch_is_not_a_stopped_run(tmp_path, tokenizer):
    """Equal rewards in every group give zero advantages and no gradient: logged, not counted as stalling."""
    trainer = _trainer(tmp_path, tokenizer, max_steps=5)
    trainer.rewards = CombinedReward([("one", build_reward("callable", function=f"{__name__}:always_one"), 1.0)])
    trainer.train()
    rows = [r for r in _rows(tmp_path) if r["split"] == "train"]
    assert len(rows) == 5 and all(r["zero_advantage_groups"] == 1.0 and r["grad_norm"] == 0.0 for r in rows)


def test_dynamic_sampling_and_overlong_filtering_leave_rows_out(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=2, dynamic_sampling=True, overlong_filtering=True)
    trainer.rewards = CombinedReward([("one", build_reward("callable", function=f"{__name__}:always_one"), 1.0)])
    trainer.train()  # every group is equal: nothing is kept, and the steps are not a stalled run
    rows = [r for r in _rows(tmp_path) if r["split"] == "train"]
    assert [r["kept"] for r in rows] == [0.0, 0.0]
    trainer = _trainer(tmp_path / "b", tokenizer, max_steps=2, overlong_filtering=True, max_new_tokens=2)
    trainer.train()  # with 2 new tokens almost every completion is cut
    kept = [r["kept"] for r in _rows(tmp_path / "b") if r["split"] == "train"]
    assert all(k < 0.5 for k in kept)


def even_prompts_only(prompts, completions, **fields):
    """Signal on prompts "Write N:" with N even (the ASCII share), none on the odd ones (always 0)."""
    return [ascii_share([], [c])[0] if int(p.split()[1][:-1]) % 2 == 0 else 0.0 for p, c in zip(prompts, completions)]


def test_dapo_refills_the_batch_with_groups_that_have_signal(tmp_path, tokenizer):
    """dynamic_sampling leaves the odd prompts' groups (equal rewards) out; with refill_rounds more prompts
    are sampled until the batch is whole, so every kept group has signal and the batch stays full."""
    reward = CombinedReward([("even", build_reward("callable", function=f"{__name__}:even_prompts_only"), 1.0)])
    rows = {}
    for rounds in (0, 4):
        trainer = _trainer(
            tmp_path / str(rounds),
            tokenizer,
            max_steps=4,
            dynamic_sampling=True,
            refill_rounds=rounds,
            per_device_train_batch_size=4,
        )
        trainer.rewards = reward
        trainer.train()
        rows[rounds] = [r for r in _rows(tmp_path / str(rounds)) if r["split"] == "train"]
    assert sum(r["kept"] for r in rows[0]) / 4 < 0.8  # about half the groups have no signal
    assert all(r["kept"] == 1.0 for r in rows[4])  # refilled: 4 groups with signal every step
    assert all(r["refill_rounds"] >= 1 for r in rows[4]) and "refill_rounds" not in rows[0][0]


def test_several_updates_per_rollout_batch_move_the_ratio(tmp_path, tokenizer):
    trainer = _trainer(
        tmp_path, tokenizer, max_steps=4, num_iterations=2, loss_params={"epsilon_low": 0.01, "epsilon_high": 0.01}
    )
    trainer.train()
    rows = [r for r in _rows(tmp_path) if r["split"] == "train"]
    # steps 1 and 3 sample (ratio 1); steps 2 and 4 reuse those rollouts after an update (ratio moves, clips)
    assert rows[0]["ratio"] == pytest.approx(1.0) and rows[2]["ratio"] == pytest.approx(1.0)
    assert rows[1]["ratio"] != pytest.approx(1.0, abs=1e-6) and rows[1]["clip_fraction"] > 0
    assert rows[1]["reward"] == rows[0]["reward"] and rows[3]["reward"] == rows[2]["reward"]


def test_num_iterations_resume_is_exact(tmp_path, tokenizer):
    straight = _trainer(tmp_path / "a", tokenizer, max_steps=4, num_iterations=2)
    straight.train()
    first = _trainer(tmp_path / "b", tokenizer, max_steps=4, num_iterations=2, save_strategy="steps", save_steps=2)
    first.args.max_steps = 2
    first.train()
    resumed = _trainer(tmp_path / "b", tokenizer, max_steps=4, num_iterations=2, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    a = [r["loss"] for r in _rows(tmp_path / "a") if r["split"] == "train"]
    b = [r["loss"] for r in _rows(tmp_path / "b") if r["split"] == "train"]
    assert b == pytest.approx(a, rel=1e-5)


def test_lora_trains_adapters_against_the_base(tmp_path, tokenizer):
    from peft import LoraConfig

    model = build_tiny_llama(vocab_size=len(tokenizer), seed=0, hidden_size=32, num_heads=2, intermediate_size=64)
    rewards = CombinedReward([("ascii", build_reward("callable", function=f"{__name__}:ascii_share"), 1.0)])
    records = [{"prompt": f"Write {i}:"} for i in range(8)]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = _args(tmp_path, max_steps=3, loss_params={"beta": 0.1})
    trainer = OnlineTrainer(
        model, args, train_dataset=records, processing_class=tokenizer, rewards=rewards, peft_config=lora
    )
    assert trainer.ref_model is None  # the base, adapters off, is the reference
    trainer.train()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    kl = [r["kl"] for r in _rows(tmp_path) if r["split"] == "train"]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0


def test_kl_term_uses_a_frozen_reference(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, loss_params={"beta": 0.1}, max_steps=3)
    trainer.train()
    kl = [r["kl"] for r in _rows(tmp_path) if r["split"] == "train"]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0  # the policy moves away from the reference
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())


def test_shared_prompt_scoring_trains_as_unshared(tmp_path, tokenizer):
    """``share_prompt`` runs each prompt once for its G completions: the same losses, metrics and weights."""
    plain = _trainer(tmp_path / "a", tokenizer, max_steps=3, loss_params={"beta": 0.1})
    plain.train()
    shared = _trainer(tmp_path / "b", tokenizer, max_steps=3, loss_params={"beta": 0.1}, share_prompt=True)
    shared.train()
    a = [r for r in _rows(tmp_path / "a") if r["split"] == "train"]
    b = [r for r in _rows(tmp_path / "b") if r["split"] == "train"]
    for key in ("loss", "reward", "kl", "entropy"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-6), key
    for p, q in zip(plain.model.parameters(), shared.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_entropy_is_logged(tmp_path, tokenizer):
    """The mean entropy of the policy over the completion tokens, in nats: at most log V, above 0."""
    trainer = _trainer(tmp_path, tokenizer, max_steps=1)
    trainer.train()
    row = [r for r in _rows(tmp_path) if r["split"] == "train"][0]
    assert 0 < row["entropy"] <= torch.log(torch.tensor(float(len(tokenizer)))).item()


def test_kl_as_a_reward_term(tmp_path, tokenizer):
    """``kl_reward_coef``: each completion's reward loses coef x its summed KL estimate before the advantages.
    Against a reference that differs from the policy the penalty is positive and changes the advantages."""
    trainer = _trainer(tmp_path, tokenizer, max_steps=1, kl_reward_coef=0.5, kl_reward_estimator="k3")
    trainer.ref_model = build_tiny_llama(
        vocab_size=len(tokenizer), seed=1, hidden_size=32, num_heads=2, intermediate_size=64
    ).requires_grad_(False)
    seen = {}
    original = trainer._advantages

    def spy(rewards):
        seen["rewards"] = rewards.clone()
        return original(rewards)

    trainer._advantages = spy
    trainer.train()
    row = [r for r in _rows(tmp_path) if r["split"] == "train"][0]
    assert row["kl_penalty"] > 0
    # the logged reward is the task's; the advantages saw it minus 0.5 x the KL penalty (mean over completions)
    assert float(seen["rewards"].mean()) == pytest.approx(row["reward"] - 0.5 * row["kl_penalty"], abs=1e-5)


def test_resume_is_exact(tmp_path, tokenizer):
    straight = _trainer(tmp_path / "a", tokenizer, max_steps=4)
    straight.train()
    first = _trainer(tmp_path / "b", tokenizer, max_steps=4, save_strategy="steps", save_steps=2)
    first.args.max_steps = 2
    first.train()
    resumed = _trainer(tmp_path / "b", tokenizer, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    a = [r["loss"] for r in _rows(tmp_path / "a") if r["split"] == "train"]
    b = [r["loss"] for r in _rows(tmp_path / "b") if r["split"] == "train"]
    assert b == pytest.approx(a, rel=1e-5)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"loss": "dpo"}, "takes a policy loss"),
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"temperature": 0.0}, "temperature: expected a finite number > 0"),
        ({"loss_params": {"beta": -1}}, "beta: expected a finite number >= 0"),
        ({"num_iterations": 0}, "num_iterations: expected an integer >= 1"),
        ({"num_iterations": 2, "save_strategy": "steps", "save_steps": 3}, "save_steps: expected a multiple of"),
        ({"kl_reward_coef": -0.1}, "kl_reward_coef: expected a finite number >= 0"),
        ({"refill_rounds": -1}, "refill_rounds: expected an integer >= 0"),
        ({"rollout_backend": "sglang"}, "rollout_backend: expected hf or vllm"),
        ({"kl_reward_estimator": "k4"}, "kl_reward_estimator: expected one of k1, k2, k3"),
        ({"min_new_tokens": 9}, "min_new_tokens: expected an integer from 0 to max_new_tokens"),
    ],
)
def test_bad_settings_are_named(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kw)
