"""User-conditioned policies (prefkit.train.user_conditioning): tokens, prefixes, the neutral reference,
DPO with two users of opposite tastes, a new user from a few pairs, config errors, save / load.

Byte tokenizer ids (hand-checkable): pad 0, BOS 1, EOS 2, UNK 3, then the byte alphabet sorted, so a
printable ASCII character c other than space has id ord(c) - 29 ('h' = 75, 'i' = 76, 'q' = 84,
'0' = 19); its length is 260, so the first added token gets id 260.
"""

import json
import math

import pytest
import torch

from prefkit.data.records import PairwiseRecord
from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama
from prefkit.online.sampling import sample_for_user
from prefkit.train.config import ConfigError, PreferenceConfig, parse_config
from prefkit.train.logps import completion_logps
from prefkit.train.trainer import PreferenceTrainer
from prefkit.train.user_conditioning import (
    USERS_FILE,
    UserTokens,
    add_new_user,
    add_user_tokens,
    fit_new_user,
    fit_user,
    load_user_tokens,
    pair_margins,
    user_token_names,
)

TOPICS = ["cats", "dogs", "rain", "tea", "maps", "jazz", "bread", "stars", "boats", "clocks", "snow", "ink"]
TRAIN, HELD_OUT = TOPICS[:8], TOPICS[8:]


def pairs(user, prompts, likes_yes=True):
    """One pair per prompt: the user prefers "yes sure" to "no way" (or the opposite)."""
    good, bad = ("yes sure", "no way") if likes_yes else ("no way", "yes sure")
    return [PairwiseRecord(prompt=f"about {p}?", chosen=good, rejected=bad, user_id=user) for p in prompts]


def small_model(tokenizer, seed=0):
    return build_tiny_llama(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=seed
    )


def make_args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        max_length=64,
        max_prompt_length=32,
        loss_params={"beta": 0.1},
        user_conditioning=True,
    )
    base.update(overrides)
    return PreferenceConfig(**base)


def row_logps(model, rows, n_completion):
    """Summed log-probs of the last ``n_completion`` tokens of each (equal-length) row."""
    ids = torch.tensor(rows)
    comp = torch.zeros_like(ids)
    comp[:, -n_completion:] = 1
    with torch.no_grad():
        return completion_logps(model, ids, torch.ones_like(ids), comp).sum


# -- tokens and prefixes -----------------------------------------------------------------------


def test_token_names():
    assert user_token_names("alice") == ["<|user:alice|>"]
    assert user_token_names("g:a/1", 2) == ["<|user:g:a/1:0|>", "<|user:g:a/1:1|>"]


def test_tokens_added_and_rows_start_at_the_mean(tokenizer):
    tok = build_byte_tokenizer()
    model = small_model(tok)
    old = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    tokens = add_user_tokens(model, tok, ["b", "a"], n_tokens=2)
    # users sorted: a -> 260, 261; b -> 262, 263
    assert tokens.ids == {"a": [260, 261], "b": [262, 263]}
    assert tokens.base_vocab == 260 and len(tok) == 264
    assert tok.convert_ids_to_tokens([260, 263]) == ["<|user:a:0|>", "<|user:b:1|>"]
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == 264
    assert torch.equal(weight[:260], old)  # existing rows untouched
    for new_id in range(260, 264):
        torch.testing.assert_close(weight[new_id], old.mean(0))
        torch.testing.assert_close(model.get_output_embeddings().weight[new_id], old_out.mean(0))
    # a text holding the token string reads it as one token (generation / chat users)
    assert tok("<|user:b:0|>hi", add_special_tokens=False)["input_ids"] == [262, 75, 76]
    assert tok.decode([262, 75, 76], skip_special_tokens=True) == "hi"


def test_prefix_keeps_a_leading_bos():
    tokens = UserTokens(ids={"a": [260], "b": [261]}, n_tokens=1, base_vocab=260)
    assert tokens.prefix([75, 76], "b", bos_token_id=1) == [261, 75, 76]
    assert tokens.prefix([1, 75, 76], "a", bos_token_id=1) == [1, 260, 75, 76]
    with pytest.raises(KeyError, match="user 'c' has no token"):
        tokens.prefix([75], "c", bos_token_id=1)


def test_trainer_prefixes_every_prompt(tmp_path):
    tok = build_byte_tokenizer()
    records = [
        PairwiseRecord(prompt="hi", chosen="a", rejected="b", user_id="b"),
        PairwiseRecord(prompt="q0", chosen="a", rejected="b", user_id="a"),
    ]
    trainer = PreferenceTrainer(
        small_model(tok), make_args(tmp_path, user_prefix_tokens=2), train_dataset=records, processing_class=tok
    )
    # 'h' 'i' = 75 76; 'q' '0' = 84 19; a -> 260 261, b -> 262 263
    assert trainer.train_dataset["prompt_input_ids"] == [[262, 263, 75, 76], [260, 261, 84, 19]]
    assert trainer.model.get_input_embeddings().weight.shape[0] == 264
    assert trainer.ref_model.get_input_embeddings().weight.shape[0] == 264


def test_reference_and_initial_policy_identical_across_users(tmp_path):
    tok = build_byte_tokenizer()
    records = pairs("a", TRAIN[:2]) + pairs("b", TRAIN[:2], likes_yes=False)
    trainer = PreferenceTrainer(small_model(tok), make_args(tmp_path), train_dataset=records, processing_class=tok)
    rows = [[260, 75, 76, 40], [261, 75, 76, 40]]  # user a / user b, then "hi" and one completion token
    for model in (trainer.ref_model, trainer.model):
        lp = row_logps(model, rows, 2)
        assert lp[0].item() == lp[1].item()  # identical rows -> bit-identical log-probs


def test_explicit_reference_gets_neutral_rows(tmp_path):
    tok = build_byte_tokenizer()
    records = pairs("a", TRAIN[:2]) + pairs("b", TRAIN[:2], likes_yes=False)
    ref = small_model(build_byte_tokenizer(), seed=3)
    mean = ref.get_input_embeddings().weight.detach()[:260].mean(0)
    trainer = PreferenceTrainer(
        small_model(tok), make_args(tmp_path), train_dataset=records, processing_class=tok, ref_model=ref
    )
    weight = trainer.ref_model.get_input_embeddings().weight
    torch.testing.assert_close(weight[260], mean)
    torch.testing.assert_close(weight[261], mean)


# -- two users of opposite tastes -------------------------------------------------------------


def _train(tmp_path, conditioned, **overrides):
    tok = build_byte_tokenizer()
    records = pairs("a", TRAIN) + pairs("b", TRAIN, likes_yes=False)
    args = make_args(tmp_path, user_conditioning=conditioned, **overrides)
    trainer = PreferenceTrainer(small_model(tok), args, train_dataset=records, processing_class=tok)
    trainer.train()
    return trainer, tok


def _accuracy(trainer, tok, user, likes_yes):
    records = pairs(user, HELD_OUT, likes_yes)
    margins = pair_margins(trainer.model, trainer.ref_model, tok, records, tokens=trainer.user_tokens)
    return (margins > 0).float().mean().item()


def test_dpo_serves_two_opposite_users(tmp_path):
    pooled, tok_p = _train(tmp_path / "pooled", conditioned=False)
    cond, tok_c = _train(tmp_path / "cond", conditioned=True)
    acc_pooled = {"a": _accuracy(pooled, tok_p, "a", True), "b": _accuracy(pooled, tok_p, "b", False)}
    acc_cond = {"a": _accuracy(cond, tok_c, "a", True), "b": _accuracy(cond, tok_c, "b", False)}
    # Pooled: both users label the same pairs in opposite ways, and without a user token a pair's
    # margin for b is minus its margin for a, so exactly one of the two is right on every prompt:
    # the two accuracies add up to 1, and the worse user is at or below 0.5.
    assert acc_pooled["a"] + acc_pooled["b"] == pytest.approx(1.0)
    assert min(acc_cond.values()) >= 0.9
    assert min(acc_cond.values()) >= min(acc_pooled.values()) + 0.4


def test_precompute_ref_logps_matches(tmp_path):
    on, _ = _train(tmp_path / "on", conditioned=True, precompute_ref_logps=True, max_steps=3)
    off, _ = _train(tmp_path / "off", conditioned=True, max_steps=3)
    for a, b in zip(on.model.parameters(), off.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- a new user from a few pairs --------------------------------------------------------------


def test_new_users_fit_from_a_few_pairs(tmp_path):
    trainer, tok = _train(tmp_path, conditioned=True)
    policy, reference, tokens = trainer.model, trainer.ref_model, trainer.user_tokens
    emb = policy.get_input_embeddings().weight
    # c likes "yes sure" (as a does), d likes "no way" (as b does)
    assert add_new_user(policy, tok, tokens, "c", reference=reference) == [262]
    assert add_new_user(policy, tok, tokens, "d", reference=reference) == [263]
    # c starts at mean(a, b); d at mean(a, b, c) = mean(a, b) too
    torch.testing.assert_close(emb[262], emb[260:262].detach().mean(0))
    torch.testing.assert_close(emb[263], emb[262])
    torch.testing.assert_close(
        reference.get_input_embeddings().weight[263], reference.get_input_embeddings().weight[260]
    )

    def accuracy(user, likes_yes):
        margins = pair_margins(policy, reference, tok, pairs(user, HELD_OUT, likes_yes), tokens=tokens)
        return (margins > 0).float().mean().item()

    start = {"c": accuracy("c", True), "d": accuracy("d", False)}
    # same start row, opposite labels on the same pairs: exactly one of c, d is right on each pair
    assert start["c"] + start["d"] == pytest.approx(1.0)

    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    fit_user(policy, tok, tokens, "c", pairs("c", TRAIN[:4]), steps=30, lr=0.1, reference=reference)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"model.embed_tokens.weight"}
    rows = (policy.get_input_embeddings().weight != before["model.embed_tokens.weight"]).any(1).nonzero().flatten()
    assert rows.tolist() == [262]  # only c's row moved
    assert all(p.requires_grad for p in policy.parameters())  # restored after fitting
    fit_user(policy, tok, tokens, "d", pairs("d", TRAIN[:4], likes_yes=False), steps=30, lr=0.1, reference=reference)

    after = {"c": accuracy("c", True), "d": accuracy("d", False)}
    assert min(after.values()) == 1.0 and min(after.values()) >= min(start.values()) + 0.5


def test_fit_new_user_defaults_and_errors(tmp_path):
    tok = build_byte_tokenizer()
    policy = small_model(tok)
    tokens = add_user_tokens(policy, tok, ["a", "b"])
    ids = fit_new_user(policy, tok, tokens, "c", pairs("c", TRAIN[:2]), steps=3, lr=0.1)
    assert ids == [262] and tokens.ids["c"] == [262]
    with pytest.raises(ValueError, match="already has a token"):
        fit_new_user(policy, tok, tokens, "c", pairs("c", TRAIN[:2]))
    with pytest.raises(ValueError, match="of kind 'reward_pair', not pairwise"):
        fit_new_user(policy, tok, tokens, "e", pairs("e", TRAIN[:2]), loss="bt")
    with pytest.raises(ValueError, match="non-empty list of PairwiseRecords"):
        fit_new_user(policy, tok, tokens, "e", [])
    assert "e" not in tokens.ids  # nothing was added by the failed calls
    fit_user(policy, tok, tokens, "a", pairs("a", TRAIN[:2]), loss="simpo", steps=2)  # a reference-free loss


def test_sample_for_user_puts_the_token_first(tmp_path):
    tok = build_byte_tokenizer()
    model = small_model(tok)
    tokens = add_user_tokens(model, tok, ["a", "b"])
    samples = sample_for_user(model, tok, tokens, "b", ["hi"], n=2, max_new_tokens=3, progress=False)
    assert [s.prompt_ids for s in samples] == [[261, 75, 76]] * 2
    assert all(s.prompt == "hi" for s in samples)


# -- errors and config -------------------------------------------------------------------------


def test_records_without_user_id(tmp_path):
    tok = build_byte_tokenizer()
    records = pairs("a", TRAIN[:2]) + [PairwiseRecord(prompt="hi", chosen="x", rejected="y")]
    with pytest.raises(ValueError, match=r"train data: 1 of 3 records have no user_id \(records 3\)"):
        PreferenceTrainer(small_model(tok), make_args(tmp_path), train_dataset=records, processing_class=tok)
    tok = build_byte_tokenizer()
    trainer = PreferenceTrainer(
        small_model(tok),
        make_args(tmp_path, user_id_missing="shared"),
        train_dataset=records,
        processing_class=tok,
    )
    # users sorted: a -> 260, none -> 261; the record without user_id gets <|user:none|>
    assert trainer.user_tokens.ids == {"a": [260], "none": [261]}
    assert trainer.train_dataset["prompt_input_ids"][2] == [261, 75, 76]


def test_eval_user_unseen_in_training(tmp_path):
    tok = build_byte_tokenizer()
    with pytest.raises(ValueError, match=r"eval data: user\(s\) c do not occur in the training data"):
        PreferenceTrainer(
            small_model(tok),
            make_args(tmp_path),
            train_dataset=pairs("a", TRAIN[:2]),
            eval_dataset=pairs("c", TRAIN[:2]),
            processing_class=tok,
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"user_conditioning": True, "user_prefix_tokens": 0}, "user_prefix_tokens: expected an integer >= 1, got 0"),
        (
            {"user_conditioning": True, "user_id_missing": "drop"},
            "user_id_missing: expected one of error, shared, got 'drop'",
        ),
        ({"user_prefix_tokens": 2}, "user_prefix_tokens: set, but user_conditioning is false"),
        ({"user_conditioning": True, "loss": "bt"}, "user_conditioning trains a policy"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"output_dir": "unused", **overrides})


# -- save and load -----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, tok = _train(tmp_path, conditioned=True, max_steps=3)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    saved = json.loads((out / USERS_FILE).read_text())
    assert saved["users"]["b"] == {"ids": [261], "tokens": ["<|user:b|>"]}
    tok2 = AutoTokenizer.from_pretrained(out)
    tokens = load_user_tokens(out, tok2)
    assert tokens.ids == trainer.user_tokens.ids and tokens.base_vocab == 260
    model = AutoModelForCausalLM.from_pretrained(out)
    records = pairs("a", HELD_OUT) + pairs("b", HELD_OUT, likes_yes=False)
    torch.testing.assert_close(
        pair_margins(model, trainer.ref_model, tok2, records, tokens=tokens),
        pair_margins(trainer.model, trainer.ref_model, tok, records, tokens=trainer.user_tokens),
    )
    with pytest.raises(ValueError, match="load the tokenizer saved with this policy"):
        load_user_tokens(out, build_byte_tokenizer())


def test_tied_embeddings_get_one_row():
    tok = build_byte_tokenizer()
    model = build_tiny_llama(vocab_size=len(tok), hidden_size=16, num_layers=1, num_heads=2, tie_word_embeddings=True)
    old = model.get_input_embeddings().weight.detach().clone()
    add_user_tokens(model, tok, ["a"])
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    torch.testing.assert_close(model.get_input_embeddings().weight[260], old.mean(0))


def test_unpaired_loss_trains_with_user_tokens(tmp_path):
    from prefkit.data.records import UnpairedRecord

    tok = build_byte_tokenizer()
    records = [
        UnpairedRecord(prompt=f"q{i}", completion="yes", label=i % 2 == 0, user_id="ab"[i % 2]) for i in range(4)
    ]
    trainer = PreferenceTrainer(
        small_model(tok),
        make_args(tmp_path, loss="kto", max_steps=2, loss_params={}),
        train_dataset=records,
        processing_class=tok,
    )
    # 'q' = 84, '0' = 19; users a -> 260, b -> 261
    assert trainer.train_dataset["prompt_input_ids"][:2] == [[260, 84, 19], [261, 84, 20]]
    trainer.train()


@pytest.mark.parametrize("option", [{"share_prompt": True}, {"packing": True}])
def test_shared_prompt_and_packing_give_the_same_loss(tmp_path, option):
    losses = []
    for extra in ({}, option):
        tok = build_byte_tokenizer()
        records = pairs("a", TRAIN[:4]) + pairs("b", TRAIN[:4], likes_yes=False)
        # step 1's loss is log 2 (policy = reference); step 2's checks step 1's gradients (SGD: Adam's
        # first step is lr * sign(gradient), which turns float rounding of near-zero gradients into lr)
        args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=4, optim="sgd", learning_rate=1.0, **extra)
        trainer = PreferenceTrainer(small_model(tok), args, train_dataset=records, processing_class=tok)
        losses.append(trainer.train().training_loss)
    assert losses[0] != pytest.approx(math.log(2), rel=1e-3)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_eval_rm_implicit_scores_a_user_conditioned_policy_per_user(tmp_path):
    """`prefkit eval rm --implicit` on a saved user-conditioned policy puts each record's user tokens in
    front of its prompt and gives the reference the neutral user rows, as training did: its per-pair
    implicit-reward margins equal `pair_margins`, and `--subset-column user_id` reports each user."""
    from prefkit.cli import main
    from prefkit.data.loaders import write_records

    trainer, tok = _train(tmp_path, conditioned=True)
    policy_dir, ref_dir = tmp_path / "policy", tmp_path / "ref"
    trainer.save_model(str(policy_dir))
    base_tok = build_byte_tokenizer()  # `tok` now holds the user tokens
    small_model(base_tok).save_pretrained(ref_dir)  # the initial policy: the run's reference before user rows
    base_tok.save_pretrained(ref_dir)
    records = pairs("a", HELD_OUT) + pairs("b", HELD_OUT, likes_yes=False)
    data = tmp_path / "held_out.jsonl"
    write_records(records, str(data))
    out = tmp_path / "eval"
    argv = ["eval", "rm", "--model", str(policy_dir), "--implicit", "--ref", str(ref_dir), "--beta", "0.1"]
    argv += ["--data", str(data), "--subset-column", "user_id", "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    expected = 0.1 * pair_margins(trainer.model, trainer.ref_model, tok, records, tokens=trainer.user_tokens)
    margins = torch.tensor([row["logit"] for row in rows])  # beta * (margin of log pi - log ref)
    torch.testing.assert_close(margins, expected.double().to(margins.dtype), atol=1e-4, rtol=1e-4)
    results = json.loads((out / "results.json").read_text())
    per_user = {name: s["accuracy"] for name, s in results["metrics"]["subsets"].items()}
    assert set(per_user) == {"a", "b"} and min(per_user.values()) >= 0.9
    stranger = tmp_path / "stranger.jsonl"
    write_records(pairs("zed", HELD_OUT[:1]), str(stranger))
    assert main([*argv[:9], "--data", str(stranger), "--output", str(tmp_path / "e2"), "--no-progress"]) == 2
