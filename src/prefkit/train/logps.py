"""The log-prob engine: per-completion log-probabilities without ``[batch, seq, vocab]`` logits.

Every preference method scores completions under a causal LM: for each row of a batch, the sum of
``log p(token_t | tokens_<t)`` over the completion tokens. The obvious way — run the model, take
``log_softmax`` of the full logits, gather — materialises a ``[N, T, V]`` tensor (and its gradient),
which dominates memory for modern vocabularies. This module avoids it while still running the
model's own ``forward`` (and so any DDP / FSDP / DeepSpeed wrapper's forward around it):

1. For the duration of one call, the forward of the model's output embedding (the LM head, an
   ``nn.Linear``) is replaced by a function that receives the final hidden states ``[N, T, H]``
   inside the real forward, keeps only the ``M`` rows that predict a completion token (the hidden
   state at ``t - 1`` predicts token ``t``) and scores them with :func:`chunked_token_logps`,
   reading the head's weight at that moment (when FSDP / ZeRO-3 have gathered it).
2. :func:`chunked_token_logps` projects ``chunk_size`` rows at a time against the weight, takes the
   log-softmax of the target token in float32 and keeps only ``[M]`` numbers. Its backward pass
   recomputes each chunk's logits and accumulates the gradients of the hidden states and of the
   weight chunk by chunk, so peak extra memory is ``O(chunk_size * V)`` in both directions.
   ``chunk_size="auto"`` picks the rows per chunk from a memory budget (:func:`auto_chunk_size`).
3. The head returns ``[1, M, 1]`` zeros that carry the log-probs' gradient (``(logp - logp.detach())
   / slope``). They leave the model as ``.logits`` (so wrappers see the gradient path through the
   forward's output); the engine adds the detached log-probs back. Whatever the forward does to its
   logits after the head (a scale or soft-cap) maps 0 to 0, and the division by its slope at 0
   makes the gradient exact.

Final-logit transforms that some architectures apply after the LM head are reproduced exactly:
soft-capping (``final_logit_softcapping``, ``logits_soft_cap``: ``cap * tanh(z / cap)``) and scaling
(``logit_scale`` in the Cohere family, ``logits_scaling`` for the architectures whose meaning of it
is known). Other known transforms raise ``NotImplementedError`` naming the config field. As a guard
against transforms this module does not know about, the first call for each model compares the
engine with the model's own logits on a short probe (at most 16 tokens of the batch) and raises
``NotImplementedError`` if the two disagree.

Packed rows (:func:`shared_prefix_logps`): prefix sharing puts the ``K`` completions of one prompt
into one unit ``[prompt][completion 1]...[completion K]`` with ``position_ids`` restarting after the
prompt and a block attention mask, so the prompt runs once; padding-free packing puts several units
(each prompt + completion alone, or shared units) into one row, ``position_ids`` restarting at 0 on
each unit, the mask keeping units apart (flash-attention: no mask, varlen boundaries from
``position_ids``). The result has the layout and values (up to float rounding) of
:func:`completion_logps` on the unpacked rows.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_MEMORY_MB",
    "LogpOutput",
    "last_logits_forward",
    "auto_chunk_size",
    "chunked_token_kl",
    "chunked_token_logps",
    "completion_logps",
    "shared_prefix_logps",
    "shared_prefix_mask",
]


@dataclass
class LogpOutput:
    """What :func:`completion_logps` returns; ``N`` rows, ``T`` positions.

    ``sum``: ``[N]`` summed log-prob of each row's completion tokens (0 for a row with none).
    ``n_tokens``: ``[N]`` float count of completion tokens.
    ``per_token``: ``[N, T]`` or ``None``; ``per_token[:, t] = log p(input_ids[:, t] | input_ids[:, :t])``
    where ``completion_mask[:, t] == 1``, else 0 (the layout of ``completion_mask``).
    ``logsumsq``: ``[N, T]`` or ``None``, detached; ``log sum_v p(v | input_ids[:, :t])^2`` at the
    completion positions, else 0 (WPO's weights).
    ``entropy``: ``[N, T]`` or ``None``, detached; ``-sum_v p(v | input_ids[:, :t]) log p(v | ...)`` at the
    completion positions, else 0 (logged by the online trainer).
    ``kl``: ``[N, T]`` or ``None``: ``KL(p_ref(. | prefix) || p(. | prefix))`` over the whole vocabulary at the
    completion positions, else 0, with its gradient (TDPO's sequential KL; ``kl_to`` of :func:`completion_logps`).
    ``head_inputs`` / ``head``: with ``keep_head_inputs``, the ``[M, H]`` detached hidden states that predict the
    completion tokens and the LM head that scores them: what ``kl_to`` needs from a reference.
    """

    sum: Tensor
    n_tokens: Tensor
    per_token: Tensor | None = None
    logsumsq: Tensor | None = None
    entropy: Tensor | None = None
    kl: Tensor | None = None
    head_inputs: Tensor | None = None
    head: Any = None


# --------------------------------------------------------------------------------------------
# Rows per chunk from a memory budget
# --------------------------------------------------------------------------------------------

DEFAULT_MEMORY_MB = 256
# "auto" never takes more rows than this: from about 128 rows on, a chunk's [rows, H] x [H, V] matmul is
# compute-bound on a CPU (fewer rows stream the whole head weight for little work; measured 30-45 %
# slower at 32 rows), so larger chunks only cost memory. An explicit chunk_size may exceed it.
AUTO_MAX_ROWS = 128
# Vocabulary-wide rows alive at once per chunk row in the worst case (the backward pass of a
# soft-capped model: the logits, their softmax, and two temporaries of the soft-cap's slope).
_LOGIT_COPIES = 4


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmax is computed in: float32, or float64 when the weight is float64."""
    return torch.promote_types(dtype, torch.float32)


def auto_chunk_size(vocab_size: int, dtype: torch.dtype = torch.float32, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Rows per chunk whose logits fit in ``memory_mb``, at most ``AUTO_MAX_ROWS`` (128):
    ``clamp(memory_mb * 2**20 // (V * bytes * 4), 1, 128)``.

    ``bytes`` is the size of one element of the softmax dtype (4: float32, for float32, bfloat16 and
    float16 models alike; 8 for float64) and 4 the number of ``[rows, V]`` float tensors the engine
    holds at once in the worst case. E.g. 256 MB: ``V = 32000``: 128 rows (524 fit);
    ``V = 151936``: 110; ``V = 256000``: 65.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float)) or not memory_mb > 0:
        raise ValueError(f"memory_mb must be a positive number, got {memory_mb!r}")
    if not math.isfinite(memory_mb):
        raise ValueError(f"memory_mb must be finite, got {memory_mb!r}")
    row_bytes = vocab_size * _float_dtype(dtype).itemsize * _LOGIT_COPIES
    return max(1, min(AUTO_MAX_ROWS, int(memory_mb * 2**20) // row_bytes))


def _chunk_rows(chunk_size: int | str, memory_mb: float, vocab_size: int, dtype: torch.dtype) -> int:
    """``chunk_size`` itself, or with ``"auto"`` :func:`auto_chunk_size`."""
    if chunk_size == "auto":
        return auto_chunk_size(vocab_size, dtype, memory_mb)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or 'auto', got {chunk_size!r}")
    return chunk_size


# --------------------------------------------------------------------------------------------
# Chunked log-softmax of target tokens
# --------------------------------------------------------------------------------------------


def _matmul_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of the vocabulary matmul: the weight's, or autocast's where autocast is on for its
    device and would cast an ``nn.Linear`` (every float dtype but float64)."""
    device = weight.device.type
    if weight.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None) -> Tensor:
    """Final logits of the rows ``h`` ``[C, H]``: ``softcap(scale * (h @ W.T + b))``, float32+.

    The matmul runs in the weight's dtype (as ``nn.Linear`` would), everything after it in
    :func:`_float_dtype`.
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
    """``log_softmax(softcap(scale * (hidden @ W.T + b)))[target]`` row by row, chunked both ways.

    The matmuls run in ``mm_dtype`` (the weight's dtype, or autocast's), the softmax in float32
    (float64 for float64 weights); autocast is off inside, so these dtypes hold in both passes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap, want_logsumsq, want_entropy, mm_dtype):
        w = weight.to(mm_dtype)
        fdt = _float_dtype(w.dtype)
        m = hidden.shape[0]
        logp = torch.empty(m, dtype=fdt, device=hidden.device)
        lse = torch.empty(m, dtype=fdt, device=hidden.device)
        lss = torch.empty(m if want_logsumsq else 0, dtype=fdt, device=hidden.device)
        ent = torch.empty(m if want_entropy else 0, dtype=fdt, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for s in range(0, m, chunk_size):
                e = min(s + chunk_size, m)
                z = _chunk_logits(hidden[s:e], w, bias, scale, softcap)
                lse_c = torch.logsumexp(z, dim=-1)
                lse[s:e] = lse_c
                logp[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse_c
                if want_logsumsq:
                    # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
                    lss[s:e] = torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse_c
                if want_entropy:
                    # H = logsumexp(z) - sum_v softmax(z)_v z_v  (-inf logits have probability 0)
                    p = torch.exp(z - lse_c[:, None])
                    ent[s:e] = lse_c - (p * torch.where(p > 0, z, torch.zeros_like(z))).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.scale, ctx.softcap, ctx.mm_dtype = chunk_size, scale, softcap, mm_dtype
        ctx.mark_non_differentiable(lss, ent)
        return logp, lss, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_lss, _grad_ent):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk_size, scale, softcap = ctx.chunk_size, ctx.scale, ctx.softcap
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(ctx.mm_dtype)
        fdt = _float_dtype(w.dtype)
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
                z = _chunk_logits(h, w, bias, scale, softcap)
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
                if need_b:
                    grad_b.add_(dz.sum(0))
                dz = dz.to(w.dtype)
                if need_h:
                    grad_h[s:e] = (dz @ w).to(hidden.dtype)
                if need_w and w.dtype == fdt:
                    grad_w.addmm_(dz.t(), h.to(fdt))
                elif need_w:  # a low-precision matmul (as nn.Linear's backward), accumulated in float32
                    grad_w.add_(dz.t() @ h.to(w.dtype))
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


class _ChunkedTokenKL(torch.autograd.Function):
    """``KL(softmax(z_ref) || softmax(z))`` per row, ``z`` from ``hidden`` and ``weight`` as in `_ChunkedTokenLogps`
    and ``z_ref`` from the reference's ``ref_hidden`` and head (no gradient), chunked both ways."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref, chunk_size, scale, softcap, mm_dtype):
        w, w_ref = weight.to(mm_dtype), ref.module.weight.to(mm_dtype)
        fdt = _float_dtype(w.dtype)
        m = hidden.shape[0]
        kl = torch.empty(m, dtype=fdt, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False), torch.no_grad():
            for s in range(0, m, chunk_size):
                e = min(s + chunk_size, m)
                logp = torch.log_softmax(_chunk_logits(hidden[s:e], w, bias, scale, softcap), dim=-1)
                z_ref = _chunk_logits(ref_hidden[s:e], w_ref, ref.module.bias, ref.scale, ref.softcap)
                logp_ref = torch.log_softmax(z_ref.to(fdt), dim=-1)
                p_ref = logp_ref.exp()
                # sum_v p_ref (log p_ref - log p); a token with p_ref = 0 adds nothing
                kl[s:e] = torch.where(p_ref > 0, p_ref * (logp_ref - logp), torch.zeros_like(p_ref)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden)
        ctx.ref, ctx.chunk_size, ctx.scale, ctx.softcap, ctx.mm_dtype = ref, chunk_size, scale, softcap, mm_dtype
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_hidden = ctx.saved_tensors
        ref, chunk_size, scale, softcap = ctx.ref, ctx.chunk_size, ctx.scale, ctx.softcap
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w, w_ref = weight.to(ctx.mm_dtype), ref.module.weight.to(ctx.mm_dtype)
        fdt = _float_dtype(w.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=fdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=fdt, device=bias.device) if need_b else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk_size):
                e = min(s + chunk_size, hidden.shape[0])
                h = hidden[s:e]
                z = _chunk_logits(h, w, bias, scale, softcap)
                z_ref = _chunk_logits(ref_hidden[s:e], w_ref, ref.module.bias, ref.scale, ref.softcap).to(fdt)
                # d KL / d z = softmax(z) - softmax(z_ref); times the incoming gradient
                dz = torch.softmax(z, dim=-1) - torch.softmax(z_ref, dim=-1)
                dz.mul_(grad_kl[s:e].to(fdt)[:, None])
                if softcap is not None:
                    dz.mul_(1.0 - (z / softcap) ** 2)
                if scale != 1.0:
                    dz.mul_(scale)
                del z, z_ref
                if need_b:
                    grad_b.add_(dz.sum(0))
                dz = dz.to(w.dtype)
                if need_h:
                    grad_h[s:e] = (dz @ w).to(hidden.dtype)
                if need_w:
                    grad_w.add_(dz.t().to(fdt) @ h.to(fdt))
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def chunked_token_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_head: Any,
    bias: Tensor | None = None,
    *,
    chunk_size: int | str = "auto",
    memory_mb: float = DEFAULT_MEMORY_MB,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """``[M]`` full-vocabulary ``KL(p_ref || p)`` of each row, ``p = softmax(z)`` with ``z`` as in
    :func:`chunked_token_logps` and ``p_ref`` the reference head's (``ref_head``: the ``head`` of a
    :class:`LogpOutput`) on ``ref_hidden`` ``[M, H_ref]``. Gradients reach ``hidden``, ``weight`` and ``bias``
    (``d KL / d z = p - p_ref``), never the reference; both passes hold two ``[rows, V]`` chunks at a time
    (half of ``chunk_size="auto"``'s rows each)."""
    if hidden.shape[0] != ref_hidden.shape[0]:
        raise ValueError(
            f"the reference scored {ref_hidden.shape[0]} completion tokens and the policy {hidden.shape[0]}: "
            "kl_to needs the reference's output on the same batch"
        )
    if ref_head.module.weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"the reference's vocabulary ({ref_head.module.weight.shape[0]}) differs from the policy's "
            f"({weight.shape[0]}): the token-level KL needs one vocabulary"
        )
    rows = max(
        1, _chunk_rows(chunk_size, memory_mb, weight.shape[0], weight.dtype) // (2 if chunk_size == "auto" else 1)
    )
    return _ChunkedTokenKL.apply(
        hidden,
        weight,
        bias,
        ref_hidden.detach(),
        ref_head,
        rows,
        float(logit_scale),
        None if softcap is None else float(softcap),
        _matmul_dtype(weight),
    )


def chunked_token_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int | str = "auto",
    memory_mb: float = DEFAULT_MEMORY_MB,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_logsumsq: bool = False,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Log-prob of each row's target token, computed ``chunk_size`` rows at a time.

    With ``z = softcap(logit_scale * (hidden @ weight.T + bias))`` (``softcap(x) = cap * tanh(x / cap)``,
    skipped when ``softcap`` is None), returns ``log_softmax(z)[m, targets[m]]`` for every row ``m``
    without ever holding more than ``chunk_size`` rows of ``z``. The backward pass recomputes each
    chunk's logits and accumulates the gradients of ``hidden``, ``weight`` and ``bias`` chunk by
    chunk (so it is chunked too; the result is not twice differentiable).

    The matmuls run in the weight's dtype, or, inside an autocast region for the weight's device,
    in autocast's dtype (as ``nn.Linear`` would; forward and backward alike). The log-softmax always
    runs in float32 (float64 for a float64 weight).

    Args:
        hidden: ``[M, H]`` hidden states (any float dtype).
        weight: ``[V, H]`` output-embedding weight.
        targets: ``[M]`` long token ids in ``[0, V)``.
        bias: optional ``[V]`` output bias.
        chunk_size: rows per chunk (>= 1), or ``"auto"``: :func:`auto_chunk_size` of ``V`` and ``memory_mb``.
        memory_mb: with ``chunk_size="auto"``, the budget for one chunk's ``[rows, V]`` float tensors.
        logit_scale: multiplies the logits before soft-capping.
        softcap: soft-capping value (> 0) or None.
        return_logsumsq: also return ``log sum_v softmax(z)_v^2`` per row (detached).
        return_entropy: also return the entropy ``-sum_v softmax(z)_v log softmax(z)_v`` per row (detached).

    Returns:
        ``[M]`` log-probs in float32 (float64 when ``weight`` is float64), then with ``return_logsumsq``
        and with ``return_entropy`` (in that order) a further ``[M]`` detached tensor each.
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [M, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)}, weight is {tuple(weight.shape)} "
            "(a weight read while sharded or partitioned, e.g. outside an FSDP / ZeRO-3 forward?)"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [M] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    rows = _chunk_rows(chunk_size, memory_mb, weight.shape[0], weight.dtype)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap!r}")
    if not math.isfinite(logit_scale) or logit_scale == 0:
        raise ValueError(f"logit_scale must be finite and non-zero, got {logit_scale!r}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"targets must lie in [0, {weight.shape[0]}); got range [{int(targets.min())}, {int(targets.max())}]"
        )
    logp, lss, ent = _ChunkedTokenLogps.apply(
        hidden,
        weight,
        bias,
        targets.long(),
        rows,
        float(logit_scale),
        None if softcap is None else float(softcap),
        bool(return_logsumsq),
        bool(return_entropy),
        _matmul_dtype(weight),
    )
    extras = ([lss] if return_logsumsq else []) + ([ent] if return_entropy else [])
    return (logp, *extras) if extras else logp


# --------------------------------------------------------------------------------------------
# Finding the causal LM under its wrappers, its output embedding and its logit transforms
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
# ``logits_scaling`` means different things in different architectures: model_type -> the factor
# the forward applies to the LM head's output, as a function of the value.
_LOGITS_SCALING = {
    "granite": lambda s: 1.0 / s,  # logits / s
    "granite_swa": lambda s: 1.0 / s,
    "granitemoe": lambda s: 1.0 / s,
    "granitemoe_swa": lambda s: 1.0 / s,
    "granitemoehybrid": lambda s: 1.0 / s,
    "granitemoeshared": lambda s: 1.0 / s,
    "minicpm3": lambda s: 1.0,  # divides the hidden states before the head: the head receives them divided
    "hyperclovax": lambda s: s,  # logits * s
}


@dataclass
class _Head:
    """The output embedding of a causal LM and the transform its forward applies to the head's output."""

    module: nn.Linear
    scale: float
    softcap: float | None


def _is_deepspeed_engine(model: nn.Module) -> bool:
    return any(c.__module__.startswith("deepspeed") for c in type(model).__mro__) and hasattr(model, "module")


def _is_fsdp_wrapper(model: nn.Module) -> bool:
    """A ``FullyShardedDataParallel`` (FSDP1) wrapper; FSDP2's ``fully_shard`` wraps nothing."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / FSDP / DeepSpeed wrappers (whose forward the engine calls)."""
    while True:
        if isinstance(model, nn.DataParallel):
            raise NotImplementedError(
                "DataParallel-wrapped models are not supported: its replicas would call the replaced LM head of the "
                "original module. Use DistributedDataParallel (e.g. through accelerate)."
            )
        if isinstance(model, nn.parallel.DistributedDataParallel) or _is_deepspeed_engine(model):
            model = model.module
        elif _is_fsdp_wrapper(model):
            model = model.module
        else:
            return model


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
            f"PEFT {cfg.peft_type} (prompt learning) is not supported: it prepends virtual tokens to the "
            "sequence, so positions no longer match input_ids. Use an adapter method such as LoRA."
        )
    if str(cfg.peft_type).split(".")[-1] == "POLY":
        raise NotImplementedError(
            "PEFT POLY is not supported: it needs task_ids, which completion_logps does not pass."
        )
    return model.get_base_model()


def _module_class(module: nn.Module) -> type:
    """``module``'s class, seen through the subclass FSDP2's ``fully_shard`` gives it."""
    cls = type(module)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if cls.__bases__[:1] == (FSDPModule,) and len(cls.__bases__) == 2:
            return cls.__bases__[1]
    return cls


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
        if head.disable_adapters or not head.active_adapters or head.active_adapters[0] not in head.modules_to_save:
            head = head.original_module
        else:
            head = head.modules_to_save[head.active_adapters[0]]
    if _module_class(head) is not nn.Linear:
        raise NotImplementedError(
            f"the output embedding is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear "
            "(e.g. a LoRA adapter or a quantized layer on lm_head); the engine replaces its forward with a "
            "projection by its .weight and would ignore whatever else its forward does"
        )
    return head


def _logit_transform(lm: nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)`` that ``lm``'s forward applies to the LM head's output, from its config."""
    config = lm.config
    found = {f: getattr(config, f, None) for f in _TRANSFORM_FIELDS}
    found = {f: v for f, v in found.items() if v is not None}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        nested = [f for f in _TRANSFORM_FIELDS if getattr(text_config, f, None) is not None and f not in found]
        if nested:
            raise NotImplementedError(
                f"{type(lm).__name__}: its text config sets {nested}, and whether the wrapper's forward "
                "applies it differs between architectures; load the text-only causal LM instead"
            )
    for field, what in _UNSUPPORTED_FIELDS.items():
        if field in found:
            raise NotImplementedError(f"config.{field} = {found[field]!r} {what}; not supported by completion_logps")
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


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM under ``model``'s DDP / FSDP / DeepSpeed and PEFT wrappers."""
    lm = _unwrap_peft(_unwrap(model))
    if not hasattr(lm, "config"):
        raise NotImplementedError(f"{type(lm).__name__} is not a transformers causal LM (no config)")
    return lm


def _resolve_head(lm: nn.Module) -> _Head:
    """Output embedding and logit transform of the causal LM ``lm``."""
    return _Head(_output_module(lm), *_logit_transform(lm))


@contextlib.contextmanager
def _head_replaced(module: nn.Module, forward: Callable[[Tensor], Tensor]):
    """``module(x)`` calls ``forward(x)`` inside the block (module hooks still run); restored after."""
    saved = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _through_forward(
    model: nn.Module, head: _Head, inputs: dict[str, Tensor], on_hidden: Callable[[Tensor], Tensor]
) -> Tensor:
    """``model(**inputs, use_cache=False).logits`` with the LM head replaced by ``on_hidden``.

    ``on_hidden`` gets the head's input, the final hidden states ``[N, T, H]``, inside the model's
    forward (and so inside any wrapper's forward); what it returns comes out as ``.logits`` after the
    forward's own logit transform.
    """
    shape = tuple(inputs["input_ids"].shape)
    calls = []

    def forward(hidden: Tensor) -> Tensor:
        if tuple(hidden.shape[:2]) != shape:
            raise NotImplementedError(
                f"{type(model).__name__}'s LM head received hidden states of shape {tuple(hidden.shape)} for "
                f"input_ids of shape {shape}; the engine needs one hidden state per input position"
            )
        calls.append(1)
        return on_hidden(hidden)

    with _head_replaced(head.module, forward):
        out = model(**inputs, use_cache=False)
    if len(calls) != 1:
        raise NotImplementedError(
            f"{type(model).__name__}'s forward called its LM head {len(calls)} times; the engine needs exactly one call"
        )
    logits = getattr(out, "logits", None)
    if logits is None:
        raise NotImplementedError(f"{type(model).__name__}'s forward returned no .logits")
    return logits


def _head_logits(head: _Head, hidden: Tensor) -> Tensor:
    """The final logits ``[C, V]`` of hidden states ``[C, H]`` (the head's weight as read now)."""
    return _chunk_logits(hidden, head.module.weight, head.module.bias, head.scale, head.softcap)


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


def _first_check(model: nn.Module, head: _Head, what: str) -> tuple[set, tuple] | None:
    """``(done, key)`` if check ``what`` has not yet run for ``model`` and this head, else None."""
    key = (what, id(head.module), head.scale, head.softcap)
    done = _verified.setdefault(model, set())
    return None if key in done else (done, key)


def _verify_against_forward(model: nn.Module, head: _Head, input_ids: Tensor) -> None:
    """Once per model (and head), compare the engine's next-token distributions with ``model(...)``'s.

    Runs the model's forward on the first 16 tokens of the first row (whatever the masks say: any
    tokens do, and every process of a distributed run makes the same calls) in eval mode, without
    gradients, and compares its logits with the engine's transform of the hidden states the LM head
    received. Raises ``NotImplementedError`` if the distributions differ by more than numerical
    noise, i.e. the forward does something to the logits after the head that the engine does not.
    """
    first = _first_check(model, head, "forward")
    if first is None or input_ids.numel() == 0:
        return
    probe = input_ids[:1, :_PROBE_TOKENS]
    ours = []
    # The head's own forward: an instance attribute (e.g. an accelerate hook) or its class's.
    own_forward = vars(head.module).get("forward") or type(head.module).forward.__get__(head.module)

    def on_hidden(hidden: Tensor) -> Tensor:
        ours.append(_head_logits(head, hidden[0]))
        return own_forward(hidden)

    with _eval_no_grad(model):
        ref = _through_forward(model, head, {"input_ids": probe, "attention_mask": torch.ones_like(probe)}, on_hidden)
    name = type(model).__name__
    if ref.shape != (1, *ours[0].shape):
        raise NotImplementedError(
            f"{name}'s forward returned logits of shape {tuple(ref.shape)} for a probe of {probe.shape[1]} "
            f"tokens; the engine expects [1, {probe.shape[1]}, {ours[0].shape[1]}]"
        )
    tv = _max_tv(ref[0].to(ours[0].dtype), ours[0])
    tol = _PROBE_TOL.get(head.module.weight.dtype, _PROBE_TOL_LOW_PRECISION)
    if not tv <= tol:
        raise NotImplementedError(
            f"completion_logps does not reproduce {name}'s forward: next-token distributions differ by "
            f"total-variation distance {tv:.3g} (> {tol:g}) on a probe. The model transforms the hidden states "
            "or logits in a way the engine does not know about (e.g. an unlisted logit scale or soft-cap)."
        )
    first[0].add(first[1])


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


def _check_inputs(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> None:
    """Shapes and masks as architecture.md §3 lays them out."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, T], got {tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("completion_mask", completion_mask)):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    if input_ids.shape[1] and bool(completion_mask[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be 0: the first position has no context to predict it from")
    if bool((completion_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError("completion_mask marks positions where attention_mask is 0")


def last_logits_forward(model: nn.Module, **inputs: Any):
    """``model(**inputs)`` computing the logits of the last position only where the model takes
    ``logits_to_keep`` (no ``[N, T, V]`` logits), all of them otherwise; returns the model's output."""
    try:
        return model(**inputs, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        return model(**inputs)


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int | str = "auto",
    memory_mb: float = DEFAULT_MEMORY_MB,
    per_token: bool = False,
    logsumsq: bool = False,
    entropy: bool = False,
    hidden_hook: Callable[[Tensor], None] | None = None,
    keep_head_inputs: bool = False,
    kl_to: LogpOutput | None = None,
) -> LogpOutput:
    """Summed (and optionally per-token) log-probs of the completion tokens of each row.

    For each row ``i`` and each position ``t`` with ``completion_mask[i, t] == 1``, computes
    ``log p(input_ids[i, t] | input_ids[i, :t])`` under ``model``, exactly as
    ``log_softmax(model(input_ids, attention_mask).logits)`` would give it, but without the
    ``[N, T, V]`` logits: ``model``'s own forward runs with its LM head replaced, for this call, by
    one that gathers the ``M`` hidden states predicting completion tokens and scores them with
    :func:`chunked_token_logps` ``chunk_size`` rows at a time (forward and backward). Gradients flow
    to every parameter that influences the result, through the forward's output.

    Args:
        model: a transformers causal LM (``*ForCausalLM``), optionally PEFT-wrapped (LoRA and other
            adapter methods; not prompt learning, not LoRA on the LM head), optionally wrapped in
            DistributedDataParallel, FSDP or a DeepSpeed engine (whose forward is called, so gradient
            synchronisation and parameter gathering work). Tied embeddings work.
        input_ids: ``[N, T]`` token ids (padding anywhere; padded positions are ignored).
        attention_mask: ``[N, T]``, 1 on real tokens.
        completion_mask: ``[N, T]``, 1 on the tokens to score; must be 0 at ``t = 0`` and wherever
            ``attention_mask`` is 0.
        chunk_size: rows of the vocabulary projection computed at once, or ``"auto"``: as many as fit
            ``memory_mb`` (:func:`auto_chunk_size`). Results do not depend on it beyond float rounding.
        memory_mb: with ``chunk_size="auto"``, the memory budget of one chunk's ``[rows, V]`` tensors.
        per_token: also return the ``[N, T]`` per-token log-probs.
        logsumsq: also return the ``[N, T]`` detached ``log sum_v p(v | prefix)^2``.
        entropy: also return the ``[N, T]`` detached entropy of ``p(. | prefix)``.
        hidden_hook: called with the ``[N, T, H]`` final hidden states (what the LM head receives, with their
            gradient) during the forward, e.g. for a value head on the same backbone (PPO).
        keep_head_inputs: keep the detached hidden states that predict the completion tokens and the head in
            the output (``head_inputs``, ``head``), for a later ``kl_to`` (run the reference with it).
        kl_to: a reference's output on the same batch made with ``keep_head_inputs``: also return ``kl``, the
            per-token full-vocabulary ``KL(p_ref || p)`` with its gradient (:func:`chunked_token_kl`). Like
            ``hidden_hook``, this reads the hidden states inside the forward but outside its output, so it is
            for unsharded models (plain or DistributedDataParallel), not FSDP or ZeRO-3.

    Returns:
        A :class:`LogpOutput` (float32, or float64 for a float64 model).

    The first call for each model also runs the model's forward on a probe of at most 16 tokens
    and raises ``NotImplementedError`` if its logits disagree with the engine's (see the module docstring).
    """
    _check_inputs(input_ids, attention_mask, completion_mask)
    head = _resolve_head(_causal_lm(model))
    _verify_against_forward(model, head, input_ids)
    # hidden[:, t - 1] predicts input_ids[:, t]; keep only the rows predicting a completion token.
    select = completion_mask[:, 1:].bool()
    rows, cols = select.nonzero(as_tuple=True)
    return _score(
        model,
        head,
        {"input_ids": input_ids, "attention_mask": attention_mask},
        lambda hidden: hidden[:, :-1][select],
        input_ids[:, 1:][select],
        rows,
        cols + 1,
        tuple(input_ids.shape),
        chunk_size=chunk_size,
        memory_mb=memory_mb,
        per_token=per_token,
        logsumsq=logsumsq,
        entropy=entropy,
        hidden_hook=hidden_hook,
        keep_head_inputs=keep_head_inputs,
        kl_to=kl_to,
    )


def _score(
    model: nn.Module,
    head: _Head,
    inputs: dict[str, Any],
    pick: Callable[[Tensor], Tensor],
    targets: Tensor,
    rows: Tensor,
    cols: Tensor,
    shape: tuple[int, int],
    *,
    chunk_size: int | str,
    memory_mb: float,
    per_token: bool,
    logsumsq: bool,
    entropy: bool = False,
    hidden_hook: Callable[[Tensor], None] | None = None,
    keep_head_inputs: bool = False,
    kl_to: LogpOutput | None = None,
) -> LogpOutput:
    """Run ``model`` on ``inputs`` and score ``targets`` ``[M]`` from the hidden states ``pick(hidden)``
    ``[M, H]`` that predict them; token ``m`` is position ``(rows[m], cols[m])`` of the ``shape = (N, T)``
    layout the output is given in."""
    found: dict[str, Tensor] = {}
    # The slope at 0 of what the forward does to the head's output: scale, times 1 for a soft-cap.
    slope = head.scale

    def on_hidden(hidden: Tensor) -> Tensor:
        if hidden_hook is not None:
            hidden_hook(hidden)
        picked = pick(hidden)
        if keep_head_inputs:
            found["head_inputs"] = picked.detach()
        if kl_to is not None:
            found["kl"] = chunked_token_kl(
                picked,
                head.module.weight,
                kl_to.head_inputs,
                kl_to.head,
                head.module.bias,
                chunk_size=chunk_size,
                memory_mb=memory_mb,
                logit_scale=head.scale,
                softcap=head.softcap,
            )
        result = chunked_token_logps(
            picked,
            head.module.weight,
            targets,
            head.module.bias,
            chunk_size=chunk_size,
            memory_mb=memory_mb,
            logit_scale=head.scale,
            softcap=head.softcap,
            return_logsumsq=logsumsq,
            return_entropy=entropy,
        )
        logp, *extras = result if (logsumsq or entropy) else (result,)
        found["lss"] = extras.pop(0) if logsumsq else None
        found["ent"] = extras.pop(0) if entropy else None
        found["logp"] = logp.detach()
        # Zeros carrying logp's gradient: the forward's transform T maps them to T(0) = 0 with slope T'(0).
        # (The division comes after the reshape so that the output is no view: FSDP2 warns about views.)
        return (logp - found["logp"])[None, :, None] / slope

    carrier = _through_forward(model, head, inputs, on_hidden)
    if carrier.numel() != targets.numel():
        raise NotImplementedError(
            f"{type(model).__name__}'s forward changed the shape of its LM head's output "
            f"({targets.numel()} values in, {tuple(carrier.shape)} out)"
        )
    logp = carrier.reshape(-1).to(found["logp"].dtype) + found["logp"]
    n, t = shape
    # Accumulate the per-row sums in float64 (M numbers, negligible cost): sums of hundreds of
    # float32 log-probs would otherwise carry a few ulps of summation-order error.
    total = logp.new_zeros(n, dtype=torch.float64).index_add(0, rows, logp.double()).to(logp.dtype)
    n_tokens = torch.bincount(rows, minlength=n).to(logp.dtype)
    out = LogpOutput(sum=total, n_tokens=n_tokens)
    if per_token:
        out.per_token = logp.new_zeros(n, t).index_put((rows, cols), logp)
    if logsumsq:
        out.logsumsq = found["lss"].new_zeros(n, t).index_put((rows, cols), found["lss"]).detach()
    if entropy:
        out.entropy = found["ent"].new_zeros(n, t).index_put((rows, cols), found["ent"]).detach()
    if kl_to is not None:
        out.kl = found["kl"].new_zeros(n, t).index_put((rows, cols), found["kl"])
    if keep_head_inputs:
        out.head_inputs, out.head = found["head_inputs"], head
    return out


# --------------------------------------------------------------------------------------------
# Packed rows: prefix sharing (one pass over each prompt) and padding-free packing
# --------------------------------------------------------------------------------------------

# Attention implementations that apply a custom 4-D additive mask exactly as given.
_MASKED_ATTENTION = ("eager", "sdpa")
_OPTIONS = "share_prompt / packing"


def _is_flash(impl: Any) -> bool:
    """A flash-attention implementation (transformers' own test: ``"flash"`` in the name). Given no
    attention mask, it reads the boundaries of packed sequences from ``position_ids`` (varlen)."""
    return isinstance(impl, str) and "flash" in impl


def _units(segment_ids: Tensor) -> Tensor:
    """``[B, L]``: the unit of each position, numbered ``0..U-1`` over the batch in row-major order;
    -1 on padding. A unit is a run of prompt tokens (segment 0) and the completion tokens after it."""
    before = torch.nn.functional.pad(segment_ids[:, :-1], (1, 0), value=-1)
    starts = (segment_ids == 0) & (before != 0)
    units = starts.flatten().cumsum(0).view_as(segment_ids) - 1
    return torch.where(segment_ids >= 0, units, -1)


def shared_prefix_mask(segment_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[B, 1, L, L]`` attention mask of packed rows of units ``[prompt][completion 1]...``.

    A row holds one unit (prefix sharing) or several (packing); a unit starts at each run of prompt
    tokens (segment 0). Position ``q`` sees position ``k <= q`` of its own unit when ``k`` is a
    prompt token or in ``q``'s own segment, so each completion attends to its unit's one prompt
    copy and to itself, causally, and never to another completion or another unit. A padding
    position (segment -1) sees only itself, so no softmax row is empty (an empty one would give NaN
    and poison the gradients). With ``dtype=torch.bool``: True where visible (what transformers
    gives sdpa); with a float dtype: additive, 0 where visible and ``finfo(dtype).min`` elsewhere
    (what transformers gives eager attention).
    """
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    units = _units(segment_ids)
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    causal = idx[:, None] >= idx[None, :]
    same_unit = units[:, :, None] == units[:, None, :]
    visible = causal & same_unit & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    visible |= (q < 0) & (idx[:, None] == idx[None, :])
    if dtype == torch.bool:
        return visible[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def _segment_starts(segment_ids: Tensor) -> Tensor:
    """``[B, L]``: the index where each position's segment (a prompt, or one completion) begins."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.where(change, idx, 0).cummax(1).values


def _last_prompt_token(segment_ids: Tensor) -> Tensor:
    """``[B, L]``: for each position, the index of the last prompt token at or before it (its unit's
    last prompt token, on a completion); -1 before the row's first prompt token."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    return torch.where(segment_ids == 0, idx, -1).cummax(1).values


def _expected_positions(segment_ids: Tensor) -> Tensor:
    """``[B, L]``: ``0..P-1`` over each unit's prompt and ``P..P+C-1`` over each of its completions."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    in_segment = idx - _segment_starts(segment_ids)
    prompt_length = in_segment.gather(1, _last_prompt_token(segment_ids).clamp(min=0)) + 1
    return torch.where(segment_ids > 0, prompt_length + in_segment, in_segment)


def _check_shared_inputs(
    input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor, completion_rows: Tensor, completion_mask: Tensor
) -> None:
    """Packed rows as `prefkit.data.collators.pack_shared_rows` lays them out."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
    for name, t in (("position_ids", position_ids), ("segment_ids", segment_ids)):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    k = completion_rows.shape[1] if completion_rows.dim() == 2 else 0
    if segment_ids.numel() and (int(segment_ids.min()) < -1 or int(segment_ids.max()) > k):
        raise ValueError(f"segment_ids must lie in [-1, K = {k}]")
    real = segment_ids >= 0
    idx = torch.arange(input_ids.shape[1], device=segment_ids.device)
    if not torch.equal(real, idx < real.sum(1, keepdim=True)):
        raise ValueError("padding (segment -1) must come after every real token of its row")
    if input_ids.shape[1] and bool((segment_ids[:, 0] > 0).any()):
        raise ValueError("each packed row must start with a prompt (segment 0): a completion has no context there")
    units = _units(segment_ids)
    same_unit = (units[:, 1:] == units[:, :-1]) & real[:, 1:]
    if bool((segment_ids[:, 1:] < segment_ids[:, :-1])[same_unit].any()):
        raise ValueError("each unit must be its prompt (segment 0), then its completions in increasing segment order")
    n_units = int(units.max()) + 1 if segment_ids.numel() else 0
    if not bool(torch.bincount(units[segment_ids > 0], minlength=n_units).all()):
        raise ValueError("every unit (a run of prompt tokens and what follows) must have a completion token")
    if completion_rows.dim() != 2 or completion_rows.shape[0] != n_units:
        raise ValueError(
            f"completion_rows must be [U, K] with one row per unit (U = {n_units}), got {tuple(completion_rows.shape)}"
        )
    if completion_mask.dim() != 2 or completion_mask.shape[0] != completion_rows.numel():
        raise ValueError(
            f"completion_mask must be [U*K, T] with U*K = {completion_rows.numel()}, got {tuple(completion_mask.shape)}"
        )
    if not torch.equal(position_ids[real], _expected_positions(segment_ids)[real]):
        raise ValueError(
            "position_ids must count 0.. over each unit's prompt and restart at the prompt's length on every completion"
        )
    if int((segment_ids > 0).sum()) != int(completion_mask.sum()):
        raise ValueError(
            f"segment_ids mark {int((segment_ids > 0).sum())} completion tokens, completion_mask "
            f"{int(completion_mask.sum())}"
        )


def _mask_dtype(lm: nn.Module) -> torch.dtype:
    """Boolean for sdpa (a quarter of a float32 mask's memory), the model's float dtype for eager."""
    if lm.config._attn_implementation == "sdpa":
        return torch.bool
    return lm.get_input_embeddings().weight.dtype


def _check_shared_model(lm: nn.Module, position_ids: Tensor, segment_ids: Tensor, k: int) -> None:
    """Raise unless ``lm`` takes ``position_ids`` and attention that can express the packed rows:
    a custom 4-D mask, or (units of one completion each) flash-attention's varlen from position_ids."""
    config = lm.config
    impl = getattr(config, "_attn_implementation", None)
    if _is_flash(impl) and k > 1:
        raise NotImplementedError(
            f"share_prompt needs attention that takes a custom 4-D mask ({' or '.join(_MASKED_ATTENTION)}); the "
            f"model uses {impl!r}, which reads packed sequences from position_ids alone and cannot let two "
            "completions share one prompt. Set share_prompt to false (packing alone works with flash-attention), "
            "or load the model with attn_implementation='sdpa'."
        )
    if impl not in _MASKED_ATTENTION and not _is_flash(impl):
        raise NotImplementedError(
            f"{_OPTIONS} need attention that takes a custom 4-D mask ({' or '.join(_MASKED_ATTENTION)}), or for "
            f"packing without share_prompt flash-attention; the model uses {impl!r}. Set share_prompt and packing "
            "to false, or load the model with attn_implementation='sdpa'."
        )
    if "position_ids" not in inspect.signature(lm.forward).parameters:
        raise NotImplementedError(
            f"{_OPTIONS} need position_ids, which {type(lm).__name__}.forward does not take; set share_prompt and "
            "packing to false"
        )
    window = getattr(config, "sliding_window", None)
    longest = int(position_ids[segment_ids >= 0].max()) + 1 if bool((segment_ids >= 0).any()) else 0
    if isinstance(window, int) and longest > window:
        raise NotImplementedError(
            f"{_OPTIONS}: a prompt + completion of {longest} tokens exceeds the model's sliding window "
            f"({window}), which the packed mask does not reproduce; set share_prompt and packing to false"
        )


def _packed_inputs(lm: nn.Module, input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor) -> dict[str, Tensor]:
    """The forward's inputs for packed rows: the block mask for eager / sdpa; for flash-attention
    only ``position_ids`` (transformers starts a new sequence wherever they restart at 0)."""
    if _is_flash(lm.config._attn_implementation):
        return {"input_ids": input_ids, "position_ids": position_ids}
    return {
        "input_ids": input_ids,
        "attention_mask": shared_prefix_mask(segment_ids, _mask_dtype(lm)),
        "position_ids": position_ids,
    }


def _one_row(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The packed rows' real tokens (segment >= 0, the last tensor) concatenated into one row ``[1, n]``:
    flash-attention's varlen path reads sequence boundaries from ``position_ids`` in one row only."""
    real = tensors[-1] >= 0
    return tuple(t[real][None] for t in tensors)


def _probe_logits(model: nn.Module, head: _Head, inputs: dict[str, Tensor], positions: Tensor) -> Tensor:
    """The engine's final logits ``[P, V]`` at ``positions`` of the one row of ``inputs``."""
    found = []

    def on_hidden(hidden: Tensor) -> Tensor:
        found.append(_head_logits(head, hidden[0, positions]))
        return hidden[..., :1]

    _through_forward(model, head, inputs, on_hidden)
    return found[0]


def _verify_packing(
    model: nn.Module, head: _Head, lm: nn.Module, input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor, k: int
) -> None:
    """Once per model (and head), compare packed rows with unpacked ones on the batch's first row.

    Runs the first packed row, as the engine does, and each of the ``k`` prompt + completion rows
    of its **last** unit alone (eval mode, no gradients; the same number of forwards whatever the
    data, as every process of a distributed run must), and compares the next-token distributions at
    the first 16 tokens of each of those completions. The last unit comes after every other unit
    of its row, so a mask that lets units or completions see each other, or position_ids that do
    not restart, show up there. Raises ``NotImplementedError`` if they differ by more than
    numerical noise (a model that ignores ``position_ids`` or the 4-D mask, or changes attention in
    another way).
    """
    first = _first_check(model, head, "packed rows")
    real = segment_ids[0] >= 0
    if first is None or not bool(real.any()):
        return
    ids, pos, seg = input_ids[0, real][None], position_ids[0, real][None], segment_ids[0, real][None]
    unit = _units(seg)[0]
    last = unit == unit.max()
    n_prompt = int((last & (seg[0] == 0)).sum())
    spans = [(last & (seg[0] == j)).nonzero()[:_PROBE_TOKENS, 0] for j in range(1, k + 1)]
    tv = 0.0
    with _eval_no_grad(model):
        packed_inputs = _packed_inputs(lm, ids, pos, seg)
        packed = _probe_logits(model, head, packed_inputs, torch.cat(spans)).split([len(s) for s in spans])
        for j, shared in enumerate(packed, start=1):
            row = ids[:, last & ((seg[0] == 0) | (seg[0] == j))]
            at = torch.arange(n_prompt, n_prompt + len(shared), device=ids.device)
            alone = _probe_logits(model, head, {"input_ids": row, "attention_mask": torch.ones_like(row)}, at)
            if len(shared):
                tv = max(tv, _max_tv(alone, shared))
    tol = _PROBE_TOL.get(head.module.weight.dtype, _PROBE_TOL_LOW_PRECISION)
    if not tv <= tol:
        raise NotImplementedError(
            f"{_OPTIONS}: {type(model).__name__} gives different next-token distributions for a completion in a "
            "packed row and for the plain prompt + completion row (total-variation distance "
            f"{tv:.3g} > {tol:g}); the model does not apply position_ids or the attention mask as the packing "
            "needs. Set share_prompt and packing to false."
        )
    first[0].add(first[1])


def shared_prefix_logps(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    segment_ids: Tensor,
    completion_rows: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int | str = "auto",
    memory_mb: float = DEFAULT_MEMORY_MB,
    per_token: bool = False,
    logsumsq: bool = False,
    entropy: bool = False,
) -> LogpOutput:
    """`completion_logps` of ``N = U * K`` prompt + completion rows, from packed rows of ``U`` units.

    A unit is one prompt and ``K`` completions, ``[prompt][completion 1]...[completion K]``; a
    packed row holds one unit (prefix sharing: each prompt runs once for all its completions) or
    several (padding-free packing: ``[prompt + chosen][prompt + rejected][...]`` with ``K = 1``, or
    shared units ``[prompt][chosen][rejected]`` one after another), laid out by
    `prefkit.data.collators.pack_shared_rows`. ``position_ids`` restart at 0 on every unit's prompt
    and at the prompt's length on every completion, and a block attention mask
    (`shared_prefix_mask`) lets each completion see its unit's prompt and itself, causally, but no
    other completion or unit, so every completion token gets the hidden state it would get in its
    own row. The model runs once over the ``[B, L]`` packed rows (through its own forward, as in
    `completion_logps`); a completion's first token is predicted from the hidden state of its
    prompt's last token, which all ``K`` completions share (gathered once per completion, so its
    gradient sums them); every other token from the token before it.

    With flash-attention (``"flash"`` in the model's attention implementation) and ``K = 1`` no mask
    is passed: the real tokens of all rows are concatenated into one row and transformers' varlen
    path reads the units' boundaries from ``position_ids`` (every unit is one causal sequence
    restarting at 0). ``K > 1`` needs the mask and is refused there.

    Args:
        model: a transformers causal LM with eager or sdpa attention (flash-attention for ``K = 1``),
            maybe wrapped (see `completion_logps`).
        input_ids, position_ids: ``[B, L]`` packed rows, right-padded.
        segment_ids: ``[B, L]``: 0 on each unit's prompt, ``k`` on its completion ``k`` (1-based), -1 on
            padding. A unit starts at each run of 0s, so every unit needs a completion token.
        completion_rows: ``[U, K]``: the output row of completion ``k`` of unit ``u`` (``k + 1`` in
            ``segment_ids``), units numbered in order of appearance, row by row.
        completion_mask: ``[N, T]``: the completion mask of the unpacked rows (completion ``k`` of unit
            ``u`` is 1 in row ``completion_rows[u, k]`` at columns ``P_u .. P_u + C_uk - 1``).
        chunk_size, memory_mb, per_token, logsumsq, entropy: as in `completion_logps`.

    Returns:
        The `LogpOutput` `completion_logps` gives for the unpacked ``[N, T]`` rows: ``sum`` and
        ``n_tokens`` ``[N]``, ``per_token`` / ``logsumsq`` / ``entropy`` ``[N, T]`` in the layout of
        ``completion_mask``.

    Raises ``NotImplementedError`` (naming ``share_prompt`` / ``packing``) for an attention
    implementation that cannot express the packed rows, a model whose forward takes no
    ``position_ids``, a prompt + completion longer than a sliding window, or a model whose packed rows
    disagree with unpacked ones on the first call's probe (as `completion_logps` checks its forward).
    """
    _check_shared_inputs(input_ids, position_ids, segment_ids, completion_rows, completion_mask)
    lm = _causal_lm(model)
    head = _resolve_head(lm)
    k = completion_rows.shape[1]
    _check_shared_model(lm, position_ids, segment_ids, k)
    if _is_flash(lm.config._attn_implementation):
        input_ids, position_ids, segment_ids = _one_row(input_ids, position_ids, segment_ids)
    _verify_against_forward(model, head, input_ids)
    _verify_packing(model, head, lm, input_ids, position_ids, segment_ids, k)

    b_idx, t_idx = (segment_ids > 0).nonzero(as_tuple=True)
    seg = segment_ids[b_idx, t_idx]
    # The predictor of a completion token: the token before it, or its prompt's last token for the first.
    first = t_idx == _segment_starts(segment_ids)[b_idx, t_idx]
    source = torch.where(first, _last_prompt_token(segment_ids)[b_idx, t_idx], t_idx - 1)
    rows, cols = completion_rows[_units(segment_ids)[b_idx, t_idx], seg - 1], position_ids[b_idx, t_idx]
    width = completion_mask.shape[1]
    if bool((cols >= width).any()) or not bool(completion_mask[rows, cols.clamp(max=width - 1)].all()):
        raise ValueError("completion_mask does not mark the completion tokens of segment_ids at their positions")
    return _score(
        model,
        head,
        _packed_inputs(lm, input_ids, position_ids, segment_ids),
        lambda hidden: hidden[b_idx, source],
        input_ids[b_idx, t_idx],
        rows,
        cols,
        tuple(completion_mask.shape),
        chunk_size=chunk_size,
        memory_mb=memory_mb,
        per_token=per_token,
        logsumsq=logsumsq,
        entropy=entropy,
    )
