"""Single-GPU memory modes, applied from outside the models."""

from __future__ import annotations

import torch
from torch import nn

from wan_i2v.sampling.loop import Experts

OFFLOAD_MODES = ("experts", "blocks")


def module_tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def tensors_outside_blocks(model: nn.Module) -> list[torch.Tensor]:
    """A DiT's embeddings and head: what stays put while its blocks move."""
    in_blocks = {id(t) for block in model.blocks for t in module_tensors(block)}
    return [t for t in module_tensors(model) if id(t) not in in_blocks]


class HostCopy:
    """A module whose weights live in host memory (pinned for a GPU) and visit the device.

    Bringing it up is one async host-to-device copy per tensor; sending it back only
    drops the device copy, since inference never changes a weight.
    """

    def __init__(self, module: nn.Module, device: torch.device | str):
        self.module = module
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.host = []
        for tensor in module_tensors(module):
            data = tensor.data.cpu()
            tensor.data = data.pin_memory() if pin and not data.is_pinned() else data
            self.host.append(tensor.data)

    def to_device(self) -> nn.Module:
        for tensor in module_tensors(self.module):
            tensor.data = tensor.data.to(self.device, non_blocking=True)
        return self.module

    def to_host(self) -> None:
        for tensor, host in zip(module_tensors(self.module), self.host):
            tensor.data = host


class ExpertSwap(Experts):
    """Only the active expert on the GPU (the official single-GPU mode for 80 GB cards).

    An arriving expert's blocks are copied on a side stream, and the compute stream waits
    for a block's copy only just before that block runs: the ~28 GB copy (about 0.6 s from
    pinned memory on an H100) hides behind the first forward's compute, of which a block
    takes 70-280 ms, while no more than one expert's memory is ever allocated. Only the
    embeddings and the first block are waited for.
    """

    def __init__(self, high_noise: nn.Module, low_noise: nn.Module, boundary: int, device: torch.device):
        super().__init__(high_noise, low_noise, boundary)
        self.device = torch.device(device)
        self.copies = {name: HostCopy(model, device) for name, model in self.models.items()}
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending: dict[nn.Module, torch.cuda.Event] = {}  # block -> the end of its copy
        self.active: str | None = None
        wait_for_copy = torch.compiler.disable(self._wait_for_copy)  # stream work, not graph material
        self.hooks = [block.register_forward_pre_hook(wait_for_copy) for model in self.models.values() for block in model.blocks]

    def activate(self, name: str) -> nn.Module:
        if name != self.active:
            self.release()
            self.active = name  # first: an arrival that fails half-way is still released
            self._arrive(self.models[name])
        return self.models[name]

    def remove(self) -> None:
        """Send the active expert back and take the hooks off the blocks."""
        self.release()
        for hook in self.hooks:
            hook.remove()

    def release(self) -> None:
        if self.active is None:
            return
        if self.copy_stream is not None:  # copies still under way must not write into freed memory
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for block in self.models[self.active].blocks:
            self.pending.pop(block, None)
        self.copies[self.active].to_host()
        self.active = None

    def _arrive(self, model: nn.Module) -> None:
        if self.copy_stream is None:
            for tensor in module_tensors(model):
                tensor.data = tensor.data.to(self.device)
            return
        for tensor in tensors_outside_blocks(model):  # embeddings and head: needed first, in stream order
            tensor.data = tensor.data.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        # The memory is allocated in the compute stream's order (the expert just released gave it
        # back there), so the copies start only once that expert's kernels are done with it.
        self.copy_stream.wait_stream(compute)
        for block in model.blocks:
            tensors = list(module_tensors(block))
            targets = [torch.empty_like(t.data, device=self.device) for t in tensors]
            with torch.cuda.stream(self.copy_stream):
                for tensor, target in zip(tensors, targets):
                    tensor.data = target.copy_(tensor.data, non_blocking=True)
                self.pending[block] = torch.cuda.Event()
                self.pending[block].record(self.copy_stream)

    def _wait_for_copy(self, block: nn.Module, args) -> None:
        event = self.pending.pop(block, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
