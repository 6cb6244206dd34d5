"""The log-prob engine: per-completion log-probabilities without ``[batch, seq, vocab]`` logits.

Every preference method scores completions under a causal LM: for each row of a batch, the sum of
``log p(token_t | tokens_<t)`` over the completion tokens. The obvious way — run the model, take
``log_softmax`` of the full logits, gather — materialises a ``[N, T, V]`` tensor (and its gradient),
which dominates memory for modern vocabularies. This module avoids it:

1. The model's *decoder* (the backbone under the LM head, reached with ``get_decoder()``) is run to
   its final hidden states ``[N, T, H]``.
2. Only the rows that predict a completion token are kept (the hidden state at ``t - 1`` predicts
   token ``t``), giving ``[M, H]`` with ``M`` = number of completion tokens. Prompt and padding
   positions are never projected to the vocabulary.
3. :func:`chunked_token_logps` projects ``chunk_size`` rows at a time against the output-embedding
   weight, takes the log-softmax of the target token in float32, and keeps only ``[M]`` numbers.
   Its backward pass recomputes each chunk's logits and accumulates the gradients of the hidden
   states and of the weight chunk by chunk, so peak extra memory is ``O(chunk_size * V)`` in both
   directions.

Final-logit transforms that some architectures apply after the LM head are reproduced exactly:
soft-capping (``final_logit_softcapping``, ``logits_soft_cap``: ``cap * tanh(z / cap)``) and scaling
(``logit_scale`` in the Cohere family, ``logits_scaling`` for the architectures whose meaning of it
is known). Other known transforms raise ``NotImplementedError`` naming the config field. As a guard
against transforms this module does not know about, the first call for each model compares the
engine with the model's own ``forward`` on a short probe (at most 16 tokens of the batch) and
raises ``NotImplementedError`` if the two disagree.

Prefix sharing (:func:`shared_prefix_logps`): the ``K`` completions of one prompt are packed into one
row ``[prompt][completion 1]...[completion K]`` with ``position_ids`` restarting after the prompt and
a block attention mask, so the prompt runs once; the result has the layout and values (up to float
rounding) of :func:`completion_logps` on the ``K`` unshared rows.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LogpOutput", "chunked_token_logps", "completion_logps", "shared_prefix_logps", "shared_prefix_mask"]


@dataclass
class LogpOutput:
    """What :func:`completion_logps` returns; ``N`` rows, ``T`` positions.

    ``sum``: ``[N]`` summed log-prob of each row's completion tokens (0 for a row with none).
    ``n_tokens``: ``[N]`` float count of completion tokens.
    ``per_token``: ``[N, T]`` or ``None``; ``per_token[:, t] = log p(input_ids[:, t] | input_ids[:, :t])``
    where ``completion_mask[:, t] == 1``, else 0 (the layout of ``completion_mask``).
    ``logsumsq``: ``[N, T]`` or ``None``, detached; ``log sum_v p(v | input_ids[:, :t])^2`` at the
    completion positions, else 0 (WPO's weights).
    """

    sum: Tensor
    n_tokens: Tensor
    per_token: Tensor | None = None
    logsumsq: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Chunked log-softmax of target tokens
# --------------------------------------------------------------------------------------------


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmax is computed in: float32, or float64 when the weight is float64."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None
) -> Tensor:
    """Final logits of the rows ``h`` ``[C, H]``: ``softcap(scale * (h @ W.T + b))``, float32+.

    The matmul runs in the weight's dtype (as ``nn.Linear`` would; the weight is never copied),
    everything after it in :func:`_float_dtype`.
    """
    fdt = _float_dtype(weight.dtype)
    z = (h.to(weight.dtype) @ weight.t()).to(fdt)
    if bias is not None:
        z = z + bias.to(fdt)
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log_softmax(softcap(scale * (hidden @ W.T + b)))[target]`` row by row, chunked both ways."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap, want_logsumsq):
        fdt = _float_dtype(weight.dtype)
        m = hidden.shape[0]
        logp = torch.empty(m, dtype=fdt, device=hidden.device)
        lse = torch.empty(m, dtype=fdt, device=hidden.device)
        lss = torch.empty(m if want_logsumsq else 0, dtype=fdt, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for s in range(0, m, chunk_size):
                e = min(s + chunk_size, m)
                z = _chunk_logits(hidden[s:e], weight, bias, scale, softcap)
                lse_c = torch.logsumexp(z, dim=-1)
                lse[s:e] = lse_c
                logp[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse_c
                if want_logsumsq:
                    # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
                    lss[s:e] = torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse_c
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.scale, ctx.softcap = chunk_size, scale, softcap
        ctx.mark_non_differentiable(lss)
        return logp, lss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_lss):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk_size, scale, softcap = ctx.chunk_size, ctx.scale, ctx.softcap
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        fdt = _float_dtype(weight.dtype)
        m = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate the weight's gradient in float32 (float64 for float64 weights) across chunks.
        grad_w = torch.zeros(weight.shape, dtype=fdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=fdt, device=bias.device) if need_b else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for s in range(0, m, chunk_size):
                e = min(s + chunk_size, m)
                h = hidden[s:e]
                g = grad_logp[s:e].to(fdt)
                z = _chunk_logits(h, weight, bias, scale, softcap)
                # d logp / d z = onehot(target) - softmax(z); times the incoming gradient.
                dz = torch.exp(z - lse[s:e, None])
                dz.mul_(-g[:, None])
                dz.scatter_add_(1, targets[s:e, None], g[:, None])
                if softcap is not None:
                    # z = cap * tanh(u / cap)  =>  dz/du = 1 - (z / cap)^2
                    dz.mul_(1.0 - (z / softcap) ** 2)
                if scale != 1.0:
                    dz.mul_(scale)
                del z
                # dz is now d/d(h @ W.T + b) for this chunk.
                if need_h:
                    grad_h[s:e] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(dz.t(), h.to(fdt))
                if need_b:
                    grad_b.add_(dz.sum(0))
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def chunked_token_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = 4096,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_logsumsq: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-prob of each row's target token, computed ``chunk_size`` rows at a time.

    With ``z = softcap(logit_scale * (hidden @ weight.T + bias))`` (``softcap(x) = cap * tanh(x / cap)``,
    skipped when ``softcap`` is None), returns ``log_softmax(z)[m, targets[m]]`` for every row ``m``
    without ever holding more than ``chunk_size`` rows of ``z``. The backward pass recomputes each
    chunk's logits and accumulates the gradients of ``hidden``, ``weight`` and ``bias`` chunk by
    chunk (so it is chunked too; the result is not twice differentiable).

    Args:
        hidden: ``[M, H]`` hidden states (any float dtype).
        weight: ``[V, H]`` output-embedding weight; the matmul runs in its dtype.
        targets: ``[M]`` long token ids in ``[0, V)``.
        bias: optional ``[V]`` output bias.
        chunk_size: rows per chunk (>= 1).
        logit_scale: multiplies the logits before soft-capping.
        softcap: soft-capping value (> 0) or None.
        return_logsumsq: also return ``log sum_v softmax(z)_v^2`` per row (detached).

    Returns:
        ``[M]`` log-probs in float32 (float64 when ``weight`` is float64), and with
        ``return_logsumsq`` a second ``[M]`` detached tensor.
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [M, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)}, weight is {tuple(weight.shape)} "
            "(a sharded or partitioned weight, e.g. DeepSpeed ZeRO-3, is not supported)"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [M] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap!r}")
    if not math.isfinite(logit_scale) or logit_scale == 0:
        raise ValueError(f"logit_scale must be finite and non-zero, got {logit_scale!r}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"targets must lie in [0, {weight.shape[0]}); got range [{int(targets.min())}, {int(targets.max())}]"
        )
    logp, lss = _ChunkedTokenLogps.apply(
        hidden,
        weight,
        bias,
        targets.long(),
        chunk_size,
        float(logit_scale),
        None if softcap is None else float(softcap),
        bool(return_logsumsq),
    )
    return (logp, lss) if return_logsumsq else logp


# --------------------------------------------------------------------------------------------
# Finding the decoder, the output embedding and the logit transforms of a model
# --------------------------------------------------------------------------------------------

# Config fields that transform the logits in ways this engine does not reproduce.
_UNSUPPORTED_FIELDS = {
    "lm_head_multiplier": "multiplies the logits (Falcon-H1)",
    "logits_mup_width_multiplier": "divides the hidden states before the LM head (muP)",
    "logit_softcap": "applies a soft-capping module to the logits",
    "output_logit_soft_cap": "soft-caps the logits (xLSTM)",
    "unpadded_vocab_size": "truncates the vocabulary after the LM head",
}
# Every field that changes the final logits somewhere in transformers.
_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logits_soft_cap",
    "logit_scale",
    "logits_scaling",
    *_UNSUPPORTED_FIELDS,
)
# ``logits_scaling`` means different things in different architectures: model_type -> factor(value).
_LOGITS_SCALING = {
    "granite": lambda s: 1.0 / s,  # logits / s
    "granite_swa": lambda s: 1.0 / s,
    "granitemoe": lambda s: 1.0 / s,
    "granitemoe_swa": lambda s: 1.0 / s,
    "granitemoehybrid": lambda s: 1.0 / s,
    "granitemoeshared": lambda s: 1.0 / s,
    "minicpm3": lambda s: 1.0 / s,  # hidden / s before a bias-free head == logits / s
    "hyperclovax": lambda s: s,  # logits * s
}


@dataclass
class _Head:
    """How to get from token ids to final logits for one model."""

    decoder: nn.Module
    weight: Tensor
    bias: Tensor | None
    scale: float
    softcap: float | None


def _wrapper_error(model: nn.Module) -> str | None:
    """A reason why ``model`` cannot be scored by calling its decoder directly, or None."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return (
            f"{type(model).__name__}-wrapped models are not supported: the engine calls the decoder and the "
            "output embedding directly, which bypasses the wrapper's forward (and with it DDP's gradient "
            "synchronisation). Pass the unwrapped model only where no gradients need synchronising "
            "(e.g. a frozen reference model)."
        )
    if any(c.__module__.startswith("deepspeed") for c in type(model).__mro__):
        return (
            f"{type(model).__name__} (DeepSpeed engine) is not supported: the engine calls the decoder and the "
            "output embedding directly, bypassing the engine's forward and its parameter gathering."
        )
    if torch.distributed.is_available():
        fsdp_types: tuple[type, ...] = ()
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel

            fsdp_types += (FullyShardedDataParallel,)
            from torch.distributed.fsdp import FSDPModule

            fsdp_types += (FSDPModule,)
        except ImportError:
            pass
        if fsdp_types and any(isinstance(m, fsdp_types) for m in model.modules()):
            return (
                "FSDP-sharded models are not supported: the engine reads the output-embedding weight outside "
                "the root module's forward, where FSDP keeps it sharded."
            )
    return None


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (whose injected adapters stay in place)."""
    try:
        from peft import PeftModel
    except ImportError:
        return model
    if not isinstance(model, PeftModel):
        return model
    cfg = model.active_peft_config
    if cfg.is_prompt_learning:
        raise NotImplementedError(
            f"PEFT {cfg.peft_type} (prompt learning) is not supported: its virtual tokens are added in "
            "PeftModel.forward, which the engine does not call. Use an adapter method such as LoRA."
        )
    if str(cfg.peft_type).split(".")[-1] == "POLY":
        raise NotImplementedError(
            "PEFT POLY is not supported: it needs task_ids passed through PeftModel.forward."
        )
    if getattr(cfg, "alora_invocation_tokens", None) is not None:
        raise NotImplementedError("PEFT aLoRA is not supported: its offsets are set up in PeftModel.forward.")
    return model.get_base_model()


def _output_module(lm: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that maps hidden states to logits, resolving PEFT's modules_to_save."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"{type(lm).__name__} has no output embeddings (get_output_embeddings() is None); "
            "completion_logps needs a causal language model"
        )
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        ModulesToSaveWrapper = ()
    if ModulesToSaveWrapper and isinstance(head, ModulesToSaveWrapper):
        # Mirrors ModulesToSaveWrapper.forward: the first active adapter's copy, or the original.
        if (
            head.disable_adapters
            or not head.active_adapters
            or head.active_adapters[0] not in head.modules_to_save
        ):
            head = head.original_module
        else:
            head = head.modules_to_save[head.active_adapters[0]]
    if type(head) is not nn.Linear:
        raise NotImplementedError(
            f"the output embedding is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear "
            "(e.g. a LoRA adapter or a quantized layer on lm_head); the engine reads its .weight directly and "
            "would ignore whatever else its forward does"
        )
    if hasattr(head.weight, "ds_id"):
        raise NotImplementedError("DeepSpeed ZeRO-3 partitioned output embeddings are not supported")
    return head


def _logit_transform(lm: nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)`` applied to the LM head's output by ``lm``'s forward, from its config."""
    config = lm.config
    found = {f: getattr(config, f, None) for f in _TRANSFORM_FIELDS}
    found = {f: v for f, v in found.items() if v is not None}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        nested = [
            f for f in _TRANSFORM_FIELDS if getattr(text_config, f, None) is not None and f not in found
        ]
        if nested:
            raise NotImplementedError(
                f"{type(lm).__name__}: its text config sets {nested}, and whether the wrapper's forward "
                "applies it differs between architectures; load the text-only causal LM instead"
            )
    for field, what in _UNSUPPORTED_FIELDS.items():
        if field in found:
            raise NotImplementedError(
                f"config.{field} = {found[field]!r} {what}; not supported by completion_logps"
            )
    scale = 1.0
    if "logit_scale" in found:
        # The Cohere family copies config.logit_scale onto the module and multiplies by the copy.
        module_scale = getattr(lm, "logit_scale", found["logit_scale"])
        scale *= float(found["logit_scale"] if module_scale is None else module_scale)
    if "logits_scaling" in found:
        model_type = getattr(config, "model_type", None)
        if model_type not in _LOGITS_SCALING:
            raise NotImplementedError(
                f"config.logits_scaling = {found['logits_scaling']!r} on model_type {model_type!r}: its meaning "
                f"differs between architectures and is only known for {sorted(_LOGITS_SCALING)}"
            )
        scale *= float(_LOGITS_SCALING[model_type](float(found["logits_scaling"])))
    caps = [f for f in ("final_logit_softcapping", "logits_soft_cap") if f in found]
    if len(caps) > 1 or (caps and scale != 1.0):
        raise NotImplementedError(
            f"config sets {sorted(found)}: the order in which these are applied is not known to completion_logps"
        )
    softcap = float(found[caps[0]]) if caps else None
    if softcap is not None and not softcap > 0:
        raise ValueError(f"config.{caps[0]} must be positive, got {softcap!r}")
    return scale, softcap


def _resolve_head(model: nn.Module) -> _Head:
    """Decoder, output weight/bias and logit transform of ``model`` (a causal LM, maybe PEFT-wrapped)."""
    reason = _wrapper_error(model)
    if reason:
        raise NotImplementedError(reason)
    lm = _unwrap_peft(model)
    if not hasattr(lm, "get_decoder") or not hasattr(lm, "config"):
        raise NotImplementedError(
            f"{type(lm).__name__} is not a transformers causal LM (no get_decoder/config); completion_logps "
            "needs one"
        )
    head = _output_module(lm)
    decoder = lm.get_decoder()
    if decoder is lm or decoder is None:
        raise NotImplementedError(
            f"{type(lm).__name__}.get_decoder() does not return a separate backbone, so the engine cannot run "
            "the model up to its final hidden states without the LM head"
        )
    scale, softcap = _logit_transform(lm)
    if head.bias is not None and getattr(lm.config, "model_type", None) == "minicpm3" and scale != 1.0:
        raise NotImplementedError("minicpm3 scales the hidden states before a biased LM head; not supported")
    return _Head(decoder, head.weight, head.bias, scale, softcap)


def _final_hidden(
    decoder: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
) -> Tensor:
    """The decoder's last hidden states ``[N, T, H]`` (``attention_mask`` 2-D, or 4-D with ``position_ids``)."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise NotImplementedError(f"{type(decoder).__name__} returned no last_hidden_state")
    if hidden.shape[:2] != input_ids.shape:
        raise NotImplementedError(
            f"{type(decoder).__name__} returned hidden states of shape {tuple(hidden.shape)} for input_ids of "
            f"shape {tuple(input_ids.shape)}; the engine needs one hidden state per input position"
        )
    return hidden


# --------------------------------------------------------------------------------------------
# One-time check against the model's own forward
# --------------------------------------------------------------------------------------------

_PROBE_TOKENS = 16
# Total-variation distance allowed between the engine's and the model's next-token distributions.
_PROBE_TOL = {torch.float64: 1e-4, torch.float32: 1e-3}
_PROBE_TOL_LOW_PRECISION = 3e-2
_verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module):
    """Eval mode (no dropout) and no gradients; every module's training flag is restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def _max_tv(logits_a: Tensor, logits_b: Tensor) -> float:
    """Largest total-variation distance between the rows' next-token distributions ``[C, V]``."""
    return 0.5 * (torch.softmax(logits_a, dim=-1) - torch.softmax(logits_b, dim=-1)).abs().sum(-1).max().item()


def _verify_against_forward(model: nn.Module, head: _Head, input_ids: Tensor, attention_mask: Tensor) -> None:
    """Once per model (and head), compare the engine's next-token distributions with ``model(...)``.

    Runs both on up to 16 real tokens of the first non-empty row, in eval mode (so dropout does not
    differ between the two) and without gradients, then restores every module's training flag.
    Raises ``NotImplementedError`` if the distributions differ by more than numerical noise, i.e.
    the model's forward does something between the decoder and the logits that the engine does not.
    """
    key = (id(head.weight), id(head.bias), head.scale, head.softcap)
    done = _verified.setdefault(model, set())
    if key in done:
        return
    probe = None
    for row, mask in zip(input_ids, attention_mask):
        real = row[mask.bool()][:_PROBE_TOKENS]
        if real.numel():
            probe = real[None]
            break
    if probe is None:
        return  # nothing to compare on; check at the next call
    ones = torch.ones_like(probe)
    with _eval_no_grad(model):
        out = model(input_ids=probe, attention_mask=ones, use_cache=False)
        ref = getattr(out, "logits", None)
        hidden = _final_hidden(head.decoder, probe, ones)[0]
        ours = _chunk_logits(hidden, head.weight, head.bias, head.scale, head.softcap)
    name = type(model).__name__
    if ref is None or ref.shape != (1, *ours.shape):
        raise NotImplementedError(
            f"{name}'s forward returned logits of shape {None if ref is None else tuple(ref.shape)} for a "
            f"probe of {probe.shape[1]} tokens; the engine expects [1, {probe.shape[1]}, {ours.shape[1]}]"
        )
    tv = _max_tv(ref[0].to(ours.dtype), ours)
    tol = _PROBE_TOL.get(head.weight.dtype, _PROBE_TOL_LOW_PRECISION)
    if not tv <= tol:
        raise NotImplementedError(
            f"completion_logps does not reproduce {name}'s forward: next-token distributions differ by "
            f"total-variation distance {tv:.3g} (> {tol:g}) on a probe. The model transforms the hidden states "
            "or logits in a way the engine does not know about (e.g. an unlisted logit scale or soft-cap)."
        )
    done.add(key)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


def _check_inputs(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> None:
    """Shapes and masks as architecture.md §3 lays them out."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, T], got {tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("completion_mask", completion_mask)):
        if t.shape != input_ids.shape:
            raise ValueError(
                f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}"
            )
    if input_ids.shape[1] and bool(completion_mask[:, 0].any()):
        raise ValueError(
            "completion_mask[:, 0] must be 0: the first position has no context to predict it from"
        )
    if bool((completion_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError("completion_mask marks positions where attention_mask is 0")


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int = 4096,
    per_token: bool = False,
    logsumsq: bool = False,
) -> LogpOutput:
    """Summed (and optionally per-token) log-probs of the completion tokens of each row.

    For each row ``i`` and each position ``t`` with ``completion_mask[i, t] == 1``, computes
    ``log p(input_ids[i, t] | input_ids[i, :t])`` under ``model``, exactly as
    ``log_softmax(model(input_ids, attention_mask).logits)`` would give it, but without the
    ``[N, T, V]`` logits: the decoder runs to its final hidden states, the ``M`` rows that predict
    completion tokens are gathered, and :func:`chunked_token_logps` scores them ``chunk_size`` rows
    at a time (forward and backward). Gradients flow to every parameter that influences the result.

    Args:
        model: a transformers causal LM (``*ForCausalLM``), optionally PEFT-wrapped (LoRA and other
            adapter methods; not prompt learning, not LoRA on the LM head). Tied embeddings work.
            DDP / FSDP / DeepSpeed wrappers are rejected (see ``docs/logps.md``).
        input_ids: ``[N, T]`` token ids (padding anywhere; padded positions are ignored).
        attention_mask: ``[N, T]``, 1 on real tokens.
        completion_mask: ``[N, T]``, 1 on the tokens to score; must be 0 at ``t = 0`` and wherever
            ``attention_mask`` is 0.
        chunk_size: rows of the vocabulary projection computed at once; peak extra memory is about
            ``chunk_size * V`` floats (times a small constant) in forward and in backward.
        per_token: also return the ``[N, T]`` per-token log-probs.
        logsumsq: also return the ``[N, T]`` detached ``log sum_v p(v | prefix)^2``.

    Returns:
        A :class:`LogpOutput` (float32, or float64 for a float64 model).

    The first call for each model also runs the model's own forward on a probe of at most 16 tokens
    and raises ``NotImplementedError`` if it disagrees with the engine (see the module docstring).
    """
    _check_inputs(input_ids, attention_mask, completion_mask)
    head = _resolve_head(model)
    _verify_against_forward(model, head, input_ids, attention_mask)

    hidden = _final_hidden(head.decoder, input_ids, attention_mask)
    # hidden[:, t - 1] predicts input_ids[:, t]; keep only the rows predicting a completion token.
    select = completion_mask[:, 1:].bool()
    rows, cols = select.nonzero(as_tuple=True)
    return _score(
        head,
        hidden[:, :-1][select],
        input_ids[:, 1:][select],
        rows,
        cols + 1,
        input_ids.shape,
        chunk_size=chunk_size,
        per_token=per_token,
        logsumsq=logsumsq,
    )


def _score(
    head: _Head,
    hidden: Tensor,
    targets: Tensor,
    rows: Tensor,
    cols: Tensor,
    shape: tuple[int, int],
    *,
    chunk_size: int,
    per_token: bool,
    logsumsq: bool,
) -> LogpOutput:
    """Score ``targets`` ``[M]`` from the ``hidden`` ``[M, H]`` that predict them; token ``m`` is
    position ``(rows[m], cols[m])`` of the ``shape = (N, T)`` layout the output is given in."""
    result = chunked_token_logps(
        hidden,
        head.weight,
        targets,
        head.bias,
        chunk_size=chunk_size,
        logit_scale=head.scale,
        softcap=head.softcap,
        return_logsumsq=logsumsq,
    )
    logp, lss = result if logsumsq else (result, None)
    n, t = shape
    # Accumulate the per-row sums in float64 (M numbers, negligible cost): sums of hundreds of
    # float32 log-probs would otherwise carry a few ulps of summation-order error.
    total = logp.new_zeros(n, dtype=torch.float64).index_add(0, rows, logp.double()).to(logp.dtype)
    n_tokens = torch.bincount(rows, minlength=n).to(logp.dtype)
    out = LogpOutput(sum=total, n_tokens=n_tokens)
    if per_token:
        out.per_token = logp.new_zeros(n, t).index_put((rows, cols), logp)
    if logsumsq:
        out.logsumsq = lss.new_zeros(n, t).index_put((rows, cols), lss).detach()
    return out


# --------------------------------------------------------------------------------------------
# Prefix sharing: one pass over each prompt for all of its completions
# --------------------------------------------------------------------------------------------

# Attention implementations that apply a custom 4-D additive mask exactly as given.
_MASKED_ATTENTION = ("eager", "sdpa")


def shared_prefix_mask(segment_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[B, 1, L, L]`` attention mask of packed rows ``[prompt][completion 1]...``.

    Position ``q`` sees position ``k <= q`` when ``k`` is a prompt token (segment 0) or in ``q``'s
    own segment, so each completion attends to the one prompt copy and to itself, causally, and
    never to another completion. A padding position (segment -1) sees only itself, so no softmax
    row is empty (an empty one would give NaN and poison the gradients). With ``dtype=torch.bool``:
    True where visible (what transformers gives sdpa); with a float dtype: additive, 0 where visible
    and ``finfo(dtype).min`` elsewhere (what transformers gives eager attention).
    """
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    causal = idx[:, None] >= idx[None, :]
    visible = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    visible |= (q < 0) & (idx[:, None] == idx[None, :])
    if dtype == torch.bool:
        return visible[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def _prompt_lengths(segment_ids: Tensor) -> Tensor:
    return (segment_ids == 0).sum(1)


def _check_shared_inputs(
    input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor, completion_rows: Tensor, completion_mask: Tensor
) -> None:
    """Packed rows as `prefkit.data.collators.pack_shared_rows` lays them out."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
    for name, t in (("position_ids", position_ids), ("segment_ids", segment_ids)):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    b, length = input_ids.shape
    if completion_rows.dim() != 2 or completion_rows.shape[0] != b:
        raise ValueError(f"completion_rows must be [B, K] with B = {b}, got {tuple(completion_rows.shape)}")
    if completion_mask.dim() != 2 or completion_mask.shape[0] != completion_rows.numel():
        raise ValueError(
            f"completion_mask must be [B*K, T] with B*K = {completion_rows.numel()}, got {tuple(completion_mask.shape)}"
        )
    if segment_ids.numel() and (int(segment_ids.min()) < -1 or int(segment_ids.max()) > completion_rows.shape[1]):
        raise ValueError(f"segment_ids must lie in [-1, K = {completion_rows.shape[1]}]")
    idx = torch.arange(length, device=segment_ids.device)
    real, prompt = segment_ids >= 0, segment_ids == 0
    if not torch.equal(real, idx < real.sum(1, keepdim=True)) or not torch.equal(
        prompt, idx < _prompt_lengths(segment_ids)[:, None]
    ):
        raise ValueError("each packed row must be its prompt (segment 0), then its completions, then padding (-1)")
    if bool((segment_ids[:, 1:] < segment_ids[:, :-1])[real[:, 1:]].any()):
        raise ValueError("each completion's segment must be one run of positions, in increasing segment order")
    if bool(((segment_ids > 0).any(1) & (_prompt_lengths(segment_ids) == 0)).any()):
        raise ValueError("a packed row has completion tokens but no prompt token to predict the first one from")
    expected = torch.where(
        segment_ids > 0, _prompt_lengths(segment_ids)[:, None] + idx - _segment_starts(segment_ids), idx
    )
    if not torch.equal(position_ids[real], expected[real]):
        raise ValueError(
            "position_ids must count 0.. over the prompt and restart at the prompt's length on every completion"
        )
    if int((segment_ids > 0).sum()) != int(completion_mask.sum()):
        raise ValueError(
            f"segment_ids mark {int((segment_ids > 0).sum())} completion tokens, completion_mask "
            f"{int(completion_mask.sum())}"
        )


def _segment_starts(segment_ids: Tensor) -> Tensor:
    """``[B, L]``: the index where each position's segment begins."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.where(change, idx, 0).cummax(1).values


def _mask_dtype(decoder: nn.Module) -> torch.dtype:
    """Boolean for sdpa (a quarter of a float32 mask's memory), the model's float dtype for eager."""
    if decoder.config._attn_implementation == "sdpa":
        return torch.bool
    return decoder.get_input_embeddings().weight.dtype


def _check_shared_model(decoder: nn.Module, position_ids: Tensor, segment_ids: Tensor) -> None:
    """Raise unless ``decoder`` applies a custom 4-D mask and ``position_ids`` exactly."""
    config = decoder.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _MASKED_ATTENTION:
        raise NotImplementedError(
            f"share_prompt needs attention that takes a custom 4-D mask ({' or '.join(_MASKED_ATTENTION)}); the model "
            f"uses {impl!r}. Set share_prompt to false, or load the model with attn_implementation='sdpa'."
        )
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        raise NotImplementedError(
            f"share_prompt needs position_ids, which {type(decoder).__name__}.forward does not take; "
            "set share_prompt to false"
        )
    window = getattr(config, "sliding_window", None)
    longest = int(position_ids[segment_ids >= 0].max()) + 1 if bool((segment_ids >= 0).any()) else 0
    if isinstance(window, int) and longest > window:
        raise NotImplementedError(
            f"share_prompt: a prompt + completion of {longest} tokens exceeds the model's sliding window "
            f"({window}), which the packed mask does not reproduce; set share_prompt to false"
        )


def _verify_sharing(model: nn.Module, head: _Head, input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor):
    """Once per model (and head), compare packed rows with unshared ones on the batch's first example.

    Runs the first packed row and each of its prompt + completion rows (eval mode, no gradients)
    and compares the next-token distributions at the first 16 tokens of every completion. Raises
    ``NotImplementedError`` naming ``share_prompt`` if they differ by more than numerical noise
    (a model that ignores ``position_ids`` or the 4-D mask, or changes attention in another way).
    """
    key = ("share_prompt", id(head.weight), id(head.bias), head.scale, head.softcap)
    done = _verified.setdefault(model, set())
    if key in done:
        return
    real = segment_ids[0] >= 0
    ids, pos, seg = input_ids[0, real][None], position_ids[0, real][None], segment_ids[0, real][None]
    if not bool((seg > 0).any()):
        return  # nothing to compare on; check at the next call
    tv = 0.0
    with _eval_no_grad(model):
        packed = _final_hidden(head.decoder, ids, shared_prefix_mask(seg, _mask_dtype(head.decoder)), pos)[0]
        n_prompt = int(_prompt_lengths(seg))
        for k in seg.unique().tolist():
            if k == 0:
                continue
            row = ids[(seg == 0) | (seg == k)][None]
            alone = _final_hidden(head.decoder, row, torch.ones_like(row))[0, n_prompt : n_prompt + _PROBE_TOKENS]
            shared = packed[seg[0] == k][:_PROBE_TOKENS]
            logits = [_chunk_logits(h, head.weight, head.bias, head.scale, head.softcap) for h in (alone, shared)]
            tv = max(tv, _max_tv(*logits))
    tol = _PROBE_TOL.get(head.weight.dtype, _PROBE_TOL_LOW_PRECISION)
    if not tv <= tol:
        raise NotImplementedError(
            f"share_prompt: {type(model).__name__} gives different next-token distributions for a completion "
            "packed after its prompt and for the plain prompt + completion row (total-variation distance "
            f"{tv:.3g} > {tol:g}); the model does not apply position_ids or the 4-D attention mask as the packing "
            "needs. Set share_prompt to false."
        )
    done.add(key)


def shared_prefix_logps(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    segment_ids: Tensor,
    completion_rows: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int = 4096,
    per_token: bool = False,
    logsumsq: bool = False,
) -> LogpOutput:
    """`completion_logps` of ``N = B * K`` prompt + completion rows, each prompt run only once.

    Example ``b`` is one packed row ``[prompt][completion 1]...[completion K]``
    (`prefkit.data.collators.pack_shared_rows`): ``position_ids`` restart at the prompt's length on
    every completion and a block attention mask (`shared_prefix_mask`) lets each completion see the
    prompt and itself, causally, but not the other completions, so every completion token gets the
    hidden state it would get in its own row. The decoder runs once over the ``[B, L]`` packed rows;
    a completion's first token is predicted from the hidden state of the prompt's last token, which
    all ``K`` completions share (it is gathered once per completion, so its gradient sums them); every
    other token from the token before it.

    Args:
        model: a transformers causal LM with eager or sdpa attention (see `completion_logps`).
        input_ids, position_ids: ``[B, L]`` packed rows, right-padded.
        segment_ids: ``[B, L]``: 0 on the prompt, ``k`` on completion ``k`` (1-based), -1 on padding.
        completion_rows: ``[B, K]``: the output row of example ``b``'s completion ``k`` (``k + 1`` in
            ``segment_ids``).
        completion_mask: ``[N, T]``: the completion mask of the unshared rows (completion ``k`` of
            example ``b`` is 1 in row ``completion_rows[b, k]`` at columns ``P_b .. P_b + C_bk - 1``).
        chunk_size, per_token, logsumsq: as in `completion_logps`.

    Returns:
        The `LogpOutput` `completion_logps` gives for the unshared ``[N, T]`` rows: ``sum`` and
        ``n_tokens`` ``[N]``, ``per_token`` / ``logsumsq`` ``[N, T]`` in the layout of ``completion_mask``.

    Raises ``NotImplementedError`` (naming ``share_prompt``) for an attention implementation that
    does not take a custom 4-D mask (e.g. flash-attention-2), a prompt + completion longer than a
    sliding window, or a model whose packed rows disagree with unshared ones on the first call's
    probe (as `completion_logps` checks its forward).
    """
    _check_shared_inputs(input_ids, position_ids, segment_ids, completion_rows, completion_mask)
    head = _resolve_head(model)
    _check_shared_model(head.decoder, position_ids, segment_ids)
    _verify_against_forward(model, head, input_ids, (segment_ids >= 0).long())
    _verify_sharing(model, head, input_ids, position_ids, segment_ids)

    mask = shared_prefix_mask(segment_ids, _mask_dtype(head.decoder))
    hidden = _final_hidden(head.decoder, input_ids, mask, position_ids)
    b_idx, t_idx = (segment_ids > 0).nonzero(as_tuple=True)
    seg = segment_ids[b_idx, t_idx]
    # The predictor of a completion token: the token before it, or the prompt's last token for the first.
    first = t_idx == _segment_starts(segment_ids)[b_idx, t_idx]
    source = torch.where(first, _prompt_lengths(segment_ids)[b_idx] - 1, t_idx - 1)
    rows, cols = completion_rows[b_idx, seg - 1], position_ids[b_idx, t_idx]
    width = completion_mask.shape[1]
    if bool((cols >= width).any()) or not bool(completion_mask[rows, cols.clamp(max=width - 1)].all()):
        raise ValueError("completion_mask does not mark the completion tokens of segment_ids at their positions")
    return _score(
        head,
        hidden[b_idx, source],
        input_ids[b_idx, t_idx],
        rows,
        cols,
        tuple(completion_mask.shape),
        chunk_size=chunk_size,
        per_token=per_token,
        logsumsq=logsumsq,
    )
