"""`prefkit demo`: DPO on a built-in tiny model and a synthetic preference, in under a minute.

Nothing is downloaded. The demo

1. writes a few hundred synthetic pairwise records to ``OUTPUT_DIR/data.jsonl``: prompts asking
   for help with a topic; both replies state the same fact, the *chosen* one politely and
   completely, the *rejected* one rudely or cut off mid-sentence (seeded templates, so the
   preference is learnable and known);
2. builds a randomly initialised tiny Llama and the byte tokenizer;
3. trains DPO with `PreferenceTrainer` for a few dozen steps, printing loss, implicit-reward
   accuracy and margins as it goes;
4. reports the implicit-reward accuracy on the training pairs and on held-out pairs, saves the
   final model under ``OUTPUT_DIR/model`` and says what to run next.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from prefkit.data.records import PairwiseRecord

TOPICS = [
    ("photosynthesis", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("the moon", "The moon orbits the earth about once every twenty-seven days."),
    ("rain", "Rain forms when water vapour cools into droplets heavy enough to fall."),
    ("volcanoes", "A volcano is an opening where molten rock reaches the surface."),
    ("magnets", "Magnets attract iron because of aligned electron spins."),
    ("tides", "Tides rise and fall because the moon pulls on the oceans."),
    ("bread", "Bread rises because yeast releases carbon dioxide in the dough."),
    ("rainbows", "A rainbow appears when sunlight is bent and split by raindrops."),
    ("bees", "Bees carry pollen between flowers and make honey from nectar."),
    ("thunder", "Thunder is the sound of air expanding fast around lightning."),
    ("ice", "Water freezes into ice at zero degrees Celsius."),
    ("seasons", "Seasons change because the earth is tilted on its axis."),
    ("sound", "Sound is a wave of pressure that travels through the air."),
    ("stars", "Stars shine because of nuclear fusion in their cores."),
    ("rust", "Iron rusts when it reacts with oxygen and water."),
    ("wind", "Wind is air moving from high pressure to low pressure."),
    ("clouds", "Clouds are tiny water droplets floating in the sky."),
    ("fossils", "Fossils are traces of ancient life preserved in rock."),
    ("compasses", "A compass needle points north along the magnetic field."),
    ("echoes", "An echo is sound bouncing back from a hard surface."),
    ("gravity", "Gravity pulls every mass towards every other mass."),
    ("salt water", "Sea water is salty because rivers carry minerals into it."),
    ("shadows", "A shadow forms where an object blocks the light."),
    ("deserts", "Deserts are places that get very little rain each year."),
    ("the heart", "The heart pumps blood around the body all day."),
    ("coral", "Coral reefs are built by tiny animals called polyps."),
    ("snow", "Snow forms when water vapour freezes into crystals."),
    ("mirrors", "A mirror reflects light back at the same angle."),
    ("lightning", "Lightning is a giant spark of static electricity."),
    ("leaves", "Leaves are green because they hold chlorophyll."),
]

PROMPTS = [
    "Can you tell me about {topic}?",
    "Please explain {topic}.",
    "What should I know about {topic}?",
    "I am curious about {topic}. Can you help?",
    "Could you describe {topic} for me?",
]

POLITE_OPENINGS = ["Of course! ", "Happy to help. ", "Sure, gladly. ", "Great question! "]
POLITE_CLOSINGS = [" I hope this helps.", " Let me know if you want more.", " Thanks for asking!"]
RUDE_OPENINGS = ["Ugh, fine. ", "Whatever. ", "Obviously, ", "Not again. "]
RUDE_CLOSINGS = [" Now stop bothering me.", " Look it up yourself next time.", " Go away."]


def make_demo_records(n: int = 300, seed: int = 0) -> list[PairwiseRecord]:
    """``n`` synthetic pairs about the same fact: the chosen reply is polite and complete; the
    rejected one states the same fact rudely (half) or politely but cut off mid-sentence (half)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        topic, fact = rng.choice(TOPICS)
        prompt = rng.choice(PROMPTS).format(topic=topic)
        chosen = rng.choice(POLITE_OPENINGS) + fact + rng.choice(POLITE_CLOSINGS)
        if rng.random() < 0.5:
            rejected = rng.choice(RUDE_OPENINGS) + fact + rng.choice(RUDE_CLOSINGS)
        else:
            words = fact.split()
            rejected = rng.choice(POLITE_OPENINGS) + " ".join(
                words[: rng.randint(2, max(2, len(words) // 2))]
            )
        records.append(PairwiseRecord(prompt=prompt, chosen=chosen, rejected=rejected, id=f"demo-{i}"))
    return records


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir", default="runs/demo", help="where data, metrics and the model go (default: runs/demo)"
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    parser.add_argument(
        "--loss", default="dpo", help="a pairwise loss name, e.g. dpo, ipo, simpo (default: dpo)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the data, the model and training (default: 0)"
    )


def run_demo(
    output_dir: str | Path = "runs/demo",
    steps: int = 40,
    loss: str = "dpo",
    seed: int = 0,
    quiet: bool = False,
):
    """Run the demo; returns ``{"train_accuracy", "heldout_accuracy", "heldout_margin", "seconds", ...}``."""
    from prefkit.data.loaders import load_records, write_records
    from prefkit.losses import get_loss
    from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama
    from prefkit.train.commands import split_holdout
    from prefkit.train.config import PreferenceConfig
    from prefkit.train.trainer import PreferenceTrainer

    say = (lambda *a: None) if quiet else print
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    spec = get_loss(loss)
    if spec.kind != "pairwise":
        raise ValueError(
            f"the demo data is pairwise; loss {loss!r} is {spec.kind}. "
            "Pick a pairwise loss (`prefkit losses`)."
        )
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_path = write_records(make_demo_records(300, seed), out / "data.jsonl")
    records = load_records(data_path)
    train, held_out = split_holdout(records, 0.2, seed)
    say(
        f"prefkit demo: {len(train)} training pairs and {len(held_out)} held-out pairs written to {data_path}"
    )
    say(
        "  chosen = polite and complete, rejected = rude or cut off; "
        "model = tiny random Llama (byte tokenizer)"
    )

    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer), seed=seed)
    log_every = max(1, steps // 8)
    args = PreferenceConfig(
        output_dir=str(out),
        loss=loss,
        max_steps=steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        logging_steps=log_every,
        eval_strategy="steps",
        eval_steps=max(1, steps // 2),
        save_strategy="no",
        max_length=160,
        max_prompt_length=64,
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=quiet,
    )
    trainer = PreferenceTrainer(
        model,
        args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        run_info={
            "model": "tiny (random init, built in)",
            "data": {"train_file": str(data_path), "eval": "20% held out"},
        },
    )
    trainer.train()
    train_metrics = trainer.evaluate(eval_dataset=trainer.train_dataset, metric_key_prefix="eval_train")
    held_metrics = trainer.evaluate()
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    trainer.create_model_card()
    seconds = time.perf_counter() - start
    result = {
        "train_accuracy": train_metrics["eval_train_rewards/accuracies"],
        "heldout_accuracy": held_metrics["eval_rewards/accuracies"],
        "heldout_margin": held_metrics["eval_rewards/margins"],
        "heldout_loss": held_metrics["eval_loss"],
        "seconds": seconds,
        "output_dir": str(out),
    }
    say("")
    say(f"Summary ({loss}, {steps} steps, {seconds:.0f} s):")
    say(
        f"  implicit-reward accuracy  train {result['train_accuracy']:.3f}   "
        f"held-out {result['heldout_accuracy']:.3f}   (chance 0.5)"
    )
    say(
        f"  held-out reward margin    {result['heldout_margin']:.3f}   "
        f"held-out loss {result['heldout_loss']:.4f}"
    )
    say("")
    say(f"Files in {out}/:")
    say("  data.jsonl     the synthetic pairs (prompt, chosen, rejected)")
    say("  metrics.jsonl  every logged metric, one JSON line per log event")
    say("  model/         the trained policy and tokenizer (from_pretrained-ready)")
    say("  README.md      the model card: losses, formulas, hyper-parameters, final metrics")
    say("")
    say("Next: train from a YAML config (same tiny model, example data), then change the loss:")
    say("  prefkit train examples/dpo_tiny.yaml")
    say("  prefkit train examples/dpo_tiny.yaml loss=ipo output_dir=runs/ipo_tiny")
    say("  prefkit losses      # every loss you can put in `loss:`")
    return result


def run(args: argparse.Namespace) -> int:
    import sys

    from prefkit.losses import get_loss

    try:
        kind = get_loss(args.loss).kind
    except KeyError as err:
        print(f"prefkit demo: error: {err.args[0]}", file=sys.stderr)
        return 2
    if kind != "pairwise" or args.steps < 1:
        problem = (
            f"--loss {args.loss} is {kind}; the demo needs a pairwise loss"
            if kind != "pairwise"
            else (f"--steps must be at least 1, got {args.steps}")
        )
        print(f"prefkit demo: error: {problem}", file=sys.stderr)
        return 2
    run_demo(args.output_dir, steps=args.steps, loss=args.loss, seed=args.seed)
    return 0
