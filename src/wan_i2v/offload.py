"""Single-GPU memory modes, applied from outside the models."""

from __future__ import annotations

import torch
from torch import nn

from wan_i2v.sampling.loop import Experts

OFFLOAD_MODES = ("experts", "blocks")


def module_tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


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
    """Only the active expert on the GPU (the official single-GPU mode for 80 GB cards)."""

    def __init__(self, high_noise: nn.Module, low_noise: nn.Module, boundary: int, device: torch.device):
        super().__init__(high_noise, low_noise, boundary)
        self.copies = {name: HostCopy(model, device) for name, model in self.models.items()}
        self.active: str | None = None

    def activate(self, name: str) -> nn.Module:
        if name != self.active:
            self.release()
            self.copies[name].to_device()
            self.active = name
        return self.models[name]

    def release(self) -> None:
        if self.active is not None:
            self.copies[self.active].to_host()
            self.active = None
