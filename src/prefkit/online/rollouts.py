"""Rollouts: ``n`` completions per prompt with the sampling policy's per-token log-probs.

`HFRollouts` generates with Hugging Face ``generate`` (KV cache, batched, left-padded prompts), on CPU or
GPU. Each `Rollout` carries the prompt and completion token ids, the log-prob of every sampled token
under the distribution it was drawn from (the model's logits at ``temperature``, after ``top_k`` /
``top_p`` truncation: what importance ratios of the policy-gradient losses divide by), the decoded text
and why it ended: ``eos`` (the model's end token), ``stop`` (a stop string) or ``length``
(``max_new_tokens``).

The completions of one prompt are consecutive (``prompt_index`` ``i`` for items ``i*n .. i*n + n - 1``), the
layout the advantage estimators read. They share one prompt prefill: the prompts of a batch run once
(all but their last token), the KV cache is copied ``n`` times, and ``generate`` continues from it.

Sampling is seeded per completion, not per batch: completion ``k`` of a prompt whose seed key is ``s``
(its index, or what the caller passes as ``prompt_seeds``) draws each token as the arg-max of the
processed logits plus Gumbel noise from a generator seeded by ``(settings.seed, s, k)`` (the Gumbel-max
trick: an exact sample of the softmax). So a completion does not depend on which other prompts share its
batch, on ``batch_size`` or on how prompts are split across processes (up to float rounding of the
logits in different batch shapes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation import utils as _generation_utils

from prefkit.data.batching import left_pad, module_device

__all__ = ["HFRollouts", "Rollout", "SamplingSettings"]

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class SamplingSettings:
    """How completions are drawn. ``top_k`` 0 and ``top_p`` 1.0 keep the whole distribution (ancestral
    sampling at ``temperature``); ``stop``: strings that end a completion (kept in it); ``min_new_tokens``:
    the end token is masked before that many tokens (benchmarks force equal lengths with it)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self):
        for name in ("n", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if (
            isinstance(self.min_new_tokens, bool)
            or not isinstance(self.min_new_tokens, int)
            or not 0 <= self.min_new_tokens <= self.max_new_tokens
        ):
            raise ValueError(
                f"min_new_tokens: expected an integer from 0 to max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens!r}"
            )
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
        self._token_stops: dict[str, int | None] = {}
        self.max_context = max_context or getattr(getattr(model, "config", None), "max_position_embeddings", None)

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[list[int]], settings: SamplingSettings, prompt_seeds: Sequence[int] | None = None
    ) -> list[Rollout]:
        """``settings.n`` rollouts of each prompt, prompt-major. ``prompt_seeds``: one integer per prompt that
        seeds its completions with ``settings.seed`` (default: the prompt's index)."""
        if not prompt_ids:
            raise ValueError("no prompts to roll out")
        seeds = list(range(len(prompt_ids))) if prompt_seeds is None else [int(s) for s in prompt_seeds]
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"prompt_seeds: expected {len(prompt_ids)} seeds (one per prompt), got {len(seeds)}")
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
        device = module_device(self.model)
        was_training = self.model.training
        self.model.eval()
        per_batch = max(1, self.batch_size // settings.n)  # prompts per generate call
        out: list[Rollout] = []
        try:
            for start in range(0, len(prompt_ids), per_batch):
                chunk = [(i, list(prompt_ids[i]), seeds[i]) for i in range(start, min(start + per_batch, len(seeds)))]
                out.extend(self._batch(chunk, settings, eos, pad, device))
        finally:
            self.model.train(was_training)
        return out

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int):
        """The KV cache of every prompt but its last token, copied ``n`` times (None: nothing to share)."""
        if ids.shape[1] < 2:
            return None
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True
        )
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        if n > 1:
            cache.batch_repeat_interleave(n)
        return cache

    def _stop_tokens(self, stops: tuple[str, ...]) -> tuple[set[int], tuple[str, ...]]:
        """Stop strings that are one token of their own (ended like EOS, inside ``generate``; works with any
        tokenizer), and the others (``generate``'s stop-string criteria, then cut by text)."""
        single, text = set(), []
        for stop in stops:
            if stop not in self._token_stops:
                self._token_stops[stop] = self._only_token(stop)
            if self._token_stops[stop] is None:
                text.append(stop)
            else:
                single.add(self._token_stops[stop])
        return single, tuple(text)

    def _only_token(self, stop: str) -> int | None:
        """The id of the one token whose text holds ``stop``, when exactly one does (so ending at that token is
        ending at the stop string); else None."""
        ids = list(self.tokenizer(stop, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            return None
        needle = stop.strip() or stop
        holders = [i for i in range(len(self.tokenizer)) if needle in self.tokenizer.decode([i])]
        return ids[0] if holders == ids else None

    def _batch(self, chunk, settings: SamplingSettings, eos: int, pad: int, device) -> list[Rollout]:
        n = settings.n
        ids, mask = left_pad([row for _, row, _ in chunk], pad)
        ids, mask = ids.to(device), mask.to(device)
        row_seeds = [_row_seed(settings.seed, s, k) for _, _, s in chunk for k in range(n)]
        sampler = _GumbelSampler(row_seeds, device)
        processors = [TemperatureLogitsWarper(float(settings.temperature))] if settings.temperature != 1.0 else []
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(float(settings.top_p)))
        token_stops, text_stops = self._stop_tokens(settings.stop)
        extra = {"stop_strings": list(text_stops), "tokenizer": self.tokenizer} if text_stops else {}
        cache = self._prefill(ids, mask, n)
        if cache is not None:
            extra[_CACHE_KWARG] = cache
        # Greedy decoding of (processed logits + Gumbel noise) is sampling from the processed softmax.
        sequences = self.model.generate(
            input_ids=ids.repeat_interleave(n, dim=0),
            attention_mask=mask.repeat_interleave(n, dim=0),
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([*processors, sampler]),
            repetition_penalty=1.0,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens or None,
            eos_token_id=[eos, *token_stops] if token_stops else eos,
            pad_token_id=pad,
            **extra,
        )
        new = sequences[:, ids.shape[1] :]
        step_logprobs = sampler.logprobs(new)
        rollouts = []
        items = [(i, prompt) for i, prompt, _ in chunk for _ in range(n)]
        for row, ((i, prompt), tokens) in enumerate(zip(items, new.cpu().tolist())):
            cut, reason = len(tokens), "length"
            for k, token in enumerate(tokens):
                if token == eos or token in token_stops:
                    cut, reason = k + 1, "eos" if token == eos else "stop"
                    break
            completion = tokens[:cut]
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            if reason == "length" and text_stops:
                cut_stop = _stop_cut(completion, text_stops, self.tokenizer)
                if cut_stop is not None:
                    completion, reason = completion[:cut_stop], "stop"
                    text = self.tokenizer.decode(completion, skip_special_tokens=True)
            logprobs = step_logprobs[row, : len(completion)].tolist()
            rollouts.append(Rollout(i, prompt, completion, logprobs, text, reason))
        return rollouts


# generate's name for a prefilled KV cache: ``cache`` from transformers 5.x on, ``past_key_values`` before.
_CACHE_KWARG = "cache" if "cache" in getattr(_generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def _row_seed(seed: int, prompt_seed: int, k: int) -> int:
    """A 63-bit seed for completion ``k`` of the prompt keyed ``prompt_seed`` (splitmix64-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_seed * 0xBF58476D1CE4E5B9 + k * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 29
    return x & (2**63 - 1)


class _GumbelSampler(LogitsProcessor):
    """The last logits processor: adds each row's own Gumbel noise (so the arg-max that greedy decoding takes
    is a sample of the processed softmax) and keeps the log-prob of the token that arg-max picks, ``[N]`` per
    step (the full ``[N, V]`` scores are never stored)."""

    def __init__(self, row_seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
        self.picked: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        z = scores.float()
        uniform = torch.stack(
            [torch.rand(z.shape[1], generator=g, device=z.device, dtype=torch.float32) for g in self.generators]
        )
        # arg-max of logits + Gumbel noise (a row's log-normaliser does not move it; -inf stays -inf, so
        # truncated tokens are never picked); greedy decoding takes the same arg-max of what is returned
        noisy = z - torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))
        picked = noisy.argmax(dim=-1)
        self.picked.append(picked)
        self.steps.append(z.gather(1, picked[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1))
        return noisy

    def logprobs(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``[N, steps]`` log-probs of the generated tokens (after a row ends, ``generate`` pads it and the
        values there are unused); checks that ``generate`` took the sampled first tokens."""
        steps = new_tokens.shape[1]
        if not self.steps or steps == 0:
            return new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)
        if not torch.equal(self.picked[0], new_tokens[:, 0]):
            raise RuntimeError("generate did not take the sampled tokens (a logits processor ran after the sampler)")
        return torch.stack(self.steps, dim=1)[:, :steps]


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
