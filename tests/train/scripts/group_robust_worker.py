"""Group-robust DPO runs for tests/train/test_group_robust_ddp.py, under ``accelerate launch`` or plain ``python``.

    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml tests/train/scripts/group_robust_worker.py \
        --batch 4 --out-dir results
    python tests/train/scripts/group_robust_worker.py --batch 8 --out-dir results

Trains a tiny Llama (seeded; byte tokenizer) with ``dpo`` and ``group_robust`` on 16 fixed pairs of two
lab-style user groups (12 majority, 4 minority) for ``--steps`` plain-SGD steps, and writes

- from every process, ``OUT_DIR/alpha-RANK.pt``: alpha after each step (float64 ``[steps, 2]``);
- from the main process, ``OUT_DIR/result.pt``: ``losses`` (the logged loss of each step), ``metrics``
  (the logged per-group losses of each step), ``before`` / ``after`` (every trained parameter) and
  ``num_processes``.

With per-device batch 4 on 2 processes and batch 8 on one, each step sees the same 8 pairs (see
tests/train/test_ddp.py), so the two runs must agree.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import TrainerCallback

from prefkit.data.records import PairwiseRecord
from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama
from prefkit.train.config import PreferenceConfig
from prefkit.train.trainer import PreferenceTrainer

FORMAL = ["Indeed, certainly.", "Certainly so.", "Indeed."]
CASUAL = ["yeah lol", "lol ok sure", "sure"]


def pairs() -> list[PairwiseRecord]:
    """Sixteen pairs: 12 of the majority (prefers formal), 4 of the minority (prefers casual)."""
    out = []
    for i in range(16):
        minority = i % 4 == 3
        formal, casual = FORMAL[i % 3], CASUAL[(i // 3) % 3]
        out.append(
            PairwiseRecord(
                prompt=f"Q{i}: tell me{' more' * (i % 3)}",
                chosen=casual if minority else formal,
                rejected=formal if minority else casual,
                user_id=f"group:{'minority' if minority else 'majority'}/{i % 2}",
            )
        )
    return out


class AlphaTrace(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.alphas = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.alphas.append(self.trainer.group_robust_alpha.clone())


def run(batch: int, steps: int, out_dir: str) -> None:
    tokenizer = build_byte_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        args = PreferenceConfig(
            output_dir=tmp,
            loss="dpo",
            groups="lab",
            group_robust=True,
            group_robust_step_size=2.0,
            max_steps=steps,
            per_device_train_batch_size=batch,
            optim="sgd",
            learning_rate=5.0,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            dataloader_pin_memory=False,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
            max_length=48,
            max_prompt_length=24,
        )
        model = build_tiny_llama(
            vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0
        )
        trainer = PreferenceTrainer(model, args, train_dataset=pairs(), processing_class=tokenizer)
        trace = AlphaTrace(trainer)
        trainer.add_callback(trace)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        after = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
        rank = trainer.accelerator.process_index
        torch.save(torch.stack(trace.alphas), os.path.join(out_dir, f"alpha-{rank}.pt"))
        if not trainer.is_world_process_zero():
            return
        rows = [e for e in trainer.state.log_history if "loss" in e and "group/majority/loss" in e]
        keys = ("group/majority/loss", "group/minority/loss")
        result = {
            "losses": torch.tensor([e["loss"] for e in rows], dtype=torch.float64),
            "metrics": {k: torch.tensor([e.get(k, float("nan")) for e in rows], dtype=torch.float64) for k in keys},
            "before": before,
            "after": after,
            "num_processes": trainer.accelerator.num_processes,
        }
        torch.save(result, os.path.join(out_dir, "result.pt"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out-dir", required=True)
    cli = parser.parse_args()
    run(cli.batch, cli.steps, cli.out_dir)
