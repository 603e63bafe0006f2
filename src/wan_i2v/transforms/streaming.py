"""Single-GPU memory modes: weights wait in pinned host memory and visit the GPU as they are needed.

An 80 GB card holds one expert but not both; a 24-48 GB card holds only a few of an expert's
blocks. Both modes stream a DiT's blocks with the same engine, :class:`BlockStream`, so the
stream rules that keep a copy from racing the compute are written, and checked, once:

- :class:`ExpertSwap` (the official single-GPU mode for 80 GB cards) streams the whole arriving
  expert and keeps it until the expert is released. A block waits only for its own copy, so the
  ~28 GB copy (about 0.6 s from pinned memory on an H100) hides behind the first forward's
  compute, of which a block takes 70-280 ms: only the embeddings and the first block are waited for.
- :class:`BlockOffload` (24-48 GB cards) streams each block ``ahead`` blocks before it runs and
  drops it after. At 480P a block computes for ~70 ms while its 0.7 GB of bf16 weights take
  ~30 ms to copy from pinned memory, so one block ahead hides the copies.

Inference never changes a weight, so sending weights back only drops the device copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from wan_i2v.sampling.loop import Experts


def module_tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def tensors_outside_blocks(model: nn.Module) -> list[torch.Tensor]:
    """A DiT's embeddings and head: what stays put while its blocks move."""
    in_blocks = {id(t) for block in model.blocks for t in module_tensors(block)}
    return [t for t in module_tensors(model) if id(t) not in in_blocks]


class HostCopy:
    """A module's weights (or ``tensors``, some of them) kept in host memory, pinned for a GPU.

    ``to_device`` is one async copy per tensor on the current stream, for weights needed
    before anything else can run; block weights that should overlap compute go through
    :class:`BlockStream`.
    """

    def __init__(self, module: nn.Module, device: torch.device | str, tensors: Iterable[torch.Tensor] | None = None):
        self.module = module
        self.device = torch.device(device)
        self.tensors = list(module_tensors(module) if tensors is None else tensors)
        pin = self.device.type == "cuda"
        self.host = []
        for tensor in self.tensors:
            data = tensor.data.cpu()
            tensor.data = data.pin_memory() if pin and not data.is_pinned() else data
            self.host.append(tensor.data)

    def to_device(self) -> nn.Module:
        for tensor in self.tensors:
            tensor.data = tensor.data.to(self.device, non_blocking=True)
        return self.module

    def to_host(self) -> None:
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host


class BlockStream:
    """Blocks whose weights are copied to the device on a side stream just ahead of their use.

    Before block i runs, a forward pre-hook makes sure blocks i..i+``ahead`` (cyclically) are
    on their way and makes the compute stream wait for block i's copy alone; with
    ``drop_after_use`` a forward hook drops block i's device copy once it has run. Otherwise
    the blocks stay until :meth:`release`.

    The stream rules:

    - Device memory for a copy is allocated on the compute stream, and the copy stream waits
      for the compute stream before copying into it: the memory handed out may be what a
      dropped block's kernels, still queued on the compute stream, read.
    - The compute stream waits for a block's copy before the block runs, and before the copy's
      memory is given back (a release while copies are under way).

    Allocating on the compute stream, rather than on the copy stream with ``record_stream``,
    is what bounds the memory. With ``record_stream`` a dropped block's memory (or a released
    expert's) is reusable only once the host sees the compute stream catch up with the drop;
    the host runs ahead of the GPU, so the allocator would take fresh memory for the arriving
    weights and hold both, up to two experts at a swap. Given back on the compute stream, the
    memory is reused at once in that stream's order, so the device never holds more than the
    resident blocks, and never more than one expert.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, ahead: int, drop_after_use: bool):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.ahead = min(ahead, len(self.blocks) - 1)  # further ahead would wrap onto the running block
        self.host = [HostCopy(block, self.device) for block in self.blocks]
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Resident blocks: index -> the end of its copy, None once the compute stream has waited
        # for it (or at once, without a copy stream).
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.handles = []
        for index, block in enumerate(self.blocks):
            # The hooks run eagerly even when the block is compiled (Module.compile traces hooks
            # too): they move storage between devices and order streams, which is not graph material.
            before = torch.compiler.disable(lambda module, args, index=index: self._before(index))
            self.handles.append(block.register_forward_pre_hook(before))
            if drop_after_use:
                after = torch.compiler.disable(lambda module, args, output, index=index: self._drop(index))
                self.handles.append(block.register_forward_hook(after))

    def resident_blocks(self) -> list[int]:
        """Indices of the blocks whose weights are on the device now (or being copied there)."""
        return sorted(self.ready)

    def prefetch(self, index: int) -> None:
        """Start the copies of block ``index`` and the ``ahead`` blocks after it."""
        for step in range(self.ahead + 1):
            self._fetch((index + step) % len(self.blocks))

    def release(self) -> None:
        """Drop every block's device copy."""
        for index in list(self.ready):
            self._drop(index)

    def remove(self) -> None:
        """Stop streaming; the blocks stay in host memory."""
        for handle in self.handles:
            handle.remove()
        self.release()

    def _fetch(self, index: int) -> None:
        if index in self.ready:
            return
        copy = self.host[index]
        targets = [torch.empty_like(source, device=self.device) for source in copy.host]
        if self.copy_stream is None:
            for tensor, source, target in zip(copy.tensors, copy.host, targets):
                tensor.data = target.copy_(source)
            self.ready[index] = None
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for tensor, source, target in zip(copy.tensors, copy.host, targets):
                tensor.data = target.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.ready[index] = event

    def _wait(self, index: int) -> None:
        event = self.ready[index]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            self.ready[index] = None  # waited for once, in stream order, is enough for every later use

    def _before(self, index: int) -> None:
        self.prefetch(index)
        self._wait(index)

    def _drop(self, index: int) -> None:
        self._wait(index)  # a copy still under way must not write into memory the compute stream reuses
        self.host[index].to_host()
        del self.ready[index]


class ExpertSwap(Experts):
    """Only the active expert on the GPU: its blocks stream in whole and stay until released."""

    def __init__(self, high_noise: nn.Module, low_noise: nn.Module, boundary: int, device: torch.device):
        super().__init__(high_noise, low_noise, boundary)
        self.device = torch.device(device)
        # The embeddings and head run first, so they are copied in the compute stream's order.
        self.outside = {name: HostCopy(model, self.device, tensors_outside_blocks(model)) for name, model in self.models.items()}
        self.streams = {
            name: BlockStream(model.blocks, self.device, ahead=len(model.blocks) - 1, drop_after_use=False)
            for name, model in self.models.items()
        }
        self.active: str | None = None

    def activate(self, name: str) -> nn.Module:
        if name != self.active:
            self.release()
            self.active = name  # first: an arrival that fails half-way is still released
            self.outside[name].to_device()
            self.streams[name].prefetch(0)
        return self.models[name]

    def release(self) -> None:
        if self.active is None:
            return
        self.streams[self.active].release()
        self.outside[self.active].to_host()
        self.active = None

    def remove(self) -> None:
        """Send the active expert back and take the hooks off the blocks."""
        self.release()
        for stream in self.streams.values():
            stream.remove()


class BlockOffload(BlockStream):
    """A DiT whose embeddings and head stay on the device while its blocks stream through it."""

    def __init__(self, model: nn.Module, device: torch.device | str, ahead: int = 1):
        for tensor in tensors_outside_blocks(model):
            tensor.data = tensor.data.to(device)
        super().__init__(model.blocks, device, ahead, drop_after_use=True)
