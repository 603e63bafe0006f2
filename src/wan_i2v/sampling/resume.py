"""Resumable runs: the loop's state after each step, in a file a later run goes on from."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch

from wan_i2v.config import GenerationSettings
from wan_i2v.errors import WanError
from wan_i2v.sampling.loop import LoopState
from wan_i2v.video import write_atomically

STATE_FORMAT = "wan-i2v-loop-state/1"


def map_tensors(state, fn):
    """``state`` with ``fn`` applied to its tensors, alone or in lists and dicts (nested)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {key: map_tensors(value, fn) for key, value in state.items()}
    if isinstance(state, list):
        return [map_tensors(value, fn) for value in state]
    return state


def state_to(state: LoopState, device: torch.device) -> LoopState:
    return LoopState(**map_tensors(vars(state), lambda t: t.to(device)))


def run_identity(checkpoint: Path | None, plan_identity: dict, loras: list[dict], images: dict[str, str] | None = None) -> dict:
    """What, besides the generation settings, decides a run's video, which a saved state must match
    to be resumed: the checkpoint's folder, what in the execution plan changes the numbers
    (``ExecutionPlan.identity``), the LoRAs' records (none: no entry, as before LoRAs existed) and
    the given images' pixels (``images``: "image", and "last_image" when one is given, to the SHA-256
    of its pixels), so a run with another first or last frame starts over rather than mixes them."""
    identity = {**({"checkpoint": str(Path(checkpoint).resolve())} if checkpoint is not None else {}), **plan_identity}
    if loras:
        identity["loras"] = loras
    return {**identity, **(images or {})}


def save_loop_state(path, state: LoopState, settings: GenerationSettings, run: dict) -> None:
    """The denoising state after a step, written atomically (a killed write leaves the previous one).
    ``run`` identifies the checkpoint, precision and input image the state belongs to."""
    cpu = map_tensors(vars(state), torch.Tensor.cpu)
    record = {"format": STATE_FORMAT, "settings": settings.as_dict(), "run": run, **cpu}
    write_atomically(Path(path), lambda tmp: torch.save(record, tmp))


def load_loop_state(path, settings: GenerationSettings, run: dict, *, seed_given: bool):
    """(settings, LoopState) to resume from ``path``, or None when there is nothing to resume.

    A state saved for another image, checkpoint, precision or other settings is ignored (and
    overwritten by the run); without an explicit seed, the saved run's seed is taken.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        warnings.warn(f"ignoring unreadable state file {path}; starting over")
        return None
    discarded = f"the saved state in {path} is of another run (image, checkpoint, precision, LoRAs or settings); starting over"
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT or record.get("run") != run:
        warnings.warn(discarded)
        return None
    try:
        saved = GenerationSettings(**{**record["settings"], "guide_scale": tuple(record["settings"]["guide_scale"])})
    except (TypeError, WanError):
        warnings.warn(discarded)
        return None
    saved = replace(saved, fps=settings.fps)  # the output's frame rate: the one asked for now
    wanted = settings if seed_given else replace(settings, seed=saved.seed)
    if saved != wanted:
        warnings.warn(discarded)
        return None
    return saved, LoopState(record["step"], record["latent"], record["solver"], record.get("hooks", {}), record.get("block_hooks", {}))
