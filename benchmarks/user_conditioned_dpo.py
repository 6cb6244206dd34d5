"""Pooled DPO against user-conditioned DPO in the lab world with two groups of opposite tastes.

    python benchmarks/user_conditioned_dpo.py                       # defaults, about 3 minutes on 2 CPU cores
    python benchmarks/user_conditioned_dpo.py --pairs 1000 --steps 100   # quicker

The world is the lab's ``groups`` preset: a majority (70 %) that likes formal and dislikes casual words
and prefers short answers, and a minority (30 %) with the opposite tastes (docs/lab.md). Users are
drawn as `prefkit lab draw --groups` draws them (``group:NAME/K``, ten per group, each record's group
by share); Bradley-Terry labels from the user's group's true reward. Users 8 and 9 of each group are
**unseen**: none of their pairs is trained on.

Policies, all trained from the world's reference policy (`prefkit.lab.policy.reference_policy`) with
sigmoid DPO (beta 0.1), the same steps, batch, learning rate and seed:

- ``pooled``: DPO on every seen pair, no user information;
- ``conditioned``: the same pairs with ``user_conditioning: true`` (one soft-prompt token per user);
- for the unseen users, the conditioned policy with the user's token at its start (the mean of the
  seen users' rows, k = 0) and after fitting it on ``--shots`` of their pairs (`fit_new_user`'s two steps,
  `add_new_user` then `fit_user`: only that row trains).

Evaluation: completions sampled at temperature 1 on every prompt of the world, ``--samples`` per prompt
per group: for the conditioned policy split evenly over the group's users, each with their token in
front; for the pooled policy and the reference without a token. A group's cell is the mean of that
group's true reward ``r_g`` of the samples made for its users (``own``), and ``other``, the other
group's reward of the same samples; ``kl`` is the Monte-Carlo KL to the reference from those samples
(for the conditioned policy: to the reference conditioned on the neutral token, the reference it was
trained against). ``--token-per group`` gives the seen users of a group one shared token. Prints the
table and writes ``results.json`` and ``results.md`` to ``--output-dir`` (default benchmarks/results/user_conditioned/).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from prefkit.lab import BradleyTerry, GroupMix, draw_dataset, make_world
from prefkit.lab.policy import reference_policy
from prefkit.online.sampling import completion_log_probs, sample_completions, sample_for_user
from prefkit.train.config import PreferenceConfig
from prefkit.train.trainer import PreferenceTrainer
from prefkit.train.user_conditioning import add_new_user, fit_user

OUT = Path(__file__).resolve().parent / "results" / "user_conditioned"
USERS_PER_GROUP = 10
UNSEEN = (8, 9)


def user_index(user_id: str) -> int:
    return int(user_id.rsplit("/", 1)[1])


def group_of(user_id: str) -> str:
    return user_id.split(":", 1)[1].split("/", 1)[0]


def train(reference, records, args_dict, conditioned: bool, output_dir: Path, prefix_tokens: int = 1):
    args = PreferenceConfig(
        output_dir=str(output_dir),
        user_conditioning=conditioned,
        user_prefix_tokens=prefix_tokens if conditioned else 1,
        **args_dict,
    )
    trainer = PreferenceTrainer(
        copy.deepcopy(reference.model),
        args,
        train_dataset=records,
        processing_class=copy.deepcopy(reference.tokenizer),  # the trainer adds the user tokens to it
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    trainer.model.eval()
    return trainer, time.perf_counter() - start


def score(world, samples, group: str, other: str, policy, ref_model, pad_id) -> dict[str, float]:
    own = np.array([world.true_reward(c.prompt, c.text, group) for c in samples])
    cross = np.array([world.true_reward(c.prompt, c.text, other) for c in samples])
    kl = None
    if policy is not None:
        log_ratio = completion_log_probs(policy, samples, pad_id, progress=False) - completion_log_probs(
            ref_model, samples, pad_id, progress=False
        )
        kl = float(log_ratio.mean())
    return {
        "own": float(own.mean()),
        "own_se": float(own.std(ddof=1) / np.sqrt(len(own))),
        "other": float(cross.mean()),
        "kl": kl,
        "n": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3000, help="pairs drawn (seen and unseen users)")
    parser.add_argument("--steps", type=int, default=300, help="DPO optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--pooled-beta",
        type=float,
        default=None,
        help="the pooled policy's beta (default --beta); lower it to compare the two at a matched KL",
    )
    parser.add_argument("--shots", type=int, default=8, help="pairs of an unseen user given to fit_new_user")
    parser.add_argument(
        "--samples", type=int, default=32, help="samples per prompt per group (split evenly over its users)"
    )
    parser.add_argument(
        "--token-per", choices=["user", "group"], default="user", help="a soft-prompt token per user or per group"
    )
    parser.add_argument("--prefix-tokens", type=int, default=1, help="user_prefix_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    world = make_world("groups", args.seed)
    reference = reference_policy(world, args.seed, progress=False)
    annotator = GroupMix(BradleyTerry(1.0), users_per_group=USERS_PER_GROUP)
    records = draw_dataset(world, "pairwise", args.pairs, annotator, seed=args.seed)
    seen = [r for r in records if user_index(r.user_id) not in UNSEEN]
    if args.token_per == "group":  # the seen users of a group share one token: group:NAME/K -> group:NAME
        seen = [dataclasses.replace(r, user_id=f"group:{group_of(r.user_id)}") for r in seen]
    unseen = [r for r in records if user_index(r.user_id) in UNSEEN]
    groups = [g.name for g in world.groups]
    other = {groups[0]: groups[1], groups[1]: groups[0]}
    users = {g: sorted({r.user_id for r in seen if group_of(r.user_id) == g}) for g in groups}
    new_users = {g: sorted({r.user_id for r in unseen if group_of(r.user_id) == g}) for g in groups}

    train_args = dict(
        loss="dpo",
        loss_params={"beta": args.beta},
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(10, args.steps // 10),
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    pooled_args = {**train_args, "loss_params": {"beta": args.beta if args.pooled_beta is None else args.pooled_beta}}
    with tempfile.TemporaryDirectory() as runs:  # the trainers' output_dir (nothing is saved there)
        pooled, pooled_s = train(reference, seen, pooled_args, False, Path(runs) / "pooled")
        cond, cond_s = train(reference, seen, train_args, True, Path(runs) / "conditioned", args.prefix_tokens)

    tok, pad = reference.tokenizer, reference.tokenizer.pad_token_id
    prompts = world.prompts
    sampling = dict(max_new_tokens=3 * world.max_len, temperature=1.0, progress=False)
    rows: dict[str, dict[str, dict]] = {"reference": {}, "pooled": {}, "conditioned": {}, "unseen k=0": {}}
    rows[f"unseen k={args.shots}"] = {}
    for g in groups:
        n = args.samples
        samples = sample_completions(reference.model, tok, prompts, n=n, seed=args.seed, **sampling)
        rows["reference"][g] = score(world, samples, g, other[g], None, None, pad)
        samples = sample_completions(pooled.model, tok, prompts, n=n, seed=args.seed, **sampling)
        rows["pooled"][g] = score(world, samples, g, other[g], pooled.model, pooled.ref_model, pad)
        samples = [
            c
            for i, u in enumerate(users[g])
            for c in sample_for_user(
                cond.model,
                cond.processing_class,
                cond.user_tokens,
                u,
                prompts,
                n=args.samples,
                seed=args.seed + i,
                **sampling,
            )
        ]
        rows["conditioned"][g] = score(world, samples, g, other[g], cond.model, cond.ref_model, pad)

    # unseen users: their token at its start (k = 0), then fitted on `shots` of their pairs
    policy, ctok, tokens, ref = cond.model, cond.processing_class, cond.user_tokens, cond.ref_model
    fit_losses = {}
    for k_label, fit in (("unseen k=0", False), (f"unseen k={args.shots}", True)):
        for g in groups:
            samples = []
            for i, u in enumerate(new_users[g]):
                if not fit:
                    add_new_user(policy, ctok, tokens, u, reference=ref)
                else:
                    shots = [r for r in unseen if r.user_id == u][: args.shots]
                    fit_losses[u] = fit_user(
                        policy, ctok, tokens, u, shots, beta=args.beta, steps=50, lr=0.05, reference=ref
                    )
                samples += sample_for_user(
                    policy,
                    ctok,
                    tokens,
                    u,
                    prompts,
                    n=args.samples // len(new_users[g]),
                    seed=args.seed + 100 + i,
                    **sampling,
                )
            rows[k_label][g] = score(world, samples, g, other[g], policy, ref, pad)

    result = {
        "settings": vars(args),
        "world": "groups",
        "groups": {
            g: {"share": world.shares[g], "seen_users": len(users[g]), "unseen_users": len(new_users[g])}
            for g in groups
        },
        "pairs": {"seen": len(seen), "unseen": len(unseen)},
        "train_seconds": {"pooled": pooled_s, "conditioned": cond_s},
        "rows": rows,
        "fit_losses": fit_losses,
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result, groups, other)
    (out / "results.md").write_text(table + "\n")
    print(table)


def markdown(result, groups, other) -> str:
    s = result["settings"]
    lines = [
        "# Pooled vs user-conditioned DPO (lab world `groups`)",
        "",
        f"{result['pairs']['seen']} training pairs of {sum(v['seen_users'] for v in result['groups'].values())} seen "
        f"users; DPO beta {s['beta']}"
        + ("" if s.get("pooled_beta") is None else f" (pooled: {s['pooled_beta']})")
        + f", {s['steps']} steps of {s['batch_size']} pairs, lr {s['lr']}, seed {s['seed']}; "
        f"unseen users fitted on {s['shots']} pairs each (only their token row). Mean true reward of samples "
        "(temperature 1) made for each group's users: `own` is the group's reward, `other` the other group's "
        "reward of the same samples; KL to the reference per response.",
        "",
        "| policy | " + " | ".join(f"{g}: own | {g}: other | {g}: KL" for g in groups) + " |",
        "|---|" + "---|---|---|" * len(groups),
    ]
    for name, cells in result["rows"].items():
        parts = []
        for g in groups:
            c = cells[g]
            kl = "-" if c["kl"] is None else f"{c['kl']:.2f}"
            parts.append(f"{c['own']:.3f} ± {c['own_se']:.3f} | {c['other']:.3f} | {kl}")
        lines.append(f"| {name} | " + " | ".join(parts) + " |")
    lines += [
        "",
        f"Total {result['seconds']:.0f} s (training: pooled {result['train_seconds']['pooled']:.0f} s, "
        f"conditioned {result['train_seconds']['conditioned']:.0f} s).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
