"""Short training runs for tests/train/test_ddp.py, under ``accelerate launch`` or plain ``python``.

    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml tests/train/scripts/ddp_worker.py \
        --batch 2 --grad-accum 2 --out-dir results reward dpo dpo-shared
    python tests/train/scripts/ddp_worker.py --batch 8 --out-dir results reward

Builds everything from seeds (tiny Llama, byte tokenizer, 16 fixed preference pairs; nothing is
downloaded) and, for each case (``reward``: `RewardTrainer` with ``bt``; ``dpo``: `PreferenceTrainer`
with ``dpo`` and a frozen-copy reference; ``dpo-shared``: the same with ``share_prompt``; ``kto`` and
``bco``: `PreferenceTrainer` on sixteen thumbs-up/down completions; ``gpm``: `RewardTrainer` with the
general preference model and the ``gpm`` judge loss), trains
``--steps`` optimizer steps with plain SGD and a constant learning rate, and writes from the main
process ``OUT_DIR/CASE.pt`` (``torch.save``) with

- ``losses``: the training loss of every step as transformers logs it (gathered over the processes
  and averaged), a float64 tensor;
- ``metrics``: prefkit's logged metrics of every step (``loss/*``, ``rewards/*``, ``logps/*``), whose
  sums and counts the trainer adds up over the processes;
- ``before`` / ``after``: every trained parameter (unwrapped names) before and after training;
- ``num_processes``: how many processes trained.

The global batch is ``--batch x --grad-accum x processes``; the test compares runs with equal
global batches. SGD makes the parameter change ``lr x`` the accumulated gradient, so equal updates
mean equal gradients (Adam's first step, ``lr x sign(g)``, would hide gradient differences).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from prefkit.data.records import PairwiseRecord, UnpairedRecord
from prefkit.models.gpm import build_gpm
from prefkit.models.loading import TinySpec
from prefkit.models.reward import build_reward_model
from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama
from prefkit.train.config import PreferenceConfig
from prefkit.train.reward_trainer import RewardTrainer
from prefkit.train.trainer import PreferenceTrainer

N_PAIRS = 16
TINY = TinySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)
CHOSEN = ["Sure, here it is.", "Happy to help!", "Of course.", "Gladly, friend."]
REJECTED = ["No.", "Go away.", "Whatever you say, I guess", "Nope"]


def pairs() -> list[PairwiseRecord]:
    """Sixteen pairs with prompts and completions of different lengths (so batches get padding)."""
    return [
        PairwiseRecord(
            prompt=f"Q{i}: say{' please' * (i % 3)}",
            chosen=CHOSEN[i % len(CHOSEN)],
            rejected=REJECTED[(i + 1) % len(REJECTED)],
            id=f"p{i}",
        )
        for i in range(N_PAIRS)
    ]


def thumbs() -> list[UnpairedRecord]:
    """Sixteen thumbs-up/down completions (half desirable) of varied lengths."""
    return [
        UnpairedRecord(
            prompt=f"Q{i}: say{' please' * (i % 3)}",
            completion=(CHOSEN if i % 2 == 0 else REJECTED)[(i // 2) % 4],
            label=i % 2 == 0,
        )
        for i in range(N_PAIRS)
    ]


CASES = ("reward", "dpo", "dpo-shared", "kto", "bco", "gpm", "mapo")


def build_trainer(case: str, batch: int, grad_accum: int, steps: int, output_dir: str):
    tokenizer = build_byte_tokenizer()
    args = PreferenceConfig(
        output_dir=output_dir,
        loss={"reward": "bt", "kto": "kto", "bco": "bco", "gpm": "gpm", "mapo": "mapo"}.get(case, "dpo"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=grad_accum,
        optim="sgd",
        learning_rate=0.5 if case in ("reward", "gpm") else 5.0,
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
        share_prompt=case == "dpo-shared",
    )
    if case == "reward":
        model = build_reward_model("tiny", tiny=TINY, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        return RewardTrainer(model, args, train_dataset=pairs(), processing_class=tokenizer)
    if case == "gpm":  # a judge: the general preference model, trained through its forward (= compare)
        backbone = build_tiny_llama(
            vocab_size=len(tokenizer), hidden_size=TINY.hidden_size, num_layers=TINY.num_layers, seed=TINY.seed
        )
        model = build_gpm(backbone, embed_dim=4, beta=0.5, seed=0)
        return RewardTrainer(model, args, train_dataset=pairs(), processing_class=tokenizer)
    model = build_tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=TINY.hidden_size,
        num_layers=TINY.num_layers,
        num_heads=TINY.num_heads,
        intermediate_size=TINY.intermediate_size,
        seed=TINY.seed,
    )
    data = thumbs() if case in ("kto", "bco") else pairs()
    return PreferenceTrainer(model, args, train_dataset=data, processing_class=tokenizer)


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def run(case: str, batch: int, grad_accum: int, steps: int, out: str) -> None:
    """Train one case, then write its result file from the main process (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(case, batch, grad_accum, steps, tmp)
        before = trained_parameters(trainer.model)
        trainer.train()
        after = trained_parameters(trainer.accelerator.unwrap_model(trainer.model))
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        if trainer.is_world_process_zero():
            metric_keys = sorted(k for k in logged[0] if k.startswith(("loss/", "rewards/", "logps/")))
            result = {
                "losses": torch.tensor([entry["loss"] for entry in logged], dtype=torch.float64),
                "metrics": {k: torch.tensor([entry[k] for entry in logged], dtype=torch.float64) for k in metric_keys},
                "before": before,
                "after": after,
                "num_processes": trainer.accelerator.num_processes,
            }
            torch.save(result, out)
        trainer.accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=CASES)
    parser.add_argument("--batch", type=int, required=True, help="per-device train batch size (pairs)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out-dir", required=True, help="folder of the result files, written by the main process")
    opts = parser.parse_args()
    os.makedirs(opts.out_dir, exist_ok=True)
    for case in opts.cases:
        run(case, opts.batch, opts.grad_accum, opts.steps, os.path.join(opts.out_dir, f"{case}.pt"))
    if torch.distributed.is_initialized():  # a gloo group left to the interpreter's exit can abort it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
