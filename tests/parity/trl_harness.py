"""The TRL side of the parity tests: run TRL 1.16's trainers on a tiny model and record what they compute.

Everything here depends only on TRL, ``transformers``, ``datasets`` and ``prefkit.models.tiny``, so the TRL
reference values exist independently of the prefkit code under test.

Setup shared by every case
--------------------------
* model: ``build_tiny_llama(seed=0)`` (float32). The reference is an exact copy; the policy is the same copy
  with every parameter perturbed by ``N(0, 0.05^2)`` noise from a fixed generator, so that log-ratios,
  rewards, margins and accuracies are non-trivial (per-pair ``beta * delta`` spans about ``[-1.6, 1.5]``).
* tokenizer: ``build_byte_tokenizer()`` (plain text, no BOS added by ``__call__``).
* data: the 8 plain-text pairs of :data:`PAIRS` (varied prompt/completion lengths), one batch of all 8
  rows, no shuffling, no truncation.
* each TRL trainer gets its own deep copies of policy and reference (TRL patches ``forward`` in place), is
  built once per configuration, and ``trainer.compute_loss(model, batch)`` is called on the first batch,
  which TRL's own collator builds from TRL's own tokenized dataset, before any update. Loss and logged
  metrics are read back; forward hooks also capture TRL's own per-token log-probs (or logits, for the
  legacy CPO/ORPO trainers) so paper-form variants can be computed from TRL's inputs.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

from prefkit.models.tiny import build_byte_tokenizer, build_tiny_llama

MODEL_SEED = 0
PERTURB_SEED = 1234
PERTURB_SCALE = 0.05

PAIRS: list[dict[str, str]] = [
    {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5, I think."},
    {"prompt": "Name a colour.", "chosen": " Blue is a colour of the sky.", "rejected": " Dog."},
    {
        "prompt": "Q: capital of France?\nA:",
        "chosen": " Paris",
        "rejected": " London is the capital of France.",
    },
    {"prompt": "Say hi", "chosen": " Hi there! How can I help you today?", "rejected": " no"},
    {"prompt": "Translate 'chat' to English.", "chosen": " cat", "rejected": " chat"},
    {
        "prompt": "Is water wet? Answer yes or no, then explain briefly.",
        "chosen": " Yes: it makes things wet.",
        "rejected": " Maybe.",
    },
    {"prompt": "Count to five:", "chosen": " 1 2 3 4 5", "rejected": " 1 2 3"},
    {
        "prompt": "Write a haiku about rain.",
        "chosen": " Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky",
        "rejected": " Rain is wet and cold.",
    },
]


def build_tokenizer(bos: bool = True):
    """The byte tokenizer; ``bos=False`` removes its BOS token (see :func:`trl_cpo`)."""
    tok = build_byte_tokenizer()
    if not bos:
        tok.bos_token = None
    return tok


def build_models(vocab_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(policy, reference)``: reference = tiny Llama (seed 0); policy = reference + fixed noise."""
    ref = build_tiny_llama(vocab_size=vocab_size, seed=MODEL_SEED)
    policy = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(PERTURB_SEED)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * PERTURB_SCALE)
    policy.train()
    ref.eval()
    return policy, ref


def unpaired_records(pairs: list[dict[str, str]] = PAIRS) -> list[dict[str, Any]]:
    """Unpair with TRL's own ``unpair_preference_dataset``: all chosen rows (label True), then all rejected."""
    from trl.data_utils import unpair_preference_dataset

    return unpair_preference_dataset(Dataset.from_list(pairs)).to_list()


@dataclass
class TrlRun:
    """What a TRL trainer computed on the first batch, before any update."""

    loss: float
    metrics: dict[str, float]
    examples: list[dict[str, Any]]  # TRL's tokenized rows, in batch order
    batch: dict[str, torch.Tensor]  # TRL's collated batch
    policy_outputs: list[Any] = field(default_factory=list)  # forward outputs captured, in call order
    ref_outputs: list[Any] = field(default_factory=list)


def _common_args(workdir: str | None, batch_size: int) -> dict[str, Any]:
    return {
        "output_dir": workdir or tempfile.mkdtemp(prefix="prefkit-parity-"),
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "per_device_train_batch_size": batch_size,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "disable_tqdm": True,
    }


def _hook(module: torch.nn.Module, store: list) -> None:
    def hook(_mod, _args, output):
        store.append(
            {
                k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                for k, v in output.items()
                if k in ("log_probs", "logits", "log_sum_sq_probs")
            }
        )

    module.register_forward_hook(hook)


def _run_first_batch(trainer, metrics_store: str, batch_size: int) -> TrlRun:
    examples = [trainer.train_dataset[i] for i in range(batch_size)]
    batch = trainer.data_collator(copy.deepcopy(examples))
    policy_store: list = []
    ref_store: list = []
    _hook(trainer.model, policy_store)
    if getattr(trainer, "ref_model", None) is not None:
        _hook(trainer.ref_model, ref_store)
    trainer.model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = trainer.compute_loss(trainer.model, batch)
    if metrics_store == "_metrics":  # DPO / KTO: lists of floats per step
        metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v}
    else:  # CPO / ORPO: _stored_metrics[train][name] -> list of floats/tensors
        metrics = {k: float(v[-1]) for k, v in trainer._stored_metrics["train"].items() if len(v)}
    return TrlRun(float(loss.detach()), metrics, examples, batch, policy_store, ref_store)


def trl_dpo(policy, ref, tokenizer, pairs=PAIRS, workdir: str | None = None, **config) -> TrlRun:
    """``DPOTrainer`` with ``DPOConfig(**config)``; ``precompute_ref_log_probs=False``, explicit ref model."""
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(**_common_args(workdir, len(pairs)), precompute_ref_log_probs=False, max_length=None, **config)
        trainer = DPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(ref),
            args=args,
            train_dataset=Dataset.from_list(pairs),
            processing_class=copy.deepcopy(tokenizer),
        )
    return _run_first_batch(trainer, "_metrics", len(pairs))


def trl_kto(policy, ref, tokenizer, records, workdir: str | None = None, **config) -> TrlRun:
    """``KTOTrainer`` on unpaired records, one batch of all of them (its KL rows rotate completions by one:
    row ``i`` is scored with the completion of row ``i - 1``)."""
    from trl import KTOConfig, KTOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = KTOConfig(
            **_common_args(workdir, len(records)), precompute_ref_log_probs=False, max_length=None, **config
        )
        trainer = KTOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(ref),
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=copy.deepcopy(tokenizer),
        )
    return _run_first_batch(trainer, "_metrics", len(records))


def trl_cpo(policy, tokenizer, pairs=PAIRS, workdir: str | None = None, **config) -> TrlRun:
    """``trl.experimental.cpo.CPOTrainer``. Pass a BOS-less tokenizer (``build_tokenizer(bos=False)``): this
    legacy trainer prepends ``bos_token_id`` to every prompt when the tokenizer has one, unlike
    ``DPOTrainer``, which tokenizes with ``tokenizer(text)``; without BOS both see the same token ids."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = CPOConfig(**_common_args(workdir, len(pairs)), max_length=4096, **config)
        trainer = CPOTrainer(
            model=copy.deepcopy(policy),
            args=args,
            train_dataset=Dataset.from_list(pairs),
            processing_class=copy.deepcopy(tokenizer),
        )
    return _run_first_batch(trainer, "_stored_metrics", len(pairs))


def trl_orpo(policy, tokenizer, pairs=PAIRS, workdir: str | None = None, **config) -> TrlRun:
    """``trl.experimental.orpo.ORPOTrainer`` (same BOS remark as :func:`trl_cpo`)."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ORPOConfig(**_common_args(workdir, len(pairs)), max_length=4096, **config)
        trainer = ORPOTrainer(
            model=copy.deepcopy(policy),
            args=args,
            train_dataset=Dataset.from_list(pairs),
            processing_class=copy.deepcopy(tokenizer),
        )
    return _run_first_batch(trainer, "_stored_metrics", len(pairs))


def trl_train_first_step(kind: str, policy, ref, tokenizer, rows, workdir: str | None = None, **config):
    """Run ``DPOTrainer.train()`` (``kind="dpo"``) or ``KTOTrainer.train()`` (``kind="kto"``) for one
    step over one batch holding every row, and return the first ``log_history`` entry (``loss``,
    ``grad_norm`` and the logged metrics). For DPO the sampler's order cannot matter for a batch-mean
    loss; KTO's sampler is sequential (TRL's default for it)."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    config_cls, trainer_cls = {"dpo": (DPOConfig, DPOTrainer), "kto": (KTOConfig, KTOTrainer)}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = config_cls(
            **_common_args(workdir, len(rows)),
            precompute_ref_log_probs=False,
            max_length=None,
            max_steps=1,
            **config,
        )
        trainer = trainer_cls(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(ref),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=copy.deepcopy(tokenizer),
        )
        trainer.train()
    return trainer.state.log_history[0]
