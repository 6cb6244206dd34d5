"""The world tokenizer, the base distribution's log-probability and the cached reference policy."""

import itertools
import math

import numpy as np
import pytest
import torch

from prefkit.lab import World, make_world
from prefkit.lab.policy import (
    ReferenceSpec,
    _base_samples,
    _kl_to_base,
    build_world_tokenizer,
    pretrain_reference,
    reference_policy,
)
from prefkit.lab.world import RESPONSE_WORDS
from prefkit.models.tiny import build_tiny_llama


def test_world_tokenizer_has_one_token_per_word():
    world = make_world("default", 0)
    tok = build_world_tokenizer(world)
    assert len(tok) == 4 + len(world.vocabulary)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("tell me about food")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 5  # BOS + four words
    response = "clear soup bread indeed"
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    assert len(r_ids) == 4 and tok.unk_token_id not in r_ids
    assert tok.decode(r_ids + [tok.eos_token_id], skip_special_tokens=True) == response


def test_base_log_prob_is_a_distribution():
    # With max_len 2 every response is one or two of the response words: the probabilities sum to 1.
    world = World("tiny", make_world("default", 0).groups, max_len=2)
    prompt = "describe food"
    total = sum(math.exp(world.base_log_prob(prompt, w)) for w in RESPONSE_WORDS)
    total += sum(
        math.exp(world.base_log_prob(prompt, f"{a} {b}")) for a, b in itertools.product(RESPONSE_WORDS, repeat=2)
    )
    assert total == pytest.approx(1.0, abs=1e-9)
    assert world.base_log_prob(prompt, "a b c") == -math.inf  # longer than max_len
    assert world.base_log_prob(prompt, "zebra") == -math.inf  # not a response word
    # an on-topic word (weight 5) is five times as likely as a filler word (weight 1)
    assert world.base_log_prob(prompt, "soup") - world.base_log_prob(prompt, "the") == pytest.approx(math.log(5))


def test_prompts_lists_every_template_and_topic():
    world = make_world("default", 0)
    assert len(world.prompts) == len(set(world.prompts)) == 24
    rng = np.random.default_rng(0)
    assert set(world.sample_prompts(500, rng)) == set(world.prompts)


def test_pretraining_fits_the_base_distribution(small_reference):
    world, ref = small_reference
    tok = build_world_tokenizer(world)
    untrained = build_tiny_llama(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    samples = _base_samples(world, 256, np.random.default_rng(5))
    kl_untrained = _kl_to_base(world, untrained, tok, samples)
    kl_trained = _kl_to_base(world, ref.model, ref.tokenizer, samples)
    # A random model is ~log(V) nats per token off; the trained one must be far closer.
    assert kl_trained < 0.5 < kl_untrained
    assert kl_trained == pytest.approx(ref.info["kl_to_base"], abs=0.15)  # another held-out sample, same estimate
    assert ref.info["params"] == sum(p.numel() for p in ref.model.parameters())


def test_reference_is_cached_and_reloaded(small_reference, small_spec, lab_cache):
    world, ref = small_reference
    again = reference_policy(world, 0, spec=small_spec, cache_dir=lab_cache, progress=False)
    assert again.from_cache and again.path == ref.path
    for a, b in zip(ref.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    assert again.info["kl_to_base"] == ref.info["kl_to_base"]
    # nothing half-written is left beside the cached folder
    assert [p.name for p in lab_cache.iterdir() if p.name.startswith(".")] == []


def test_cache_key_separates_specs_seeds_and_bases(tmp_path):
    world = make_world("default", 0)
    spec = ReferenceSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, steps=2, heldout_samples=8)
    a = reference_policy(world, 0, spec=spec, cache_dir=tmp_path, progress=False)
    b = reference_policy(world, 1, spec=spec, cache_dir=tmp_path, progress=False)
    c = reference_policy(World("long", world.groups, max_len=12), 0, spec=spec, cache_dir=tmp_path, progress=False)
    assert len({a.path, b.path, c.path}) == 3 and not (a.from_cache or b.from_cache or c.from_cache)
    # the true reward is not part of the base distribution: another preset with the same base shares the policy
    d = reference_policy(make_world("verbose", 0), 0, spec=spec, cache_dir=tmp_path, progress=False)
    assert d.from_cache and d.path == a.path


def test_pretraining_is_reproducible():
    world = make_world("default", 0)
    spec = ReferenceSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, steps=3, heldout_samples=8)
    m1, _, i1 = pretrain_reference(world, 0, spec, progress=False)
    m2, _, i2 = pretrain_reference(world, 0, spec, progress=False)
    assert i1["final_loss"] == i2["final_loss"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
