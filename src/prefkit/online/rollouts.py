"""Rollouts: ``n`` completions per prompt with the sampling policy's per-token log-probs.

`HFRollouts` generates with Hugging Face ``generate`` (KV cache, batched, left-padded prompts), on CPU or
GPU. Each `Rollout` carries the prompt and completion token ids, the log-prob of every sampled token
under the distribution it was drawn from (the model's logits at ``temperature``, after ``top_k`` /
``top_p`` truncation: what importance ratios of the policy-gradient losses divide by), the decoded text
and why it ended: ``eos`` (the model's end token), ``stop`` (a stop string) or ``length``
(``max_new_tokens``). Generation is seeded per batch, so equal arguments give equal rollouts.

The completions of one prompt are consecutive (``prompt_index`` ``i`` for items ``i*n .. i*n + n - 1``), the
layout the advantage estimators read. ``generate`` copies each prompt ``n`` times before its prefill; a
backend that shares one prefill per prompt (vLLM's prefix cache) is to come with the online trainer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prefkit.data.batching import module_device
from prefkit.online.sampling import left_pad

__all__ = ["HFRollouts", "Rollout", "SamplingSettings"]

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class SamplingSettings:
    """How completions are drawn. ``top_k`` 0 and ``top_p`` 1.0 keep the whole distribution (ancestral
    sampling at ``temperature``); ``stop``: strings that end a completion (kept in it)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self):
        for name in ("n", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0: no top-k), got {self.top_k!r}")
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(f"temperature: expected a finite number > 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop: expected non-empty strings, got {self.stop!r}")


@dataclass
class Rollout:
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # one per completion token, under the sampling distribution
    text: str
    finish_reason: str  # eos, stop or length

    def __len__(self) -> int:
        return len(self.completion_ids)


class HFRollouts:
    """Rollouts with ``model.generate``; ``batch_size`` sequences (prompt copies) per call."""

    def __init__(self, model: nn.Module, tokenizer, *, batch_size: int = 64, max_context: int | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no eos_token_id; rollouts need one")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_context = max_context or getattr(getattr(model, "config", None), "max_position_embeddings", None)

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[list[int]], settings: SamplingSettings) -> list[Rollout]:
        """``settings.n`` rollouts of each prompt, prompt-major."""
        if not prompt_ids:
            raise ValueError("no prompts to roll out")
        for i, row in enumerate(prompt_ids):
            if not row:
                raise ValueError(f"prompt {i} has no tokens")
            if self.max_context is not None and len(row) + settings.max_new_tokens > self.max_context:
                raise ValueError(
                    f"prompt {i} has {len(row)} tokens; with max_new_tokens {settings.max_new_tokens} it exceeds the "
                    f"model's context of {self.max_context} tokens (cut prompts with max_prompt_length)"
                )
        tok = self.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        items = [(i, list(prompt_ids[i])) for i in range(len(prompt_ids)) for _ in range(settings.n)]
        device = module_device(self.model)
        was_training = self.model.training
        self.model.eval()
        out: list[Rollout] = []
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for b, start in enumerate(range(0, len(items), self.batch_size)):
                    chunk = items[start : start + self.batch_size]
                    out.extend(self._batch(chunk, settings, b, eos, pad, device))
        finally:
            self.model.train(was_training)
        return out

    def _batch(self, chunk, settings: SamplingSettings, b: int, eos: int, pad: int, device) -> list[Rollout]:
        ids, mask = left_pad([row for _, row in chunk], pad)
        torch.manual_seed(settings.seed * 1_000_003 + b)
        extra = {"stop_strings": list(settings.stop), "tokenizer": self.tokenizer} if settings.stop else {}
        result = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=float(settings.temperature),
            top_k=settings.top_k,
            top_p=float(settings.top_p),
            repetition_penalty=1.0,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=0,
            eos_token_id=eos,
            pad_token_id=pad,
            output_scores=True,
            return_dict_in_generate=True,
            **extra,
        )
        new = result.sequences[:, ids.shape[1] :]
        # scores[t]: [B, V] processed logits of step t (temperature, top-k, top-p applied), -inf where cut
        step_logprobs = torch.stack(
            [
                torch.log_softmax(s.float(), dim=-1).gather(1, new[:, t : t + 1]).squeeze(1)
                for t, s in enumerate(result.scores)
            ],
            dim=1,
        )
        rollouts = []
        for row, ((i, prompt), tokens) in enumerate(zip(chunk, new.cpu().tolist())):
            cut, reason = len(tokens), "length"
            if eos in tokens:
                cut, reason = tokens.index(eos) + 1, "eos"
            completion = tokens[:cut]
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            if reason == "length" and settings.stop:
                cut_stop = _stop_cut(completion, settings.stop, self.tokenizer)
                if cut_stop is not None:
                    completion, reason = completion[:cut_stop], "stop"
                    text = self.tokenizer.decode(completion, skip_special_tokens=True)
            logprobs = step_logprobs[row, : len(completion)].tolist()
            rollouts.append(Rollout(i, prompt, completion, logprobs, text, reason))
        return rollouts


def _stop_cut(tokens: list[int], stops: tuple[str, ...], tokenizer) -> int | None:
    """The number of tokens up to and including the first one that completes a stop string (None: none does).
    Once a prefix holds a stop string every longer one does, so the shortest is found by bisection."""

    def holds(k: int) -> bool:
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        return any(s in text for s in stops)

    if not tokens or not holds(len(tokens)):
        return None
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
