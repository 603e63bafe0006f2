"""The denoising loop: the one place that picks the expert, applies guidance and steps the solver.

Everything else that wants to act inside the loop is a hook (``LoopHook``): progress bars, step
callbacks, caches that skip a model call. Hooks see each step's index, timestep, active expert
and guide scale, and each model call with its guidance branch; a hook's state is saved with the
loop's, so a resumed run goes on exactly as an uninterrupted one.

Hooks inside a model call attach to each expert's block stack (``models/hooks.py``): the loop
resets them before the run, tells them the expert, branch and step of each call and when it leaves
an expert, and saves their states with its own (this process's: each rank of a parallel run holds its own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from wan_i2v.models.conditioning import FixedFrames
from wan_i2v.models.spec import ExpertSpec
from wan_i2v.sampling.guidance import ClassifierFreeGuidance
from wan_i2v.sampling.schedulers import Schedule, make_solver


class Experts:
    """A model's experts by name (``ExpertSpec``s: each runs from its boundary up to the previous
    one's); ``activate`` returns the one to run. Offloading subclasses this."""

    def __init__(self, models: Mapping[str, nn.Module], experts: Sequence[ExpertSpec]):
        self.models = {expert.name: models[expert.name] for expert in experts}
        self.boundaries = sorted(((expert.boundary, expert.name) for expert in experts), reverse=True)

    def name_for(self, timestep: float) -> str:
        return next(name for boundary, name in self.boundaries if timestep >= boundary)

    def activate(self, name: str) -> nn.Module:
        return self.models[name]

    def release(self) -> None:
        """Called once the loop is done with the experts."""


@dataclass(frozen=True)
class StepInfo:
    """One step as hooks see it."""

    index: int  # 0-based
    total: int
    timestep: float
    expert: str  # its name in the model's spec
    guide_scale: float


class LoopHook:
    """Override what you need. ``name`` (if set) keys the hook's ``state_dict`` in the saved loop
    state; a hook with state must set it, or a resumed run would start it afresh."""

    name: str | None = None

    def on_step_begin(self, step: StepInfo) -> None:
        pass

    def around_model(self, step: StepInfo, branch: str, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One model call of the step (``branch``: "cond", "uncond" or "both"); ``run()`` makes it."""
        return run()

    def on_step_end(self, step: StepInfo, latent: torch.Tensor) -> torch.Tensor | None:
        """After the solver step; a returned tensor replaces the latent."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Cancelled(Exception):
    """The run was cancelled before step ``step`` (0-based); every step before it is saved."""

    def __init__(self, step: int, total: int):
        super().__init__(step, total)  # the arguments, so that it pickles (it crosses from a rank to the caller)
        self.step, self.total = step, total

    def __str__(self) -> str:
        return f"cancelled after {self.step} of {self.total} steps"


@dataclass
class LoopState:
    """A run after ``step`` steps: the latent, the solver's memory, the loop hooks' states and, by
    expert, the states of the hooks on its block stack (``HookRegistry.state_dict``: this process's,
    under its shard's key; ``models.hooks.merge_states`` merges those of several ranks)."""

    step: int
    latent: torch.Tensor
    solver: dict
    hooks: dict = field(default_factory=dict)
    block_hooks: dict = field(default_factory=dict)


def denoise(
    noise: torch.Tensor,
    *,
    experts: Experts,
    guidance: ClassifierFreeGuidance,
    schedule: Schedule,
    solver: str,
    guide_scale: Mapping[str, float],
    hooks: Sequence[LoopHook] = (),
    resume: LoopState | None = None,
    on_state: Callable[[LoopState], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    fixed: FixedFrames | None = None,
) -> torch.Tensor:
    """Run the sampler from ``noise`` [1, C, F, H, W] (fp32, run device) to clean latents, each
    step with its expert's ``guide_scale`` (by expert name). ``fixed`` latent frames replace the
    noise's, are called with timestep 0 and are put back after every step.

    ``resume`` goes on from a saved state instead of from the noise; ``on_state`` sees the
    state after each step (to save it). ``stop_requested()`` is asked before each step: True
    raises ``Cancelled``, the state of the steps done already seen by ``on_state``.
    """
    stepper = make_solver(solver, schedule)
    latent = noise if fixed is None else fixed.put_back(noise)
    timesteps = schedule.timesteps.tolist()
    first = 0
    registries = {name: model.block_stack().hooks for name, model in experts.models.items()}
    for registry in registries.values():
        registry.reset()
    if resume is not None:
        first, latent = resume.step, resume.latent
        stepper.load_state_dict(resume.solver)
        for hook in hooks:
            if hook.name is not None:
                hook.load_state_dict(resume.hooks.get(hook.name, {}))
        for name, registry in registries.items():
            registry.load_state_dict(resume.block_hooks.get(name, {}))
    previous = None  # the expert of the step before
    try:
        for index, t in enumerate(timesteps[first:], start=first):
            if stop_requested is not None and stop_requested():
                raise Cancelled(index, len(timesteps))
            name = experts.name_for(t)
            if previous is not None and name != previous:
                registries[previous].switched_away()
            previous = name
            model = experts.activate(name)
            step = StepInfo(index, len(timesteps), float(t), name, guide_scale[name])
            for hook in hooks:
                hook.on_step_begin(step)

            def call(branch, *inputs, step=step, model=model):
                def run():
                    with registries[step.expert].context(expert=step.expert, branch=branch, step=step.index, steps=step.total):
                        return model(*inputs)

                for hook in reversed(hooks):  # the first hook is the outermost
                    run = (lambda hook, inner: lambda: hook.around_model(step, branch, inner))(hook, run)
                return run()

            timestep = torch.full((1,), float(t), device=latent.device)
            if fixed is not None:
                timestep = fixed.timestep(timestep)
            with torch.no_grad():
                flow = guidance(call, latent, timestep, step.guide_scale)
            latent = stepper.step(flow, latent)
            if fixed is not None:
                latent = fixed.put_back(latent)
            for hook in hooks:
                replaced = hook.on_step_end(step, latent)
                latent = latent if replaced is None else replaced
            if on_state is not None:
                # After the last step nothing runs (a resume goes straight to the decode): its state
                # needs no hook's, and the step cache's GBs are not written.
                last = index + 1 == len(timesteps)
                states = {} if last else {hook.name: hook.state_dict() for hook in hooks if hook.name is not None}
                block_states = {} if last else {name: registry.state_dict() for name, registry in registries.items()}
                on_state(LoopState(index + 1, latent, stepper.state_dict(), states, block_states))
    finally:
        # Also after an error or Ctrl-C: an offloaded expert must not stay on the GPU.
        experts.release()
    return latent
