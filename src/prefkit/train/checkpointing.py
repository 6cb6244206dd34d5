"""`CheckpointingTrainer`: what every prefkit trainer adds to ``transformers.Trainer``.

- **Atomic checkpoints.** transformers writes ``checkpoint-N`` file by file, so a crash mid-save
  leaves a partial folder that ``get_last_checkpoint`` would pick for ``--resume``. Here everything
  (weights, optimizer, scheduler, RNG, trainer state and the trainer's own state, `STATE_FILE`) goes
  to ``.staging-checkpoint-N/checkpoint-N`` first, is flushed to disk, and one ``os.replace``
  publishes it.
- **Exact resume.** ``train(resume_from_checkpoint=True)`` takes the last complete checkpoint of
  ``output_dir`` (an error when there is none); the subclass's `prefkit_state` is restored by
  `load_prefkit_state`; a run resumed at its final step trains nothing.
- **Metric windows.** Metrics stored per batch (`_store_metrics`) are averaged over the logging
  window, summed over every process first, and added to the training log / evaluation results,
  which are printed as compact lines (`PreferenceProgressCallback`) and appended to
  ``output_dir/metrics.jsonl`` (`MetricsJsonlCallback`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zipfile
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from prefkit.train.callbacks import MetricsJsonlCallback, PreferenceProgressCallback

__all__ = ["STATE_FILE", "CheckpointError", "CheckpointingTrainer", "TrainingStoppedError"]

logger = logging.getLogger("prefkit.train")

STATE_FILE = "prefkit_state.json"
# The base class's own entry in STATE_FILE: the summed training loss so far and metrics.jsonl's length.
RUN_STATE_KEY = "checkpointing"


class TrainingStoppedError(RuntimeError):
    """Training stopped because it stopped learning (a non-finite loss, or `bad_step_limit` optimizer
    steps in a row with a non-finite or zero gradient norm). `prefkit train` exits 1 with the message."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed exactly: a file missing or unreadable (named in the message)."""


class CheckpointingTrainer(Trainer):
    """``transformers.Trainer`` with atomic checkpoints, a state file, exact resume and metric windows
    (module docstring). Subclasses put what a checkpoint must carry besides the model, optimizer,
    scheduler and RNG into `prefkit_state` and restore it in `load_prefkit_state`."""

    _staging_root: str | None = None
    _deferred_push: str | None = None
    _resumed_complete = False  # set by _init_training_state: resumed at the last step, nothing to train

    def __init__(self, *args, **kwargs):
        self._metric_sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._metric_counts: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._bad_steps: list[str] = []  # the current run of optimizer steps with a non-finite or zero gradient
        self._prior_loss_sum = 0.0  # summed per-step training loss of the steps before the resumed checkpoint
        super().__init__(*args, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(PreferenceProgressCallback)
        self._metrics_callback = MetricsJsonlCallback()
        self.add_callback(self._metrics_callback)

    # ------------------------------------------------------------------------------------------
    # A run that stops learning stops
    # ------------------------------------------------------------------------------------------
    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._watch_gradient(grad_norm)
        return grad_norm

    def _watch_gradient(self, grad_norm) -> None:
        """Count optimizer steps in a row whose gradient norm is non-finite or exactly zero (no update);
        `bad_step_limit` of them (``args.bad_step_limit``; 0: never) stop the run with `TrainingStoppedError`."""
        limit = getattr(self.args, "bad_step_limit", 3)
        if grad_norm is None or not limit:
            return
        value = float(grad_norm.item() if isinstance(grad_norm, Tensor) else grad_norm)
        if math.isfinite(value) and value != 0.0:
            self._bad_steps = []
            return
        self._bad_steps.append(f"step {self.state.global_step + 1}: grad_norm {value}")
        if len(self._bad_steps) >= limit:
            first = self._bad_steps[0].split(":")[0]
            what = "zero (no update)" if value == 0.0 else "not finite"
            raise TrainingStoppedError(
                f"training stopped learning at {self._bad_steps[-1].split(':')[0]}: the gradient norm was {what} "
                f"for {limit} optimizer steps in a row since {first} ({'; '.join(self._bad_steps)}). Lower "
                "learning_rate, check the data for extreme weights or margins, or set bad_step_limit: 0 to "
                "train on regardless."
            )

    # ------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------
    def _store_metrics(self, metrics: dict[str, Tensor], split: str) -> None:
        """Add a batch's metrics (tensors of per-example values, or scalars) to ``split``'s window."""
        sums, counts = self._metric_sums[split], self._metric_counts[split]
        for key, value in metrics.items():
            value = value.detach().float().reshape(-1)
            if value.numel() == 0:
                continue
            sums[key] += value.sum().item()
            counts[key] += value.numel()

    def _pop_metrics(self, split: str) -> dict[str, float]:
        """The window's averages over every process (plus `_derived_metrics`); the window is emptied."""
        sums, counts = self._metric_sums[split], self._metric_counts[split]
        total_sums, total_counts = self._gathered(sums, counts)
        out = {k: total_sums[k] / total_counts[k] for k in total_sums if total_counts[k] > 0}
        out.update(self._derived_metrics(out))
        sums.clear()
        counts.clear()
        return out

    def _derived_metrics(self, averages: dict[str, float]) -> dict[str, float]:
        """Metrics computed from a window's averages (none here)."""
        return {}

    def _extra_train_logs(self) -> dict[str, float]:
        """Values added to every training log besides the metric window (none here)."""
        return {}

    def _gathered(self, sums: dict[str, float], counts: dict[str, int]) -> tuple[dict[str, float], dict[str, int]]:
        """The metric sums and counts of every process added up (every process logs at the same steps,
        so this collective is reached by all); a process's own under a single-process run."""
        if self.accelerator.num_processes == 1:
            return sums, counts
        parts = [None] * self.accelerator.num_processes
        torch.distributed.all_gather_object(parts, (dict(sums), dict(counts)))
        total_sums: dict[str, float] = defaultdict(float)
        total_counts: dict[str, int] = defaultdict(int)
        for part_sums, part_counts in parts:
            for key, value in part_sums.items():
                total_sums[key] += value
                total_counts[key] += part_counts[key]
        return total_sums, total_counts

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(self._pop_metrics("train"))
            logs.update(self._extra_train_logs())
        if "train_runtime" in logs and "train_loss" in logs:
            # transformers averages the steps of this call only; the run's mean counts every step since step 0
            new_steps = 0 if self._resumed_complete else self.state.global_step - self._initial_global_step
            total = self._prior_loss_sum + logs["train_loss"] * new_steps
            logs["train_loss"] = total / max(self.state.global_step, 1)
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._pop_metrics("eval")  # start clean
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        for key, value in self._pop_metrics("eval").items():
            output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output

    # ------------------------------------------------------------------------------------------
    # Checkpoints: atomic folders, prefkit state, resume
    # ------------------------------------------------------------------------------------------
    def prefkit_state(self) -> dict[str, Any]:
        """Trainer-held state that checkpoints must carry (written to `STATE_FILE`); none here."""
        return {}

    def load_prefkit_state(self, checkpoint: str) -> None:
        """Restore what `prefkit_state` saved in ``checkpoint`` (nothing here)."""

    def _get_output_dir(self, trial):
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_root is not None:
            self._deferred_push = checkpoint_folder  # pushed once the folder has its final name
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, written into a staging folder and renamed into place."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging_root = os.path.join(run_dir, f".staging-{name}")
        staged = os.path.join(staging_root, name)
        if self.args.should_save and os.path.exists(staging_root):
            shutil.rmtree(staging_root)  # left by an earlier interrupted save
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        self._deferred_push = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        pending = self._tr_loss.detach() if isinstance(getattr(self, "_tr_loss", None), Tensor) else None
        pending_loss = self.accelerator.gather(pending.reshape(1)).mean().item() if pending is not None else 0.0
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        run_state = {
            "loss_sum": self._prior_loss_sum + self._total_loss_scalar + pending_loss,
            "metrics_lines": self._metrics_callback.line_count(self.args),
        }
        with open(os.path.join(staged, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump({**self.prefkit_state(), RUN_STATE_KEY: run_state}, fh)
        if self.state.best_model_checkpoint and os.path.abspath(self.state.best_model_checkpoint) == os.path.abspath(
            staged
        ):
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        _fsync_tree(staged)
        if os.path.exists(final):
            # Re-saving a step that already has a checkpoint (e.g. the end of a resumed run).
            old = os.path.join(staging_root, f"old-{name}")
            os.replace(final, old)
        os.replace(staged, final)
        _fsync_dir(run_dir)
        shutil.rmtree(staging_root, ignore_errors=True)
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,  # step order: renamed folders do not carry meaningful mtimes
        )
        if self._deferred_push is not None:
            self._deferred_push = None
            super()._push_from_checkpoint(final)

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        """transformers' resume state, except that a run resumed at (or past) its last step trains nothing.

        transformers checks ``max_steps`` only after a step, so a run whose last checkpoint is its final
        step, in the middle of an epoch, would otherwise take one more optimizer step (and write
        ``checkpoint-{N+1}``) on ``--resume``. Returning ``num_train_epochs`` as the epochs already trained
        leaves its epoch loop empty; the run then only finishes (final save, metrics) as usual.
        """
        epochs, steps = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        self._resumed_complete = resume_from_checkpoint is not None and self.state.global_step >= max_steps
        if self._resumed_complete:
            logger.info(
                "resumed at step %d of max_steps %d: training is already complete", self.state.global_step, max_steps
            )
            return num_train_epochs, 0
        return epochs, steps

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the last complete checkpoint of
        ``output_dir`` (an error when there is none), and the checkpoint's `STATE_FILE` is restored."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = (
                get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            )
            if resume_from_checkpoint is None:
                raise ValueError(f"--resume: no checkpoint-* folder in output_dir {self.args.output_dir!r}")
        if resume_from_checkpoint:
            if not os.path.isdir(resume_from_checkpoint):
                raise FileNotFoundError(f"checkpoint {resume_from_checkpoint!r} does not exist")
            self._check_checkpoint(resume_from_checkpoint)
            self.load_prefkit_state(resume_from_checkpoint)
            self._load_run_state(resume_from_checkpoint)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint or None,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------
    # What a resume needs
    # ------------------------------------------------------------------------------------------
    def _required_checkpoint_files(self) -> list[str]:
        """Files without which a resume would not continue the same run (plain single-device / DDP
        checkpoints; DeepSpeed and FSDP keep the optimizer in their own layout)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return ["trainer_state.json"]
        return ["trainer_state.json", "optimizer.pt", "scheduler.pt"]

    def _check_checkpoint(self, checkpoint: str) -> None:
        """Refuse a checkpoint that would not resume exactly: a required file missing, or any file that
        does not read (a truncated or corrupt file is named, not a traceback)."""
        for name in self._required_checkpoint_files():
            if not os.path.isfile(os.path.join(checkpoint, name)):
                why = {
                    "optimizer.pt": "the optimizer's moments would restart from zero",
                    "scheduler.pt": "the learning-rate schedule would restart",
                    "trainer_state.json": "the step, epoch and log history are in it",
                }[name]
                raise CheckpointError(
                    f"{os.path.join(checkpoint, name)}: missing, so the run cannot resume exactly ({why}); restore "
                    "the file or resume from an earlier checkpoint (--resume PATH)"
                )
        weights = [n for n in os.listdir(checkpoint) if n.endswith((".safetensors", ".bin", ".pt", ".pth"))]
        if not any(n.startswith(("model", "adapter_model", "pytorch_model")) for n in weights) and not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled
        ):
            raise CheckpointError(f"{checkpoint}: no model weights (model.safetensors) in the checkpoint")
        for name in sorted(os.listdir(checkpoint)):
            problem = _unreadable(os.path.join(checkpoint, name))
            if problem:
                raise CheckpointError(f"{os.path.join(checkpoint, name)}: {problem}; resume from another checkpoint")

    def _load_run_state(self, checkpoint: str) -> None:
        """The summed loss before the checkpoint (for the run's mean train_loss) and metrics.jsonl's
        length at the checkpoint (lines after it are dropped on resume)."""
        path = os.path.join(checkpoint, STATE_FILE)
        state = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                state = json.load(fh).get(RUN_STATE_KEY, {})
        self._prior_loss_sum = float(state.get("loss_sum", 0.0))
        self._metrics_callback.keep_lines = state.get("metrics_lines")


def _unreadable(path: str) -> str | None:
    """Why the checkpoint file ``path`` does not read (None when it does): JSON that does not parse, a
    torch zip archive whose entries fail their CRC check, a safetensors file shorter than its header says."""
    if os.path.isdir(path):
        return None
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                json.load(fh)
        elif path.endswith((".pt", ".pth", ".bin")):
            if not zipfile.is_zipfile(path):
                return "not a torch checkpoint (not a zip archive: truncated or overwritten?)"
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"corrupt (entry {bad} fails its checksum)"
        elif path.endswith(".safetensors"):
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    return "truncated (no safetensors header)"
                n = int.from_bytes(head, "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if os.path.getsize(path) < 8 + n + end:
                return "truncated (shorter than its safetensors header says)"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, zipfile.BadZipFile) as err:
        return f"does not read ({type(err).__name__}: {err})"
    return None


def _fsync_tree(folder: str) -> None:
    """Flush every file of ``folder`` to disk before it is renamed into place."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
