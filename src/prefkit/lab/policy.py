"""A world's tokenizer and reference policy: a tiny Llama pre-trained on the world's base distribution.

The tokenizer is word-level (one token per world word, plus ``<pad> <s> </s> <unk>``), built with the
`tokenizers` library; a prompt gets ``<s>`` in front, a completion ``</s>`` at its end, as in training.

The reference policy is a randomly initialised Llama (about 200 thousand parameters with the default
`ReferenceSpec`) trained by maximum likelihood on fresh samples ``(x, y)`` of the world's base
distribution: the loss is the mean negative log-likelihood of the response tokens (EOS included)
given the prompt. It takes well under a minute on 2 CPU cores and is cached on disk, keyed by the base
distribution and the spec, so later runs load it in a second.

Its fit is reported as ``kl_to_base`` = KL(p_base || pi_ref), estimated on held-out base samples as
the mean of ``log p_base(y | x) - log pi_ref(y | x)`` (`World.base_log_prob` gives the exact base
log-probability).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from prefkit.data.collators import pad_rows
from prefkit.lab.world import World
from prefkit.models.tiny import SPECIAL_TOKENS, build_tiny_llama

__all__ = ["LabPolicy", "ReferenceSpec", "build_world_tokenizer", "default_cache_dir", "reference_policy"]

# Bump when the pre-training recipe changes, so old caches are not reused.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ReferenceSpec:
    """The reference policy's architecture and pre-training settings (all part of the cache key)."""

    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 25
    heldout_samples: int = 1024


@dataclass
class LabPolicy:
    """A causal LM for a world with its tokenizer; ``path`` is where it is saved (None: in memory only);
    ``info`` says how it was made (``steps``, ``seconds``, ``params``, ``final_loss``, ``kl_to_base``);
    ``from_cache``: loaded from a saved folder rather than trained in this call."""

    model: Any
    tokenizer: PreTrainedTokenizerFast
    path: Path | None
    info: dict[str, Any]
    from_cache: bool = False


def build_world_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``world.vocabulary``: pad 0, BOS 1, EOS 2, UNK 3, then the words."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + world.vocabulary)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def default_cache_dir() -> Path:
    """``$PREFKIT_CACHE/lab``, else ``~/.cache/prefkit/lab``."""
    root = os.environ.get("PREFKIT_CACHE") or Path.home() / ".cache" / "prefkit"
    return Path(root) / "lab"


def _cache_key(world: World, spec: ReferenceSpec, seed: int) -> str:
    base = {
        "vocabulary": world.vocabulary,
        "max_len": world.max_len,
        "on_topic_weight": world.on_topic_weight,
        "off_topic_weight": world.off_topic_weight,
        "spec": asdict(spec),
        "seed": seed,
        "recipe": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:16]


def _base_samples(world: World, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    prompts = world.sample_prompts(n, rng)
    return [(p, world.sample_responses(p, 1, rng)[0]) for p in prompts]


def _encode(tokenizer, samples: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [list(tokenizer(p)["input_ids"]) for p, _ in samples]
    eos = tokenizer.eos_token_id
    responses = [list(tokenizer(r, add_special_tokens=False)["input_ids"]) + [eos] for _, r in samples]
    return prompts, responses


def _response_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from prefkit.train.logps import completion_logps

    return completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum


def _kl_to_base(world: World, model, tokenizer, samples: list[tuple[str, str]]) -> float:
    batch = pad_rows(*_encode(tokenizer, samples), tokenizer.pad_token_id, None)
    with torch.no_grad():
        model_logps = _response_logps(model, batch)
    base = torch.tensor([world.base_log_prob(p, r) for p, r in samples])
    return float((base - model_logps).mean())


def _lr_factor(step: int, spec: ReferenceSpec) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def new_policy(tokenizer, spec: ReferenceSpec, seed: int, max_positions: int = 128):
    """A freshly initialised tiny Llama of ``spec``'s size for ``tokenizer``."""
    return build_tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=max_positions,
        seed=seed,
    )


def pretrain(model, make_batch, spec: ReferenceSpec, seed: int, desc: str, progress: bool) -> list[float]:
    """Maximum likelihood on ``spec.steps`` batches ``make_batch()`` (`pad_rows` output): AdamW at
    ``spec.learning_rate``, warm-up then cosine decay (`_lr_factor`); the per-step losses. Leaves the model
    in eval mode; torch's global RNG is left as it was."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, spec))
    model.train()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(range(spec.steps), desc=desc, disable=not progress)
        for _ in bar:
            batch = make_batch()
            loss = -_response_logps(model, batch).sum() / batch["completion_mask"].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(nll=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


def pretrain_reference(world: World, seed: int = 0, spec: ReferenceSpec = ReferenceSpec(), progress: bool = True):
    """Train the reference policy from scratch (no cache); returns ``(model, tokenizer, info)``."""
    start = time.perf_counter()
    tokenizer = build_world_tokenizer(world)
    model = new_policy(tokenizer, spec, seed)
    rng = np.random.default_rng([seed, 7])
    heldout = _base_samples(world, spec.heldout_samples, rng)
    losses = pretrain(
        model,
        lambda: pad_rows(*_encode(tokenizer, _base_samples(world, spec.batch_size, rng)), 0, None),
        spec,
        seed,
        f"pre-training the reference policy of world {world.name!r}",
        progress,
    )
    info = {
        "world": world.name,
        "seed": seed,
        "spec": asdict(spec),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": spec.steps,
        "final_loss": float(np.mean(losses[-20:])),
        "kl_to_base": _kl_to_base(world, model, tokenizer, heldout),
        "seconds": time.perf_counter() - start,
    }
    return model, tokenizer, info


def _save_atomically(folder: Path, model, tokenizer, info: dict[str, Any]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lab_reference.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process saved the same policy first
            if not (folder / "lab_reference.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_lab_policy(path: str | os.PathLike) -> LabPolicy:
    """A policy saved by `reference_policy` (or any causal-LM folder with a tokenizer)."""
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    info_file = path / "lab_reference.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    return LabPolicy(model, tokenizer, path, info, from_cache=True)


def reference_policy(
    world: World,
    seed: int = 0,
    *,
    spec: ReferenceSpec = ReferenceSpec(),
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
) -> LabPolicy:
    """The reference policy of ``world``: loaded from the cache, or pre-trained and cached.

    ``cache_dir``: the cache root (None: `default_cache_dir`; False: no cache, always train). The
    policy lives in ``<cache_dir>/reference-<key>``, where the key hashes the base distribution, the
    spec, the seed and the recipe version; it is written to a temporary folder and renamed into place,
    so an interrupted run never leaves a half-written policy.
    """
    if cache_dir is False:
        model, tokenizer, info = pretrain_reference(world, seed, spec, progress)
        return LabPolicy(model, tokenizer, None, info)
    root = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
    folder = root / f"reference-{_cache_key(world, spec, seed)}"
    if (folder / "lab_reference.json").exists():
        return load_lab_policy(folder)
    model, tokenizer, info = pretrain_reference(world, seed, spec, progress)
    _save_atomically(folder, model, tokenizer, info)
    return LabPolicy(model, tokenizer, folder, info)


def lab_backbone(spec: str, *, progress: bool = True):
    """``(model, tokenizer)`` for the model spec ``lab:WORLD`` or ``lab:WORLD:SEED``: the world's reference
    policy (pre-trained once, then cached). Registered as the ``lab`` model source (entry point
    ``prefkit.model_sources``), so personalized heads can take it as their backbone."""
    from prefkit.lab.world import make_world

    scheme, _, rest = spec.partition(":")
    world, _, seed = rest.partition(":")
    if scheme != "lab" or not world:
        raise ValueError("expected lab:WORLD or lab:WORLD:SEED")
    try:
        seed_value = int(seed or 0)
        reference = reference_policy(make_world(world, seed_value), seed_value, progress=progress)
    except ValueError as err:
        raise ValueError(f"expected lab:WORLD or lab:WORLD:SEED ({err})") from err
    return reference.model, reference.tokenizer
