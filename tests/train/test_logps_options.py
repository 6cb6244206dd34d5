"""The log-prob engine's options: chunking by a memory budget, bf16 autocast, gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_logps import make_batch
from test_prefix_sharing import both_layouts, random_examples, tiny

from prefkit.models.tiny import build_tiny_llama
from prefkit.train import logps as logps_module
from prefkit.train.config import ConfigError, PreferenceConfig, parse_config
from prefkit.train.logps import auto_chunk_size, chunked_token_logps, completion_logps, shared_prefix_logps

# ------------------------------------------------------------------------- rows per chunk from a budget


def test_auto_chunk_size_follows_the_formula():
    # rows = clamp(floor(memory_mb * 2^20 / (V * bytes * 4)), 1, 128)
    assert auto_chunk_size(32000) == 128  # 268435456 / (32000 * 4 * 4) = 524.3, capped at 128
    assert auto_chunk_size(151936) == 110  # 268435456 / 2430976 = 110.4
    assert auto_chunk_size(256000) == 65  # 268435456 / 4096000 = 65.5
    assert auto_chunk_size(32000, memory_mb=16) == 32  # 16777216 / 512000 = 32.8
    assert auto_chunk_size(1000, torch.float64, memory_mb=1) == 32  # 1048576 / (1000 * 8 * 4) = 32.8
    assert auto_chunk_size(1000, torch.bfloat16, memory_mb=1) == 65  # softmax in float32: 1048576 / 16000
    assert auto_chunk_size(10**9, memory_mb=1) == 1  # never below one row
    for bad in (0, -5, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="memory_mb"):
            auto_chunk_size(1000, memory_mb=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 2]), chunk_size="big")


def test_auto_chunks_have_the_budgeted_rows(tiny_model, tokenizer, monkeypatch):
    ids, am, cm = make_batch(tokenizer)
    vocab, m = len(tokenizer), int(cm[:, 1:].sum())
    memory_mb = 3 * vocab * 4 * 4 / 2**20  # exactly 3 rows of [rows, V] float32, four copies
    assert auto_chunk_size(vocab, memory_mb=memory_mb) == 3
    seen = []
    real = logps_module._chunk_logits

    def spy(h, *args):
        seen.append(h.shape[0])
        return real(h, *args)

    completion_logps(tiny_model, ids, am, cm)  # the one-time probe runs outside the spy
    monkeypatch.setattr(logps_module, "_chunk_logits", spy)
    out = completion_logps(tiny_model, ids, am, cm, memory_mb=memory_mb)
    assert seen == [3] * (m // 3) + ([m % 3] if m % 3 else [])  # forward only: no backward was run
    seen.clear()
    out.sum.sum().backward()
    assert seen == [3] * (m // 3) + ([m % 3] if m % 3 else [])  # the backward recomputes the same chunks


def test_results_do_not_depend_on_the_chunking(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    vocab = len(tokenizer)
    outs, grads = [], []
    for kwargs in ({"chunk_size": 1}, {"chunk_size": 7}, {"memory_mb": 2 * vocab * 16 / 2**20}, {}):
        tiny_model.zero_grad()
        out = completion_logps(tiny_model, ids, am, cm, per_token=True, logsumsq=True, **kwargs)
        out.sum.sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in tiny_model.parameters()])
    for out, g in zip(outs[1:], grads[1:]):
        assert (out.per_token - outs[0].per_token).abs().max().item() < 1e-6
        assert (out.logsumsq - outs[0].logsumsq).abs().max().item() < 1e-6
        assert max((a - b).abs().max().item() for a, b in zip(g, grads[0])) < 1e-5  # summation order


def test_config_chunking_keys(tmp_path):
    args = PreferenceConfig(output_dir=str(tmp_path))
    assert args.logps_chunk_size == "auto" and args.logps_memory_mb == 256
    run = parse_config({"output_dir": str(tmp_path)}, ["logps_chunk_size=512", "logps_memory_mb=64"])
    assert run.train.logps_chunk_size == 512 and run.train.logps_memory_mb == 64
    assert PreferenceConfig(output_dir=str(tmp_path), logps_chunk_size="128").logps_chunk_size == 128
    for key, bad in (("logps_chunk_size", "big"), ("logps_chunk_size", 0), ("logps_memory_mb", 0)):
        with pytest.raises(ConfigError, match=key):
            PreferenceConfig(output_dir=str(tmp_path), **{key: bad})


# ------------------------------------------------------------------------- bf16 autocast


def test_autocast_bf16_matmul_with_a_float32_log_softmax():
    g = torch.Generator().manual_seed(3)
    m, h, v = 9, 16, 37
    hidden = torch.randn(m, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (m,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = chunked_token_logps(hidden, weight, targets, chunk_size=4)
        linear = F.linear(hidden, weight)
    assert linear.dtype == torch.bfloat16 and logp.dtype == torch.float32
    # The bf16 logits nn.Linear gives under autocast, then a float64 log-softmax: a bf16 (or even
    # float32-after-bf16) softmax would be ~1e-2 off; ours is float32, within a few float32 ulps.
    exact = linear.double().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert (logp.double() - exact).abs().max().item() < 1e-5
    logp.sum().backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    F.linear(h64, w64).log_softmax(-1).gather(1, targets[:, None]).sum().backward()
    assert torch.allclose(hidden.grad.double(), h64.grad, atol=5e-2, rtol=2e-2)
    assert torch.allclose(weight.grad.double(), w64.grad, atol=5e-2, rtol=2e-2)


def test_dpo_step_in_bf16_is_close_to_float32(tokenizer, pref_args, make_pairs, tmp_path):
    from prefkit.train.trainer import PreferenceTrainer

    def first_step(bf16: bool) -> dict[str, float]:
        policy = build_tiny_llama(vocab_size=len(tokenizer), seed=0)
        ref = build_tiny_llama(vocab_size=len(tokenizer), seed=1)  # a different reference: loss != log 2
        args = pref_args(output_dir=str(tmp_path / f"bf16-{bf16}"), max_steps=1, bf16=bf16)
        trainer = PreferenceTrainer(
            policy, args, train_dataset=make_pairs(4), processing_class=tokenizer, ref_model=ref
        )
        trainer.train()
        (entry,) = [e for e in trainer.state.log_history if "loss" in e]
        return entry

    full, half = first_step(False), first_step(True)
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert math.isfinite(half[key])
        assert half[key] == pytest.approx(full[key], rel=2e-2), key
    assert half["logps/chosen"] != full["logps/chosen"]  # bf16 autocast was on


# ------------------------------------------------------------------------- gradient checkpointing


def _grads(model, fn):
    model.zero_grad()
    fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shared", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, shared):
    if shared:
        _, packed = both_layouts(*random_examples(3, 2, seed=4))
        args = [packed[k] for k in ("input_ids", "position_ids", "segment_ids", "completion_rows", "completion_mask")]
        model = tiny("llama", "sdpa")

        def objective(m):
            out = shared_prefix_logps(m, *args, chunk_size=4, per_token=True)
            return out.sum.sum() + 0.5 * out.per_token.sum()
    else:
        ids, am, cm = make_batch(tokenizer)
        model = build_tiny_llama(vocab_size=len(tokenizer), seed=0)

        def objective(m):
            return (torch.tensor([0.3, -1.2, 0.7, 2.0]) * completion_logps(m, ids, am, cm, chunk_size=4).sum).sum()

    model.train()
    plain = _grads(model, objective)
    model.activation_checkpointing_enable()  # transformers 5's name for gradient checkpointing
    assert model.is_activation_checkpointing
    checkpointed = _grads(model, objective)
    assert all(g.abs().sum() > 0 for g in plain.values())
    assert max((checkpointed[n] - g).abs().max().item() for n, g in plain.items()) < 1e-5


@pytest.mark.parametrize("share_prompt", [False, True])
def test_trainer_with_gradient_checkpointing_makes_the_same_update(
    tokenizer, pref_args, make_pairs, tmp_path, share_prompt
):
    """One SGD step with learning rate 1: the parameter change is minus the gradient itself."""
    from prefkit.train.trainer import PreferenceTrainer

    def step(checkpointing: bool):
        policy = build_tiny_llama(vocab_size=len(tokenizer), seed=0, attn_implementation="sdpa")
        ref = build_tiny_llama(vocab_size=len(tokenizer), seed=1, attn_implementation="sdpa")
        start = {n: p.detach().clone() for n, p in policy.named_parameters()}
        args = pref_args(
            output_dir=str(tmp_path / f"gc-{checkpointing}-{share_prompt}"),
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            activation_checkpointing=checkpointing,  # the YAML key gradient_checkpointing is its deprecated alias
            share_prompt=share_prompt,
        )
        trainer = PreferenceTrainer(
            policy, args, train_dataset=make_pairs(4), processing_class=tokenizer, ref_model=ref
        )
        trainer.train()
        assert policy.is_activation_checkpointing == checkpointing
        return {n: p.detach() - start[n] for n, p in policy.named_parameters()}

    plain, checkpointed = step(False), step(True)
    assert plain["lm_head.weight"].abs().sum() > 0
    assert max((checkpointed[n] - d).abs().max().item() for n, d in plain.items()) < 1e-5
