"""The log-prob engine (`prefkit.train.logps`) against the naive full-logits computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from prefkit.models.tiny import build_tiny_llama
from prefkit.train.logps import LogpOutput, chunked_token_logps, completion_logps

TOL = 1e-5
# Completions of at most 10 tokens keep every summed log-prob below 64 in magnitude, where float32
# still resolves 4e-6 (at 256 one ulp is already 3e-5, more than TOL).
PROMPTS = ["Hi", "What is 2+2?", "Name a colour", "Q"]
COMPLETIONS = ["Hello!", "4", "Dark blue", "Yes"]


def make_batch(tokenizer, prompts=PROMPTS, completions=COMPLETIONS):
    """Right-padded prompt+completion rows of varied lengths, as the collators lay them out."""
    rows = []
    for p, c in zip(prompts, completions):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p_ids, c_ids))
    t = max(len(p) + len(c) for p, c in rows)
    n = len(rows)
    input_ids = torch.full((n, t), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(n, t, dtype=torch.long)
    completion_mask = torch.zeros(n, t, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    return input_ids, attention_mask, completion_mask


def naive(model, input_ids, attention_mask, completion_mask):
    """Reference: full logits, log_softmax, gather. Returns (sum [N], per_token [N, T], logsumsq [N, T]).

    The per-row sum is accumulated in float64, as the engine does, so that the reference itself
    carries no float32 summation-order error.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logp = logits.log_softmax(-1)
    mask = completion_mask[:, 1:].float()
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * mask
    lss = torch.logsumexp(2 * logp, dim=-1) * mask
    return tok.double().sum(1).float(), F.pad(tok, (1, 0)), F.pad(lss, (1, 0)).detach()


def grads(scalar, params):
    return torch.autograd.grad(scalar, params, allow_unused=True)


def max_grad_err(g1, g2):
    err = 0.0
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            err = max(err, (a - b).abs().max().item())
    return err


# ------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_size", [5, 7])
def test_values_and_gradients_match_naive(tokenizer, tied, chunk_size):
    model = build_tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=tied, seed=0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, am, cm = make_batch(tokenizer)
    n_rows = int(cm[:, 1:].sum())
    assert n_rows > chunk_size and n_rows % chunk_size != 0  # several chunks, ragged last one

    out = completion_logps(model, ids, am, cm, chunk_size=chunk_size, per_token=True)
    ref_sum, ref_tok, _ = naive(model, ids, am, cm)
    assert isinstance(out, LogpOutput) and out.logsumsq is None
    assert out.sum.dtype == torch.float32 and out.sum.shape == (4,)
    assert (out.sum - ref_sum).abs().max().item() < TOL
    assert (out.per_token - ref_tok).abs().max().item() < TOL
    assert torch.equal(out.n_tokens, cm.sum(1).float())

    params = list(model.parameters())
    assert any(p is model.lm_head.weight for p in params)
    w = torch.tensor([0.3, -1.2, 0.7, 2.0])
    g_engine = grads((w * out.sum).sum(), params)
    g_naive = grads((w * ref_sum).sum(), params)
    assert all(g is not None and g.abs().sum() > 0 for g in g_engine)  # every parameter gets a gradient
    assert max_grad_err(g_engine, g_naive) < TOL


def test_per_token_gradients_match_naive(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    out = completion_logps(tiny_model, ids, am, cm, chunk_size=3, per_token=True)
    _, ref_tok, _ = naive(tiny_model, ids, am, cm)
    w = torch.randn(ids.shape)
    params = list(tiny_model.parameters())
    assert max_grad_err(grads((w * out.per_token).sum(), params), grads((w * ref_tok).sum(), params)) < TOL


def test_per_token_layout(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    out = completion_logps(tiny_model, ids, am, cm, chunk_size=4, per_token=True)
    assert out.per_token.shape == ids.shape
    # Non-zero (strictly negative log-probs) exactly on completion tokens, zero elsewhere.
    assert torch.equal(out.per_token < 0, cm.bool())
    assert torch.equal(out.per_token[cm == 0], torch.zeros(int((cm == 0).sum())))
    assert torch.allclose(out.per_token.sum(1), out.sum, atol=TOL)
    # Position t holds log p(ids[t] | ids[:t]): check one entry by hand from the logits at t - 1.
    i, t = 2, int(cm[2].nonzero()[3])
    logits = tiny_model(input_ids=ids[i : i + 1, :t], attention_mask=am[i : i + 1, :t]).logits[0, -1]
    assert abs(out.per_token[i, t].item() - logits.log_softmax(-1)[ids[i, t]].item()) < TOL


def test_logsumsq_matches_naive_and_is_detached(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    out = completion_logps(tiny_model, ids, am, cm, chunk_size=6, logsumsq=True)
    _, _, ref_lss = naive(tiny_model, ids, am, cm)
    assert out.per_token is None and out.logsumsq.shape == ids.shape
    assert not out.logsumsq.requires_grad
    assert (out.logsumsq - ref_lss).abs().max().item() < TOL
    assert torch.equal(out.logsumsq != 0, cm.bool())
    # log sum p^2 <= log max p <= 0, and >= -log V (uniform).
    vals = out.logsumsq[cm.bool()]
    assert (vals < 0).all() and (vals >= -torch.log(torch.tensor(float(len(tokenizer)))) - TOL).all()


def test_chunk_size_does_not_change_results(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    outs = [completion_logps(tiny_model, ids, am, cm, chunk_size=c, per_token=True).per_token for c in (1, 3, 4096)]
    assert (outs[0] - outs[2]).abs().max().item() < TOL
    assert (outs[1] - outs[2]).abs().max().item() < TOL


def test_row_without_completion_tokens(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    cm[1] = 0
    out = completion_logps(tiny_model, ids, am, cm, chunk_size=4, per_token=True)
    assert out.sum[1].item() == 0.0 and out.n_tokens[1].item() == 0.0
    assert (out.per_token[1] == 0).all()
    ref_sum, _, _ = naive(tiny_model, ids, am, cm)
    assert (out.sum - ref_sum).abs().max().item() < TOL
    out.sum.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters())


def test_batch_without_any_completion_tokens(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    out = completion_logps(tiny_model, ids, am, torch.zeros_like(cm), per_token=True, logsumsq=True)
    assert torch.equal(out.sum, torch.zeros(4)) and torch.equal(out.n_tokens, torch.zeros(4))
    assert (out.per_token == 0).all() and (out.logsumsq == 0).all()
    out.sum.sum().backward()
    assert tiny_model.lm_head.weight.grad is not None and (tiny_model.lm_head.weight.grad == 0).all()


def test_no_grad_call_and_training_flags_restored(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    tiny_model.train()
    with torch.no_grad():
        out = completion_logps(tiny_model, ids, am, cm)
    assert not out.sum.requires_grad
    assert all(m.training for m in tiny_model.modules())  # the one-time probe ran in eval mode
    ref_sum, _, _ = naive(tiny_model, ids, am, cm)
    assert (out.sum - ref_sum).abs().max().item() < TOL


# ------------------------------------------------------------------------- never the full logits


class _WatchVocabTensors(TorchDispatchMode):
    """Records the shape of every newly allocated op output with a vocabulary-sized dimension.

    Outputs that share storage with an input (views such as ``weight.t()``, in-place ops) allocate
    nothing and are skipped.
    """

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and self.vocab_size in t.shape
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.shapes.append(tuple(t.shape))
        return out


def test_full_logits_are_never_built(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    vocab, chunk = len(tokenizer), 4
    completion_logps(tiny_model, ids, am, cm)  # first call: the one-time probe runs the full forward once

    calls = []
    handle = tiny_model.lm_head.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    watch = _WatchVocabTensors(vocab)
    try:
        with watch:
            out = completion_logps(tiny_model, ids, am, cm, chunk_size=chunk, per_token=True, logsumsq=True)
            out.sum.sum().backward()
    finally:
        handle.remove()
    # The LM head runs once, replaced: it returns [1, M, 1] gradient carriers, not logits.
    assert calls == [(1, int(cm[:, 1:].sum()), 1)]
    assert watch.shapes, "the watcher saw no vocabulary-sized tensors at all"
    # Only chunk-sized [rows, V] blocks and the [V, H] weight gradient: never [N, T, V] nor [M, V].
    hidden_size = tiny_model.config.hidden_size
    assert all(s in ((vocab, hidden_size), (vocab,)) or (len(s) == 2 and s[0] <= chunk) for s in watch.shapes)

    # The watcher does catch the naive computation.
    watch = _WatchVocabTensors(vocab)
    with watch:
        naive(tiny_model, ids, am, cm)
    assert (ids.shape[0], ids.shape[1] - 1, vocab) in watch.shapes


# ------------------------------------------------------------------------- chunked_token_logps itself


def _naive_chunked(hidden, weight, targets, bias, scale, softcap):
    z = (hidden @ weight.t() + (0 if bias is None else bias)) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = z.log_softmax(-1)
    return logp.gather(1, targets[:, None]).squeeze(1), torch.logsumexp(2 * logp, -1)


@pytest.mark.parametrize(("scale", "softcap"), [(1.0, None), (2.5, None), (1.0, 0.7), (0.5, 1.3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_token_logps_gradcheck_float64(scale, softcap, with_bias):
    g = torch.Generator().manual_seed(1)
    m, h, v = 7, 5, 11
    hidden = torch.randn(m, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (m,), generator=g)

    logp, lss = chunked_token_logps(
        hidden, weight, targets, bias, chunk_size=3, logit_scale=scale, softcap=softcap, return_logsumsq=True
    )
    ref, ref_lss = _naive_chunked(hidden, weight, targets, bias, scale, softcap)
    assert logp.dtype == torch.float64
    assert (logp - ref).abs().max().item() < 1e-12
    assert (lss - ref_lss).abs().max().item() < 1e-12 and not lss.requires_grad

    inputs = (hidden, weight) + ((bias,) if with_bias else ())

    def fn(*xs):
        b = xs[2] if with_bias else None
        return chunked_token_logps(xs[0], xs[1], targets, b, chunk_size=3, logit_scale=scale, softcap=softcap)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


def test_chunked_token_logps_low_precision_computes_softmax_in_float32():
    g = torch.Generator().manual_seed(2)
    m, h, v = 9, 16, 37
    hidden = torch.randn(m, h, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(v, h, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (m,), generator=g)
    logp = chunked_token_logps(hidden, weight, targets, chunk_size=4)
    assert logp.dtype == torch.float32
    # Same bf16 logits as nn.Linear would produce, then a float32 log-softmax.
    ref = F.linear(hidden, weight).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert (logp - ref).abs().max().item() < 1e-5
    logp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    F.linear(h32, w32).log_softmax(-1).gather(1, targets[:, None]).sum().backward()
    assert torch.allclose(hidden.grad.float(), h32.grad, atol=5e-2, rtol=2e-2)
    assert torch.allclose(weight.grad.float(), w32.grad, atol=5e-2, rtol=2e-2)


def test_chunked_token_logps_rejects_bad_arguments():
    hidden, weight = torch.randn(3, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="targets must lie"):
        chunked_token_logps(hidden, weight, torch.tensor([0, 6, 1]))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        chunked_token_logps(hidden, torch.randn(6, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(hidden, weight, torch.tensor([0, 1, 2]), chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        chunked_token_logps(hidden, weight, torch.tensor([0, 1, 2]), softcap=0.0)


# ------------------------------------------------------------------------- logit transforms


def _tiny_kwargs():
    return {
        "vocab_size": 50,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _transform_models():
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    torch.manual_seed(0)
    yield (
        "gemma2 final_logit_softcapping",
        Gemma2ForCausalLM(Gemma2Config(**_tiny_kwargs(), head_dim=8, final_logit_softcapping=0.2)),
    )
    yield "cohere logit_scale", CohereForCausalLM(CohereConfig(**_tiny_kwargs(), logit_scale=4.0))
    yield "granite logits_scaling", GraniteForCausalLM(GraniteConfig(**_tiny_kwargs(), logits_scaling=0.25))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_logit_transforms_are_reproduced(which):
    name, model = list(_transform_models())[which]
    ids = torch.randint(3, 50, (3, 11))
    am = torch.ones_like(ids)
    am[2, 8:] = 0
    cm = am.clone()
    cm[:, :4] = 0
    out = completion_logps(model, ids, am, cm, chunk_size=4, per_token=True)
    ref_sum, ref_tok, _ = naive(model, ids, am, cm)
    assert (out.sum - ref_sum).abs().max().item() < TOL, name
    # The transform matters here: without it the numbers would be visibly different.
    hidden = model.get_decoder()(input_ids=ids, attention_mask=am).last_hidden_state
    plain = model.lm_head(hidden)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (F.pad(plain * cm[:, 1:], (1, 0)) - ref_tok).abs().max().item() > 1e-2, name
    params = [p for p in model.parameters() if p.requires_grad]
    assert max_grad_err(grads(out.sum.sum(), params), grads(ref_sum.sum(), params)) < TOL, name


def test_unsupported_config_fields_raise(tokenizer):
    ids, am, cm = make_batch(tokenizer)
    model = build_tiny_llama(vocab_size=len(tokenizer), lm_head_multiplier=2.0)
    with pytest.raises(NotImplementedError, match="lm_head_multiplier"):
        completion_logps(model, ids, am, cm)
    model = build_tiny_llama(vocab_size=len(tokenizer), logits_scaling=2.0)
    with pytest.raises(NotImplementedError, match="logits_scaling.*'llama'"):
        completion_logps(model, ids, am, cm)


def test_unknown_transform_in_forward_is_caught(tokenizer):
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    base = build_tiny_llama(vocab_size=len(tokenizer))
    model = ScaledLlama(base.config)
    model.load_state_dict(base.state_dict())
    ids, am, cm = make_batch(tokenizer)
    with pytest.raises(NotImplementedError, match="does not reproduce ScaledLlama"):
        completion_logps(model, ids, am, cm)


def test_models_that_cannot_be_scored_raise(tokenizer):
    ids, am, cm = make_batch(tokenizer)
    model = build_tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="no output embeddings"):
        completion_logps(model.model, ids, am, cm)
    with pytest.raises(NotImplementedError, match="DataParallel"):
        completion_logps(torch.nn.DataParallel(model), ids, am, cm)


def test_input_validation(tiny_model, tokenizer):
    ids, am, cm = make_batch(tokenizer)
    bad = cm.clone()
    bad[0, 0] = 1
    with pytest.raises(ValueError, match=r"completion_mask\[:, 0\]"):
        completion_logps(tiny_model, ids, am, bad)
    bad = cm.clone()
    bad[3, -1] = 1  # row 3 is padded at the end
    assert am[3, -1] == 0
    with pytest.raises(ValueError, match="attention_mask is 0"):
        completion_logps(tiny_model, ids, am, bad)
    with pytest.raises(ValueError, match="shape of input_ids"):
        completion_logps(tiny_model, ids, am[:, :-1], cm)


# ------------------------------------------------------------------------- PEFT


def _perturb(model, substring, std=0.2):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if substring in n:
                p.normal_(0.0, std)


def test_peft_lora_values_and_gradients(tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    base_sum, _, _ = naive(tiny_model, *make_batch(tokenizer))
    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _perturb(model, "lora_B")  # LoRA starts as a no-op; make the adapters change the outputs
    ids, am, cm = make_batch(tokenizer)

    out = completion_logps(model, ids, am, cm, chunk_size=5, per_token=True)
    ref_sum, ref_tok, _ = naive(model, ids, am, cm)
    assert (out.sum - ref_sum).abs().max().item() < TOL
    assert (out.per_token - ref_tok).abs().max().item() < TOL
    assert (out.sum - base_sum).abs().max().item() > 1e-3  # the adapters were applied

    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    g_engine, g_naive = grads(out.sum.sum(), lora), grads(ref_sum.sum(), lora)
    assert all(g is not None and g.abs().sum() > 0 for g in g_engine)
    assert max_grad_err(g_engine, g_naive) < TOL

    # The reference pass of a PEFT policy: adapters disabled gives the base model.
    with model.disable_adapter(), torch.no_grad():
        ref_out = completion_logps(model, ids, am, cm)
    assert (ref_out.sum - base_sum).abs().max().item() < TOL


def test_peft_modules_to_save_lm_head(tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    ids, am, cm = make_batch(tokenizer)
    base_sum, _, _ = naive(tiny_model, ids, am, cm)
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(tiny_model, cfg)
    copy = model.base_model.model.lm_head.modules_to_save["default"]
    _perturb(copy, "weight", std=0.1)

    out = completion_logps(model, ids, am, cm, chunk_size=5)
    ref_sum, _, _ = naive(model, ids, am, cm)
    assert (out.sum - ref_sum).abs().max().item() < TOL
    assert (out.sum - base_sum).abs().max().item() > 1e-2
    g_engine, g_naive = grads(out.sum.sum(), [copy.weight]), grads(ref_sum.sum(), [copy.weight])
    assert max_grad_err(g_engine, g_naive) < TOL and g_engine[0].abs().sum() > 0
    with model.disable_adapter(), torch.no_grad():
        assert (completion_logps(model, ids, am, cm).sum - base_sum).abs().max().item() < TOL


def test_peft_unsupported_configurations_raise(tokenizer):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    ids, am, cm = make_batch(tokenizer)
    model = get_peft_model(build_tiny_llama(vocab_size=len(tokenizer)), LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(NotImplementedError, match="not a plain torch.nn.Linear"):
        completion_logps(model, ids, am, cm)
    model = get_peft_model(
        build_tiny_llama(vocab_size=len(tokenizer)),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    with pytest.raises(NotImplementedError, match="prompt learning"):
        completion_logps(model, ids, am, cm)


def test_entropy_by_hand_and_in_completion_logps(tiny_model):
    """The chunked entropy equals -sum p log p of the full softmax, row by row and through the engine."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = (
        torch.randn(9, 5, generator=g, dtype=torch.float64),
        torch.randn(13, 5, generator=g, dtype=torch.float64),
    )
    targets = torch.randint(0, 13, (9,), generator=g)
    logp, lss, ent = chunked_token_logps(
        hidden, weight, targets, chunk_size=4, return_logsumsq=True, return_entropy=True
    )
    full = torch.log_softmax(hidden @ weight.t(), -1)
    assert torch.allclose(ent, -(full.exp() * full).sum(-1), atol=1e-12) and not ent.requires_grad
    assert torch.allclose(logp, full.gather(1, targets[:, None]).squeeze(1), atol=1e-12)
    ids = torch.randint(4, 100, (2, 7), generator=g)
    attn, comp = torch.ones_like(ids), torch.zeros_like(ids)
    comp[:, 3:] = 1
    out = completion_logps(tiny_model, ids, attn, comp, per_token=True, entropy=True)
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(input_ids=ids).logits.float(), -1)[:, 2:-1]
    assert torch.allclose(out.entropy[:, 3:], -(lp.exp() * lp).sum(-1), atol=1e-5)
    assert (out.entropy[:, :3] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 3, "auto"])
def test_kl_to_a_reference_matches_full_logits_with_gradients(chunk_size):
    """``kl_to``: the per-token KL(p_ref || p) over the whole vocabulary equals the one from the two models'
    full logits, at every completion position, with the same gradients (TDPO's sequential KL)."""
    torch.manual_seed(0)
    pol = build_tiny_llama(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2).double()
    ref = build_tiny_llama(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2).double()
    ids = torch.randint(4, 40, (3, 8))
    attn = torch.ones_like(ids)
    attn[2, 6:] = 0
    comp = torch.zeros_like(ids)
    comp[:, 3:] = 1
    comp[2, 6:] = 0
    with torch.no_grad():
        r = completion_logps(ref, ids, attn, comp, keep_head_inputs=True, chunk_size=chunk_size)
    out = completion_logps(pol, ids, attn, comp, kl_to=r, chunk_size=chunk_size)
    logp = F.log_softmax(pol(ids, attention_mask=attn).logits, -1)
    with torch.no_grad():
        logp_ref = F.log_softmax(ref(ids, attention_mask=attn).logits, -1)
    naive = torch.zeros_like(out.kl)
    naive[:, 1:] = (logp_ref.exp() * (logp_ref - logp)).sum(-1)[:, :-1] * comp[:, 1:]
    assert torch.allclose(out.kl, naive, atol=1e-12)
    params = [p for p in pol.parameters()]
    got = torch.autograd.grad(out.kl.sum(), params, allow_unused=True)
    want = torch.autograd.grad(naive.sum(), params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None and w is None) or torch.allclose(g, w, atol=1e-12)
    # the log-probs are unchanged by asking for the KL
    assert torch.allclose(out.sum, completion_logps(pol, ids, attn, comp).sum)


def test_kl_to_refuses_a_mismatched_reference():
    torch.manual_seed(0)
    pol = build_tiny_llama(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2)
    other = build_tiny_llama(vocab_size=48, hidden_size=16, num_layers=1, num_heads=2)
    ids = torch.randint(4, 40, (2, 6))
    attn, comp = torch.ones_like(ids), torch.zeros_like(ids)
    comp[:, 3:] = 1
    with torch.no_grad():
        r = completion_logps(other, ids, attn, comp, keep_head_inputs=True)
        short = completion_logps(pol, ids, attn, comp * (torch.arange(6) < 5), keep_head_inputs=True)
    with pytest.raises(ValueError, match="vocabulary"):
        completion_logps(pol, ids, attn, comp, kl_to=r)
    with pytest.raises(ValueError, match="same batch"):
        completion_logps(pol, ids, attn, comp, kl_to=short)


@pytest.mark.parametrize(("scale", "softcap"), [(1.0, None), (2.5, None), (0.5, 1.3)])
def test_chunked_token_kl_by_hand_and_gradcheck(scale, softcap):
    from prefkit.train.logps import _Head, chunked_token_kl

    g = torch.Generator().manual_seed(2)
    m, h, v = 5, 4, 9
    hidden = torch.randn(m, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, generator=g, requires_grad=True)
    ref_hidden = torch.randn(m, h, dtype=torch.float64, generator=g)
    ref_head = _Head(torch.nn.Linear(h, v, dtype=torch.float64), 1.0, None)

    def logits(x, w, b):
        z = scale * (x @ w.t() + b)
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    def fn(x, w, b):
        return chunked_token_kl(x, w, ref_hidden, ref_head, b, chunk_size=2, logit_scale=scale, softcap=softcap)

    with torch.no_grad():
        p_ref = F.softmax(ref_head.module(ref_hidden), -1)
    naive = (p_ref * (p_ref.log() - F.log_softmax(logits(hidden, weight, bias), -1))).sum(-1)
    assert torch.allclose(fn(hidden, weight, bias), naive, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-8)
