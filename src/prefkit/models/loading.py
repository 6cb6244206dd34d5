"""Load a policy, a reference model and a tokenizer by name.

A name is one of:

- ``"tiny"``: the built-in randomly initialised tiny Llama (`prefkit.models.tiny`) with the byte
  tokenizer. Nothing is downloaded; the same ``seed`` and sizes give the same weights.
- a local folder written by ``save_pretrained`` (e.g. by `prefkit.models.tiny.save_tiny_model`,
  or a prefkit checkpoint);
- a Hugging Face Hub model id, read with ``AutoModelForCausalLM.from_pretrained`` /
  ``AutoTokenizer.from_pretrained``;
- a llama2.c checkpoint file (``*.bin``), converted by `prefkit.models.llama2c`; its tokenizer is the
  ``tok{vocab_size}.bin`` (or ``tokenizer.bin``) beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("prefkit.models")

TINY = "tiny"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the built-in tiny Llama (``model: tiny``)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    seed: int = 0


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """``"auto"`` and ``None`` pass through; names like ``"bfloat16"`` become ``torch`` dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(_DTYPES)}") from None


def is_llama2c_file(name_or_path: str) -> bool:
    """A llama2.c checkpoint: an existing ``*.bin`` file (Hugging Face models are folders or Hub ids)."""
    path = Path(name_or_path)
    return path.suffix == ".bin" and path.is_file()


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, **kwargs: Any):
    """A tokenizer ready for preference training.

    ``"tiny"`` gives the byte tokenizer; a registered ``SCHEME:REST`` spec (`model_source`, e.g.
    ``lab:default``) its loader's tokenizer. Otherwise ``AutoTokenizer.from_pretrained``. A tokenizer
    without a pad token gets ``pad = eos`` (logged); one with neither is an error, because the
    collators need a pad id and completions need an EOS.
    """
    source = model_source(name_or_path) if isinstance(name_or_path, str) else None
    if name_or_path == TINY:
        from prefkit.models.tiny import build_byte_tokenizer

        tokenizer = build_byte_tokenizer()
    elif source is not None:  # a registered SCHEME:REST spec, e.g. lab:default
        tokenizer = source(name_or_path, progress=False)[1]
    elif is_llama2c_file(name_or_path):
        from prefkit.models.llama2c import load_llama2c_tokenizer

        tokenizer = load_llama2c_tokenizer(name_or_path)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    return ensure_pad_token(tokenizer, name_or_path)


def ensure_pad_token(tokenizer, name: str | None = None):
    """Set ``pad_token = eos_token`` when the tokenizer has no pad token (logged once)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {name or type(tokenizer).__name__!r} has neither a pad token nor an EOS token; "
            "set tokenizer.pad_token and tokenizer.eos_token before training"
        )
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning(
        "tokenizer %s has no pad token: using its EOS token %r (id %d) for padding (padded positions "
        "are masked, so this changes no log-prob)",
        name or type(tokenizer).__name__,
        tokenizer.eos_token,
        tokenizer.eos_token_id,
    )
    return tokenizer


def load_policy(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    tiny: TinySpec | None = None,
    vocab_size: int | None = None,
    **kwargs: Any,
):
    """A causal LM to train.

    ``"tiny"`` builds `prefkit.models.tiny.build_tiny_llama` with the sizes of ``tiny`` (a
    `TinySpec`) and ``vocab_size`` (default: the byte tokenizer's). A llama2.c ``*.bin`` file is
    converted by `prefkit.models.llama2c.load_llama2c_model`; a registered ``SCHEME:REST`` spec
    (`model_source`, e.g. ``lab:default``) by its loader. Anything else goes to
    ``AutoModelForCausalLM.from_pretrained(name_or_path, dtype=..., ...)``.
    """
    torch_dtype = resolve_dtype(dtype)
    if name_or_path == TINY:
        from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama

        spec = tiny or TinySpec()
        if vocab_size is None:
            vocab_size = len(build_byte_tokenizer())
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = build_tiny_llama(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.max_position_embeddings,
            seed=spec.seed,
            **extra,
        )
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
        return model
    source = model_source(name_or_path) if isinstance(name_or_path, str) else None
    if source is not None:  # a registered SCHEME:REST spec, e.g. lab:default (a lab world's reference)
        model = source(name_or_path, progress=True)[0]
        return model.to(torch_dtype) if isinstance(torch_dtype, torch.dtype) else model
    if is_llama2c_file(name_or_path):
        from prefkit.models.llama2c import load_llama2c_model

        model = load_llama2c_model(name_or_path, attn_implementation=attn_implementation)
        return model.to(torch_dtype) if isinstance(torch_dtype, torch.dtype) else model

    from transformers import AutoModelForCausalLM

    load_kwargs: dict[str, Any] = dict(kwargs)
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **load_kwargs)


MODEL_SOURCES_GROUP = "prefkit.model_sources"


def model_source(spec: str):
    """The loader for a ``SCHEME:REST`` model spec that an installed package registers under the entry-point
    group ``prefkit.model_sources`` (prefkit's own: ``lab`` -> `prefkit.lab.policy.lab_backbone`, a lab
    world's pre-trained reference policy), or None for any other spec. A loader takes ``(spec, progress=...)``
    and returns ``(model, tokenizer)``; ``ValueError`` for a bad spec. Registering by entry point keeps the
    packages that load models below the lab that makes them."""
    from importlib.metadata import entry_points

    scheme, sep, _ = spec.partition(":")
    if not sep or not scheme.isidentifier():
        return None
    for entry in entry_points(group=MODEL_SOURCES_GROUP):
        if entry.name == scheme:
            return entry.load()
    return None


def load_reference(name_or_path: str, **kwargs: Any):
    """`load_policy`, then frozen: eval mode and ``requires_grad=False`` on every parameter."""
    return freeze(load_policy(name_or_path, **kwargs))


def freeze(model):
    """Put ``model`` in eval mode and stop gradients to all its parameters (in place)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
