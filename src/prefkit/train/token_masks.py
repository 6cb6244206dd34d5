"""The trainer part that feeds token-mask losses (``sparsepo``, ``mapo``) their per-token masks.

A token-mask loss is registered with ``token_masks="learned"`` or ``"activations"`` (`prefkit.losses.base`). The
`PreferenceTrainer` then composes a `TokenMasker`: after the reference's log-prob pass it runs the reference once
more for its hidden states (no gradient; every decoder layer's output, each shifted one position so that the state
that predicts a token sits at that token's position), and turns them into ``[2B, T]`` masks on the completion
tokens with `prefkit.models.token_masks`:

- ``learned`` (SparsePO): a `SparseTokenMask` that trains with the policy. It is attached to the policy as the
  submodule ``prefkit_token_mask``, so the optimizer, checkpoints and exact resume carry it like any weight; the
  final save writes the policy without it and the mask beside it (``token_mask.safetensors``, ``token_mask.json``).
- ``activations`` (MaPO): `activation_mask`, nothing to train.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from prefkit.models.token_masks import SparseTokenMask, activation_mask
from prefkit.train.logps import last_logits_forward

__all__ = ["MASK_FILE", "MASK_MODULE", "TokenMasker"]

MASK_MODULE = "prefkit_token_mask"
MASK_FILE = "token_mask.safetensors"


def _decoder_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
    """Every decoder layer's output ``[N, T, H]`` (HF ``hidden_states[1:]``), shifted right by one position."""
    out = last_logits_forward(model, input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    states = getattr(out, "hidden_states", None)
    if not states or len(states) < 2:
        raise ValueError(f"{type(model).__name__} returned no hidden states; token masks need output_hidden_states")
    shifted = []
    for h in states[1:]:
        prev = torch.zeros_like(h)
        prev[:, 1:] = h[:, :-1]
        shifted.append(prev)
    return shifted


class TokenMasker:
    """Per-token masks for a token-mask loss: ``reference_states`` (under no grad), then ``masks``."""

    def __init__(self, kind: str, params: dict[str, Any], model: nn.Module, seed: int = 0):
        if kind not in ("learned", "activations"):
            raise ValueError(f"token masks are learned or activations, got {kind!r}")
        self.kind = kind
        self.module: SparseTokenMask | None = None
        if kind == "learned":
            config = model.config
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.module = SparseTokenMask(
                    config.hidden_size,
                    config.num_hidden_layers,
                    independent=bool(params.get("independent", False)),
                    dropout=float(params.get("mask_dropout", 0.01)),
                    init_std=float(getattr(config, "initializer_range", 0.02)),
                )
            weight = next(model.parameters())
            self.module.to(weight.device)
            model.add_module(MASK_MODULE, self.module)

    def reference_states(self, reference: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
        return _decoder_states(reference, inputs["input_ids"], inputs["attention_mask"])

    def masks(self, states: list[Tensor], completion_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(reward mask, KL mask)``, each ``[N, T]``, 0 off the completion tokens."""
        keep = completion_mask.bool()
        if self.module is None:
            mask = activation_mask(states, completion_mask)
            return mask, mask
        reward, kl = self.module([h[keep] for h in states])
        out = []
        for values in (reward, kl):
            full = torch.zeros(completion_mask.shape, dtype=values.dtype, device=values.device)
            full[keep] = values
            out.append(full)
        return out[0], out[1]

    def describe(self) -> dict[str, Any]:
        if self.module is None:
            return {"masks": "activations"}
        m = self.module
        net = m.reward
        return {
            "masks": "learned",
            "hidden_size": net.norm.normalized_shape[0],
            "num_layers": m.num_layers,
            "independent": m.independent,
            "dropout": net.dropout.p,
        }

    def save(self, output_dir: str) -> None:
        """Write the learned mask beside a saved policy (nothing for activation masks)."""
        if self.module is None:
            return
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        save_file(state, os.path.join(output_dir, MASK_FILE))
        with open(os.path.join(output_dir, "token_mask.json"), "w", encoding="utf-8") as fh:
            json.dump(self.describe(), fh, indent=2)
            fh.write("\n")
