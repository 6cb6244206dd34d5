"""Sampling completions from a causal LM, and scoring sampled completions by their token ids.

`sample_completions` draws ``n`` completions per prompt with plain ancestral sampling (temperature
only by default: no top-k, no top-p, no repetition penalty, whatever the model's own generation
config says), so the samples follow the policy's distribution and a Monte-Carlo KL estimate from them
is unbiased. Prompts are tokenized exactly as training tokenizes them
(`prefkit.data.tokenize.tokenize_prompt`) and left-padded; batches are seeded, so equal arguments give
equal samples.

`completion_log_probs` returns ``log pi(y | x)`` of sampled completions from their **token ids**
(not from re-tokenized text), so a completion cut by ``max_new_tokens`` is scored as sampled,
without an EOS it never produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefkit.data.batching import batches_by_length, left_pad, module_device, run_batched
from prefkit.data.collators import pad_rows
from prefkit.data.tokenize import tokenize_prompt

if TYPE_CHECKING:
    from prefkit.train.user_conditioning import UserTokens

__all__ = ["Completion", "completion_log_probs", "sample_completions", "sample_for_user"]


@dataclass
class Completion:
    """One sampled completion: ``prompt`` (as given), ``text`` (decoded without special tokens),
    ``prompt_ids`` and ``token_ids`` (the sampled ids, EOS included when produced) and ``finished``
    (it ended with EOS before ``max_new_tokens``)."""

    prompt: Any
    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    finished: bool


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _cut_at_eos(ids: list[int], eos_id: int) -> tuple[list[int], bool]:
    """The sampled ids up to the first EOS (generate pads a finished row after it)."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1], True
    return ids, False


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    max_prompt_length: int | None = None,
    progress: bool = True,
    desc: str = "sampling",
    prompt_ids: Sequence[list[int]] | None = None,
) -> list[Completion]:
    """``n`` completions of each prompt (text or chat messages), prompt-major: the completions of
    ``prompts[i]`` are items ``i*n .. i*n + n - 1``. Sampling is ancestral at ``temperature`` (> 0).
    ``prompt_ids``: the prompts' token ids, used instead of tokenizing ``prompts`` (e.g. with a user's
    soft-prompt tokens in front, `sample_for_user`)."""
    _check_positive("n", n)
    _check_positive("max_new_tokens", max_new_tokens)
    _check_positive("batch_size", batch_size)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r} (use best-of-N or argmax elsewhere)")
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no eos_token_id; sampling needs one")
    pad_id = eos_id if pad_id is None else pad_id
    if prompt_ids is None:
        prompt_ids = [tokenize_prompt(p, tokenizer, max_prompt_length=max_prompt_length) for p in prompts]
    elif len(prompt_ids) != len(prompts):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} rows for {len(prompts)} prompts")
    items = [(i, prompt_ids[i]) for i in range(len(prompts)) for _ in range(n)]
    device = module_device(model)
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for b, start in enumerate(tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress)):
                chunk = items[start : start + batch_size]
                ids, mask = left_pad([row for _, row in chunk], pad_id)
                torch.manual_seed(seed * 1_000_003 + b)
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=True,
                    temperature=float(temperature),
                    top_k=0,
                    top_p=1.0,
                    repetition_penalty=1.0,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=0,
                    eos_token_id=eos_id,
                    pad_token_id=pad_id,
                )
                new = generated[:, ids.shape[1] :].cpu().tolist()
                for (i, row), tokens in zip(chunk, new):
                    token_ids, finished = _cut_at_eos(tokens, eos_id)
                    text = tokenizer.decode(token_ids, skip_special_tokens=True)
                    out.append(Completion(prompts[i], text, list(row), token_ids, finished))
    finally:
        model.train(was_training)
    return out


def completion_log_probs(
    model: nn.Module,
    completions: Sequence[Completion],
    pad_token_id: int,
    *,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "log-probs",
) -> Tensor:
    """``[N]`` summed ``log model(token_ids | prompt_ids)`` of each completion (float32, CPU)."""
    from prefkit.train.logps import completion_logps

    if not completions:
        raise ValueError("no completions to score")
    for i, c in enumerate(completions):
        if not c.token_ids:
            raise ValueError(f"completion {i} has no tokens; nothing to score")
    device = module_device(model)
    lengths = [len(c.prompt_ids) + len(c.token_ids) for c in completions]

    def one(idx: list[int]) -> Tensor:
        batch = pad_rows(
            [completions[i].prompt_ids for i in idx], [completions[i].token_ids for i in idx], pad_token_id, None
        )
        args = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
        return completion_logps(model, *args).sum

    was_training = model.training
    model.eval()
    try:
        return run_batched(one, batches_by_length(lengths, batch_size), len(completions), desc, progress)
    finally:
        model.train(was_training)


def sample_for_user(
    model: nn.Module,
    tokenizer,
    tokens: UserTokens,
    user_id: str | None,
    prompts: Sequence[Any],
    *,
    max_prompt_length: int | None = None,
    **sampling,
):
    """`prefkit.online.sample_completions` of ``prompts`` with ``user_id``'s tokens in front of each
    prompt (tokenized as training tokenizes them). ``sampling``: ``n``, ``max_new_tokens``,
    ``temperature``, ``seed``, ``batch_size``, ``progress``, ``desc``."""
    prompt_ids = [
        tokens.prefix(
            tokenize_prompt(p, tokenizer, max_prompt_length=max_prompt_length), user_id, tokenizer.bos_token_id
        )
        for p in prompts
    ]
    return sample_completions(model, tokenizer, prompts, prompt_ids=prompt_ids, **sampling)
