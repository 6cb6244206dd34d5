"""Short online (GRPO-family) runs for tests/online/test_online_ddp.py, under ``accelerate launch`` or plain ``python``.

    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml tests/online/scripts/online_ddp_worker.py \
        --batch 2 --out-dir results grpo rpp-shared
    python tests/online/scripts/online_ddp_worker.py --batch 4 --out-dir results grpo

Builds everything from seeds (tiny Llama, byte tokenizer, 8 prompts, a rule reward; nothing is downloaded)
and, for each case (``grpo``: the grpo loss and group-normalised advantages with a KL term to a frozen
copy; ``rpp-shared``: REINFORCE++'s batch-normalised advantages, whose statistics span every process's
completions, with ``share_prompt``; ``online-dpo``: `OnlinePreferenceTrainer`, DPO on the best and worst
of each prompt's 4 samples; ``ppo``: `PPOTrainer` with the per-sequence grpo loss, its critic compared
too), trains ``--steps`` SGD steps of ``--batch`` prompts x 4 completions per
process and writes from the main process ``OUT_DIR/CASE.pt`` with the logged ``losses``, the logged
``reward`` of each step, the ``completions`` every process sampled (gathered, in global order), the
trained parameters ``before`` and ``after``, and ``num_processes``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama
from prefkit.online.ppo import PPOArguments, PPOTrainer
from prefkit.online.preference import OnlinePreferenceArguments, OnlinePreferenceTrainer
from prefkit.online.rewards import CombinedReward, build_reward
from prefkit.online.trainer import OnlineArguments, OnlineTrainer

CASES = ("grpo", "rpp-shared", "online-dpo", "ppo")


def vowel_share(prompts, completions, **fields):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def build_trainer(case: str, batch: int, steps: int, output_dir: str) -> OnlineTrainer:
    tokenizer = build_byte_tokenizer()
    dpo, ppo = case == "online-dpo", case == "ppo"
    method = (
        {"loss": "dpo", "loss_params": {"beta": 0.1}}
        if dpo
        else {"loss": "grpo", "loss_params": {"epsilon_low": 0.2, "epsilon_high": 0.2}, "kl_reward_coef": 0.05}
        if ppo
        else {
            "loss": "grpo",
            "loss_params": {"beta": 0.04} if case == "grpo" else {},
            "advantage": "grpo" if case == "grpo" else "reinforce_pp",
            "share_prompt": case == "rpp-shared",
        }
    )
    args_class = OnlinePreferenceArguments if dpo else PPOArguments if ppo else OnlineArguments
    args = args_class(
        output_dir=output_dir,
        **method,
        num_generations=4,
        max_new_tokens=6,
        max_steps=steps,
        per_device_train_batch_size=batch,
        optim="sgd",
        learning_rate=2.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    model = build_tiny_llama(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    rewards = CombinedReward(
        [("vowels", build_reward("callable", function=f"{os.path.abspath(__file__)}:vowel_share"), 1.0)]
    )
    records = [{"prompt": f"Q{i}: say{' please' * (i % 3)}", "id": f"p{i}"} for i in range(8)]
    trainer_class = OnlinePreferenceTrainer if dpo else PPOTrainer if ppo else OnlineTrainer
    return trainer_class(model, args, train_dataset=records, processing_class=tokenizer, rewards=rewards)


def run(case: str, batch: int, steps: int, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(case, batch, steps, tmp)
        sampled: list[list[int]] = []
        original = trainer._rollouts

        def recording(records, indices):
            rollouts = original(records, indices)
            sampled.extend(list(r.completion_ids) for r in rollouts)
            return rollouts

        trainer._rollouts = recording
        critic = getattr(trainer, "critic", None)

        def weights(model) -> dict:
            out = {n: p.detach().clone() for n, p in model.named_parameters()}
            if critic is not None:  # PPO: the critic's updates are compared too
                out.update({f"critic.{n}": p.detach().clone() for n, p in critic.named_parameters()})
            return out

        before = weights(trainer.model)
        trainer.train()
        after = weights(trainer.accelerator.unwrap_model(trainer.model))
        everyone = [sampled]
        if torch.distributed.is_initialized():
            everyone = [None] * trainer.accelerator.num_processes
            torch.distributed.all_gather_object(everyone, sampled)
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        if trainer.is_world_process_zero():
            per_step = len(sampled) // steps
            completions = [
                c for s in range(steps) for proc in everyone for c in proc[s * per_step : (s + 1) * per_step]
            ]
            torch.save(
                {
                    "losses": torch.tensor([e["loss"] for e in logged], dtype=torch.float64),
                    "reward": torch.tensor([e["reward"] for e in logged], dtype=torch.float64),
                    "completions": completions,
                    "before": before,
                    "after": after,
                    "num_processes": trainer.accelerator.num_processes,
                },
                out,
            )
        trainer.accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=CASES)
    parser.add_argument("--batch", type=int, required=True, help="prompts per device per step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out-dir", required=True)
    opts = parser.parse_args()
    os.makedirs(opts.out_dir, exist_ok=True)
    for case in opts.cases:
        run(case, opts.batch, opts.steps, os.path.join(opts.out_dir, f"{case}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
