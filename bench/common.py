"""Shared by the benchmarks: full-size models with random weights built straight on the GPU (or the CPU), and timing."""

from __future__ import annotations

import gc
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the diffusers name mapping the references use

from wan_i2v.tiny import randomize_  # noqa: E402

GB = 2**30
SEED = 1234


def random_model(build, dtype: torch.dtype, keep_fp32=lambda name: False, seed: int = SEED, device: str = "cuda") -> nn.Module:
    """``build()`` on the meta device, then random weights allocated on ``device`` (the GPU: fast) in
    ``dtype`` (fp32 where ``keep_fp32(name)``). The same seed on one device gives the same values
    before rounding."""
    with torch.device("meta"):
        model = build()
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            param_dtype = torch.float32 if keep_fp32(f"{module_name}.{name}") else dtype
            module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param_dtype, device=device), requires_grad=False)
    return randomize_(model, seed).eval()


def free() -> None:
    """Give the GPU memory of dropped models back, so the next measurement starts clean."""
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def measure(fn, warmup: int = 1, repeats: int = 3):
    """Median seconds of ``fn()`` over ``repeats`` after ``warmup`` (CUDA events), and peak GiB above what was allocated before."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / GB
