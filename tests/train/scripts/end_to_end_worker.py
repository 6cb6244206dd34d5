"""End-to-end PAL training for tests/train/test_end_to_end_trainer.py, under ``accelerate launch`` or plain ``python``.

    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml tests/train/scripts/end_to_end_worker.py \
        --batch 4 --out-dir results
    python tests/train/scripts/end_to_end_worker.py --batch 8 --out-dir results

Trains a PAL head (mixture variant, 2 prototypes) with a tiny Llama backbone (seeded; byte tokenizer) on
8 pairs of two users with opposite preferences for 3 epochs of plain SGD, a full global batch per step (per-device
batch 4 on 2 processes, or 8 on one), and writes from the main process ``OUT_DIR/result.pt``: ``before``
/ ``after`` (every parameter), ``losses`` (the logged loss of each step) and ``num_processes``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import PartialState

from prefkit.data.records import PairwiseRecord
from prefkit.models.end_to_end import EndToEndRewardModel, tokenize_pairs
from prefkit.models.pal import PAL
from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama
from prefkit.train.end_to_end import train_end_to_end

USERS = ["alice", "bob"]


def records() -> list[PairwiseRecord]:
    out = []
    for i in range(4):
        yes, no = f"yes, sure {i}", f"no way {i}"
        out.append(PairwiseRecord(f"q{i}?", yes, no, user_id="alice"))
        out.append(PairwiseRecord(f"q{i}?", no, yes, user_id="bob"))
    return out


def run(batch: int, out_dir: str) -> None:
    tokenizer = build_byte_tokenizer()
    lm = build_tiny_llama(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = EndToEndRewardModel(lm, PAL(32, 2, variant="mixture", users=USERS), pooling="mean")
    data = tokenize_pairs(records(), tokenizer, USERS)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as scratch:
        logged = train_end_to_end(
            model,
            data,
            tokenizer,
            output_dir=scratch,
            epochs=3,
            batch_size=batch,
            lr=0.5,
            backbone_lr=0.1,
            optim="sgd",
        )
    state = PartialState()
    if state.is_main_process:
        torch.save(
            {
                "before": before,
                "after": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "losses": torch.tensor([row["loss"] for row in logged]),
                "num_processes": state.num_processes,
            },
            f"{out_dir}/result.pt",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    run(args.batch, args.out_dir)
