"""The denoising loop: the one place that picks the expert, applies guidance and steps the solver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from wan_i2v.sampling.schedulers import Schedule, make_solver


@dataclass
class Conditioning:
    """What stays fixed over the loop, on the run device."""

    condition: torch.Tensor  # [1, 20, F, H, W]: first-frame mask and VAE latents
    context: torch.Tensor  # [1, text_len, text_dim]: the prompt, zero-padded
    context_null: torch.Tensor  # [1, text_len, text_dim]: the negative prompt


class ClassifierFreeGuidance:
    """flow = uncond + scale * (cond - uncond).

    ``batched`` runs both branches as one batch of two (faster, more activation
    memory); otherwise conditional then unconditional, as the official code does.
    """

    def __init__(self, conditioning: Conditioning, batched: bool):
        self.batched = batched
        self.condition = conditioning.condition
        self.contexts = (conditioning.context, conditioning.context_null)
        if batched:
            self.batched_condition = conditioning.condition.expand(2, *conditioning.condition.shape[1:])
            self.batched_context = torch.cat(self.contexts)

    def __call__(self, model: nn.Module, latent: torch.Tensor, timestep: torch.Tensor, scale: float) -> torch.Tensor:
        if self.batched:
            pair = model(latent.expand(2, *latent.shape[1:]), timestep.expand(2), self.batched_context, self.batched_condition)
            cond, uncond = pair.chunk(2)
        else:
            cond = model(latent, timestep, self.contexts[0], self.condition)
            uncond = model(latent, timestep, self.contexts[1], self.condition)
        return self.combine(cond, uncond, scale)

    @staticmethod
    def combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return uncond + scale * (cond - uncond)


class Experts:
    """The two experts; ``activate`` returns the one to run. Offloading subclasses this."""

    def __init__(self, high_noise: nn.Module, low_noise: nn.Module, boundary: int):
        self.models = {"high": high_noise, "low": low_noise}
        self.boundary = boundary

    def name_for(self, timestep: int) -> str:
        return "high" if timestep >= self.boundary else "low"

    def activate(self, name: str) -> nn.Module:
        return self.models[name]

    def release(self) -> None:
        """Called once the loop is done with the experts."""


# on_step(step_index, num_steps, timestep, expert_name, latent) after each step.
StepCallback = Callable[[int, int, int, str, torch.Tensor], None]


@dataclass
class LoopState:
    """A run after ``step`` steps: the latent and the solver's memory, enough to go on from there."""

    step: int
    latent: torch.Tensor
    solver: dict


def denoise(
    noise: torch.Tensor,
    *,
    experts: Experts,
    guidance: ClassifierFreeGuidance,
    schedule: Schedule,
    solver: str,
    guide_scale: tuple[float, float],
    on_step: StepCallback | None = None,
    resume: LoopState | None = None,
    on_state: Callable[[LoopState], None] | None = None,
) -> torch.Tensor:
    """Run the sampler from ``noise`` [1, C, F, H, W] (fp32, run device) to clean latents.

    ``resume`` goes on from a saved state instead of from the noise; ``on_state`` sees the
    state after each step (to save it).
    """
    stepper = make_solver(solver, schedule)
    latent = noise
    timesteps = schedule.timesteps.tolist()
    first = 0
    if resume is not None:
        first, latent = resume.step, resume.latent
        stepper.load_state_dict(resume.solver)
    try:
        for index, t in enumerate(timesteps[first:], start=first):
            name = experts.name_for(t)
            model = experts.activate(name)
            scale = guide_scale[1] if name == "high" else guide_scale[0]
            timestep = torch.full((1,), float(t), device=latent.device)
            with torch.no_grad():
                flow = guidance(model, latent, timestep, scale)
            latent = stepper.step(flow, latent)
            if on_step is not None:
                on_step(index, len(timesteps), t, name, latent)
            if on_state is not None:
                on_state(LoopState(index + 1, latent, stepper.state_dict()))
    finally:
        # Also after an error or Ctrl-C: an offloaded expert must not stay on the GPU.
        experts.release()
    return latent
