"""Do user tokens steer a user-conditioned DPO policy? A diagnosis in the lab world with two groups.

    python benchmarks/user_token_steering.py                       # about 5 minutes on 2 CPU cores
    python benchmarks/user_token_steering.py --runs 150x1,150x10    # steps x row-update scale, comma-separated

World ``groups`` (a majority and a minority with opposite tastes), 2,400 Bradley-Terry pairs labelled by users of
both groups, trained with ``user_conditioning: true`` and one token per *group* (the strongest case for steering:
each token sees all of its group's pairs). Held out: pairs on which the two groups' true preferences disagree.
Steering = the implicit reward's accuracy on those pairs for a group with its own token minus with the other
group's token (0: the token changes nothing a group cares about). Each run is ``STEPSxSCALE``: optimizer steps
(batch 32, learning rate 1e-3, beta 0.1) and a factor on the user-token rows' optimizer updates (1: as trained;
10 or 50: those rows move 10 or 50 times further per step, an lr multiplier for them alone). Also reported: the
distance between the two token rows and how much the token moves a pair's margin. Writes results.json and
results.md to --output-dir.
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
from prefkit.train.config import PreferenceConfig
from prefkit.train.logps import completion_logps
from prefkit.train.trainer import PreferenceTrainer

OUT = Path(__file__).resolve().parent / "results" / "user_token_steering"


def group_of(user_id: str) -> str:
    return user_id.split(":", 1)[1].split("/", 1)[0]


class RowScale(transformers.TrainerCallback):
    """Scale every optimizer update of the given embedding rows by ``scale`` (a learning-rate multiplier for them)."""

    def __init__(self, rows: list[int], scale: float):
        self.rows, self.scale, self.before = rows, scale, None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        weight = model.get_input_embeddings().weight
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer

        def remember(*_):
            self.before = weight.detach()[self.rows].clone()

        def stretch(*_):
            with torch.no_grad():
                weight[self.rows] = self.before + self.scale * (weight[self.rows] - self.before)

        inner.register_step_pre_hook(remember)
        inner.register_step_post_hook(stretch)


def pair_batch(tok, tokens, user, prompt, chosen, rejected):
    prompt_ids = tokens.prefix(tok(prompt)["input_ids"], user, tok.bos_token_id)
    rows = []
    for text in (chosen, rejected):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt_ids + ids, [0] * len(prompt_ids) + [1] * len(ids)))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    completion = torch.tensor([mask + [0] * (width - len(mask)) for _, mask in rows])
    return input_ids, attention, completion


@torch.no_grad()
def margins(trainer, user, pairs) -> np.ndarray:
    """The implicit reward margin log-ratio(chosen) - log-ratio(rejected) of each pair with ``user``'s token."""
    tok, tokens = trainer.processing_class, trainer.user_tokens
    policy, reference = trainer.model.eval(), trainer.ref_model
    out = []
    for record in pairs:
        batch = pair_batch(tok, tokens, user, record.prompt, record.chosen, record.rejected)
        ratio = completion_logps(policy, *batch).sum - completion_logps(reference, *batch).sum
        out.append(float(ratio[0] - ratio[1]))
    return np.array(out)


def run(world, reference, train, contested, truth, steps: int, scale: float, seed: int) -> dict:
    args = PreferenceConfig(
        output_dir=tempfile.mkdtemp(),
        user_conditioning=True,
        loss="dpo",
        loss_params={"beta": 0.1},
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    trainer = PreferenceTrainer(
        copy.deepcopy(reference.model), args, train_dataset=train, processing_class=copy.deepcopy(reference.tokenizer)
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    users = sorted(trainer.user_tokens.users)
    rows = [i for u in users for i in trainer.user_tokens.ids_of(u)]
    if scale != 1.0:
        trainer.add_callback(RowScale(rows, scale))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    weight = trainer.model.get_input_embeddings().weight.detach()
    by_user = {u: margins(trainer, u, contested) for u in users}
    groups = {}
    for g, want in truth.items():
        own = next(u for u in users if group_of(u + "/0") == g)
        other = next(u for u in users if u != own)
        acc_own = float(((by_user[own] > 0) == want).mean())
        acc_other = float(((by_user[other] > 0) == want).mean())
        groups[g] = {"own": acc_own, "other": acc_other, "steering": acc_own - acc_other}
    a, b = (by_user[u] for u in users)
    return {
        "steps": steps,
        "scale": scale,
        "seconds": seconds,
        "row_distance": float((weight[rows[0]] - weight[rows[1]]).norm()),
        "row_norm": float(weight[: min(len(weight), 200)].norm(dim=1).mean()),
        "margin_shift": float(np.abs(a - b).mean()),
        "margin_size": float(np.abs(a).mean()),
        "groups": groups,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="150x1,150x10,150x50,900x1,2400x1", help="STEPSxSCALE, comma-separated")
    parser.add_argument("--pairs", type=int, default=2400)
    parser.add_argument("--heldout", type=int, default=3000, help="held-out pairs drawn (the contested ones are kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    runs = [(int(s), float(k)) for s, k in (item.split("x") for item in args.runs.split(","))]
    world = make_world("groups", args.seed)
    reference = reference_policy(world, args.seed, progress=False)
    records = draw_dataset(
        world, "pairwise", args.pairs, GroupMix(BradleyTerry(1.0), users_per_group=10), seed=args.seed
    )
    train = [dataclasses.replace(r, user_id=f"group:{group_of(r.user_id)}") for r in records]  # a token per group
    names = [g.name for g in world.groups]
    contested, gaps = [], []
    for r in draw_dataset(world, "pairwise", args.heldout, BradleyTerry(1.0), seed=args.seed + 77):
        gap = [world.true_reward(r.prompt, r.chosen, g) - world.true_reward(r.prompt, r.rejected, g) for g in names]
        if gap[0] * gap[1] < 0:
            contested.append(r)
            gaps.append(gap)
    truth = {g: np.array([gap[i] > 0 for gap in gaps]) for i, g in enumerate(names)}
    results = []
    for steps, scale in runs:
        r = run(world, reference, train, contested, truth, steps, scale, args.seed)
        results.append(r)
        cells = "; ".join(f"{g} own {v['own']:.3f} other {v['other']:.3f}" for g, v in r["groups"].items())
        print(
            f"{steps} steps, row scale {scale:g}: steering {r['groups'][names[0]]['steering']:+.3f} ({cells}), "
            f"token rows {r['row_distance']:.2f} apart (row norm {r['row_norm']:.2f}), {r['seconds']:.0f} s"
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"world": "groups", "seed": args.seed, "pairs": args.pairs, "contested": len(contested), "runs": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Do user tokens steer? (lab world `groups`, a token per group)",
        "",
        f"{args.pairs} training pairs; {len(contested)} held-out pairs on which the groups' true preferences disagree. "
        "Accuracy of the implicit reward on them for each group with its own token and with the other group's; "
        "steering = own − other (the same for both groups by construction: the two accuracies are complements).",
        "",
        "| steps | row-update scale | "
        + " | ".join(f"{g} own / other" for g in names)
        + " | steering | token rows apart (row norm) | margin moved by the token (of) |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['steps']} | {r['scale']:g} | "
            + " | ".join(f"{r['groups'][g]['own']:.3f} / {r['groups'][g]['other']:.3f}" for g in names)
            + f" | {r['groups'][names[0]]['steering']:+.3f} | {r['row_distance']:.2f} ({r['row_norm']:.2f}) | "
            f"{r['margin_shift']:.2f} ({r['margin_size']:.2f}) |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/results.md")


if __name__ == "__main__":
    main()
