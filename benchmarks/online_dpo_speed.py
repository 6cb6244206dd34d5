"""Online DPO speed and memory: prefkit's `OnlinePreferenceTrainer` against TRL 1.16's experimental
`OnlineDPOTrainer`, side by side.

    python benchmarks/online_dpo_speed.py                               # fp32 on this CPU
    python benchmarks/online_dpo_speed.py --dtype bf16 --results-md benchmarks/RESULTS.md
    python benchmarks/online_dpo_speed.py --smoke                       # tiny sizes, 1+1 steps

The same setting as ``grpo_speed.py`` (its model, tokenizer, prompts, timing, memory and gate code is
reused): the Llama of ``dpo_speed.py``'s small shape, 16 prompts of 64 tokens per step, K = 2 completions
each (TRL's OnlineDPOTrainer always samples 2), every completion exactly 64 tokens, the same reward
(``word_value``: the mean of each word's id mod 1000, over 1000, continuous so the two samples of a prompt
never tie), DPO (sigmoid) with beta 0.1 against the frozen initial policy, AdamW, constant learning rate.
TRL tokenizes prompts without special tokens, so its prompt texts start with ``<s>``: both see the same ids
(checked). prefkit's pair is the higher- against the lower-scored sample (``pairs: best_worst``), TRL's the
same rule.

Runs: ``prefkit`` (defaults), ``prefkit+shared`` (``share_prompt``: each prompt runs once for its two
samples in training) and ``trl``.

Gate on identical rollouts: both frameworks train 2 steps on the same fixed completions (the generation
call replaced); the step-1 loss is log 2 in both (the reference is the policy) and the step-2 loss, after one
identical AdamW update at learning rate 1e-2, must agree within 1e-3 relative (1e-2 in bf16).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import tempfile
from pathlib import Path

import grpo_speed as grpo

FRAMEWORKS = ("prefkit", "prefkit+shared", "trl")
BETA = 0.1
SHAPES = {
    "small": dataclasses.replace(grpo.SHAPES["small"], prompts=16, generations=2),
    "smoke": dataclasses.replace(grpo.SHAPES["smoke"], prompts=4, generations=2),
}


def word_value(prompts, completions, **fields) -> list[float]:
    """The benchmark's reward: the mean over words ``wN`` of ``(N mod 1000) / 1000``."""
    out = []
    for text in completions:
        values = [int(w[1:]) % 1000 / 1000 for w in text.split() if w[1:].isdigit()]
        out.append(sum(values) / max(len(values), 1))
    return out


def prefkit_trainer(model, tokenizer, prompts, spec, callbacks, gen):
    from prefkit.data.tokenize import tokenize_prompt
    from prefkit.online.preference import OnlinePreferenceArguments, OnlinePreferenceTrainer
    from prefkit.online.rewards import CombinedReward
    from prefkit.online.rollouts import Rollout

    shape = spec["shape"]
    args = OnlinePreferenceArguments(
        **grpo.common_args(spec),
        per_device_train_batch_size=shape["prompts"],
        loss="dpo",
        loss_params={"beta": BETA},
        num_generations=2,
        max_new_tokens=shape["completion"],
        min_new_tokens=shape["completion"],
        rollout_batch_size=2 * shape["prompts"],
        share_prompt=spec["framework"] == "prefkit+shared",
        train_sampling_strategy="sequential",
    )
    trainer = OnlinePreferenceTrainer(
        model,
        args,
        train_dataset=[{"prompt": p} for p in prompts],
        processing_class=tokenizer,
        rewards=CombinedReward([("word_value", word_value, 1.0)]),
        callbacks=callbacks,
    )
    if spec["gate"]:

        def fixed(records, indices, seeds=None):
            out = []
            for i, record in enumerate(records):
                ids = tokenize_prompt(record["prompt"], tokenizer)
                for k in range(2):
                    c = grpo.fixed_completion(ids, k, shape["completion"], spec["vocab"])
                    text = tokenizer.decode(c, skip_special_tokens=True)
                    out.append(Rollout(i, ids, c, [0.0] * len(c), text, "length"))
            return out

        trainer._rollouts = fixed
    trainer._rollouts = gen.wrap(trainer._rollouts)
    return trainer, tokenize_prompt(prompts[0], tokenizer)


def trl_trainer(model, tokenizer, prompts, spec, callbacks, gen):
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    shape = spec["shape"]
    args = OnlineDPOConfig(
        **grpo.common_args(spec),
        per_device_train_batch_size=shape["prompts"],
        max_new_tokens=shape["completion"],
        generation_kwargs={"min_new_tokens": shape["completion"]},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=[BETA],
        loss_type="sigmoid",
        disable_dropout=True,
        missing_eos_penalty=None,
        train_sampling_strategy="sequential",
    )
    texts = ["<s> " + p for p in prompts]  # TRL tokenizes prompts without special tokens
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=[word_value],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if spec["gate"]:

        def fixed(model, prompts_batch, images=None):
            prompt_ids, prompt_mask = _prompt_tensors(trainer, prompts_batch)
            completion_ids, completion_mask = _fixed_completions(prompt_ids, prompt_mask, shape, spec)
            return prompt_ids, prompt_mask, completion_ids, completion_mask, None

        trainer._generate = fixed
    trainer._generate = gen.wrap(trainer._generate)
    return trainer, tokenizer(texts[0], add_special_tokens=False)["input_ids"]


def _prompt_tensors(trainer, prompts_batch):
    """TRL's prompt tokenization of ``_generate`` (left padding, no special tokens), repeated for 2 samples."""
    inputs = trainer.processing_class(
        text=list(prompts_batch), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    device = trainer.accelerator.device
    ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    return ids.repeat(2, 1), mask.repeat(2, 1)


def _fixed_completions(prompt_ids, prompt_mask, shape, spec):
    """The gate's completions in TRL's layout: rows ``[prompts (sample 0); prompts (sample 1)]``."""
    import torch

    b = prompt_ids.shape[0] // 2
    rows = []
    for r in range(prompt_ids.shape[0]):
        ids = prompt_ids[r][prompt_mask[r].bool()].tolist()
        rows.append(grpo.fixed_completion(ids, r // b, shape["completion"], spec["vocab"]))
    completion_ids = torch.tensor(rows, device=prompt_ids.device)
    return completion_ids, torch.ones_like(completion_ids)


def main(argv: list[str] | None = None) -> int:
    opts = grpo.parse_args(argv)
    if opts.child is not None:
        grpo.run_child(opts.child, {"prefkit": prefkit_trainer, "trl": trl_trainer})
        return 0
    import torch

    opts.threads = opts.threads or torch.get_num_threads()
    command = "python benchmarks/online_dpo_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    shape = SHAPES["smoke" if opts.smoke else "small"]
    names = [n for n in (opts.only or FRAMEWORKS) if n in FRAMEWORKS]
    with tempfile.TemporaryDirectory(prefix="online_dpo_speed_") as tmp:
        folder = Path(tmp)
        grpo.prepare(shape, folder, shape.prompts * (opts.warmup + opts.steps), opts.seed)
        script = os.path.abspath(__file__)
        gate = {n: grpo.launch(n, shape, folder, opts, gate=True, script=script)["losses"] for n in names}
        raws = {n: grpo.launch(n, shape, folder, opts, gate=False, script=script) for n in names}
    firsts = {n: r["first_prompt_ids"] for n, r in raws.items()}
    if len({tuple(v) for v in firsts.values()}) != 1:
        raise SystemExit(f"the frameworks tokenized the first prompt differently: {firsts}")
    results = {n: grpo.figures(r, shape, opts.warmup) for n, r in raws.items()}
    describe = (
        f"{shape.setup.arch} vocab {shape.setup.vocab:,}, hidden {shape.setup.hidden}, {shape.setup.layers} layers; "
        f"{shape.prompts} prompts x K=2 = {shape.completions} completions per step, prompt {shape.prompt} + "
        f"completion {shape.completion} tokens (forced); DPO beta {BETA}, AdamW lr {opts.lr:g}; {opts.dtype} on "
        f"{opts.device}, {opts.threads} threads; {opts.warmup} warm-up + {opts.steps} timed steps"
    )
    return grpo.finish("Online DPO speed", "online_dpo_speed", shape.name, describe, results, gate, opts, command)


if __name__ == "__main__":
    sys.exit(main())
