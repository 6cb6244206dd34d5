"""Training configuration: three dataclasses and one flat YAML file.

- `ModelConfig`: which policy / reference / tokenizer to load, LoRA, the tiny model's sizes.
- `DataConfig`: which feedback files to read and how.
- `PreferenceConfig` (a ``transformers.TrainingArguments``): the loss(es) and their
  hyper-parameters, sequence lengths, and every ``TrainingArguments`` option (optimizer,
  schedule, logging, checkpoints, ...).

A YAML config is **one flat mapping**; each key goes to the dataclass that owns it (as
``HfArgumentParser`` does over several dataclasses). ``key=value`` overrides are applied on top,
their values parsed as YAML scalars (``loss_params.beta=0.2`` sets one entry of a mapping). An
unknown key is an error that names the closest valid key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from transformers import TrainingArguments

from prefkit.models.loading import TinySpec
from prefkit.train.settings import ConfigError, flat_values, read_config_file

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "PreferenceConfig",
    "RunConfig",
    "config_fields",
    "config_to_dict",
    "load_config",
    "parse_config",
    "parse_overrides",
    "write_config",
]


# Loss kinds that train a reward model (RewardTrainer), and the record kind each reads.
REWARD_KINDS = ("reward_pair", "reward_list", "judge", "process")
RECORD_KINDS = {
    "reward_pair": "pairwise",
    "judge": "pairwise",
    "reward_list": "ranked",
    "process": "stepwise",
    "list": "ranked",
}


def _loss_needs_kl(name: str) -> bool:
    from prefkit.losses import get_loss

    return get_loss(name).needs_kl


# ------------------------------------------------------------------------------------------
# Dataclasses
# ------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """What to train and against what."""

    model: str = field(
        default="tiny",
        metadata={
            "help": "Policy to train: a local folder, a Hugging Face Hub model id, or 'tiny' (the built-in "
            "random tiny Llama with the byte tokenizer; no download). With a reward-model loss (kind "
            "reward_pair, reward_list or judge): the backbone that gets a scalar reward head."
        },
    )
    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "Reference model (folder, Hub id or 'tiny'). None: a frozen copy of the initial policy, "
            "or, with LoRA, the policy with its adapters disabled. Not loaded at all when every selected "
            "loss is reference-free."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer (folder or Hub id). None: the policy's own ('tiny': the byte tokenizer)."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weight dtype when loading: float32, bfloat16, float16 or auto (the checkpoint's)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model/tokenizer code from the Hub repository to run."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention implementation (eager, sdpa, flash_attention_2, ...). None: transformers' default."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank; 0 trains all weights. > 0 wraps the policy with PEFT LoRA adapters (needs `peft`)."
        },
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={"help": "Modules that get adapters: a list of module names (e.g. [q_proj, v_proj]) or 'all-linear'."},
    )
    gpm_embed_dim: int = field(
        default=8,
        metadata={"help": "Judge losses (gpm): size 2k of the general preference model's response embedding (even)."},
    )
    gpm_prompt_scaled: bool = field(
        default=False,
        metadata={"help": "Judge losses (gpm): scale each 2x2 block of R by a prompt-dependent eigenvalue."},
    )
    gpm_beta: float = field(
        default=0.1,
        metadata={"help": "Judge losses (gpm): temperature; the model's preference logit is s(a > b) / gpm_beta."},
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "model: tiny - hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "model: tiny - number of decoder layers."})
    tiny_num_heads: int = field(default=4, metadata={"help": "model: tiny - attention heads."})
    tiny_intermediate_size: int = field(default=128, metadata={"help": "model: tiny - MLP width."})
    tiny_max_position_embeddings: int = field(default=1024, metadata={"help": "model: tiny - longest sequence."})
    tiny_seed: int = field(default=0, metadata={"help": "model: tiny - seed of the random initial weights."})

    def __post_init__(self):
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = no LoRA), got {self.lora_r}")
        if self.gpm_embed_dim < 2 or self.gpm_embed_dim % 2:
            raise ConfigError(f"gpm_embed_dim must be a positive even number, got {self.gpm_embed_dim}")
        if self.gpm_beta <= 0:
            raise ConfigError(f"gpm_beta must be > 0, got {self.gpm_beta}")

    @property
    def use_lora(self) -> bool:
        return self.lora_r > 0

    @property
    def tiny_spec(self) -> TinySpec:
        return TinySpec(
            hidden_size=self.tiny_hidden_size,
            num_layers=self.tiny_num_layers,
            num_heads=self.tiny_num_heads,
            intermediate_size=self.tiny_intermediate_size,
            max_position_embeddings=self.tiny_max_position_embeddings,
            seed=self.tiny_seed,
        )

    def lora_config(self, task_type: str | None = "CAUSAL_LM", *, head: str | None = None):
        """A ``peft.LoraConfig`` (for a causal LM, ``task_type="SEQ_CLS"`` for a reward model, or None with
        ``head`` for a model with its own head module, e.g. the general preference model's ``"head"``:
        trained fully, not adapted), or None when ``lora_r == 0``."""
        if not self.use_lora:
            return None
        try:
            from peft import LoraConfig
        except ImportError as err:
            raise ImportError(
                f"lora_r={self.lora_r} needs the `peft` package: pip install 'prefkit[peft]' (or pip install peft)"
            ) from err
        extra = {} if head is None else {"modules_to_save": [head], "exclude_modules": rf"^{head}(\..*)?$"}
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            task_type=task_type,
            **extra,
        )


@dataclass
class DataConfig:
    """Where the feedback comes from."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training feedback: a .jsonl/.jsonl.gz/.json/.csv/.parquet file, a saved "
            "`datasets` folder or a Hub dataset name (read by prefkit.data.load_records)."
        },
    )
    train_split: str | None = field(
        default=None, metadata={"help": "Split of train_file to read when it holds several (e.g. 'train')."}
    )
    eval_file: str | None = field(
        default=None,
        metadata={"help": "Held-out feedback, same formats as train_file. Excludes eval_fraction."},
    )
    eval_split: str | None = field(default=None, metadata={"help": "Split of eval_file to read (e.g. 'test')."})
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of train_file (shuffled with `seed`) for evaluation when no "
            "eval_file is given. 0: no held-out split."
        },
    )
    data_kind: str | None = field(
        default=None,
        metadata={"help": "Feedback kind (pairwise, unpaired, ranked). None: detected from the fields present."},
    )
    column_map: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Read fields from differently named columns, prefkit field -> file column "
            "(e.g. {prompt: question, chosen: response_a})."
        },
    )

    def __post_init__(self):
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_file is not None and self.eval_fraction:
            raise ConfigError("give eval_file or eval_fraction, not both")


@dataclass
class PreferenceConfig(TrainingArguments):
    """``TrainingArguments`` plus prefkit's loss and sequence options.

    Defaults differ from ``TrainingArguments`` where preference training needs it:
    ``remove_unused_columns=False`` (the collators read prefkit's own columns),
    ``logging_steps=10``, ``learning_rate=1e-6`` (TRL's DPO default), ``report_to="none"``.
    """

    loss: str | list[str] = field(
        default="dpo",
        metadata={
            "help": "Loss name, or a list of names whose weighted sum is trained (e.g. [dpo, sft] is RPO). "
            "All must be of one kind. Kinds pairwise / unpaired train a policy; kinds reward_pair / "
            "reward_list / judge (bt, ranknet, listmle, ...) train a reward model, with no reference model. "
            "`prefkit losses` lists them."
        },
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss in `loss`. None: 1.0 each."}
    )
    loss_params: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Loss hyper-parameters: shared keys ({beta: 0.1}) go to every selected loss that takes "
            "them; per-loss mappings ({dpo: {beta: 0.1}, sft: {}}) to one loss. Unset keys keep the "
            "published defaults."
        },
    )
    max_length: int | None = field(
        default=512,
        metadata={"help": "Longest prompt + completion in tokens; completions are cut to fit. None: no limit."},
    )
    max_prompt_length: int | None = field(
        default=256, metadata={"help": "Longest prompt in tokens (cut by prompt_truncation). None: no limit."}
    )
    prompt_truncation: str = field(
        default="keep_end",
        metadata={"help": "How an over-long prompt is cut: keep_end (its last tokens) or keep_start."},
    )
    completion_truncation: str = field(
        default="keep_start",
        metadata={"help": "How an over-long completion is cut: keep_start (its first tokens) or keep_end."},
    )
    step_separator: str = field(
        default="\n",
        metadata={
            "help": "Stepwise records (process reward models): the text that ends every step; the PRM reads each "
            "step's score at its last token, and saves the separator in its config."
        },
    )
    logps_chunk_size: int | str = field(
        default="auto",
        metadata={
            "help": "Completion tokens per chunk of the log-softmax over the vocabulary (memory vs speed), or auto: "
            "as many as fit logps_memory_mb, clamp(logps_memory_mb * 2^20 // (vocab * 4 bytes * 4 copies), 1, 128). "
            "Results do not depend on it beyond float rounding (docs/logps.md)."
        },
    )
    logps_memory_mb: float = field(
        default=256,
        metadata={
            "help": "With logps_chunk_size: auto, the memory budget in MiB of one chunk's [tokens, vocab] float32 "
            "tensors (e.g. 110 tokens per chunk for a 152k vocabulary; 128 at most, which fits 256 MiB up to 131k)."
        },
    )
    share_prompt: bool = field(
        default=False,
        metadata={
            "help": "Pairwise losses: run each prompt once for its chosen and rejected completion (one packed row "
            "[prompt][chosen][rejected] with a block attention mask) instead of twice; same log-probs and "
            "gradients up to float rounding. Needs eager or sdpa attention."
        },
    )
    curriculum: str = field(
        default="none",
        metadata={
            "help": "Training order. none: the sampler's (shuffled). margin: Curry-DPO's easy-to-hard order, pairwise "
            "losses only: pairs sorted from the largest margin (the record's margin, else chosen_score - "
            "rejected_score) to the smallest and read in that order (train_sampling_strategy becomes sequential); "
            "every training pair needs one (prefkit data convert --to pairwise --mode best makes them)."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pairwise losses: padding-free packing. Each batch's prompt + chosen and prompt + rejected "
            "sequences ([prompt][chosen][rejected] with share_prompt) go one after another into rows of at most "
            "packing_max_tokens tokens, position_ids restarting at 0 on each; same log-probs and gradients up to "
            "float rounding. Needs eager or sdpa attention, or flash-attention without share_prompt (docs/training.md)."
        },
    )
    packing_max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "packing: the most tokens per packed row (a longer sequence gets a row of its own). None: the "
            "batch's longest sequence, so no row is wider than in the padded batch. Larger values remove more "
            "padding but, with eager and sdpa, cost L^2 attention per row of L tokens (docs/training.md)."
        },
    )
    precompute_ref_logps: bool = field(
        default=False,
        metadata={
            "help": "Score the train and eval data with the reference once before training, cache the log-probs "
            "on disk (reference_cache_dir) and train without a reference model in memory; same losses up to "
            "float rounding. Pairwise losses and bco; not kto (its KL rows pair completions within each "
            "shuffled batch)."
        },
    )
    reference_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "precompute_ref_logps: folder of the cache, one file per dataset (train.safetensors, "
            "eval.safetensors) keyed by the data's token ids and the reference's weights; a file that does "
            "not match is refused, never reused. None: OUTPUT_DIR/ref_logps."
        },
    )
    user_conditioning: bool = field(
        default=False,
        metadata={
            "help": "Train one policy for many users: each training user_id gets user_prefix_tokens new "
            "special tokens (<|user:ID|>) whose embedding rows start at the mean of the existing rows (in "
            "the policy and the reference, so the reference is the same for every user), put in front of "
            "every prompt; the policy learns them with the loss. Writes users.json with the model "
            "(docs/personalized.md, User-conditioned policies)."
        },
    )
    user_prefix_tokens: int = field(
        default=1,
        metadata={"help": "user_conditioning: soft-prompt tokens per user (their rows are the user's embedding)."},
    )
    user_id_missing: str = field(
        default="error",
        metadata={
            "help": "user_conditioning: a record without user_id is an error (error), or gets the shared "
            "token of user 'none', <|user:none|> (shared)."
        },
    )
    groups: str | None = field(
        default=None,
        metadata={
            "help": "Pairwise losses: each pair's user group, from its user_id: lab (lab user ids group:NAME/K) or a "
            "YAML/JSON file mapping user_id -> group name. Logs each group's loss and reward accuracy "
            "(group/NAME/loss, group/NAME/accuracy, worst_group/...); group_robust needs it."
        },
    )
    group_robust: bool = field(
        default=False,
        metadata={
            "help": "Pairwise losses: train for the worst group (MaxMin; group-robust DPO, Ramesh et al. 2024). The "
            "batch loss is sum_g alpha_g L_g (L_g: group g's mean loss) instead of the mean, and alpha moves "
            "toward the groups with the higher loss: alpha_g <- alpha_g exp(group_robust_step_size L_g) / Z "
            "every step. alpha is logged (group_robust/alpha/NAME) and saved with checkpoints. Needs groups "
            "(docs/training.md, MaxMin policies)."
        },
    )
    group_robust_step_size: float = field(
        default=0.01,
        metadata={
            "help": "group_robust: step size eta of alpha's exponentiated-gradient update (the authors' default "
            "0.01; 0 keeps alpha uniform: the mean of the group means)."
        },
    )
    group_robust_size_adjustment: float = field(
        default=0.0,
        metadata={
            "help": "group_robust: C of the group adjustment (GroupDRO, Sagawa et al. 2020): alpha's update uses "
            "L_g + C / sqrt(N_g), N_g the group's training pairs, favouring small groups; 0: none."
        },
    )
    bad_step_limit: int = field(
        default=3,
        metadata={
            "help": "Stop the run (exit 1, naming the steps) after this many optimizer steps in a row whose "
            "gradient norm is not finite or exactly zero, i.e. when training has stopped learning; 0: never."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "`prefkit train`: when output_dir already holds checkpoints and no --resume is "
            "given, delete them (and metrics.jsonl) and start over instead of stopping with an error."
        },
    )
    # Changed TrainingArguments defaults.
    learning_rate: float = field(
        default=1e-6,
        metadata={"help": "Initial AdamW learning rate (TRL's DPO default; raise it for LoRA or tiny models)."},
    )
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every N optimizer steps (or a fraction of the total steps if < 1)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep False: prefkit's collators read the tokenized columns themselves."},
    )
    report_to: None | str | list[str] = field(
        default="none",
        metadata={"help": "Integrations to report to (tensorboard, wandb, ...); 'none' (default) or 'all'."},
    )
    output_dir: str | None = field(
        default="runs/prefkit",
        metadata={"help": "Where checkpoints, metrics.jsonl, config.yaml and README.md go."},
    )

    def __post_init__(self):
        if isinstance(self.loss, str):
            self.loss = [self.loss]
        else:
            self.loss = list(self.loss)
        if not self.loss:
            raise ConfigError("loss: give at least one loss name")
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in self.loss_weights]
            if len(self.loss_weights) != len(self.loss):
                raise ConfigError(
                    f"loss_weights has {len(self.loss_weights)} entries for {len(self.loss)} losses ({self.loss})"
                )
        if self.loss_params is None:
            self.loss_params = {}
        if not isinstance(self.loss_params, Mapping):
            raise ConfigError(f"loss_params must be a mapping, got {self.loss_params!r}")
        self.loss_params = dict(self.loss_params)
        for name in ("prompt_truncation", "completion_truncation"):
            if getattr(self, name) not in ("keep_start", "keep_end"):
                raise ConfigError(f"{name} must be keep_start or keep_end, got {getattr(self, name)!r}")
        if isinstance(self.logps_chunk_size, str) and self.logps_chunk_size.strip().isdigit():
            self.logps_chunk_size = int(self.logps_chunk_size)
        if self.logps_chunk_size != "auto" and (
            isinstance(self.logps_chunk_size, bool)
            or not isinstance(self.logps_chunk_size, int)
            or self.logps_chunk_size < 1
        ):
            raise ConfigError(f"logps_chunk_size must be an integer >= 1 or auto, got {self.logps_chunk_size!r}")
        if isinstance(self.logps_memory_mb, bool) or not (
            isinstance(self.logps_memory_mb, (int, float)) and 0 < self.logps_memory_mb < float("inf")
        ):
            raise ConfigError(f"logps_memory_mb must be a positive number, got {self.logps_memory_mb!r}")
        if self.packing_max_tokens is not None and (
            isinstance(self.packing_max_tokens, bool)
            or not isinstance(self.packing_max_tokens, int)
            or self.packing_max_tokens < 1
        ):
            raise ConfigError(f"packing_max_tokens must be a positive integer or null, got {self.packing_max_tokens!r}")
        if self.packing_max_tokens is not None and not self.packing:
            raise ConfigError("packing_max_tokens is set but packing is false; set packing: true or drop it")
        # Validate loss names / params now, so a typo fails before any model is loaded.
        from prefkit.losses.combine import resolve_loss_params

        try:
            resolve_loss_params(self.loss, self.loss_params)
        except (KeyError, ValueError, TypeError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise ConfigError(message) from err
        self._check_user_conditioning()
        self._check_groups()
        self._check_curriculum()
        kl_losses = [n for n in self.loss if _loss_needs_kl(n)]
        for key in ("share_prompt", "packing", "precompute_ref_logps"):
            if kl_losses and getattr(self, key):
                raise ConfigError(
                    f"{key}: {', '.join(kl_losses)} read the reference's next-token distributions at every "
                    "completion token, which only the plain layout with a live reference gives; set it to false"
                )
        self._check_token_masks()
        if self.packing and self.loss_kind != "pairwise":
            raise ConfigError(
                f"packing packs the chosen and rejected sequences of pairwise losses; {self.loss} are of kind "
                f"{self.loss_kind!r}. Set packing to false."
            )
        super().__post_init__()

    def _check_token_masks(self) -> None:
        from prefkit.losses import get_loss

        masked = [n for n in self.loss if get_loss(n).token_masks]
        if len(masked) > 1:
            raise ConfigError(f"loss: at most one token-mask loss (each builds its own masks), got {masked}")

    def _check_curriculum(self) -> None:
        from prefkit.train.curriculum import CURRICULA

        if self.curriculum not in CURRICULA:
            raise ConfigError(f"curriculum: expected one of {', '.join(CURRICULA)}, got {self.curriculum!r}")
        if self.curriculum == "none":
            return
        if self.loss_kind != "pairwise":
            raise ConfigError(
                f"curriculum: margin orders preference pairs; {self.loss} are of kind {self.loss_kind!r}. "
                "Set curriculum to none."
            )
        strategy = str(getattr(self.train_sampling_strategy, "value", self.train_sampling_strategy))
        if strategy not in ("random", "sequential"):
            raise ConfigError(
                f"curriculum: margin fixes the order of the training pairs; train_sampling_strategy {strategy!r} "
                "would reorder them. Drop train_sampling_strategy or set it to sequential."
            )
        self.train_sampling_strategy = "sequential"

    def _check_user_conditioning(self) -> None:
        n = self.user_prefix_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"user_prefix_tokens must be a positive integer, got {n!r}")
        if self.user_id_missing not in ("error", "shared"):
            raise ConfigError(f"user_id_missing must be error or shared, got {self.user_id_missing!r}")
        if not self.user_conditioning:
            changed = [k for k, d in (("user_prefix_tokens", 1), ("user_id_missing", "error")) if getattr(self, k) != d]
            if changed:
                raise ConfigError(
                    f"{', '.join(changed)} is set but user_conditioning is false; set user_conditioning: true"
                )
        elif self.loss_kind not in ("pairwise", "unpaired"):
            raise ConfigError(
                f"user_conditioning trains a policy on pairwise or unpaired losses; {self.loss} are of kind "
                f"{self.loss_kind!r}. Set user_conditioning to false."
            )
        elif any(_loss_needs_kl(n) for n in self.loss):
            raise ConfigError(f"user_conditioning does not take token-level KL losses ({self.loss}); use e.g. dpo")

    def _check_groups(self) -> None:
        step = self.group_robust_step_size
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not (0 <= step < float("inf")):
            raise ConfigError(f"group_robust_step_size must be a finite number >= 0, got {step!r}")
        c = self.group_robust_size_adjustment
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0 <= c < float("inf")):
            raise ConfigError(f"group_robust_size_adjustment must be a finite number >= 0, got {c!r}")
        if c and not self.group_robust:
            raise ConfigError("group_robust_size_adjustment adjusts group_robust's weights; set group_robust: true")
        if self.groups is None:
            if self.group_robust:
                raise ConfigError(
                    "group_robust needs each pair's group: set groups to lab (user ids group:NAME/K) or to a "
                    "YAML/JSON file mapping user_id -> group"
                )
            return
        if self.groups != "lab" and not Path(self.groups).is_file():
            raise ConfigError(f"groups: {self.groups!r} is neither lab nor a file (a YAML/JSON user_id -> group map)")
        if self.loss_kind != "pairwise":
            raise ConfigError(
                f"groups / group_robust apply to pairwise policy losses; {self.loss} are of kind {self.loss_kind!r}"
            )
        from prefkit.losses import get_loss

        coupled = [n for n in self.loss if get_loss(n).batch_coupled]
        if self.group_robust and coupled:
            raise ConfigError(
                f"group_robust averages each group's per-example losses, but loss {coupled} sorts over the batch "
                "(its loss[i] is not example i's); use another loss"
            )

    # -- derived ----------------------------------------------------------------------------
    @property
    def loss_names(self) -> list[str]:
        return list(self.loss)

    @property
    def resolved_loss_weights(self) -> list[float]:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss)

    @property
    def resolved_loss_params(self) -> dict[str, dict[str, Any]]:
        """Every selected loss's full keyword arguments (defaults updated from ``loss_params``)."""
        from prefkit.losses.combine import resolve_loss_params

        return resolve_loss_params(self.loss, self.loss_params)

    @property
    def loss_kind(self) -> str:
        from prefkit.losses import get_loss

        return get_loss(self.loss[0]).kind

    @property
    def trains_reward_model(self) -> bool:
        """True when the loss kind is a reward-model kind (reward_pair, reward_list, judge)."""
        return self.loss_kind in REWARD_KINDS

    @property
    def record_kind(self) -> str:
        """The kind of feedback records the loss trains on (``ranked`` for listwise reward losses)."""
        return RECORD_KINDS.get(self.loss_kind, self.loss_kind)

    @property
    def reference_free(self) -> bool:
        """True when no selected loss reads reference log-probs (no reference model is created)."""
        from prefkit.losses import get_loss

        return not any(get_loss(n).needs_reference for n in self.loss)

    @property
    def needs_tokens(self) -> bool:
        """True when a selected loss reads per-token log-probs."""
        from prefkit.losses import get_loss

        return any(get_loss(n).needs_tokens for n in self.loss)


# ------------------------------------------------------------------------------------------
# YAML <-> dataclasses
# ------------------------------------------------------------------------------------------

SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig),
    ("data", DataConfig),
    ("train", PreferenceConfig),
)

# Fields of PreferenceConfig defined by prefkit (the rest come from TrainingArguments).
PREFKIT_TRAIN_FIELDS = (
    "loss",
    "loss_weights",
    "loss_params",
    "max_length",
    "max_prompt_length",
    "prompt_truncation",
    "completion_truncation",
    "logps_chunk_size",
    "logps_memory_mb",
    "share_prompt",
    "packing",
    "packing_max_tokens",
    "precompute_ref_logps",
    "reference_cache_dir",
    "user_conditioning",
    "user_prefix_tokens",
    "user_id_missing",
    "groups",
    "group_robust",
    "group_robust_step_size",
    "group_robust_size_adjustment",
    "bad_step_limit",
    "overwrite_output_dir",
)


@dataclass
class RunConfig:
    """One run's full configuration."""

    model: ModelConfig
    data: DataConfig
    train: PreferenceConfig


def config_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """key -> (section, field) for every key a YAML config may hold."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS:
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.name in out:
                raise RuntimeError(f"config key {f.name!r} is owned by both {out[f.name][0]} and {section}")
            out[f.name] = (section, f)
    return out


def _type_hints(cls: type) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            try:
                hints.update(typing.get_type_hints(klass))
            except Exception:  # noqa: BLE001 - unresolved forward refs: keep what resolves
                for name, ann in getattr(klass, "__annotations__", {}).items():
                    hints.setdefault(name, ann)
    return hints


def _members(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return (tp,)


def _accepts_str(tp: Any) -> bool:
    return any(isinstance(m, type) and issubclass(m, str) for m in _members(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert YAML strings to the field's scalar type where the type says so.

    PyYAML reads ``1e-5`` (no dot) as a string; a float field then gets the float. It reads ``no``
    / ``yes`` as booleans; a text field (``save_strategy: no``) gets the word back. A value that
    cannot be converted is an error naming the key.
    """
    if isinstance(value, bool) and bool not in _members(tp) and _accepts_str(tp):
        # YAML 1.1 reads `no` / `yes` (e.g. save_strategy: no) as booleans; a text field wants the word.
        return "yes" if value else "no"
    if not isinstance(value, str):
        if isinstance(value, int) and not isinstance(value, bool) and float in _members(tp) and int not in _members(tp):
            return float(value)
        return value
    members = _members(tp)
    if _accepts_str(tp):
        return value
    for target in (int, float):
        if target in members:
            try:
                return target(value)
            except ValueError:
                continue
    if bool in members:
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if int in members or float in members:
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    return value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["loss=ipo", "loss_params.beta=0.2"]`` -> ``[("loss", "ipo"), ("loss_params.beta", 0.2)]``."""
    from prefkit.train.settings import parse_overrides as parse

    return parse(overrides)


def parse_config(
    mapping: Mapping[str, Any] | None, overrides: Sequence[str] = (), *, source: str | None = None
) -> RunConfig:
    """Build a `RunConfig` from a flat mapping plus ``key=value`` overrides. Every value is checked first
    (`prefkit.train.settings.flat_values`: TRL aliases, unknown keys, types and ranges, losses, paths)."""
    where = f" in {source}" if source else ""
    values = flat_values(mapping, overrides, source=source)
    valid = config_fields()
    per_section: dict[str, dict[str, Any]] = {name: {} for name, _ in SECTIONS}
    hints = {name: _type_hints(cls) for name, cls in SECTIONS}
    for key, value in values.items():
        section, _field = valid[key]
        per_section[section][key] = _coerce(key, value, hints[section].get(key, Any))
    built = {}
    for section, cls in SECTIONS:
        try:
            built[section] = cls(**per_section[section])
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid {section} config{where}: {err}") from err
    return RunConfig(**built)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a flat YAML config file and apply ``key=value`` overrides."""
    return parse_config(read_config_file(path), overrides, source=str(path))


def _plain(value: Any) -> Any:
    """YAML-safe plain values (enums to their value, tuples to lists, dataclasses to dicts)."""
    import enum

    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def config_to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """The resolved config as ``{"model": {...}, "data": {...}, "prefkit": {...}, "training": {...}}``.

    ``training`` holds every ``TrainingArguments`` field (from its ``to_dict()``, tokens left out).
    Flattening the four groups gives a mapping `parse_config` accepts.
    """
    model = {f.name: _plain(getattr(config.model, f.name)) for f in dataclasses.fields(ModelConfig) if f.init}
    data = {f.name: _plain(getattr(config.data, f.name)) for f in dataclasses.fields(DataConfig) if f.init}
    args_dict = config.train.to_dict()
    prefkit = {name: _plain(getattr(config.train, name)) for name in PREFKIT_TRAIN_FIELDS}
    training = {}
    init_names = {f.name for f in dataclasses.fields(PreferenceConfig) if f.init}
    for key, value in args_dict.items():
        if key in PREFKIT_TRAIN_FIELDS or key not in init_names:
            continue
        if isinstance(value, str) and value.startswith("<") and value.endswith("_TOKEN>"):
            continue  # a redacted secret: never written to disk
        training[key] = _plain(value)
    return {"model": model, "data": data, "prefkit": prefkit, "training": training}


def write_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as one flat YAML mapping (grouped by comments), re-readable by
    `load_config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = config_to_dict(config)
    titles = {
        "model": "model (ModelConfig)",
        "data": "data (DataConfig)",
        "prefkit": "loss and sequences (PreferenceConfig)",
        "training": "transformers.TrainingArguments",
    }
    parts = ["# Resolved prefkit config: `prefkit train THIS_FILE` re-runs it.\n"]
    for name, values in groups.items():
        parts.append(f"\n# --- {titles[name]} ---\n")
        parts.append(yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------
# Reference table for docs/training.md
# ------------------------------------------------------------------------------------------


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    value = _plain(value)
    return (
        "`"
        + (
            yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            if value is not None
            else "null"
        )
        + "`"
    )


def config_reference_markdown(group: str) -> str:
    """A Markdown table (key, default, meaning) for ``group``: ``model``, ``data``, ``loss``
    (prefkit's PreferenceConfig fields) or ``training`` (every other TrainingArguments field)."""
    if group == "model":
        fields_ = [f for f in dataclasses.fields(ModelConfig)]
    elif group == "data":
        fields_ = [f for f in dataclasses.fields(DataConfig)]
    elif group == "loss":
        by_name = {f.name: f for f in dataclasses.fields(PreferenceConfig)}
        fields_ = [by_name[n] for n in PREFKIT_TRAIN_FIELDS]
    elif group == "training":
        fields_ = [f for f in dataclasses.fields(PreferenceConfig) if f.init and f.name not in PREFKIT_TRAIN_FIELDS]
    else:
        raise ValueError(f"unknown group {group!r}; expected model, data, loss or training")
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for f in fields_:
        if not f.init:
            continue
        text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        default = _default_repr(f).replace("|", "\\|")
        lines.append(f"| `{f.name}` | {default} | {text} |")
    return "\n".join(lines)


TABLE_GROUPS = ("model", "data", "loss", "training")


def update_reference_tables(markdown: str) -> str:
    """Replace each ``<!-- keys:GROUP -->`` ... ``<!-- /keys:GROUP -->`` block of ``markdown``
    with the current `config_reference_markdown` table (how docs/training.md is kept in sync:
    ``python -m prefkit.train.config docs/training.md``)."""
    import re

    for group in TABLE_GROUPS:
        pattern = re.compile(rf"(<!-- keys:{group} -->\n)(?:.*?\n)?(<!-- /keys:{group} -->)", re.DOTALL)
        table = config_reference_markdown(group)
        markdown = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), markdown)
    return markdown


if __name__ == "__main__":  # pragma: no cover - a maintenance helper
    import sys

    for doc in sys.argv[1:]:
        p = Path(doc)
        p.write_text(update_reference_tables(p.read_text(encoding="utf-8")), encoding="utf-8")
