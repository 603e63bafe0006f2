"""Guidance strategies: how the model calls of one step become one flow.

A strategy calls the model through ``call(branch, latent, timestep, context, condition)``, which
the loop gives it: the loop's hooks see (and may replace) each branch's call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from wan_i2v.models.conditioning import FixedFrames

# call(branch, latent, timestep, context, condition) -> flow; branch is "cond", "uncond" or "both" (batched).
ModelCall = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Conditioning:
    """What stays fixed over the loop, on the run device."""

    condition: torch.Tensor | None  # [1, C', F, H, W] channels beside the latents (I2V: mask and VAE latents); None: none
    context: torch.Tensor  # [1, text_len, text_dim]: the prompt, zero-padded
    context_null: torch.Tensor  # [1, text_len, text_dim]: the negative prompt
    fixed: FixedFrames | None = None  # latent frames the loop keeps as given (TI2V's image)


def combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


class ClassifierFreeGuidance:
    """flow = uncond + scale * (cond - uncond); at scale 1 that is cond, and only the conditional
    pass runs (the distilled models are sampled so: one forward per step).

    ``batched`` runs both branches as one batch of two (faster, more activation
    memory); otherwise conditional then unconditional, as the official code does.
    """

    def __init__(self, conditioning: Conditioning, batched: bool):
        self.batched = batched
        self.condition = conditioning.condition
        self.contexts = (conditioning.context, conditioning.context_null)
        if batched:
            condition = conditioning.condition
            self.batched_condition = None if condition is None else condition.expand(2, *condition.shape[1:])
            self.batched_context = torch.cat(self.contexts)

    def __call__(self, call: ModelCall, latent: torch.Tensor, timestep: torch.Tensor, scale: float) -> torch.Tensor:
        if scale == 1:
            return call("cond", latent, timestep, self.contexts[0], self.condition)
        if self.batched:
            pair = call("both", latent.expand(2, *latent.shape[1:]), timestep.expand(2, *timestep.shape[1:]), self.batched_context, self.batched_condition)
            cond, uncond = pair.chunk(2)
        else:
            cond = call("cond", latent, timestep, self.contexts[0], self.condition)
            uncond = call("uncond", latent, timestep, self.contexts[1], self.condition)
        return combine(cond, uncond, scale)
