"""Plain DPO against group-robust (MaxMin) DPO in the lab world with two user groups at 80 / 20.

    python benchmarks/maxmin_dpo.py                       # 3 seeds, about 4 minutes on one CPU thread
    python benchmarks/maxmin_dpo.py --seeds 0 --etas 1    # quicker

World ``groups`` reweighted to 80 % majority / 20 % minority (`prefkit.lab.pluralism.with_shares`): the
majority likes formal words and dislikes casual ones, the minority the opposite (and cares less for the
good words, and likes length). Per seed: the world's reference policy (pre-trained once, then cached),
``steps x batch`` fresh pairs labelled by Bradley-Terry users drawn from the groups by share (user_id
``group:NAME/K``), and from the same reference, with the same pairs, steps and seed:

- ``dpo``: plain DPO (the batch mean of the per-pair losses);
- ``group-robust eta=E``: ``groups: lab``, ``group_robust: true``, ``group_robust_step_size: E``
  (``eta = 0`` keeps alpha uniform: the mean of the two group means, without the MaxMin weighting).

Each policy is sampled (16 completions per prompt of the world) and scored with each group's true reward;
KL(pi || pi_ref) is the Monte-Carlo mean of the log-ratio over those samples; held-out implicit-reward
accuracy per group comes from the trainer's own evaluation on 2000 fresh pairs (``eval_group/NAME/accuracy``).
Writes ``results.json`` and ``results.md`` to benchmarks/results/maxmin_dpo/ and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from prefkit.lab import BradleyTerry, GroupMix, draw_dataset, make_world
from prefkit.lab.evaluate import evaluate_policy
from prefkit.lab.pluralism import with_shares
from prefkit.lab.policy import reference_policy
from prefkit.train.config import PreferenceConfig
from prefkit.train.trainer import PreferenceTrainer

OUT = Path(__file__).resolve().parent / "results" / "maxmin_dpo"
SHARES = (0.8, 0.2)  # world "groups": (majority, minority)
GROUPS = ("majority", "minority")


def train(reference, records, held_out, *, eta: float | None, steps: int, batch: int, lr: float, beta: float, seed):
    """One run from a trainable copy of the reference; ``eta=None`` is plain DPO (groups only logged)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = PreferenceConfig(
            output_dir=tmp,
            loss="dpo",
            loss_params={"beta": beta},
            groups="lab",
            group_robust=eta is not None,
            group_robust_step_size=0.0 if eta is None else eta,
            max_steps=steps,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=256,
            learning_rate=lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=min(10, steps // 10),
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            seed=seed,
            data_seed=seed,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=False,
            disable_tqdm=True,
        )
        policy = copy.deepcopy(reference.model).requires_grad_(True)
        trainer = PreferenceTrainer(
            policy,
            args,
            train_dataset=records,
            eval_dataset=held_out,
            processing_class=reference.tokenizer,
            ref_model=copy.deepcopy(reference.model),
        )
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        heldout = trainer.evaluate()
    trainer.model.eval()
    weights = trainer.group_robust_alpha
    alpha = None if weights is None else dict(zip(trainer.group_names, weights.tolist()))
    accuracy = {g: heldout[f"eval_group/{g}/accuracy"] for g in GROUPS}
    return trainer.model, {"alpha": alpha, "heldout_accuracy": accuracy, "train_seconds": seconds}


def evaluate(world, model, reference, reference_samples, n_per_prompt: int, seed: int) -> dict:
    result = evaluate_policy(
        world,
        model,
        reference.tokenizer,
        reference=reference.model,
        reference_samples=reference_samples,
        n_per_prompt=n_per_prompt,
        seed=seed,
        progress=False,
    )
    return {
        "group_reward": result.group_rewards,
        "worst_group": result.worst_group,
        "worst_group_reward": result.worst_group_reward,
        "mean_reward": result.mean_reward,
        "kl": result.kl,
        "kl_se": result.kl_se,
    }


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def _cell(values, digits: int = 3) -> str:
    if all(math.isnan(v) for v in values):
        return "-"
    mean, se = _mean_se(values)
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def summarize(runs: list[dict], methods: list[str]) -> list[str]:
    rows = [
        "| method | majority reward | minority reward | worst-group reward | worst-group gain over dpo (paired) "
        "| population reward | KL (nats) | held-out acc. majority | held-out acc. minority | final alpha (maj / min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dpo_worst = {r["seed"]: r["worst_group_reward"] for r in runs if r["method"] == "dpo"}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        alphas = [r["alpha"] for r in mine if r["alpha"] is not None]
        alpha = " / ".join(f"{np.mean([a[g] for a in alphas]):.2f}" for g in GROUPS) if alphas else "-"
        rows.append(
            f"| {method} | {_cell([r['group_reward']['majority'] for r in mine])} "
            f"| {_cell([r['group_reward']['minority'] for r in mine])} "
            f"| {_cell([r['worst_group_reward'] for r in mine])} "
            f"| {_cell([r['worst_group_reward'] - dpo_worst[r['seed']] for r in mine])} "
            f"| {_cell([r['mean_reward'] for r in mine])} "
            f"| {_cell([r['kl'] for r in mine], 2)} | {_cell([r['heldout_accuracy']['majority'] for r in mine])} "
            f"| {_cell([r['heldout_accuracy']['minority'] for r in mine])} | {alpha} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--etas", type=float, nargs="+", default=[0.0, 0.1, 1.0], help="group_robust_step_size values")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--n-per-prompt", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=2000, help="held-out pairs for the implicit-reward accuracy")
    parser.add_argument("--output-dir", default=str(OUT))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    methods = ["dpo"] + [f"group-robust eta={eta:g}" for eta in args.etas]
    runs = []
    for seed in args.seeds:
        world = with_shares(make_world("groups", seed), SHARES)
        reference = reference_policy(world, seed, progress=False)
        annotator = GroupMix(BradleyTerry(1.0))
        records = draw_dataset(world, "pairwise", args.steps * args.batch, annotator, seed=seed)
        held_out = draw_dataset(world, "pairwise", args.heldout, annotator, seed=seed + 10_000)
        ref_eval = evaluate_policy(
            world, reference.model, reference.tokenizer, n_per_prompt=args.n_per_prompt, seed=seed, progress=False
        )
        runs.append(
            {
                "seed": seed,
                "method": "reference",
                "group_reward": ref_eval.group_rewards,
                "worst_group_reward": ref_eval.worst_group_reward,
                "mean_reward": ref_eval.mean_reward,
                "kl": 0.0,
                "heldout_accuracy": {g: float("nan") for g in GROUPS},
                "alpha": None,
            }
        )
        for method, eta in zip(methods, [None, *args.etas]):
            options = dict(steps=args.steps, batch=args.batch, lr=args.lr, beta=args.beta, seed=seed)
            model, info = train(reference, records, held_out, eta=eta, **options)
            figures = evaluate(world, model, reference, ref_eval.samples, args.n_per_prompt, seed)
            runs.append({"seed": seed, "method": method, **figures, **info})
            print(
                f"seed {seed} {method:>22}: rewards {figures['group_reward']}, KL {figures['kl']:.2f}, "
                f"held-out acc {info['heldout_accuracy']}, alpha {info['alpha']} ({info['train_seconds']:.0f} s)"
            )
    minutes = (time.perf_counter() - start) / 60
    table = summarize(runs, ["reference", *methods])
    markdown = [
        "# MaxMin policies: plain DPO against group-robust DPO (lab world `groups` at 80 / 20)",
        "",
        f"Seeds {args.seeds}; per seed {args.steps * args.batch} fresh Bradley-Terry pairs from users drawn by share "
        f"(one epoch: {args.steps} steps of {args.batch}), learning rate {args.lr}, beta {args.beta}, from the "
        "world's reference policy. Rewards: mean true reward of each group over "
        f"{args.n_per_prompt} samples per prompt; worst-group: the lower of the two; population: share-weighted. "
        f"Held-out accuracy: implicit-reward accuracy on {args.heldout} fresh pairs per group. Mean ± standard error "
        "over seeds.",
        "",
        *table,
        "",
        f"Run time {minutes:.1f} min (`python benchmarks/maxmin_dpo.py`).",
    ]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(table))
    print(f"wrote {out}/results.md and results.json ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
