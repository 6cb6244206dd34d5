"""DPO training speed and memory: prefkit's `PreferenceTrainer` against TRL's `DPOTrainer`, side by side.

    python benchmarks/dpo_speed.py                          # configuration "small", both frameworks
    python benchmarks/dpo_speed.py --config both --output results.json --results-md benchmarks/RESULTS.md
    python benchmarks/dpo_speed.py --sweep --only prefkit   # peak memory against response length / vocabulary
    python benchmarks/dpo_speed.py --smoke                  # tiny sizes, 2 steps, every framework (< 90 s)
    python benchmarks/dpo_speed.py --only prefkit --prefkit logps_chunk_size=64 --prefkit precompute_ref_logps=true
    python benchmarks/dpo_speed.py --config qwen05b --device cuda --dtype bf16

Configurations (random weights, sigmoid DPO with beta 0.1, a frozen copy of the initial policy as the
reference, AdamW, constant learning rate, no dropout, no gradient accumulation, no gradient checkpointing):

- ``small``: Llama, vocabulary 32,000, hidden 256, 4 layers, 4 heads, MLP 688, untied embeddings;
  8 pairs per step, prompts of 64 tokens, chosen and rejected responses of 96 tokens.
- ``large-vocab``: as ``small`` with vocabulary 128,000 and responses of 256 tokens.
- ``qwen05b``: Qwen2.5-0.5B's shape (vocabulary 151,936, hidden 896, 24 layers, 14 heads, 2 KV heads,
  MLP 4,864, tied embeddings), rows of 1,024 tokens (prompt 256 + response 768), 4 pairs per step;
  meant for ``--device cuda``. On CUDA, TRL also runs with ``use_liger_kernel=True`` when
  ``liger_kernel`` is importable.

Runs: ``prefkit`` (its defaults), ``prefkit+shared`` (the same with ``share_prompt=true``: each
prompt runs once for its chosen and rejected response; same log-probs within 1e-5) and ``trl``; ``--prefkit
KEY=VALUE`` sets any other prefkit training option for both prefkit runs (printed in the header).

How it is made fair. The parent process writes one model checkpoint, one tokenizer and one record file
to a temporary folder; each framework then trains in **its own subprocess** (so each peak memory is its
own) from that same checkpoint, with the same `TrainingArguments` values (batch, learning rate,
sequential data order, seed, threads, precision; TRL's defaults ``gradient_checkpointing=True`` and
``bf16=True`` are set to the values prefkit uses). Each framework builds its own default reference: prefkit
a deep copy of the policy, TRL a second load of the checkpoint. The tokenizer is word-level (one word =
one token, built with the `tokenizers` library, vocabulary as configured) and puts BOS in front of a text,
so TRL (tokenize prompt and prompt+completion+EOS text) and prefkit (tokenize prompt and completion
separately, append EOS) get the same token ids: the prompt is BOS + ``prompt - 1`` words, each response
``response - 1`` words + EOS. Each child reports the ids of its first tokenized example and the parent
checks they are equal and of the requested lengths.

Correctness gate: the loss at step 1 must agree within 1e-4 (relative). With the reference equal to the
initial policy that loss is log 2 for any correct implementation, so the loss at step 2 (after one
identical AdamW update, which checks the gradients) is compared too, within 1e-3 (relative).

Timing: a `TrainerCallback` stamps ``on_step_begin`` / ``on_step_end``; after ``--warmup`` optimizer steps,
throughput is ``--steps`` optimizer steps over the wall time from the first timed step's begin to the last
one's end (so dataset preparation and model loading are excluded; batch collation and logging between
steps are included, as in real training). Tokens per second count prompt + chosen + rejected tokens of
each pair (``prompt + 2 * response``). Other processes on the machine slow a run down: the table shows
the share of ``threads`` CPUs the process got during the timed steps (its CPU time over wall time x
threads) and the load average at the end; compare frameworks only when both are close to 100%.

Memory: on CPU the peak resident set size (``VmHWM`` of /proc/self/status, as ``getrusage``'s
``ru_maxrss``) of the child process; the peak is also reset at the start of training (``clear_refs``) to
give the peak *during* training and its growth over the RSS at that moment. On CUDA
``torch.cuda.max_memory_allocated`` is used the same way.

Model FLOPs utilisation (MFU). With ``N`` = number of parameters without the input embedding (that is,
the decoder layers, the final norm and the LM head; a tied LM head is counted once), one pair of rows
with ``T = prompt + response`` tokens each costs

    model FLOPs per pair = 6 * N * 2T  (policy forward + backward)  +  2 * N * 2T  (reference forward)
                         = 16 * N * T

(attention score FLOPs are not counted, as in the usual ``6 N`` rule; every token counts, including prompt
tokens that an implementation may skip projecting to the vocabulary). The count is the same for every run,
so ``prefkit+shared``, which runs each prompt once instead of twice, does fewer FLOPs than counted: its MFU
is an effective rate (the useful work per second), not the hardware's utilisation. MFU is the achieved model FLOP/s over
the peak of a large square ``torch.matmul`` measured in the same run on the same device and thread count,
in float32 and in bfloat16.

``--sweep`` trains 1 warm-up + 2 timed steps of 2 pairs at each point of two sweeps on the ``small``
shape: response length 128 ... 2,048 at vocabulary 32,000, and vocabulary 32,000 ... 256,000 at response
length 256; it reports the peak memory, its growth during training, and that growth minus gradients and
AdamW's two moments (3 x the policy's parameter bytes): the working memory of activations and log-prob
computation, to compare with the size of the full ``[rows, T, vocab]`` float32 logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FRAMEWORKS = ("prefkit", "prefkit+shared", "trl")
BETA = 0.1
LOSS_RTOL = {1: 1e-4, 2: 1e-3}  # step -> relative tolerance of the loss gate
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
MIB = 1024 * 1024


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration: the model's shape and the batch."""

    name: str
    arch: str  # "llama" or "qwen2"
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    batch: int  # pairs per optimizer step
    prompt: int  # tokens, BOS included
    response: int  # tokens of each of chosen and rejected, EOS included

    @property
    def row_tokens(self) -> int:
        return self.prompt + self.response

    @property
    def pair_tokens(self) -> int:
        """Prompt + chosen + rejected tokens of one pair (the tokens/s unit)."""
        return self.prompt + 2 * self.response


SMALL = Setup("small", "llama", 32000, 256, 4, 4, 4, 688, False, batch=8, prompt=64, response=96)
SETUPS = {
    "small": SMALL,
    "large-vocab": dataclasses.replace(SMALL, name="large-vocab", vocab=128000, response=256),
    "qwen05b": Setup("qwen05b", "qwen2", 151936, 896, 24, 14, 2, 4864, True, batch=4, prompt=256, response=768),
    "smoke": Setup("smoke", "llama", 512, 32, 2, 2, 2, 64, False, batch=2, prompt=8, response=12),
}
SWEEP_LENGTHS = (128, 256, 512, 1024, 2048)
SWEEP_VOCABS = (32000, 64000, 128000, 256000)
SWEEP_BATCH = 2


# ------------------------------------------------------------------------------------------
# Shared inputs: tokenizer, model checkpoint, records
# ------------------------------------------------------------------------------------------


def build_word_tokenizer(vocab_size: int):
    """Word-level tokenizer: ``<pad> <s> </s> <unk>`` then ``w4 ... w{vocab_size-1}``; splits on
    whitespace and puts ``<s>`` in front of a text (as Llama's tokenizer does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_model(setup: Setup, seed: int):
    """A randomly initialised causal LM of ``setup``'s shape, float32, no dropout."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[setup.arch]
    config = config_cls(
        vocab_size=setup.vocab,
        hidden_size=setup.hidden,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.kv_heads,
        intermediate_size=setup.intermediate,
        max_position_embeddings=setup.row_tokens,
        tie_word_embeddings=setup.tied,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def flop_params(model) -> int:
    """``N`` of the FLOPs formula: all parameters but the input embedding (a tied LM head counts once)."""
    total = sum(p.numel() for p in model.parameters())  # a shared (tied) tensor is listed once
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return total if tied else total - embedding.numel()


def make_records(setup: Setup, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` pairs of random words; a response text starts with a space so that TRL's
    ``prompt + chosen`` string splits into the same words."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(len(SPECIALS), setup.vocab)}" for _ in range(k))

    return [
        {
            "prompt": words(setup.prompt - 1),  # + BOS
            "chosen": " " + words(setup.response - 1),  # + EOS
            "rejected": " " + words(setup.response - 1),
        }
        for _ in range(n)
    ]


def prepare_inputs(setup: Setup, folder: Path, n_records: int, seed: int) -> dict[str, Any]:
    """Write the checkpoint, tokenizer and records to ``folder``; return the model's FLOP figures."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = build_model(setup, seed)
    model.save_pretrained(folder / "model")
    build_word_tokenizer(setup.vocab).save_pretrained(folder / "model")
    with open(folder / "records.jsonl", "w", encoding="utf-8") as fh:
        for rec in make_records(setup, n_records, seed):
            fh.write(json.dumps(rec) + "\n")
    n = flop_params(model)
    return {
        "flop_params": n,
        "total_params": sum(p.numel() for p in model.parameters()),
        "flops_per_pair": 16 * n * setup.row_tokens,
    }


# ------------------------------------------------------------------------------------------
# Child process: one framework, one run
# ------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryProbe:
    """Peak memory of this process: CPU resident set (VmHWM) or CUDA allocated bytes, in MiB."""

    def __init__(self, device: str):
        self.device = device

    def current(self) -> float:
        import torch

        if self.device == "cuda":
            return torch.cuda.memory_allocated() / MIB
        return _proc_status_kib("VmRSS") / 1024

    def peak(self) -> float:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / MIB
        return _proc_status_kib("VmHWM") / 1024

    def reset_peak(self) -> None:
        """Start a new peak from the current usage (Linux: ``echo 5 > /proc/self/clear_refs``)."""
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")


def step_timer_callback(probe: MemoryProbe):
    """A `TrainerCallback` that stamps each optimizer step and resets the memory peak at train begin."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if probe.device == "cuda":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.cpu_begins: list[float] = []  # process CPU seconds (all threads)
            self.cpu_ends: list[float] = []
            self.setup_peak_mib = self.train_start_mib = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.setup_peak_mib = probe.peak()
            probe.reset_peak()
            self.train_start_mib = probe.current()

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.begins.append(time.perf_counter())
            self.cpu_begins.append(time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

    return StepTimer()


def recording(trainer_cls):
    """``trainer_cls`` whose training losses are kept (detached, one per optimizer step)."""

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                self.recorded_losses.append((out[0] if return_outputs else out).detach())
            return out

    return Recording


def common_args(spec: dict[str, Any]) -> dict[str, Any]:
    """`TrainingArguments` values both frameworks get."""
    steps = spec["warmup"] + spec["steps"]
    return {
        "output_dir": spec["output_dir"],
        "per_device_train_batch_size": spec["setup"]["batch"],
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "train_sampling_strategy": "sequential",
        "gradient_checkpointing": False,
        "bf16": spec["dtype"] == "bf16",
        "use_cpu": spec["device"] == "cpu",
        "seed": spec["seed"],
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def prefkit_trainer(model, tokenizer, records, spec, callback):
    from prefkit.data.records import PairwiseRecord
    from prefkit.train.config import PreferenceConfig
    from prefkit.train.trainer import PreferenceTrainer

    args = PreferenceConfig(
        **common_args(spec),
        loss="dpo",
        loss_params={"beta": BETA},
        max_length=None,
        max_prompt_length=None,
        **({"share_prompt": True} if spec["framework"] == "prefkit+shared" else {}),
        **spec["prefkit_options"],
    )
    data = [PairwiseRecord(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in records]
    trainer = recording(PreferenceTrainer)(
        model, args, train_dataset=data, processing_class=tokenizer, callbacks=[callback]
    )
    row = trainer.train_dataset[0]
    ids = {k: row[f"{k}_input_ids"] for k in ("prompt", "chosen", "rejected")}
    return trainer, ids


def trl_trainer(model, tokenizer, records, spec, callback):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        **common_args(spec),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=False,
        disable_dropout=True,
        use_liger_kernel=spec["framework"] == "trl+liger",
    )
    data = Dataset.from_list(records)
    trainer = recording(DPOTrainer)(
        model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback]
    )
    row = trainer.train_dataset[0]
    ids = {k: row[f"{k}_ids"] for k in ("prompt", "chosen", "rejected")}
    return trainer, ids


def run_child(spec_path: Path) -> None:
    """Train one framework as ``spec_path`` says; write the measurements next to it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    probe = MemoryProbe(spec["device"])
    model_dir = spec["model_dir"]
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    with open(spec["records"], encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    timer = step_timer_callback(probe)
    make = prefkit_trainer if spec["framework"].startswith("prefkit") else trl_trainer
    trainer, first_ids = make(model, tokenizer, records, spec, timer)
    trainer.recorded_losses = []
    if spec["profile"]:
        result_extra = {"profile": profile_train(trainer)}
    else:
        trainer.train()
        result_extra = {}
    result = {
        "framework": spec["framework"],
        "first_example_ids": first_ids,
        "losses": [float(x) for x in trainer.recorded_losses],
        "step_begins": timer.begins,
        "step_ends": timer.ends,
        "cpu_begins": timer.cpu_begins,
        "cpu_ends": timer.cpu_ends,
        "load_average": os.getloadavg()[0],
        "setup_peak_mib": timer.setup_peak_mib,
        "train_start_mib": timer.train_start_mib,
        "train_peak_mib": probe.peak(),
        "ru_maxrss_mib": _ru_maxrss_mib(),
        "threads": torch.get_num_threads(),
        **result_extra,
    }
    Path(spec["result"]).write_text(json.dumps(result))


def _ru_maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def profile_train(trainer) -> str:
    """Train under ``torch.profiler``; the top operators by self time (timings then include its overhead)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if trainer.args.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        trainer.train()
    sort = "self_cuda_time_total" if trainer.args.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


# ------------------------------------------------------------------------------------------
# Parent: peaks, children, figures
# ------------------------------------------------------------------------------------------


def matmul_peak(device: str, dtype_name: str, threads: int, n: int, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` ``[n, n] @ [n, n]`` products."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for i in range(repeats + 2):  # two warm-up products
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class ChildError(RuntimeError):
    """A framework's subprocess failed."""


def run_child_script(script: str, spec_path: Path, log_path: Path, threads: int, what: str) -> None:
    """``python SCRIPT --child SPEC`` with ``threads`` OpenMP/MKL threads, its output in ``log_path``;
    `ChildError` with the log's last lines when it fails. Every benchmark runs each framework this way."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(
            [sys.executable, script, "--child", str(spec_path)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise ChildError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def launch(framework: str, setup: Setup, folder: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Run one framework in a subprocess on the inputs in ``folder``; its measurements."""
    tag = framework.replace("+", "_")
    spec = {
        "framework": framework,
        "setup": dataclasses.asdict(setup),
        "model_dir": str(folder / "model"),
        "records": str(folder / "records.jsonl"),
        "output_dir": str(folder / f"out-{tag}"),
        "result": str(folder / f"result-{tag}.json"),
        "steps": opts.steps,
        "warmup": opts.warmup,
        "threads": opts.threads,
        "device": opts.device,
        "dtype": opts.dtype,
        "lr": opts.lr,
        "seed": opts.seed,
        "profile": opts.profile,
        "prefkit_options": opts.prefkit_options,
    }
    spec_path = folder / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    print(f"  {setup.name}: running {framework} ...", flush=True)
    run_child_script(
        os.path.abspath(__file__), spec_path, folder / f"log-{tag}.txt", opts.threads, f"{framework} on {setup.name}"
    )
    return json.loads(Path(spec["result"]).read_text())


def figures(raw: dict[str, Any], setup: Setup, model_info: dict[str, Any], warmup: int, peaks: dict) -> dict:
    """Throughput, MFU and memory of one run from the child's raw measurements."""
    begins, ends = raw["step_begins"], raw["step_ends"]
    timed = range(warmup, len(ends))
    span = ends[-1] - begins[warmup]
    pairs_per_s = len(timed) * setup.batch / span
    flops_per_s = pairs_per_s * model_info["flops_per_pair"]
    peak = max(raw["setup_peak_mib"], raw["train_peak_mib"])
    return {
        "pairs_per_s": pairs_per_s,
        "tokens_per_s": pairs_per_s * setup.pair_tokens,
        "step_s_median": statistics.median(ends[i] - begins[i] for i in timed),
        "model_tflops_per_s": flops_per_s / 1e12,
        "mfu_fp32": flops_per_s / peaks["fp32"],
        "mfu_bf16": flops_per_s / peaks["bf16"],
        "peak_mib": peak,
        "train_peak_mib": raw["train_peak_mib"],
        "train_growth_mib": raw["train_peak_mib"] - raw["train_start_mib"],
        "ru_maxrss_mib": raw["ru_maxrss_mib"],
        "loss_step1": raw["losses"][0],
        "loss_step2": raw["losses"][1] if len(raw["losses"]) > 1 else None,
        "loss_last": raw["losses"][-1],
        "timed_steps": len(timed),
        "cpu_share": (raw["cpu_ends"][-1] - raw["cpu_begins"][warmup]) / (span * raw["threads"]),
        "load_average": raw["load_average"],
    }


def check_same_tokens(raws: dict[str, dict], setup: Setup) -> None:
    """Every framework saw the same ids, of the requested lengths, for the first example."""
    want = {"prompt": setup.prompt, "chosen": setup.response, "rejected": setup.response}
    for fw, raw in raws.items():
        got = {k: len(v) for k, v in raw["first_example_ids"].items()}
        if got != want:
            raise AssertionError(f"{fw} tokenized the first example to lengths {got}, expected {want}")
    first, *others = raws
    for fw in others:
        if raws[fw]["first_example_ids"] != raws[first]["first_example_ids"]:
            raise AssertionError(f"{first} and {fw} tokenized the first example to different ids")


def loss_gate(results: dict[str, dict]) -> list[str]:
    """Compare every framework's step-1 and step-2 losses with the first one's; the failures."""
    failures = []
    first, *others = results
    for step, rtol in LOSS_RTOL.items():
        key = f"loss_step{step}"
        ref = results[first][key]
        for fw in others:
            value = results[fw][key]
            if ref is None or value is None:
                continue
            if abs(value - ref) > rtol * abs(ref):
                failures.append(f"step-{step} loss {fw} {value:.8g} vs {first} {ref:.8g} (rtol {rtol:g})")
    return failures


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------

ROWS = (
    ("pairs/s", "pairs_per_s", "{:.3f}"),
    ("tokens/s (prompt+chosen+rejected)", "tokens_per_s", "{:,.0f}"),
    ("step time, median (s)", "step_s_median", "{:.3f}"),
    ("model TFLOP/s", "model_tflops_per_s", "{:.4f}"),
    ("MFU vs fp32 matmul peak", "mfu_fp32", "{:.1%}"),
    ("MFU vs bf16 matmul peak", "mfu_bf16", "{:.1%}"),
    ("peak memory, process (MiB)", "peak_mib", "{:,.0f}"),
    ("peak memory during training (MiB)", "train_peak_mib", "{:,.0f}"),
    ("growth during training (MiB)", "train_growth_mib", "{:,.0f}"),
    ("CPU share of the process during timed steps", "cpu_share", "{:.0%}"),
    ("load average (1 min) at the end", "load_average", "{:.1f}"),
    ("loss at step 1", "loss_step1", "{:.6f}"),
    ("loss at step 2", "loss_step2", "{:.6f}"),
    ("loss at last step", "loss_last", "{:.6f}"),
)
NO_RATIO = {"loss_step1", "loss_step2", "loss_last", "cpu_share", "load_average"}


def _fmt(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)


def comparison_table(results: dict[str, dict], markdown: bool) -> str:
    """Rows: metric; columns: each framework, then each prefkit run over each other framework."""
    names = list(results)
    ours = [n for n in names if n.startswith("prefkit")]
    others = [n for n in names if not n.startswith("prefkit")]
    pairs = [(a, b) for a in ours for b in others]
    header = ["metric", *names, *[f"{a}/{b}" for a, b in pairs]]
    rows = []
    for label, key, fmt in ROWS:
        cells = [label, *[_fmt(fmt, results[n][key]) for n in names]]
        for a, b in pairs:
            x, y = results[a][key], results[b][key]
            cells.append("" if key in NO_RATIO or not x or not y else f"{x / y:.2f}x")
        rows.append(cells)
    return render_table(header, rows, markdown)


def render_table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def machine_info(opts: argparse.Namespace) -> dict[str, str]:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    cpu = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} logical CPUs)" if names else cpu
    info = {
        "cpu": cpu,
        "threads": str(opts.threads),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "python": platform.python_version(),
    }
    if opts.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe_setup(setup: Setup, model_info: dict[str, Any], opts: argparse.Namespace) -> str:
    return (
        f"{setup.arch} vocab {setup.vocab:,}, hidden {setup.hidden}, {setup.layers} layers, {setup.heads} heads "
        f"({setup.kv_heads} KV), MLP {setup.intermediate}, {'tied' if setup.tied else 'untied'} embeddings "
        f"({model_info['total_params'] / 1e6:.1f}M parameters, N = {model_info['flop_params'] / 1e6:.2f}M for "
        f"FLOPs); {setup.batch} pairs/step, prompt {setup.prompt} + responses {setup.response} tokens; "
        f"{opts.dtype} on {opts.device}, {opts.threads} threads; lr {opts.lr:g} constant, AdamW; "
        f"{opts.warmup} warm-up + {opts.steps} timed steps; "
        f"prefkit options: {', '.join(f'{k}={v}' for k, v in opts.prefkit_options.items()) or 'defaults'}; "
        f"{model_info['flops_per_pair'] / 1e9:.1f} model GFLOP per pair"
    )


# ------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------


def frameworks_for(opts: argparse.Namespace) -> list[str]:
    names = [opts.only] if opts.only else list(FRAMEWORKS)
    if "trl" in names and opts.device == "cuda":
        if liger_available():
            names.append("trl+liger")
        else:
            print("note: liger_kernel is not importable; TRL with use_liger_kernel=True is not run")
    return names


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def benchmark_config(setup: Setup, opts: argparse.Namespace, peaks: dict[str, float]) -> dict[str, Any]:
    """Both frameworks on one configuration; prints the table; the figures."""
    n_records = setup.batch * (opts.warmup + opts.steps)
    with tempfile.TemporaryDirectory(prefix="dpo_speed_") as tmp:
        folder = Path(tmp)
        model_info = prepare_inputs(setup, folder, n_records, opts.seed)
        raws = {fw: launch(fw, setup, folder, opts) for fw in frameworks_for(opts)}
    check_same_tokens(raws, setup)
    results = {fw: figures(raw, setup, model_info, opts.warmup, peaks) for fw, raw in raws.items()}
    failures = loss_gate(results)
    print(f"\n== {setup.name}: {describe_setup(setup, model_info, opts)}")
    print(comparison_table(results, markdown=False))
    for fw, raw in raws.items():
        if "profile" in raw:
            print(f"\n-- profile of {fw} (timings above include the profiler's overhead)\n{raw['profile']}")
    losses = ", ".join(f"{fw} {r['loss_step1']:.8f}" for fw, r in results.items())
    print(f"step-1 losses: {losses}")
    return {
        "setup": dataclasses.asdict(setup),
        "model": model_info,
        "results": results,
        "losses": {fw: raw["losses"] for fw, raw in raws.items()},
        "gate_failures": failures,
    }


def sweep_points(opts: argparse.Namespace) -> list[Setup]:
    batch = opts.batch or SWEEP_BATCH
    base = dataclasses.replace(SMALL, batch=batch)
    points = [dataclasses.replace(base, name=f"len{r}", response=r) for r in SWEEP_LENGTHS]
    points += [
        dataclasses.replace(base, name=f"vocab{v // 1000}k", vocab=v, response=256)
        for v in SWEEP_VOCABS
        if v != base.vocab  # vocab 32k at length 256 is a point of the length sweep
    ]
    return points


def sweep(opts: argparse.Namespace, peaks: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for setup in sweep_points(opts):
        with tempfile.TemporaryDirectory(prefix="dpo_sweep_") as tmp:
            folder = Path(tmp)
            model_info = prepare_inputs(setup, folder, setup.batch * (opts.warmup + opts.steps), opts.seed)
            for fw in frameworks_for(opts):
                row = {"point": setup.name, "vocab": setup.vocab, "response": setup.response, "framework": fw}
                try:
                    raw = launch(fw, setup, folder, opts)
                except ChildError as err:
                    row["error"] = str(err).splitlines()[-1]
                    rows.append(row)
                    continue
                fig = figures(raw, setup, model_info, opts.warmup, peaks)
                optimizer_mib = 3 * model_info["total_params"] * (2 if opts.dtype == "bf16" else 4) / MIB
                row.update(fig)
                row["working_mib"] = fig["train_growth_mib"] - optimizer_mib
                row["full_logits_mib"] = 2 * setup.batch * setup.row_tokens * setup.vocab * 4 / MIB
                rows.append(row)
    print("\n" + sweep_table(rows, markdown=False))
    return rows


def sweep_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    header = [
        "vocab",
        "response",
        "framework",
        "peak MiB",
        "growth in training MiB",
        "growth - grads - Adam MiB",
        "full fp32 logits MiB",
        "pairs/s",
    ]
    body = []
    for r in rows:
        cells = [f"{r['vocab']:,}", str(r["response"]), r["framework"]]
        if "error" in r:
            body.append(cells + [f"failed: {r['error']}", "", "", "", ""])
            continue
        body.append(
            cells
            + [f"{r[k]:,.0f}" for k in ("peak_mib", "train_growth_mib", "working_mib", "full_logits_mib")]
            + [f"{r['pairs_per_s']:.3f}"]
        )
    return render_table(header, body, markdown)


def results_section(key: str, body: list[str], opts: argparse.Namespace, info: dict[str, str]) -> str:
    from _results_md import section

    machine = ", ".join(f"{k} {v}" for k, v in info.items())
    head = [
        f"## DPO speed: {key}",
        "",
        f"Run {dt.date.today().isoformat()}: `{opts.command}`",
        "",
        f"Machine: {machine}.",
        "",
    ]
    return section(f"dpo_speed:{key}", "\n".join(head + body))


def section_key(name: str, opts: argparse.Namespace) -> str:
    """The RESULTS.md section of a run: the configuration, then the device and dtype unless cpu/fp32, then
    any --prefkit options (so a run with options does not replace the defaults' section)."""
    key = name if (opts.device, opts.dtype) == ("cpu", "fp32") else f"{name}-{opts.device}-{opts.dtype}"
    for option, value in opts.prefkit_options.items():
        key += f"+{option}={value}"
    return key


def write_markdown(path: Path, report: dict[str, Any], opts: argparse.Namespace) -> None:
    from _results_md import write_section

    info = report["machine"]
    peaks = report["matmul_peak_tflops"]
    peak_line = f"Matmul peaks measured in the same run: fp32 {peaks['fp32']:.3f}, bf16 {peaks['bf16']:.3f} TFLOP/s."
    for name, cfg in report["configs"].items():
        key = section_key(name, opts)
        setup = Setup(**cfg["setup"])
        body = [
            describe_setup(setup, cfg["model"], opts) + ".",
            "",
            comparison_table(cfg["results"], markdown=True),
            "",
            peak_line,
        ]
        write_section(path, f"dpo_speed:{key}", results_section(key, body, opts, info))
    if report.get("sweep"):
        key = section_key("sweep", opts)
        body = [sweep_table(report["sweep"], markdown=True), "", peak_line]
        write_section(path, f"dpo_speed:{key}", results_section(key, body, opts, info))
    print(f"wrote the dpo_speed sections of {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config",
        choices=[*[s for s in SETUPS if s != "smoke"], "both"],
        default="small",
        help="configuration (both = small and large-vocab); default small",
    )
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 16; --sweep/--smoke: 2)")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps first (default 2; --sweep/--smoke: 1)")
    p.add_argument("--threads", type=int, help="torch threads in every process (default: torch's default here)")
    p.add_argument("--only", choices=FRAMEWORKS, help="run one framework (default: all of them)")
    p.add_argument("--batch", type=int, help="pairs per step, instead of the configuration's")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate for both (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and the trainers")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="weights (and autocast) dtype of both frameworks; default fp32",
    )
    p.add_argument("--output", type=Path, help="write every figure as JSON here")
    p.add_argument(
        "--results-md", type=Path, help="replace the <!-- dpo_speed:CONFIG --> sections of this Markdown file"
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="peak memory against response length and vocabulary instead (both frameworks unless --only)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, 1+2 steps, every framework (< 90 s)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler's top operators of each child (slows the timed steps)",
    )
    p.add_argument(
        "--prefkit",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a prefkit training option (YAML value), e.g. share_prompt=true or logps_chunk_size=64; repeatable",
    )
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.sweep and opts.smoke:
        p.error("--sweep and --smoke are separate modes")
    short = opts.sweep or opts.smoke
    opts.steps = opts.steps if opts.steps is not None else (2 if short else 16)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if short else 2)
    if opts.steps < 1 or opts.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the step-2 loss check needs two steps)")
    opts.prefkit_options = {}
    for item in opts.prefkit:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--prefkit takes KEY=VALUE, got {item!r}")
        opts.prefkit_options[key.strip()] = yaml.safe_load(value)
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
    opts.command = "python benchmarks/dpo_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    n = 1024 if opts.smoke else (8192 if opts.device == "cuda" else 2048)
    peaks = {d: matmul_peak(opts.device, d, opts.threads, n) for d in ("fp32", "bf16")}
    report: dict[str, Any] = {
        "command": opts.command,
        "machine": machine_info(opts),
        "matmul_peak_tflops": {d: v / 1e12 for d, v in peaks.items()},
        "matmul_size": n,
        "configs": {},
    }
    if opts.sweep:
        report["sweep"] = sweep(opts, peaks)
    else:
        names = ["smoke"] if opts.smoke else (["small", "large-vocab"] if opts.config == "both" else [opts.config])
        for name in names:
            setup = SETUPS[name] if opts.batch is None else dataclasses.replace(SETUPS[name], batch=opts.batch)
            report["configs"][name] = benchmark_config(setup, opts, peaks)
    print(f"\nmatmul peak ({n}x{n}): fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()))
    print(f"command: {opts.command}")
    if opts.output:
        opts.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {opts.output}")
    failures = [f"{name}: {f}" for name, cfg in report["configs"].items() for f in cfg["gate_failures"]]
    if failures:
        print("LOSS GATE FAILED (results not written to Markdown):\n  " + "\n  ".join(failures))
        return 1
    if opts.results_md:
        write_markdown(opts.results_md, report, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
