"""Shared pieces of the online-training tests: a tiny policy, a reward it learns fast, common arguments."""

import json

from prefkit.models.tiny import build_tiny_llama
from prefkit.online.rewards import CombinedReward


def ascii_share(prompts, completions, **fields):
    """A verifiable reward a random byte-level model can learn fast: the share of ASCII characters."""
    return [sum(ch.isascii() for ch in c) / max(len(c), 1) for c in completions]


def ascii_reward() -> CombinedReward:
    return CombinedReward([("ascii", ascii_share, 1.0)])


def tiny_policy(tokenizer):
    return build_tiny_llama(vocab_size=len(tokenizer), seed=0, hidden_size=32, num_heads=2, intermediate_size=64)


def base_args(tmp_path, **kw) -> dict:
    """Fast, deterministic CPU training arguments writing to ``tmp_path / "run"``; ``kw`` overrides."""
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_new_tokens=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        report_to="none",
    )
    base.update(kw)
    return base


def train_rows(tmp_path) -> list[dict]:
    """The ``train`` rows of ``tmp_path / "run" / "metrics.jsonl"``."""
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]
