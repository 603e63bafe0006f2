"""Resumable runs: the loop's state after each step, in a file a later run goes on from."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from wan_i2v.config import GenerationSettings
from wan_i2v.errors import WanError, first_line
from wan_i2v.loading.staging import PinnedArena
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


def state_record(host_state: dict, settings: GenerationSettings, run: dict) -> dict:
    """What a state file holds: the loop's state in host tensors (``HostBuffers.copy``), the settings
    and ``run`` (the checkpoint, precision and input image the state belongs to)."""
    return {"format": STATE_FORMAT, "settings": settings.as_dict(), "run": run, **host_state}


class HostBuffers:
    """Host tensors the states are copied into, kept from one save to the next: a copy even on the CPU
    (the next step may change the tensors in place while the file is written), page-locked for a GPU's
    tensors so that the copy is queued on the device's stream and the run goes on at once. A fresh
    pageable copy of each state (3.2 GB at 720P with the step cache: its pages faulted in, then filled
    at pageable speed) took about 2.9 s, five steps that skip: 39 s of a 337 s denoising stage went to
    saving the state (docs/benchmarks.md).

    A tensor takes a buffer of its shape and dtype made for its kind of device, wherever it is in the
    state: the solver's history grows at the second step and the cache's tensors change expert, but
    their buffers stay."""

    def __init__(self):
        self._held: list[_HostBuffer] = []
        self._copied: list[torch.cuda.Event] = []
        self._unpinned_told = False

    def copy(self, tree):
        """``tree`` (a dict, a list or a tensor, nested) with its tensors copied into the buffers; the
        copies from a GPU are queued on its current stream (:meth:`wait` for them). Buffers no tensor
        took this time are given back."""
        free, self._held = self._held, []
        devices = set()

        def copy_one(tensor: torch.Tensor) -> torch.Tensor:
            on_gpu = tensor.device.type == "cuda"
            held = next((held for held in free if held.fits(tensor, on_gpu)), None)
            if held is None:
                held = self._buffer_for(tensor, on_gpu)
            else:
                free.remove(held)
            self._held.append(held)
            held.tensor.copy_(tensor.detach(), non_blocking=on_gpu)
            if on_gpu:
                devices.add(tensor.device)
            return held.tensor

        try:
            return map_tensors(tree, copy_one)
        finally:  # also where a copy failed or was interrupted: what was queued is waited for before its buffer goes
            self._copied = [torch.cuda.Event() for _ in devices]
            for event, device in zip(self._copied, devices):
                event.record(torch.cuda.current_stream(device))
            for held in free:
                held.close()

    def wait(self) -> None:
        """Until the copies queued by the last :meth:`copy` are in the buffers."""
        for event in self._copied:
            event.synchronize()

    def _buffer_for(self, tensor: torch.Tensor, on_gpu: bool) -> _HostBuffer:
        if not on_gpu or tensor.nbytes == 0:
            return _HostBuffer(torch.empty(tensor.shape, dtype=tensor.dtype), None, on_gpu)
        try:
            arena = PinnedArena(tensor.nbytes, pin_for=tensor.device)
        except WanError as exc:
            if not self._unpinned_told:
                warnings.warn(f"the run's state is copied to pageable host memory, each save waiting for its copy: {first_line(exc)}")
                self._unpinned_told = True
            arena = PinnedArena(tensor.nbytes)
        return _HostBuffer(arena.holding(tensor), arena, on_gpu)

    def release(self) -> None:
        """Give the buffers back (unpinning them): the run is over."""
        try:
            self.wait()
        finally:
            for held in self._held:
                held.close()
            self._held, self._copied = [], []


@dataclass
class _HostBuffer:
    tensor: torch.Tensor
    arena: PinnedArena | None  # a GPU's tensor's: page-locked where that could be done
    for_gpu: bool

    def fits(self, tensor: torch.Tensor, on_gpu: bool) -> bool:
        return self.for_gpu == on_gpu and self.tensor.shape == tensor.shape and self.tensor.dtype == tensor.dtype

    def close(self) -> None:
        if self.arena is not None:
            self.arena.close()


# A state this large is not waited for: its steps go on unsaved while it is written. The step cache's
# state is GBs (3.2 at 720P, 1.3 at 480P), written in seconds, while a step that skips its middle
# blocks takes under one; without it a state is a few tens of MB, written well within any step.
LARGE_STATE_BYTES = 256 * 2**20


def state_bytes(state: LoopState) -> int:
    """The bytes of ``state``'s tensors."""
    sizes = []
    map_tensors(vars(state), lambda tensor: sizes.append(tensor.nbytes))
    return sum(sizes)


class StateWriter:
    """Each step's state written while the next step runs. The host copy is taken at once, so the file
    holds the step it was saved at; the host holds at most one state beside the run; a write that
    failed is raised at the next save or at :meth:`finish`. A run killed mid-write leaves the state
    written before it (the write is atomic): a resume redoes one step more (a few, below).

    A save waits for the write before it, but for a large state (``LARGE_STATE_BYTES``: the step
    cache's), whose steps go on unsaved while it is written, so the run never waits for the disk; a
    run killed then resumes from the last state written, a few steps before, to the same video. The
    last step's state is always saved: a run stopped while decoding has every step.

    Used as a context manager, it waits for the last write and gives its host buffers back on leaving."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._host = HostBuffers()

    def __enter__(self) -> "StateWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._thread is not None:  # left before finish(), with an error: the write ends before its buffers go
            self._thread.join()
        try:
            self._host.release()
        except Exception as failure:
            if exc is None:
                raise
            warnings.warn(f"the state's host buffers were given back without waiting for their copies ({first_line(failure)})")

    def skips(self, state: LoopState, settings: GenerationSettings, ranks: int = 1) -> bool:
        """``state``, saved now, would not be written: it is large (with as much again from each of
        ``ranks`` - 1 other ranks), not the last step's, and a write is under way."""
        large = state_bytes(state) * ranks >= LARGE_STATE_BYTES
        return large and state.step < settings.steps and self._thread is not None and self._thread.is_alive()

    def save(self, path, state: LoopState, settings: GenerationSettings, run: dict) -> bool:
        """Start writing ``state``; returns whether it was started (see :meth:`skips`)."""
        if self.skips(state, settings):
            return False
        self.finish()
        record = state_record(self._host.copy(vars(state)), settings, run)
        self._thread = threading.Thread(target=self._write, args=(Path(path), record), name="wan-i2v-state", daemon=True)
        self._thread.start()
        return True

    def _write(self, path: Path, record: dict) -> None:
        try:
            self._host.wait()
            write_atomically(path, lambda tmp: torch.save(record, tmp))
        except BaseException as exc:  # raised in the run's thread, at the next save or the end
            self._failure = exc

    def finish(self) -> None:
        """Wait for the write under way; raise its failure, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure


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
