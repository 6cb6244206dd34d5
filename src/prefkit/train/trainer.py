"""`PreferenceTrainer`: one ``transformers.Trainer`` for every pairwise and unpaired loss.

Per batch (docs/architecture.md §3-§6):

1. the collator gives one concatenated batch (pairwise: ``2B`` rows, chosen then rejected; with
   ``share_prompt``, ``B`` packed rows ``[prompt][chosen][rejected]``; with ``packing``, the
   sequences packed one after another into a few rows, without padding);
2. the policy scores it with `prefkit.train.logps.completion_logps` (with ``share_prompt`` or
   ``packing``, `prefkit.train.logps.shared_prefix_logps`) in **one** forward pass;
3. the reference scores it under ``torch.no_grad()`` — a separate frozen model, or the PEFT
   policy with its adapters disabled; nothing at all when every selected loss is reference-free;
4. the log-probs become a `PairLogps` / `UnpairedLogps` (per-token tensors only when a selected
   loss needs them), `combine_losses` computes the per-example loss, which is multiplied by each
   example's ``weight`` and averaged;
5. metrics (implicit rewards, accuracies, log-probs, each loss component) are accumulated and
   logged as averages over the logging window, separately for training and evaluation.

Unpaired losses get their reference point from the trainer: KTO's z0 from the mismatched KL rows
(`kto_kl_estimate`), BCO's running reward shift (`bco_update_reward_shift`), which is saved with
every checkpoint and restored on resume.

With ``groups`` (each pair's user group) the per-group losses and accuracies are logged; with
``group_robust`` the batch loss is ``sum_g alpha_g L_g`` (`prefkit.losses.group_robust`), and alpha,
updated every step and shared by all processes, is saved and restored the same way.

With ``precompute_ref_logps`` step 3 happens once, at init: `prefkit.train.reference_cache` scores
every train / eval row with the reference (or loads the values from its on-disk cache), the values
become dataset columns that the collators batch, and the reference model is dropped.

Logging, progress bars, checkpoints, resume and device placement are ``transformers.Trainer``'s;
`prefkit.train.checkpointing.CheckpointingTrainer` makes checkpoints atomic (a ``checkpoint-N``
folder is always complete), resume exact, and averages metrics over the logging window. A
non-finite loss stops the run before the optimizer step with an error naming the step and the
examples.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.trainer_utils import get_last_checkpoint

from prefkit.data.collators import SHARED_PREFIX_KEYS, PairwiseCollator, UnpairedCollator
from prefkit.data.records import PairwiseRecord, RankedRecord, StepwiseRecord, UnpairedRecord
from prefkit.losses import PairLogps, UnpairedLogps, get_loss
from prefkit.losses.combine import combine_losses, resolve_loss_params
from prefkit.losses.group_robust import (
    exponentiated_gradient_step,
    group_loss_sums,
    group_robust_objective,
    size_adjusted_losses,
)
from prefkit.losses.unpaired import bco_update_reward_shift, kto_kl_estimate
from prefkit.models.loading import ensure_pad_token, freeze, load_policy, load_tokenizer
from prefkit.train.checkpointing import STATE_FILE, CheckpointingTrainer, TrainingStoppedError
from prefkit.train.config import PreferenceConfig
from prefkit.train.curriculum import order_by_margin
from prefkit.train.logps import LogpOutput, completion_logps, shared_prefix_logps
from prefkit.train.reference_cache import (
    REF_COLUMNS,
    REF_TOKEN_COLUMNS,
    attach_reference_columns,
    cached_reference_logps,
    compute_reference_logps,
    model_hash,
    reference_dtype,
)
from prefkit.train.resume import read_history

logger = logging.getLogger("prefkit.train")

INDEX_COLUMN = "example_index"
ID_COLUMN = "example_id"
GROUP_COLUMN = "group_index"  # with `groups`: index into PreferenceTrainer.group_names

_PAIR_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# Tokenized columns and record type per loss kind (the reward kinds are RewardTrainer's).
REQUIRED_COLUMNS = {
    "pairwise": _PAIR_COLUMNS,
    "unpaired": ("prompt_input_ids", "completion_input_ids", "label"),
    "reward_pair": _PAIR_COLUMNS,
    "judge": _PAIR_COLUMNS,
    "reward_list": ("prompt_input_ids", "completions_input_ids", "ranking"),
    "process": ("prompt_input_ids", "steps_input_ids", "step_labels"),
    "list": ("prompt_input_ids", "completions_input_ids", "ranking"),
}
RECORD_CLASS = {
    "pairwise": PairwiseRecord,
    "unpaired": UnpairedRecord,
    "reward_pair": PairwiseRecord,
    "judge": PairwiseRecord,
    "reward_list": RankedRecord,
    "process": StepwiseRecord,
    "list": RankedRecord,
}
# How the trainer computes UnpairedLogps.ref_point for the unpaired losses it knows.
REF_POINT = {"kto": "kl", "bco": "reward_shift"}


class NonFiniteLossError(TrainingStoppedError):
    """The training loss became NaN or infinite; raised before the optimizer step."""


class _TrackingCollator:
    """Wraps a prefkit collator and adds each batch's example indices (and ids) to it."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        if all(INDEX_COLUMN in ex for ex in examples):
            batch[INDEX_COLUMN] = torch.tensor([int(ex[INDEX_COLUMN]) for ex in examples], dtype=torch.long)
        if any(ex.get(ID_COLUMN) is not None for ex in examples):
            batch[ID_COLUMN] = [ex.get(ID_COLUMN) for ex in examples]
        if examples and all(GROUP_COLUMN in ex for ex in examples):
            batch[GROUP_COLUMN] = torch.tensor([int(ex[GROUP_COLUMN]) for ex in examples], dtype=torch.long)
        return batch


def pair_logps_batch(
    pol: LogpOutput,
    ref: LogpOutput | None,
    mask: Tensor,
    margin: Tensor | None,
    *,
    tokens: bool,
    token_masks: tuple[Tensor, Tensor] | None = None,
):
    """The `PairLogps` of a pairwise batch's ``2B`` rows (chosen rows, then rejected rows): policy and
    reference (None for reference-free losses) sums and token counts; with ``tokens``, also the
    per-token log-probs, completion masks and logsumsq that token-level losses read; ``token_masks``: the
    ``[2B, T]`` reward and KL masks of a token-mask loss (`prefkit.train.token_masks`)."""
    b = pol.sum.shape[0] // 2
    batch = PairLogps(
        policy_chosen=pol.sum[:b],
        policy_rejected=pol.sum[b:],
        chosen_len=pol.n_tokens[:b],
        rejected_len=pol.n_tokens[b:],
        ref_chosen=None if ref is None else ref.sum[:b],
        ref_rejected=None if ref is None else ref.sum[b:],
        margin=margin,
    )
    if tokens:
        mask = mask.to(pol.sum.dtype)
        batch.policy_chosen_tokens, batch.policy_rejected_tokens = pol.per_token[:b], pol.per_token[b:]
        batch.chosen_mask, batch.rejected_mask = mask[:b], mask[b:]
        batch.chosen_logsumsq, batch.rejected_logsumsq = pol.logsumsq[:b], pol.logsumsq[b:]
        if ref is not None:
            batch.ref_chosen_tokens, batch.ref_rejected_tokens = ref.per_token[:b], ref.per_token[b:]
    if pol.kl is not None:
        batch.chosen_kl, batch.rejected_kl = pol.kl[:b], pol.kl[b:]
    if token_masks is not None:
        reward, kl = (m.to(pol.sum.dtype) for m in token_masks)
        batch.chosen_weights, batch.rejected_weights = reward[:b], reward[b:]
        batch.chosen_kl_weights, batch.rejected_kl_weights = kl[:b], kl[b:]
    return batch


class PreferenceTrainer(CheckpointingTrainer):
    """Train a causal LM on pairwise or unpaired feedback with any registered loss(es).

    Args:
        model: a causal LM, or a name for `prefkit.models.loading.load_policy` (``"tiny"``, a
            folder, a Hub id).
        args: a `PreferenceConfig` (losses, their hyper-parameters, lengths, TrainingArguments).
        train_dataset / eval_dataset: a list of `PairwiseRecord` / `UnpairedRecord` (tokenized
            here with `prefkit.data.tokenize.tokenize_records`), or an already tokenized
            ``datasets.Dataset`` with the columns of docs/architecture.md §2.
        processing_class: the tokenizer (loaded from ``model`` when that is a name).
        ref_model: the reference (model or name). None: with LoRA (``peft_config``, or a PEFT
            model) the policy with adapters disabled, otherwise a frozen deep copy of the initial
            policy. Must stay None when every selected loss is reference-free (none is created).
        peft_config: a ``peft.PeftConfig``; the policy is wrapped with ``get_peft_model``.
        run_info: descriptions for the model card (``model``, ``data``...), optional.
    """

    # Loss kinds this trainer computes (`RewardTrainer` handles the reward-model kinds).
    LOSS_KINDS: tuple[str, ...] = ("pairwise", "unpaired")

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str,
        args: PreferenceConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        ref_model: PreTrainedModel | nn.Module | str | None = None,
        peft_config=None,
        data_collator=None,
        callbacks=None,
        optimizers=(None, None),
        run_info: dict[str, Any] | None = None,
        **kwargs,
    ):
        if not isinstance(args, PreferenceConfig):
            raise TypeError(f"args must be a prefkit PreferenceConfig, got {type(args).__name__}")
        if args.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns must be False: prefkit's collators read the tokenized columns "
                "(prompt_input_ids, ...) that the model's forward signature does not name"
            )
        self.loss_names = args.loss_names
        self.loss_weights = args.resolved_loss_weights
        self.loss_params = resolve_loss_params(self.loss_names, args.loss_params)
        self.loss_specs = [get_loss(n) for n in self.loss_names]
        self.loss_kind = self.loss_specs[0].kind
        if self.loss_kind not in self.LOSS_KINDS:
            raise ValueError(
                f"{type(self).__name__} trains losses of kind {' / '.join(self.LOSS_KINDS)}; {self.loss_names} "
                f"are of kind {self.loss_kind!r} (PreferenceTrainer trains a policy on pairwise / unpaired "
                "losses, RewardTrainer a reward model on reward_pair / reward_list / judge losses)"
            )
        if args.share_prompt and self.loss_kind != "pairwise":
            raise ValueError(
                f"share_prompt shares a prompt between the chosen and rejected completions of pairwise losses; "
                f"{self.loss_names} are of kind {self.loss_kind!r}. Set share_prompt to false."
            )
        self.needs_reference = any(s.needs_reference for s in self.loss_specs)
        self.needs_tokens = any(s.needs_tokens for s in self.loss_specs)
        self.needs_kl = any(s.needs_kl for s in self.loss_specs)
        ref_point_kinds = {REF_POINT[n] for n in self.loss_names if n in REF_POINT}
        if len(ref_point_kinds) > 1:
            raise ValueError(
                f"losses {self.loss_names} need different reference points ({sorted(ref_point_kinds)}) but "
                "share one batch; train them separately"
            )
        self.ref_point_kind = ref_point_kinds.pop() if ref_point_kinds else None
        if args.precompute_ref_logps:
            self._check_precompute(args)
        if self.ref_point_kind == "kl" and args.per_device_train_batch_size < 2:
            raise ValueError(
                "KTO estimates its reference point z0 from mismatched pairs inside a batch: "
                f"per_device_train_batch_size must be at least 2, got {args.per_device_train_batch_size}"
            )
        self.run_info = dict(run_info or {})

        # -- tokenizer and policy ---------------------------------------------------------------
        model_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if processing_class is None:
            if not isinstance(model, str):
                raise ValueError("processing_class (the tokenizer) is required when model is a module")
            processing_class = load_tokenizer(model)
        processing_class = ensure_pad_token(processing_class)
        if isinstance(model, str):
            model = self._load_model(model, processing_class)
        self.run_info.setdefault("model", model_name or type(model).__name__)
        # -- user conditioning: user tokens in the tokenizer and the policy (prefkit.train.user_conditioning)
        self.user_tokens = None
        if args.user_conditioning:
            from prefkit.train.user_conditioning import describe, setup_user_conditioning

            self.user_tokens, peft_config = setup_user_conditioning(
                model, processing_class, train_dataset, args, peft_config
            )
            self.run_info["data"] = {**self.run_info.get("data", {}), "user conditioning": describe(self.user_tokens)}

        is_peft_model = _is_peft_model(model)
        if peft_config is not None:
            if is_peft_model:
                raise ValueError("model is already a PEFT model; do not pass peft_config as well")
            try:
                from peft import get_peft_model
            except ImportError as err:
                raise ImportError("peft_config needs the `peft` package: pip install peft") from err
            model = get_peft_model(model, peft_config)
            is_peft_model = True
        self.is_peft = is_peft_model

        # -- reference --------------------------------------------------------------------------
        self.ref_from_adapters = False
        if not self.needs_reference:
            if ref_model is not None:
                raise ValueError(
                    f"a ref_model was given, but every selected loss ({', '.join(self.loss_names)}) is "
                    "reference-free; drop ref_model (no reference model is used)"
                )
            self.ref_model = None
            reference = "none (reference-free loss)"
        elif ref_model is not None:
            if isinstance(ref_model, str):
                reference = f"`{ref_model}` (frozen)"
                ref_model = load_policy(ref_model, vocab_size=len(processing_class) if ref_model == "tiny" else None)
            else:
                ref_name = getattr(getattr(ref_model, "config", None), "_name_or_path", "")
                reference = f"`{ref_name or type(ref_model).__name__}` (frozen)"
            self.ref_model = freeze(ref_model)
        elif self.is_peft:
            self.ref_model = None
            self.ref_from_adapters = True
            reference = "the base model (policy with LoRA adapters disabled)"
        elif args.precompute_ref_logps:
            self.ref_model = None  # the initial policy scores the reference log-probs itself, at init
            reference = "the initial policy"
        else:
            self.ref_model = frozen_copy(model)
            reference = "a frozen copy of the initial policy"
        if self.user_tokens is not None and ref_model is not None:
            from prefkit.train.user_conditioning import init_reference_rows

            init_reference_rows(self.ref_model, self.user_tokens)
        if args.precompute_ref_logps:
            reference += " (log-probs precomputed before training)"
        self.reference_precomputed = False
        # -- token masks (sparsepo, mapo): a part that reads the reference's hidden states (prefkit.train.token_masks)
        self.token_masker = None
        masked = [s for s in self.loss_specs if s.token_masks]
        if masked:
            from prefkit.train.token_masks import TokenMasker

            spec = masked[0]
            if spec.token_masks == "learned" and self.is_peft:
                raise ValueError(
                    f"loss {spec.name!r} trains its token masks beside the policy's full weights; it does not take "
                    "LoRA (drop peft_config / lora_r)"
                )
            if spec.token_masks == "learned" and args.world_size > 1:
                raise ValueError(
                    f"loss {spec.name!r}: its learned token masks train on one process only (DDP cannot reduce the "
                    "gradients of a mask used outside the policy's forward); run one process, or use mapo"
                )
            self.token_masker = TokenMasker(spec.token_masks, self.loss_params[spec.name], model, seed=args.seed)
        self.run_info.setdefault("reference", reference)

        # -- data -------------------------------------------------------------------------------
        self.tokenization_stats: dict[str, Any] = {}
        self.group_names: list[str] | None = None  # with `groups`: set from the training data
        self.group_sizes: Tensor | None = None  # with `groups`: training pairs per group (float64)
        train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: self._prepare_dataset(v, processing_class, args, f"eval_{k}") for k, v in eval_dataset.items()
            }
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval")
        if data_collator is None:
            data_collator = _TrackingCollator(self._default_collator(processing_class.pad_token_id, args))

        # -- state ------------------------------------------------------------------------------
        self.bco_reward_shift = torch.zeros((), dtype=torch.float32)
        self.bco_count = 0
        self.group_robust_alpha = self._initial_group_weights(args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        # compute_loss returns a per-batch mean: transformers divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False

        if args.precompute_ref_logps:
            self._precompute_reference()
        if self.ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)

    # ------------------------------------------------------------------------------------------
    # Model and data
    # ------------------------------------------------------------------------------------------
    def _load_model(self, name: str, tokenizer) -> nn.Module:
        """The model to train when ``model`` is given by name."""
        return load_policy(name, vocab_size=len(tokenizer) if name == "tiny" else None)

    def _default_collator(self, pad_id: int, args: PreferenceConfig):
        if self.loss_kind == "pairwise":
            return self._pair_collator(pad_id, args)
        return UnpairedCollator(pad_id, max_length=args.max_length, kl_rows=self.ref_point_kind == "kl")

    @staticmethod
    def _pair_collator(pad_id: int, args: PreferenceConfig) -> PairwiseCollator:
        """Pairwise batches as `_pair_logps` reads them (plain, shared-prompt and / or packed rows)."""
        return PairwiseCollator(
            pad_id, share_prompt=args.share_prompt, packing=args.packing, packing_max_tokens=args.packing_max_tokens
        )

    def _prepare_dataset(self, data, tokenizer, args: PreferenceConfig, name: str):
        if name == "train" and args.curriculum == "margin" and data is not None:
            data = order_by_margin(data)
        dataset = self._tokenized_dataset(data, tokenizer, args, name)
        if self.user_tokens is not None and dataset is not None:
            dataset = self.user_tokens.prefix_dataset(dataset, name, tokenizer.bos_token_id, INDEX_COLUMN)
        dataset = self._with_groups(dataset, args, name)
        grouped = args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
        if dataset is None or not grouped or args.length_column_name in dataset.column_names:
            return dataset
        return dataset.add_column(args.length_column_name, self._padded_lengths(dataset))

    def _padded_lengths(self, dataset) -> list[int]:
        """Per example, the width its longest row pads the batch to (the ``length`` column that
        ``train_sampling_strategy="group_by_length"`` sorts by): prompt + longest completion."""
        prompts = [len(ids) for ids in dataset["prompt_input_ids"]]
        if self.loss_kind == "unpaired":
            completions = [len(ids) for ids in dataset["completion_input_ids"]]
        elif self.loss_kind in ("reward_list", "list"):
            completions = [max(map(len, ids)) for ids in dataset["completions_input_ids"]]
        elif self.loss_kind == "process":
            completions = [sum(map(len, ids)) for ids in dataset["steps_input_ids"]]
        else:
            completions = [
                max(len(c), len(r)) for c, r in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"])
            ]
            if "rejected_prompt_input_ids" in dataset.column_names:  # joint pairs: the rejected row's own prompt
                return [
                    max(p + len(c), (len(rp) or p) + len(r))
                    for p, c, r, rp in zip(
                        prompts,
                        dataset["chosen_input_ids"],
                        dataset["rejected_input_ids"],
                        dataset["rejected_prompt_input_ids"],
                    )
                ]
        return [p + c for p, c in zip(prompts, completions)]

    def _tokenized_dataset(self, data, tokenizer, args: PreferenceConfig, name: str):
        if data is None:
            return None
        from datasets import Dataset

        if isinstance(data, Dataset):
            missing = [c for c in REQUIRED_COLUMNS[self.loss_kind] if c not in data.column_names]
            if missing:
                raise ValueError(
                    f"{name} dataset lacks the tokenized {self.loss_kind} columns {missing} (has "
                    f"{data.column_names}); pass records to tokenize, or tokenize with "
                    "prefkit.data.tokenize.tokenize_records"
                )
            if INDEX_COLUMN not in data.column_names:
                data = data.add_column(INDEX_COLUMN, list(range(len(data))))
            return data
        if isinstance(data, (list, tuple)):
            from prefkit.data.tokenize import tokenize_records

            records = list(data)
            if not records:
                raise ValueError(f"{name} dataset is empty")
            expected = RECORD_CLASS[self.loss_kind]
            wrong = [i for i, r in enumerate(records) if not isinstance(r, expected)]
            if wrong:
                got = type(records[wrong[0]]).__name__
                raise ValueError(
                    f"losses {self.loss_names} are {self.loss_kind} and need {expected.__name__}s, "
                    f"but {name} "
                    f"record {wrong[0]} is a {got} ({len(wrong)} such records); convert the data explicitly "
                    "(see `prefkit data convert`)"
                )
            dataset, stats = tokenize_records(
                records,
                tokenizer,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                prompt_truncation=args.prompt_truncation,
                completion_truncation=args.completion_truncation,
                progress=not args.disable_tqdm,
                step_separator=args.step_separator,
            )
            self.tokenization_stats[name] = stats
            dropped = set(stats.dropped_indices)
            kept = [i for i in range(len(records)) if i not in dropped]
            dataset = dataset.add_column(INDEX_COLUMN, kept)
            if any(getattr(records[i], "id", None) is not None for i in kept):
                dataset = dataset.add_column(ID_COLUMN, [_str_or_none(records[i].id) for i in kept])
            return dataset
        raise TypeError(
            f"{name} dataset must be a list of records or a tokenized datasets.Dataset, got {type(data).__name__}"
        )

    # ------------------------------------------------------------------------------------------
    # Reference log-probs precomputed once (precompute_ref_logps)
    # ------------------------------------------------------------------------------------------
    def _check_precompute(self, args: PreferenceConfig) -> None:
        if not self.needs_reference:
            raise ValueError(
                f"precompute_ref_logps is set, but every selected loss ({', '.join(self.loss_names)}) is "
                "reference-free: there are no reference log-probs to compute. Set precompute_ref_logps to false."
            )
        if self.ref_point_kind == "kl":
            kl = [n for n in self.loss_names if REF_POINT.get(n) == "kl"]
            raise ValueError(
                f"precompute_ref_logps cannot serve loss {', '.join(kl)}: its reference point z0 comes from KL "
                "rows that pair each prompt with another example's completion inside each shuffled batch, so "
                "their reference log-probs depend on the batch and cannot be computed per example. Set "
                "precompute_ref_logps to false (bco's reference point needs only per-example log-probs)."
            )

    def reference_cache_dir(self) -> str:
        """Where ``precompute_ref_logps`` caches the reference log-probs."""
        return self.args.reference_cache_dir or os.path.join(self.args.output_dir, "ref_logps")

    def _precompute_reference(self) -> None:
        """Attach the reference log-probs of the train / eval datasets as columns (from the cache,
        or computed and cached), then drop the reference model."""
        with self._initial_reference() as ref:
            key = {"model_hash": model_hash(ref), "dtype": reference_dtype(ref)}
            if self.train_dataset is not None:
                self.train_dataset = self._with_reference_logps(self.train_dataset, "train", ref, key)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    k: self._with_reference_logps(v, f"eval_{k}", ref, key) for k, v in self.eval_dataset.items()
                }
            elif self.eval_dataset is not None:
                self.eval_dataset = self._with_reference_logps(self.eval_dataset, "eval", ref, key)
        del ref
        self.ref_model = None
        self.reference_precomputed = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _initial_reference(self):
        """The reference for precomputing (no grad, eval mode): the given reference model, the PEFT
        policy with adapters disabled, or the initial policy itself (no copy is made)."""
        if self.ref_model is not None:
            self.ref_model = self.ref_model.to(self.args.device)
        if self.ref_model is not None or self.ref_from_adapters:
            with self._reference(self.model) as ref:
                yield ref
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield self.model
        finally:
            self.model.train(was_training)

    def _with_reference_logps(self, dataset, split: str, ref: nn.Module, key: dict[str, str]):
        per_token = self.needs_tokens and self.loss_kind == "pairwise"
        collate = (
            self._pair_collator(self.processing_class.pad_token_id, self.args)
            if self.loss_kind == "pairwise"
            else UnpairedCollator(self.processing_class.pad_token_id, kl_rows=False)
        )

        def score(batch: dict[str, Any]) -> LogpOutput:
            batch = {k: v.to(self.args.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            if self.loss_kind == "pairwise":
                return self._pair_logps(ref, batch, tokens=per_token)
            ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            return self._logps(ref, ids, attn, comp, tokens=False)

        def compute():
            return compute_reference_logps(
                dataset,
                self.loss_kind,
                collate,
                score,
                batch_size=self.args.per_device_eval_batch_size,
                per_token=per_token,
                progress=not self.args.disable_tqdm,
                desc=f"reference log-probs ({split})",
            )

        path = os.path.join(self.reference_cache_dir(), f"{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}.safetensors")
        values = cached_reference_logps(
            dataset, self.loss_kind, path, per_token=per_token, split=split, compute=compute, **key
        )
        return attach_reference_columns(dataset, values, self.loss_kind, per_token=per_token)

    def _cached_reference(self, inputs: dict[str, Any], key: str, like: Tensor) -> Tensor:
        """A precomputed reference column of the batch, as ``like``'s dtype and device."""
        if key not in inputs:
            raise KeyError(
                f"precompute_ref_logps is on but the batch has no {key!r}: the reference model is not kept, "
                "so every dataset must get its reference log-probs at init (pass it as train_dataset / "
                "eval_dataset), and a custom data_collator must pass the ref_* columns through"
            )
        return inputs[key].to(device=like.device, dtype=like.dtype)

    def _pair_reference(self, model: nn.Module, inputs: dict[str, Any], pol: LogpOutput, *, tokens: bool):
        """The reference's `LogpOutput` of a pairwise batch: precomputed columns, or a forward pass."""
        if not self.reference_precomputed:
            with self._reference(model) as ref_model:
                return self._pair_logps(ref_model, inputs, tokens=tokens)
        chosen, rejected = REF_COLUMNS["pairwise"]
        sums = torch.cat([self._cached_reference(inputs, k, pol.sum) for k in (chosen, rejected)])
        per_token = None
        if tokens:
            per_token = torch.cat([self._cached_reference(inputs, k, pol.sum) for k in REF_TOKEN_COLUMNS["pairwise"]])
        return LogpOutput(sum=sums, n_tokens=pol.n_tokens, per_token=per_token)

    # ------------------------------------------------------------------------------------------
    # Log-probs and the loss
    # ------------------------------------------------------------------------------------------
    def _logps(
        self,
        model: nn.Module,
        ids: Tensor,
        attn: Tensor,
        comp: Tensor,
        *,
        tokens: bool,
        logsumsq: bool = False,
        **engine: Any,
    ):
        return completion_logps(
            model, ids, attn, comp, per_token=tokens, logsumsq=logsumsq, **engine, **self._chunking()
        )

    def _chunking(self) -> dict[str, Any]:
        """The engine's chunking options from the config."""
        return {"chunk_size": self.args.logps_chunk_size, "memory_mb": self.args.logps_memory_mb}

    def _pair_logps(
        self, model: nn.Module, inputs: dict[str, Any], *, tokens: bool, logsumsq: bool = False, **engine: Any
    ):
        """Log-probs of a pairwise batch's ``2B`` rows; with ``share_prompt``, one pass per prompt; with
        ``packing``, from padding-free packed rows (both: `shared_prefix_logps`). ``engine``: the plain layout's
        further `completion_logps` options (``keep_head_inputs``, ``kl_to``)."""
        if not (self.args.share_prompt or self.args.packing):
            ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
            return self._logps(model, ids, attn, comp, tokens=tokens, logsumsq=logsumsq, **engine)
        if engine:
            raise ValueError(f"{sorted(engine)} need the plain layout; set share_prompt and packing to false")
        missing = [k for k in SHARED_PREFIX_KEYS if k not in inputs]
        if missing:
            raise KeyError(
                f"share_prompt / packing is on but the batch lacks {missing}; use "
                "PairwiseCollator(pad_id, share_prompt=..., packing=...) with the same settings"
            )
        packed = {k: inputs[k] for k in SHARED_PREFIX_KEYS}
        return shared_prefix_logps(model, **packed, per_token=tokens, logsumsq=logsumsq, **self._chunking())

    @contextlib.contextmanager
    def _reference(self, model: nn.Module):
        """Yield the module that scores reference log-probs (no grad, eval mode)."""
        if self.ref_from_adapters:
            peft_model = self.accelerator.unwrap_model(model)
            was_training = peft_model.training
            peft_model.eval()
            try:
                with torch.no_grad(), peft_model.disable_adapter():
                    yield peft_model
            finally:
                peft_model.train(was_training)
        else:
            if self.ref_model is None:
                raise RuntimeError("internal: a reference was requested but none exists")
            with torch.no_grad():
                yield self.ref_model

    def _ref_logps(self, model: nn.Module, ids: Tensor, attn: Tensor, comp: Tensor, *, tokens: bool):
        with self._reference(model) as ref:
            return self._logps(ref, ids, attn, comp, tokens=tokens)

    def compute_preference_loss(
        self, model: nn.Module, inputs: dict[str, Any], train: bool
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(loss, metrics, per_example_loss)`` for one batch.

        ``metrics`` maps a metric name to a 1-D tensor of values (per example or per batch) whose
        mean over the logging window is logged.
        """
        if self.loss_kind == "pairwise":
            return self._pairwise_loss(model, inputs)
        return self._unpaired_loss(model, inputs, train)

    def _check_batch_coupled_weights(self, weight: torch.Tensor) -> None:
        coupled = [s.name for s in self.loss_specs if s.batch_coupled]
        if coupled and not bool(torch.all(weight == 1)):
            raise ValueError(
                f"loss {coupled} sorts over the batch, so its loss[i] is not example i's and per-example "
                "weights cannot apply; remove the `weight` field from the data or use another loss"
            )

    def _pairwise_loss(self, model, inputs):
        weight = inputs["weight"]
        b = weight.shape[0]
        tokens = self.needs_tokens
        token_masks = None
        if self.needs_kl:  # the reference first: the policy's pass reads its hidden states for the token KL
            with self._reference(model) as ref_model:
                ref = self._pair_logps(ref_model, inputs, tokens=True, keep_head_inputs=True)
                states = self.token_masker.reference_states(ref_model, inputs) if self.token_masker else None
            pol = self._pair_logps(model, inputs, tokens=True, logsumsq=True, kl_to=ref)
            if states is not None:
                token_masks = self.token_masker.masks(states, inputs["completion_mask"])
        else:
            pol = self._pair_logps(model, inputs, tokens=tokens, logsumsq=tokens)
            ref = self._pair_reference(model, inputs, pol, tokens=tokens) if self.needs_reference else None
        batch = pair_logps_batch(
            pol, ref, inputs["completion_mask"], inputs.get("margin"), tokens=tokens, token_masks=token_masks
        )
        out = combine_losses(batch, self.loss_names, self.loss_weights, self.loss_params)
        self._check_batch_coupled_weights(weight)
        per_example = out.loss * weight.to(out.loss.dtype)
        metrics = {k: v for k, v in out.metrics.items()}
        metrics["logps/chosen"] = pol.sum[:b].detach()
        metrics["logps/rejected"] = pol.sum[b:].detach()
        return self._batch_loss(per_example, inputs, metrics, model.training), metrics, per_example.detach()

    def _from_every_process(self, values: Tensor) -> Tensor:
        """``values`` ``[n]`` of every process concatenated (sizes may differ); ``values`` itself in a
        single process. Every process must call it at the same point (it is a collective)."""
        if self.accelerator.num_processes == 1:
            return values
        sizes = self.accelerator.gather(torch.tensor([values.shape[0]], device=values.device))
        padded = self.accelerator.gather(self.accelerator.pad_across_processes(values, dim=0))
        width = padded.shape[0] // self.accelerator.num_processes
        return torch.cat([padded[i * width : i * width + int(n)] for i, n in enumerate(sizes)])

    def _unpaired_loss(self, model, inputs, train: bool):
        ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        weight, label = inputs["weight"], inputs["label"].bool()
        pol = self._logps(model, ids, attn, comp, tokens=False)
        ref = None
        if self.reference_precomputed:
            ref = self._cached_reference(inputs, REF_COLUMNS["unpaired"][0], pol.sum)
        elif self.needs_reference:
            ref = self._ref_logps(model, ids, attn, comp, tokens=False).sum
        metrics: dict[str, Tensor] = {}
        ref_point = None
        if self.ref_point_kind == "kl":
            kl_ids, kl_attn, kl_comp = (
                inputs["kl_input_ids"],
                inputs["kl_attention_mask"],
                inputs["kl_completion_mask"],
            )
            with torch.no_grad():
                pol_kl = self._logps(model, kl_ids, kl_attn, kl_comp, tokens=False)
            ref_kl = self._ref_logps(model, kl_ids, kl_attn, kl_comp, tokens=False)
            # every process's batch mean, averaged over the processes, then clamped (as TRL does)
            means = self._from_every_process((pol_kl.sum - ref_kl.sum).detach().mean().reshape(1))
            ref_point = kto_kl_estimate(means, torch.zeros_like(means))
            metrics["kl"] = ref_point.reshape(1)
        elif self.ref_point_kind == "reward_shift":
            beta = float(self.loss_params["bco"]["beta"])
            if train:
                # the rewards of every process's batch, so all processes keep one running shift
                rewards = self._from_every_process((beta * (pol.sum - ref)).detach())
                labels = self._from_every_process(label.long()).bool()
                self.bco_reward_shift, self.bco_count = bco_update_reward_shift(
                    self.bco_reward_shift, self.bco_count, rewards[labels], rewards[~labels]
                )
            ref_point = torch.as_tensor(self.bco_reward_shift, device=pol.sum.device)
            metrics["reward_shift"] = ref_point.detach().reshape(1)
        batch = UnpairedLogps(
            policy=pol.sum,
            ref=ref,
            label=label,
            length=pol.n_tokens,
            ref_point=ref_point,
        )
        out = combine_losses(batch, self.loss_names, self.loss_weights, self.loss_params)
        per_example = out.loss * weight.to(out.loss.dtype)
        for key, value in out.metrics.items():
            if key == "rewards":
                metrics["rewards/chosen"] = value[label]
                metrics["rewards/rejected"] = value[~label]
            else:
                metrics[key] = value
        metrics["logps/chosen"] = pol.sum[label].detach()
        metrics["logps/rejected"] = pol.sum[~label].detach()
        return per_example.mean(), metrics, per_example.detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics, per_example = self.compute_preference_loss(model, inputs, train=model.training)
        if model.training and not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(self._non_finite_message(loss, inputs, metrics, per_example))
        self._store_metrics(metrics, "train" if model.training else "eval")
        return (loss, metrics) if return_outputs else loss

    def _non_finite_message(self, loss, inputs, metrics, per_example) -> str:
        step = self.state.global_step + 1
        where = f"global step {step} (the optimizer step being computed; epoch {self.state.epoch or 0:.2f})"
        indices = inputs.get(INDEX_COLUMN)
        index_list = indices.tolist() if isinstance(indices, Tensor) else None
        bad_rows = [i for i, v in enumerate(per_example.tolist()) if not math.isfinite(v)]
        parts = [f"non-finite training loss ({loss.item()}) at {where}."]
        if index_list is not None:
            parts.append(f" Batch: dataset example indices {index_list}")
            if bad_rows:
                parts.append(f"; non-finite at examples {[index_list[i] for i in bad_rows]}")
            parts.append(".")
        ids = inputs.get(ID_COLUMN)
        if ids is not None:
            parts.append(f" Example ids: {ids}.")
        bad_components = [
            k[len("loss/") :] for k, v in metrics.items() if k.startswith("loss/") and not torch.isfinite(v).all()
        ]
        if bad_components:
            parts.append(f" Non-finite loss component(s): {', '.join(bad_components)}.")
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        parts.append(
            " Training stopped before the optimizer step: no update and no checkpoint were written for this "
            f"step (last checkpoint: {last or 'none'}). Check those rows, the loss hyper-parameters and the "
            "learning rate."
        )
        return "".join(parts)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics, _ = self.compute_preference_loss(model, inputs, train=False)
        self._store_metrics(metrics, "eval")
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------
    # User groups (`groups`) and the group-robust objective (`group_robust`)
    # ------------------------------------------------------------------------------------------
    def _with_groups(self, dataset, args: PreferenceConfig, name: str):
        """``dataset`` with each example's group index (`GROUP_COLUMN`) when ``groups`` is set. The
        groups are those of the first dataset prepared (the training data), in sorted order."""
        if args.groups is None or dataset is None:
            return dataset
        from prefkit.data.groups import resolve_groups

        users = _user_ids(dataset, name)
        try:
            group_of = resolve_groups(args.groups, sorted(set(users)))
        except ValueError as err:
            raise ValueError(f"groups={args.groups!r}, {name} data: {err}") from err
        first = self.group_names is None  # the training data: its groups and their sizes
        if first:
            self.group_names = sorted(set(group_of.values()))
        unknown = sorted(set(group_of.values()) - set(self.group_names))
        if unknown:
            raise ValueError(
                f"{name} data has group(s) {unknown} that the training data lacks (groups {self.group_names}); "
                "every group needs training pairs"
            )
        index = {g: i for i, g in enumerate(self.group_names)}
        column = [index[group_of[u]] for u in users]
        if first:
            self.group_sizes = torch.bincount(torch.tensor(column), minlength=len(self.group_names)).double()
        if GROUP_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(GROUP_COLUMN)
        return dataset.add_column(GROUP_COLUMN, column)

    def _initial_group_weights(self, args: PreferenceConfig) -> Tensor | None:
        """group_robust's alpha at step 0: uniform over the training groups (float64, CPU); None without it."""
        if not args.group_robust:
            return None
        if not self.group_names:
            raise ValueError("group_robust needs training data with groups (train_dataset is missing)")
        n = len(self.group_names)
        return torch.full((n,), 1.0 / n, dtype=torch.float64)

    def _batch_loss(self, per_example: Tensor, inputs: dict[str, Any], metrics: dict[str, Tensor], train: bool):
        """The batch's loss: the mean of ``per_example``, or with ``group_robust`` sum_g alpha_g L_g (alpha
        updated first when training). With ``groups``, each group's loss and accuracy go into ``metrics``."""
        if self.args.groups is None:
            return per_example.mean()
        groups = inputs.get(GROUP_COLUMN)
        if groups is None:
            raise KeyError(
                f"groups is set but the batch has no {GROUP_COLUMN!r} column; a custom data_collator must pass it "
                "through (the default collator does)"
            )
        accuracy = metrics.get("rewards/accuracies")
        for index, name in enumerate(self.group_names):
            mask = groups == index
            metrics[f"group/{name}/loss"] = per_example.detach()[mask]
            if accuracy is not None:
                metrics[f"group/{name}/accuracy"] = accuracy[mask]
        if self.group_robust_alpha is None:
            return per_example.mean()
        return self._group_robust_loss(per_example, groups, train)

    def _group_robust_loss(self, per_example: Tensor, groups: Tensor, train: bool) -> Tensor:
        """sum_g alpha_g L_g over the groups in the batch.

        Training: the group sums and counts of every process are added up first, so alpha's update
        sees the global batch's group means and stays the same on every process; each process returns
        ``P * sum_g alpha_g S_g(local) / n_g(global)``, whose gradient, averaged over the ``P``
        processes by DDP, is that of sum_g alpha_g L_g over the global batch. Evaluation: this
        process's batch, alpha unchanged.
        """
        n = len(self.group_names)
        sums, counts = group_loss_sums(per_example, groups, n)
        if not train:
            return group_robust_objective(sums / counts.clamp(min=1), self.group_robust_alpha, counts > 0)
        totals = self._from_every_process(torch.cat([sums.detach(), counts]))
        total_sums, total_counts = totals.view(-1, 2, n).sum(0)
        present = total_counts > 0
        means = (total_sums / total_counts.clamp(min=1)).cpu()
        if torch.isfinite(means[present.cpu()]).all():  # otherwise the step stops with NonFiniteLossError
            c = float(self.args.group_robust_size_adjustment)
            means = size_adjusted_losses(means.double(), self.group_sizes, c) if c else means
            self.group_robust_alpha = exponentiated_gradient_step(
                self.group_robust_alpha, means, present.cpu(), float(self.args.group_robust_step_size)
            )
        scaled = sums * self.accelerator.num_processes / total_counts.clamp(min=1)
        return group_robust_objective(scaled, self.group_robust_alpha, present)

    def _group_weight_logs(self) -> dict[str, float]:
        """``group_robust/alpha/NAME``: the current group weights (nothing without group_robust)."""
        if self.group_robust_alpha is None:
            return {}
        return {f"group_robust/alpha/{g}": a for g, a in zip(self.group_names, self.group_robust_alpha.tolist())}

    def _group_robust_state(self) -> dict[str, Any]:
        if self.group_robust_alpha is None:
            return {}
        return {"group_robust": {"groups": list(self.group_names), "alpha": self.group_robust_alpha.tolist()}}

    def _load_group_robust_state(self, state: dict[str, Any], path: str) -> None:
        if self.group_robust_alpha is None:
            return
        saved = state.get("group_robust")
        if saved is None:
            raise ValueError(
                f"{path} has no group_robust weights (the run was saved without group_robust), so resuming "
                "with group_robust would not continue the same run"
            )
        if list(saved["groups"]) != self.group_names:
            raise ValueError(
                f"{path} holds group_robust weights for groups {saved['groups']}, but this run's training data "
                f"has groups {self.group_names}"
            )
        self.group_robust_alpha = torch.tensor([float(a) for a in saved["alpha"]], dtype=torch.float64)

    # ------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------
    def _derived_metrics(self, averages: dict[str, float]) -> dict[str, float]:
        out = {}
        if self.loss_kind == "unpaired" and "rewards/chosen" in averages and "rewards/rejected" in averages:
            out["rewards/margins"] = averages["rewards/chosen"] - averages["rewards/rejected"]
        out.update(_worst_group_metrics(averages))
        return out

    def _extra_train_logs(self) -> dict[str, float]:
        return self._group_weight_logs()

    # ------------------------------------------------------------------------------------------
    # Checkpoints: atomic folders, prefkit state, resume
    # ------------------------------------------------------------------------------------------
    def prefkit_state(self) -> dict[str, Any]:
        """Trainer-held state that checkpoints must carry (BCO's running reward shift, group_robust's alpha)."""
        state = {"bco_reward_shift": float(self.bco_reward_shift), "bco_count": int(self.bco_count)}
        state.update(self._group_robust_state())
        return state

    def load_prefkit_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            if self.group_robust_alpha is not None:
                raise FileNotFoundError(
                    f"{checkpoint} has no {STATE_FILE}: group_robust's group weights alpha cannot be restored, so "
                    "resuming would not continue the same run"
                )
            if self.ref_point_kind == "reward_shift":
                raise FileNotFoundError(
                    f"{checkpoint} has no {STATE_FILE}: BCO's running reward shift cannot be restored, so "
                    "resuming would not continue the same run"
                )
            return
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        self.bco_reward_shift = torch.tensor(float(state["bco_reward_shift"]), dtype=torch.float32)
        self.bco_count = int(state["bco_count"])
        self._load_group_robust_state(state, path)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        result = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        if self.args.should_save:
            self.create_model_card()
        return result

    # ------------------------------------------------------------------------------------------
    # Model card
    # ------------------------------------------------------------------------------------------
    def model_card_info(self):
        from prefkit import __version__
        from prefkit.train.modelcard import CARD_ARGS, ModelCardInfo

        losses = [
            {
                "name": spec.name,
                "weight": w,
                "params": self.loss_params[spec.name],
                "formula": spec.formula,
                "citation": spec.citation,
            }
            for spec, w in zip(self.loss_specs, self.loss_weights)
        ]
        train_metrics, eval_metrics = {}, {}
        for entry in self.state.log_history:
            if "loss" in entry and not any(k.startswith("eval_") for k in entry):
                train_metrics = {k: v for k, v in entry.items() if k not in ("step", "epoch")}
            elif any(k.startswith("eval_") for k in entry):
                eval_metrics = {
                    k: v
                    for k, v in entry.items()
                    if k.startswith("eval_") and "runtime" not in k and "per_second" not in k
                }
        lora = None
        if self.is_peft:
            cfg = self.accelerator.unwrap_model(self.model).active_peft_config
            lora = {k: getattr(cfg, k, None) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
            if isinstance(lora.get("target_modules"), set):
                lora["target_modules"] = sorted(lora["target_modules"])
        data = dict(self.run_info.get("data", {}))
        for split, stats in self.tokenization_stats.items():
            data.setdefault(f"{split} rows", stats.n_rows)
            if stats.n_truncated or stats.n_dropped:
                data.setdefault(f"{split} truncated / dropped", f"{stats.n_truncated} / {stats.n_dropped}")
        return ModelCardInfo(
            model=str(self.run_info.get("model")),
            reference=str(self.run_info.get("reference")),
            losses=losses,
            hyperparameters={k: getattr(self.args, k) for k in CARD_ARGS if hasattr(self.args, k)},
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            data=data,
            lora=lora,
            global_step=self.state.global_step,
            prefkit_version=__version__,
            history=read_history(self.args.output_dir),
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        masker = self.token_masker
        if _internal_call or masker is None or masker.module is None:
            super().save_model(output_dir, _internal_call=_internal_call)  # checkpoints keep a learned mask inside
        else:  # the final model: the policy alone, its learned token mask beside it
            from prefkit.train.token_masks import MASK_MODULE

            policy = self.accelerator.unwrap_model(self.model)
            module = policy._modules.pop(MASK_MODULE)
            try:
                super().save_model(output_dir, _internal_call=_internal_call)
            finally:
                policy.add_module(MASK_MODULE, module)
            if self.args.should_save:
                masker.save(output_dir or self.args.output_dir)
        if self.user_tokens is not None and self.args.should_save:
            self.user_tokens.save(output_dir or self.args.output_dir, self.processing_class)
        target = os.path.abspath(output_dir or self.args.output_dir)
        if not _internal_call and target == os.path.abspath(self.args.output_dir) and self.state.global_step > 0:
            self.create_model_card()  # PEFT's save_pretrained writes its own README.md there

    def create_model_card(self, *args, **kwargs):
        """Write prefkit's model card to ``output_dir/README.md`` (also what push_to_hub uploads)."""
        from prefkit.train.modelcard import write_model_card

        if not self.is_world_process_zero():
            return None
        return write_model_card(self.model_card_info(), self.args.output_dir)


def frozen_copy(model: nn.Module) -> nn.Module:
    """The default reference: a deep copy of the (initial) policy, in eval mode, without gradients."""
    return freeze(copy.deepcopy(model))


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _user_ids(dataset, name: str) -> list[str]:
    """Each example's ``user_id`` (the column `prefkit.data.tokenize.tokenize_records` writes when a record
    has one, or a tokenized dataset's own); an example without one is an error."""
    users = dataset["user_id"] if "user_id" in dataset.column_names else [None] * len(dataset)
    missing = [i for i, u in enumerate(users) if u is None or u == ""]
    if missing:
        rows, ids = dataset[INDEX_COLUMN], dataset[ID_COLUMN] if ID_COLUMN in dataset.column_names else None
        where = [f"{rows[i]} (id {ids[i]})" if ids and ids[i] is not None else f"{rows[i]}" for i in missing[:5]]
        raise ValueError(
            f"groups is set but {len(missing)} {name} record(s) have no user_id (0-based rows {', '.join(where)}); "
            "every pair needs its user's id to find its group"
        )
    return [str(u) for u in users]


def _worst_group_metrics(out: dict[str, float]) -> dict[str, float]:
    """``worst_group/loss`` (highest) and ``worst_group/accuracy`` (lowest) over the ``group/NAME/...``
    averages in ``out``."""
    worst = {}
    losses = [v for k, v in out.items() if k.startswith("group/") and k.endswith("/loss")]
    accuracies = [v for k, v in out.items() if k.startswith("group/") and k.endswith("/accuracy")]
    if losses:
        worst["worst_group/loss"] = max(losses)
    if accuracies:
        worst["worst_group/accuracy"] = min(accuracies)
    return worst


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)
