"""Rollouts with vLLM (optional extra ``prefkit[vllm]``, GPU): the same interface as `HFRollouts`.

`VLLMRollouts` holds a colocated ``vllm.LLM`` built from the policy's folder (or Hub id), in the training
process, sharing the GPU (``gpu_memory_utilization`` is its share). `VLLMRollouts.sync_weights` copies the
trained policy's weights into it (call it after every optimizer step; the online trainer does when the
step has changed) and resets its prefix cache. With ``sleep_mode`` vLLM frees its weights and KV cache
between generations (sleep level 2) and gets the weights back from the policy before the next one.

Each prompt is one request with ``n`` samples, so vLLM prefills the prompt once for its ``n`` completions
(prefix caching). Sampling is seeded per prompt by ``(settings.seed, prompt seed key)``, so a prompt's
completions do not depend on the other prompts of the batch or on the process that draws them (vLLM
draws the ``n`` samples of a request from one seeded generator; they are not the samples `HFRollouts`
would draw). Log-probs are vLLM's "processed" log-probs: of the distribution after temperature, top-k and
top-p, the distribution the token was drawn from, as `HFRollouts` reports them.

The facts used here (``LLM(..., enable_sleep_mode=..., distributed_executor_backend="external_launcher",
logprobs_mode="processed_logprobs")``, ``load_weights`` on the driver worker's model, ``sleep`` /
``wake_up``, ``reset_prefix_cache``) are those of vLLM 0.10-0.11's Python API. This backend is tested only
on a GPU (``pytest -m gpu``); the machine prefkit is developed on has none, so those tests skip there.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from prefkit.online.rollouts import Rollout, SamplingSettings, _row_seed

__all__ = ["VLLMRollouts", "vllm_available"]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMRollouts:
    """``generate(prompt_ids, settings, prompt_seeds)`` like `HFRollouts`, with a colocated ``vllm.LLM``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        gpu_memory_utilization: float = 0.3,
        sleep_mode: bool = False,
        max_model_len: int | None = None,
        dtype: str = "auto",
    ):
        if not vllm_available():
            raise ImportError("rollout_backend vllm needs the vllm package: pip install prefkit[vllm] (on a GPU)")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no eos_token_id; rollouts need one")
        import torch
        from vllm import LLM

        if not torch.cuda.is_available():
            raise RuntimeError("rollout_backend vllm needs a CUDA GPU; use rollout_backend hf on this machine")
        source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
        if not source:
            raise ValueError("vLLM builds its engine from the policy's folder or Hub id: the model has no name_or_path")
        self.model, self.tokenizer, self.sleep_mode = model, tokenizer, sleep_mode
        self.llm = LLM(
            model=source,
            tokenizer=getattr(tokenizer, "name_or_path", None) or source,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=sleep_mode,
            dtype=dtype,
            distributed_executor_backend="external_launcher",
            logprobs_mode="processed_logprobs",
            seed=0,
        )
        self._asleep = False
        if sleep_mode:
            self.llm.sleep(level=2)
            self._asleep = True
        self._synced = False

    def sync_weights(self, model: nn.Module | None = None) -> None:
        """Copy the policy's weights into the engine (PEFT adapters merged into their base layers' weights)."""
        import torch

        model = model or self.model
        if self.sleep_mode and self._asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        with torch.no_grad():
            if hasattr(model, "merge_adapter"):  # a PEFT model: push base + adapters, then unmerge
                model.merge_adapter()
                try:
                    engine_model.load_weights(_peft_base_names(model))
                finally:
                    model.unmerge_adapter()
            else:
                engine_model.load_weights(model.state_dict().items())
        self.llm.reset_prefix_cache()
        self._synced = True
        self._asleep = False

    def generate(
        self, prompt_ids: Sequence[list[int]], settings: SamplingSettings, prompt_seeds: Sequence[int] | None = None
    ) -> list[Rollout]:
        from vllm import SamplingParams

        if not prompt_ids:
            raise ValueError("no prompts to roll out")
        seeds = list(range(len(prompt_ids))) if prompt_seeds is None else [int(s) for s in prompt_seeds]
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"prompt_seeds: expected {len(prompt_ids)} seeds (one per prompt), got {len(seeds)}")
        if not self._synced or (self.sleep_mode and self._asleep):
            self.sync_weights()
        if self.sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        eos = self.tokenizer.eos_token_id
        params = [
            SamplingParams(
                n=settings.n,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k if settings.top_k > 0 else -1,
                max_tokens=settings.max_new_tokens,
                min_tokens=settings.min_new_tokens,
                seed=_row_seed(settings.seed, s, 0) % (2**31),
                logprobs=0,
                stop_token_ids=[eos],
                stop=list(settings.stop) or None,
                include_stop_str_in_output=True,
            )
            for s in seeds
        ]
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        if self.sleep_mode:
            self.llm.sleep(level=2)
            self._asleep = True
        rollouts = []
        for i, out in enumerate(outputs):
            for sample in out.outputs:
                tokens = list(sample.token_ids)
                logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, tokens)]
                if tokens and tokens[-1] == eos:
                    reason = "eos"
                else:  # vLLM ends at a stop string with finish_reason "stop" (the string kept in the output)
                    reason = "stop" if sample.finish_reason == "stop" else "length"
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                rollouts.append(Rollout(i, list(prompt_ids[i]), tokens, logprobs, text, reason))
        return rollouts


def _peft_base_names(model: nn.Module):
    """``(name, tensor)`` of a PEFT model with adapters merged, under the base model's own parameter names
    (the ``base_model.model.`` prefix and ``.base_layer`` dropped, the adapters' own tensors left out)."""
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        yield name, tensor
