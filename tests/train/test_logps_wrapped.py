"""The log-prob engine through distributed wrappers: it runs the wrapper's own forward.

A model wrapped in ``DistributedDataParallel`` (over a one-process gloo group) or sharded with FSDP2's
``fully_shard`` must give the log-probs and gradients of the bare model (the same arithmetic, so
equal to 1e-6 or better), with gradients reaching the LM head's weight through the wrapper; the LM
head's forward, replaced for the call, must be restored afterwards, also after an error.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_logps import make_batch
from test_prefix_sharing import both_layouts, random_examples, tiny
from torch.nn.parallel import DistributedDataParallel

from prefkit.models.tiny import build_tiny_llama
from prefkit.train import logps as logps_module
from prefkit.train.logps import completion_logps, shared_prefix_logps

TOL = 1e-6
WEIGHTS = torch.tensor([0.3, -1.2, 0.7, 2.0])


@pytest.fixture(scope="module")
def gloo_group(tmp_path_factory):
    """A one-process gloo process group (world size 1), as ``accelerate launch`` on one CPU sets up."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _twins(tokenizer, **kwargs):
    """Two identical tiny Llamas (seed 0): one to wrap, one to leave bare."""
    return tuple(build_tiny_llama(vocab_size=len(tokenizer), seed=0, **kwargs) for _ in range(2))


def _scored(model, batch, **kwargs):
    """``(LogpOutput, {name: grad})`` of a weighted sum of the per-row log-probs."""
    out = completion_logps(model, *batch, chunk_size=5, per_token=True, logsumsq=True, **kwargs)
    (WEIGHTS * out.sum).sum().backward()
    return out, {n.removeprefix("module."): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, grads_a, grads_b):
    for field in ("sum", "n_tokens", "per_token", "logsumsq"):
        assert (getattr(a, field) - getattr(b, field)).abs().max().item() <= TOL, field
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        full = g.full_tensor() if hasattr(g, "full_tensor") else g
        assert (full - grads_b[name]).abs().max().item() <= TOL, name


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_matches_the_bare_model(gloo_group, tokenizer, find_unused):
    # find_unused_parameters=True (the Trainer's default for a PreTrainedModel) makes DDP walk the
    # autograd graph from the forward's outputs: the log-probs' gradient path must leave through them.
    wrapped, bare = _twins(tokenizer)
    ddp = DistributedDataParallel(wrapped, find_unused_parameters=find_unused)
    batch = make_batch(tokenizer)
    out, grads = _scored(ddp, batch)
    ref, ref_grads = _scored(bare, batch)
    _assert_same(out, ref, grads, ref_grads)
    assert grads["lm_head.weight"].abs().sum() > 0  # the LM head's weight gets its gradient through DDP
    assert "forward" not in vars(wrapped.lm_head)  # the replaced forward is gone again


def test_ddp_shared_prefix_matches_the_bare_model(gloo_group):
    wrapped, bare = tiny("llama", "sdpa"), tiny("llama", "sdpa")
    _, packed = both_layouts(*random_examples(2, 2, seed=5))
    args = [packed[k] for k in ("input_ids", "position_ids", "segment_ids", "completion_rows", "completion_mask")]
    outs = []
    for model in (DistributedDataParallel(wrapped, find_unused_parameters=True), bare):
        out = shared_prefix_logps(model, *args, chunk_size=3, per_token=True, logsumsq=True)
        (WEIGHTS * out.sum).sum().backward()
        outs.append(out)
    _assert_same(*outs, *({n: p.grad for n, p in m.named_parameters()} for m in (wrapped, bare)))


def test_ddp_peft_lora_matches_the_bare_model(gloo_group, tokenizer):
    from peft import LoraConfig, get_peft_model

    models = []
    for base in _twins(tokenizer):
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.2, 0.2, p.numel()).reshape(p.shape))  # LoRA starts as a no-op
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())  # the same random lora_A
    batch = make_batch(tokenizer)
    out, grads = _scored(DistributedDataParallel(models[0], find_unused_parameters=True), batch)
    ref, ref_grads = _scored(models[1], batch)
    _assert_same(out, ref, grads, ref_grads)
    assert all("lora_" in n for n in grads) and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp2_matches_the_bare_model(gloo_group, tokenizer, tied):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded, bare = _twins(tokenizer, tie_word_embeddings=tied)
    mesh = init_device_mesh("cpu", (1,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    if not tied:
        fully_shard(sharded.lm_head, mesh=mesh)  # the LM head is its own FSDP unit: gathered in its forward
    fully_shard(sharded, mesh=mesh)
    batch = make_batch(tokenizer)
    out, grads = _scored(sharded, batch)
    ref, ref_grads = _scored(bare, batch)
    _assert_same(out, ref, grads, ref_grads)


def test_head_forward_is_restored_after_an_error(tiny_model, tokenizer, monkeypatch):
    batch = make_batch(tokenizer)
    completion_logps(tiny_model, *batch)  # the one-time probe passes

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(logps_module, "chunked_token_logps", broken)
    with pytest.raises(RuntimeError, match="boom"):
        completion_logps(tiny_model, *batch)
    assert "forward" not in vars(tiny_model.lm_head)
    monkeypatch.undo()
    # An instance-level forward of the head (e.g. an accelerate hook) is checked by the probe and put back.
    model = build_tiny_llama(vocab_size=len(tokenizer), seed=0)
    doubled = model.lm_head.forward = lambda h: 2.0 * torch.nn.Linear.forward(model.lm_head, h)
    with pytest.raises(NotImplementedError, match="does not reproduce"):
        completion_logps(model, *batch)
    assert vars(model.lm_head)["forward"] is doubled
