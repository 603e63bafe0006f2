"""Single-GPU memory modes, applied from outside the models."""

from __future__ import annotations

import torch
from torch import nn

from wan_i2v.sampling.loop import Experts


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


class ExpertSwap(Experts):
    """Only the active expert on the GPU (the official single-GPU mode for 80 GB cards).

    The weights live in pinned host memory. Bringing an expert up is one async
    host-to-device copy per tensor; sending it back only drops the device copy,
    since inference never changes a weight.
    """

    def __init__(self, high_noise: nn.Module, low_noise: nn.Module, boundary: int, device: torch.device):
        super().__init__(high_noise, low_noise, boundary)
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.host_copies = {}
        for name, model in self.models.items():
            copies = []
            for tensor in _tensors(model):
                if pin and not tensor.data.is_pinned():
                    tensor.data = tensor.data.pin_memory()
                copies.append(tensor.data)
            self.host_copies[name] = copies
        self.active: str | None = None

    def activate(self, name: str) -> nn.Module:
        if name != self.active:
            if self.active is not None:
                self._to_host(self.active)
            for tensor in _tensors(self.models[name]):
                tensor.data = tensor.data.to(self.device, non_blocking=True)
            self.active = name
        return self.models[name]

    def _to_host(self, name: str) -> None:
        for tensor, host in zip(_tensors(self.models[name]), self.host_copies[name]):
            tensor.data = host

    def release(self) -> None:
        if self.active is not None:
            self._to_host(self.active)
            self.active = None
