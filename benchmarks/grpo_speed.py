"""GRPO speed and memory: prefkit's `OnlineTrainer` against TRL's `GRPOTrainer`, side by side.

    python benchmarks/grpo_speed.py                                  # fp32 on this CPU, every framework
    python benchmarks/grpo_speed.py --dtype bf16 --results-md benchmarks/RESULTS.md
    python benchmarks/grpo_speed.py --smoke                          # tiny sizes, 1+1 steps (< 1 min)

Configuration ``small`` (random weights): the Llama of ``dpo_speed.py``'s small shape (vocabulary 32,000,
hidden 256, 4 layers, 4 heads, MLP 688, untied embeddings); 4 prompts of 64 tokens per step, G = 8
completions each (32 completions per step), every completion exactly 64 tokens (``min_new_tokens`` =
``max_new_tokens`` in both, so both do the same work); sampling at temperature 1 with no top-k / top-p;
the same rule reward (the share of words with an even id) called the same way; ``grpo`` loss (per-sequence
mean), group-normalised advantages, ``beta`` 0.04 with a frozen reference (the initial policy), one update
per rollout batch, AdamW at a constant learning rate, no gradient checkpointing, no dropout.

Runs: ``prefkit`` (its defaults: a shared prompt prefill in generation, the chunked log-prob engine),
``prefkit+shared`` (also ``share_prompt``: each prompt runs once for its 8 completions in training), ``trl``.

How it is made fair. The parent writes one checkpoint, one word-level tokenizer (``dpo_speed.py``'s: one
word = one token, BOS in front) and one prompt file; each framework trains in its own subprocess from them,
with the same ``TrainingArguments`` values. Each child reports the token ids of its first prompt; the parent
checks they are equal and 64 long.

Correctness gate, on identical rollouts: each framework also runs 2 steps in which its generation is replaced
by the same fixed completions (a seeded function of the prompt and the completion's index in its group), so
both score, train and update on the same tokens. The step-1 loss (the KL is 0 and the advantages of a group
sum to 0, so it is ~0) must agree within 1e-6 and the step-2 loss (``beta`` x the KL after one identical
AdamW update, at learning rate 1e-2 so that it stands far above float noise) within 1e-3 relative (1e-2 in
bf16, where TRL's log-softmax runs in bf16). The figures are written to Markdown only when the gate passes.

Timing: steps are stamped by a callback (``on_step_begin`` / ``on_step_end``); after ``--warmup`` steps,
end-to-end completions/s is ``--steps`` x 32 over the wall time of the timed steps. Generation time is the
time inside each framework's generation call (prefkit ``OnlineTrainer._rollouts``, TRL
``GRPOTrainer._generate_single_turn``); generation tokens/s counts the completion tokens; training tokens/s
counts prompt + completion tokens of the 32 rows over the rest of the step (rewards, advantages, reference
and policy forward, backward, optimizer). Memory: the peak resident set size during training
(``dpo_speed.MemoryProbe``), and on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dpo_speed as dpo  # benchmarks/ is on sys.path when this script runs

FRAMEWORKS = ("prefkit", "prefkit+shared", "trl")
BETA = 0.04
GATE_LR = 1e-2  # the gate's update is large enough that beta x KL at step 2 stands far above float noise


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    setup: dpo.Setup  # the model's shape (its batch / prompt / response fields are not used)
    prompts: int  # prompts per step
    generations: int  # G
    prompt: int  # prompt tokens, BOS included
    completion: int  # completion tokens (forced)

    @property
    def completions(self) -> int:
        return self.prompts * self.generations


SHAPES = {
    "small": Shape("small", dataclasses.replace(dpo.SMALL, prompt=64, response=64), 4, 8, 64, 64),
    "smoke": Shape("smoke", dpo.SETUPS["smoke"], 2, 4, 8, 8),
}


def even_words(prompts, completions, **fields) -> list[float]:
    """The benchmark's reward: the share of words ``wN`` with an even ``N`` (both frameworks call this)."""
    out = []
    for text in completions:
        words = text.split()
        out.append(sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return out


def fixed_completion(prompt_ids: list[int], k: int, length: int, vocab: int) -> list[int]:
    """The gate's completion ``k`` of a prompt: ``length`` word ids seeded by the prompt and ``k``."""
    rng = random.Random(hash((tuple(prompt_ids), k)) & 0xFFFFFFFF)
    return [rng.randrange(len(dpo.SPECIALS), vocab) for _ in range(length)]


# ------------------------------------------------------------------------------------------
# Child process
# ------------------------------------------------------------------------------------------


def common_args(spec: dict[str, Any]) -> dict[str, Any]:
    steps = 2 if spec["gate"] else spec["warmup"] + spec["steps"]
    return {
        "output_dir": spec["output_dir"],
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": GATE_LR if spec["gate"] else spec["lr"],
        "lr_scheduler_type": "constant",
        "gradient_checkpointing": False,
        "bf16": spec["dtype"] == "bf16",
        "use_cpu": spec["device"] == "cpu",
        "seed": spec["seed"],
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


class GenTimer:
    """Wall time spent inside a generation function."""

    def __init__(self, device: str):
        self.device, self.seconds = device, 0.0

    def wrap(self, fn):
        import torch

        def timed(*args, **kwargs):
            if self.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            return out

        return timed


def prefkit_trainer(model, tokenizer, prompts, spec, callbacks, gen: GenTimer):
    from prefkit.data.tokenize import tokenize_prompt
    from prefkit.online.rewards import CombinedReward, build_reward
    from prefkit.online.rollouts import Rollout
    from prefkit.online.trainer import OnlineArguments, OnlineTrainer

    shape = spec["shape"]
    args = OnlineArguments(
        **common_args(spec),
        per_device_train_batch_size=shape["prompts"],
        loss="grpo",
        loss_params={"beta": BETA},
        advantage="grpo",
        num_generations=shape["generations"],
        max_new_tokens=shape["completion"],
        min_new_tokens=shape["completion"],
        rollout_batch_size=shape["prompts"] * shape["generations"],
        share_prompt=spec["framework"] == "prefkit+shared",
        train_sampling_strategy="sequential",
    )
    reward = build_reward("callable", function=f"{os.path.abspath(__file__)}:even_words")
    trainer = OnlineTrainer(
        model,
        args,
        train_dataset=[{"prompt": p} for p in prompts],
        processing_class=tokenizer,
        rewards=CombinedReward([("even", reward, 1.0)]),
        callbacks=callbacks,
    )
    if spec["gate"]:
        g, vocab = shape["generations"], spec["vocab"]

        def fixed(records, indices):
            out = []
            for i, record in enumerate(records):
                ids = tokenize_prompt(record["prompt"], tokenizer)
                for k in range(g):
                    c = fixed_completion(ids, k, shape["completion"], vocab)
                    out.append(
                        Rollout(i, ids, c, [0.0] * len(c), tokenizer.decode(c, skip_special_tokens=True), "length")
                    )
            return out

        trainer._rollouts = fixed
    trainer._rollouts = gen.wrap(trainer._rollouts)
    return trainer, tokenize_prompt(prompts[0], tokenizer)


def trl_trainer(model, tokenizer, prompts, spec, callbacks, gen: GenTimer):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    shape = spec["shape"]
    args = GRPOConfig(
        **common_args(spec),
        per_device_train_batch_size=shape["prompts"] * shape["generations"],
        num_generations=shape["generations"],
        max_completion_length=shape["completion"],
        generation_kwargs={"min_new_tokens": shape["completion"]},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=BETA,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        disable_dropout=True,
        log_completions=False,
        shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[even_words],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if spec["gate"]:
        vocab = spec["vocab"]

        def fixed(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            seen: dict[tuple, int] = {}
            out = []
            for ids in prompt_ids:
                k = seen.get(tuple(ids), 0)
                seen[tuple(ids)] = k + 1
                out.append(fixed_completion(list(ids), k, shape["completion"], vocab))
            return out, None

        trainer._generate_single_turn = fixed
    trainer._generate_single_turn = gen.wrap(trainer._generate_single_turn)
    first = tokenizer(prompts[0])["input_ids"]
    return trainer, first


def run_child(spec_path: Path, makers: dict[str, Any] | None = None) -> None:
    """Train one framework as ``spec_path`` says (``makers``: framework prefix -> trainer builder; default this
    script's prefkit and TRL builders) and write its measurements next to it: step stamps, the time spent in
    generation, the exact loss of every step (from ``training_step``: logs may be rounded), peak memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    makers = makers or {"prefkit": prefkit_trainer, "trl": trl_trainer}
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    probe = dpo.MemoryProbe(spec["device"])
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).read_text().splitlines()]
    timer = dpo.step_timer_callback(probe)
    gen = GenTimer(spec["device"])
    losses: list[float] = []
    gen_marks: list[float] = []

    class GenMarks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            gen_marks.append(gen.seconds)

    make = next(fn for prefix, fn in makers.items() if spec["framework"].startswith(prefix))
    trainer, first_ids = make(model, tokenizer, prompts, spec, [timer, GenMarks()], gen)
    step = trainer.training_step

    def recorded(*args, **kwargs):
        loss = step(*args, **kwargs)
        losses.append(float(loss))
        return loss

    trainer.training_step = recorded
    trainer.train()
    result = {
        "framework": spec["framework"],
        "first_prompt_ids": list(first_ids),
        "losses": losses,
        "step_begins": timer.begins,
        "step_ends": timer.ends,
        "gen_marks": gen_marks,
        "setup_peak_mib": timer.setup_peak_mib,
        "train_start_mib": timer.train_start_mib,
        "train_peak_mib": probe.peak(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------


def prepare(shape: Shape, folder: Path, n_prompts: int, seed: int) -> None:
    model = dpo.build_model(dataclasses.replace(shape.setup, prompt=shape.prompt, response=shape.completion), seed)
    model.save_pretrained(folder / "model")
    dpo.build_word_tokenizer(shape.setup.vocab).save_pretrained(folder / "model")
    rng = random.Random(seed)
    with open(folder / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(n_prompts):
            words = " ".join(f"w{rng.randrange(len(dpo.SPECIALS), shape.setup.vocab)}" for _ in range(shape.prompt - 1))
            fh.write(json.dumps({"prompt": words}) + "\n")


def launch(framework: str, shape: Shape, folder: Path, opts, gate: bool, script: str | None = None) -> dict[str, Any]:
    """Run ``framework`` in its own process (``script --child SPEC``; default this script) on the inputs in
    ``folder``; its measurements."""
    tag = framework.replace("+", "_") + ("-gate" if gate else "")
    spec = {
        "framework": framework,
        "gate": gate,
        "shape": dataclasses.asdict(shape) | {"setup": None},
        "vocab": shape.setup.vocab,
        "model_dir": str(folder / "model"),
        "prompts": str(folder / "prompts.jsonl"),
        "output_dir": str(folder / f"out-{tag}"),
        "result": str(folder / f"result-{tag}.json"),
        "steps": opts.steps,
        "warmup": opts.warmup,
        "threads": opts.threads,
        "device": opts.device,
        "dtype": opts.dtype,
        "lr": opts.lr,
        "seed": opts.seed,
    }
    spec_path = folder / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    print(f"  {shape.name}: running {framework}{' (gate: identical rollouts)' if gate else ''} ...", flush=True)
    dpo.run_child_script(
        script or os.path.abspath(__file__), spec_path, folder / f"log-{tag}.txt", opts.threads, framework
    )
    return json.loads(Path(spec["result"]).read_text())


def figures(raw: dict[str, Any], shape: Shape, warmup: int) -> dict[str, Any]:
    begins, ends, marks = raw["step_begins"], raw["step_ends"], raw["gen_marks"]
    span = ends[-1] - begins[warmup]
    steps = len(ends) - warmup
    gen_s = marks[-1] - marks[warmup - 1]
    completion_tokens = steps * shape.completions * shape.completion
    row_tokens = steps * shape.completions * (shape.prompt + shape.completion)
    return {
        "completions_per_s": steps * shape.completions / span,
        "step_s": span / steps,
        "generation_s": gen_s / steps,
        "generation_tokens_per_s": completion_tokens / gen_s,
        "training_tokens_per_s": row_tokens / (span - gen_s),
        "peak_mib": max(raw["setup_peak_mib"], raw["train_peak_mib"]),
        "train_peak_mib": raw["train_peak_mib"],
        "train_growth_mib": raw["train_peak_mib"] - raw["train_start_mib"],
        "load_average": raw["load_average"],
    }


ROWS = (
    ("completions/s, end to end", "completions_per_s", "{:.2f}"),
    ("step time (s)", "step_s", "{:.2f}"),
    ("generation time per step (s)", "generation_s", "{:.2f}"),
    ("generation tokens/s (completion tokens)", "generation_tokens_per_s", "{:,.0f}"),
    ("training tokens/s (prompt + completion)", "training_tokens_per_s", "{:,.0f}"),
    ("peak memory, process (MiB)", "peak_mib", "{:,.0f}"),
    ("peak memory during training (MiB)", "train_peak_mib", "{:,.0f}"),
    ("growth during training (MiB)", "train_growth_mib", "{:,.0f}"),
    ("load average (1 min) at the end", "load_average", "{:.1f}"),
)
NO_RATIO = {"load_average"}
LOWER_IS_BETTER = {"step_s", "generation_s", "peak_mib", "train_peak_mib", "train_growth_mib"}


def table(results: dict[str, dict], gate: dict[str, list[float]], markdown: bool) -> str:
    names = list(results)
    ours = [n for n in names if n.startswith("prefkit")]
    header = ["metric", *names, *[f"{n}/trl" for n in ours]]
    rows = []
    for label, key, fmt in ROWS:
        cells = [label, *[fmt.format(results[n][key]) for n in names]]
        for n in ours:
            cells.append(
                "" if key in NO_RATIO or "trl" not in results else f"{results[n][key] / results['trl'][key]:.2f}x"
            )
        rows.append(cells)
    for step in (0, 1):
        label = f"loss at step {step + 1}, identical rollouts"
        rows.append([label, *[f"{gate[n][step]:.8f}" for n in names], *["" for _ in ours]])
    return dpo.render_table(header, rows, markdown)


def gate_failures(gate: dict[str, list[float]], dtype: str) -> list[str]:
    """Step 1 within 1e-6; step 2 within 1e-3 relative in fp32, 1e-2 in bf16 (TRL computes its log-softmax
    in bf16 there, prefkit in fp32; bf16 keeps 8 bits of mantissa, 0.4 % per rounding)."""
    if "trl" not in gate:
        return []
    rtol = 1e-2 if dtype == "bf16" else 1e-3
    failures = []
    ref = gate["trl"]
    for name, losses in gate.items():
        if name == "trl":
            continue
        if abs(losses[0] - ref[0]) > 1e-6:
            failures.append(f"step-1 loss {name} {losses[0]:.3e} vs trl {ref[0]:.3e}")
        if abs(losses[1] - ref[1]) > rtol * abs(ref[1]):
            failures.append(f"step-2 loss {name} {losses[1]:.8g} vs trl {ref[1]:.8g} (rtol {rtol:g})")
    return failures


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6; --smoke: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's default)")
    p.add_argument("--only", choices=FRAMEWORKS, action="append", help="run only these frameworks (repeatable)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes, 1 + 1 steps")
    p.add_argument("--output", type=Path, help="write every figure as JSON here")
    p.add_argument("--results-md", type=Path, help="replace the <!-- grpo_speed:... --> section of this file")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.steps = opts.steps if opts.steps is not None else (1 if opts.smoke else 6)
    opts.warmup = opts.warmup if opts.warmup is not None else 1
    if opts.steps < 1 or opts.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child is not None:
        run_child(opts.child)
        return 0
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    opts.threads = opts.threads or torch.get_num_threads()
    command = "python benchmarks/grpo_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    shape = SHAPES["smoke" if opts.smoke else "small"]
    names = opts.only or list(FRAMEWORKS)
    with tempfile.TemporaryDirectory(prefix="grpo_speed_") as tmp:
        folder = Path(tmp)
        prepare(shape, folder, shape.prompts * (opts.warmup + opts.steps), opts.seed)
        gate = {n: launch(n, shape, folder, opts, gate=True)["losses"] for n in names}
        raws = {n: launch(n, shape, folder, opts, gate=False) for n in names}
    firsts = {n: r["first_prompt_ids"] for n, r in raws.items()}
    if len({tuple(v) for v in firsts.values()}) != 1 or len(next(iter(firsts.values()))) != shape.prompt:
        raise SystemExit(f"the frameworks tokenized the first prompt differently: {firsts}")
    results = {n: figures(r, shape, opts.warmup) for n, r in raws.items()}
    s = shape
    describe = (
        f"{s.setup.arch} vocab {s.setup.vocab:,}, hidden {s.setup.hidden}, {s.setup.layers} layers; {s.prompts} "
        f"prompts x G={s.generations} = {s.completions} completions per step, prompt {s.prompt} + completion "
        f"{s.completion} tokens (forced); grpo loss, beta {BETA}, AdamW lr {opts.lr:g}; {opts.dtype} on "
        f"{opts.device}, {opts.threads} threads; {opts.warmup} warm-up + {opts.steps} timed steps"
    )
    return finish("GRPO speed", "grpo_speed", s.name, describe, results, gate, opts, command)


def finish(title: str, marker: str, name: str, describe: str, results, gate, opts, command: str) -> int:
    """Print the table, check the gate on identical rollouts, and (gate passed, ``--results-md``) write the
    ``<!-- MARKER:NAME-DEVICE-DTYPE -->`` section; the exit status (1: the gate failed)."""
    info = dpo.machine_info(opts)
    print(f"\n== {title}, {name}: {describe}")
    print(table(results, gate, markdown=False))
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"command: {command}")
    if opts.output:
        opts.output.write_text(json.dumps({"results": results, "gate": gate, "machine": info}, indent=2))
    failures = gate_failures(gate, opts.dtype)
    if failures:
        print("LOSS GATE FAILED (results not written to Markdown):\n  " + "\n  ".join(failures))
        return 1
    if opts.results_md:
        from _results_md import section, write_section

        key = f"{name}-{opts.device}-{opts.dtype}"
        body = [
            f"## {title}: {key}",
            "",
            f"Run {dt.date.today().isoformat()}: `{command}`",
            "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".",
            "",
            describe + ".",
            "",
            table(results, gate, markdown=True),
        ]
        write_section(opts.results_md, f"{marker}:{key}", section(f"{marker}:{key}", "\n".join(body)))
        print(f"wrote the {marker}:{key} section of {opts.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
