"""Reward functions for the online examples (`reward: callable` with `function: examples/rewards.py:NAME`).

A reward takes the prompts, the completions (text) and each prompt record's other fields as lists, and
returns one float (or None: cannot score) per completion.
"""


def ascii_share(prompts, completions, **fields):
    """The share of ASCII characters in each completion: a dense, verifiable reward that even the random
    tiny model can learn within a few steps (its byte-level samples start near 0.5)."""
    return [sum(ch.isascii() for ch in c) / max(len(c), 1) for c in completions]


def uses_word(prompts, completions, word=None, **fields):
    """1 when the completion contains the record's ``word`` (case-insensitive), else 0."""
    return [1.0 if w and w.lower() in c.lower() else 0.0 for c, w in zip(completions, word or [None] * len(completions))]
