"""Memory modes for GPUs smaller than the model: a DiT's blocks stream from the checkpoint.

A waiting weight is kept nowhere but in the checkpoint's files: the page cache serves what fits in
host memory and the disk the rest. On its way up a block passes through a small ring of pinned
slots (``loading/staging.py``), read by threads one or two blocks ahead of the compute, so host
memory holds a few blocks instead of a pinned copy of each expert (which needed 75-110 GiB).

Both single-GPU modes stream with one engine, :class:`BlockStream`, so the stream rules that keep
a copy from racing the compute are written, and checked, once:

- :class:`ExpertSwap` (one expert on the GPU at a time, for 48-80 GB cards) streams the arriving
  expert's blocks in behind its first forward and keeps them until the expert is released. A block
  waits only for its own copy, so the ~27 GB arrive while the first forward computes (a block takes
  70-280 ms, its read from the page cache a fraction of that).
- :class:`BlockOffload` (24-48 GB cards) streams each block ``ahead`` blocks before it runs and
  drops it after.

A streamed block gets each weight as the loader would make it (the stored bytes, then on the device
a LoRA's merge, the run dtype, an FP8 layer's quantization: ``loading.checkpoint.fills``), so the
video is the resident plan's to the bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from wan_i2v.loading.checkpoint import TensorSource, fills
from wan_i2v.loading.staging import Batch, Fill, StagingRing, placeholder, upload
from wan_i2v.sampling.loop import Experts


def module_tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


class HostCopy:
    """A module whose weights wait in host memory as they are (a memory-mapped file's pages: no copy
    of their own) and visit the device through the staging ``ring`` (the text encoder: 11 GB, needed
    once per video)."""

    def __init__(self, module: nn.Module, ring: StagingRing):
        self.module, self.ring = module, ring
        self.host: list[tuple[nn.Module, str, torch.Tensor]] = []
        for sub in module.modules():
            for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                self.host.append((sub, name, tensor.data))

    def to_device(self) -> nn.Module:
        with torch.no_grad():
            upload(self.ring, [Fill(f"{id(owner)}.{name}", tensor.dtype, tuple(tensor.shape), [(owner, name)], tensor=tensor) for owner, name, tensor in self.host])
        return self.module

    def to_host(self) -> None:
        for owner, name, tensor in self.host:
            getattr(owner, name).data = tensor


class BlockStream:
    """Blocks whose weights are read from the checkpoint and copied to the device just ahead of their use.

    Before block i runs, a forward pre-hook makes sure blocks i..i+``ahead`` (cyclically) are on
    their way, the next one's reads begun, and makes the compute stream wait for block i's copy
    alone; with ``drop_after_use`` a forward hook drops block i's device copy once it has run.
    Otherwise the blocks stay until :meth:`release`. A dropped block's tensors are meta placeholders.

    The stream rules:

    - Device memory for a block is allocated on the compute stream, and the copy stream waits for
      the compute stream before copying into it: the memory handed out may be what a dropped
      block's kernels, still queued on the compute stream, read.
    - The compute stream waits for a block's copy before the block runs, and before the copy's
      memory is given back (a release while copies are under way).

    Allocating on the compute stream, rather than on the copy stream with ``record_stream``,
    is what bounds the memory: given back on the compute stream, the memory is reused at once in
    that stream's order, so the device never holds more than the resident blocks.
    """

    def __init__(self, blocks: Sequence[nn.Module], source: TensorSource, ring: StagingRing, *, dtype: torch.dtype,
                 keep_fp32, ahead: int, drop_after_use: bool):  # fmt: skip
        self.blocks = list(blocks)
        self.ring = ring
        self.device = ring.device
        self.dtype, self.keep_fp32 = dtype, keep_fp32
        self.ahead = min(ahead, len(self.blocks) - 1)  # further ahead would wrap onto the running block
        self.use_source(source)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Resident blocks: index -> the end of its copy, None once the compute stream has waited for it.
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.requested: dict[int, Batch] = {}  # reads under way
        self.handles = []
        for index, block in enumerate(self.blocks):
            # The hooks run eagerly even when the block is compiled (Module.compile traces hooks
            # too): they move storage between devices and order streams, which is not graph material.
            before = torch.compiler.disable(lambda module, args, index=index: self._before(index))
            self.handles.append(block.register_forward_pre_hook(before))
            if drop_after_use:
                after = torch.compiler.disable(lambda module, args, output, index=index: self._drop(index))
                self.handles.append(block.register_forward_hook(after))

    def use_source(self, source: TensorSource) -> None:
        """Read the blocks from ``source`` from now on (other LoRAs); every block must be dropped."""
        self.fills = [fills(block, source, dtype=self.dtype, keep_fp32=self.keep_fp32, prefix=f"blocks.{index}.") for index, block in enumerate(self.blocks)]
        # Opened now: a shard deleted (or replaced) while the run goes on is still read as it was.
        self.ring.open({fill.file.path for block_fills in self.fills for fill in block_fills if fill.file is not None})
        # What a dropped block's tensors are: placeholders of the shapes and dtypes they load in.
        self.placeholders = [[(owner, name, placeholder(getattr(owner, name).shape, getattr(owner, name).dtype))
                              for fill in block_fills for owner, name in fill.targets] for block_fills in self.fills]  # fmt: skip

    @staticmethod
    def slot_bytes(blocks: Sequence[nn.Module], source: TensorSource) -> int:
        """The largest block's stored bytes: a staging slot holds one block."""
        from wan_i2v.loading.staging import aligned

        sizes = []
        for index in range(len(blocks)):
            prefix = f"blocks.{index}."
            sizes.append(sum(aligned(source.stored(key).dtype.itemsize * _numel(source.shape(key))) for key in source.keys() if key.startswith(prefix)))
        return max(sizes)

    def resident_blocks(self) -> list[int]:
        """Indices of the blocks whose weights are on the device now (or being copied there)."""
        return sorted(self.ready)

    def prefetch(self, index: int) -> None:
        """Start the copies of block ``index`` and the ``ahead`` blocks after it, and the reads of the one after those."""
        count = len(self.blocks)
        for step in range(min(self.ahead + 2, count)):
            self._request((index + step) % count)
        for step in range(self.ahead + 1):
            self._fetch((index + step) % count)

    def each_on_device(self) -> Iterator[int]:
        """Every block in turn on the device, the next on its way: yields its index once its copy has
        landed (in the compute stream's order), then drops it."""
        for index in range(len(self.blocks)):
            self.prefetch(index)
            self._wait(index)
            yield index
            self._drop(index)

    def release(self) -> None:
        """Drop every block's device copy, and the reads under way."""
        for index in list(self.ready):
            self._drop(index)
        for index in sorted(self.requested, key=lambda i: self.requested[i].tickets[0].index if self.requested[i].tickets else -1):
            self.requested.pop(index).cancel()

    def remove(self) -> None:
        """Stop streaming (the blocks are left as placeholders)."""
        for handle in self.handles:
            handle.remove()
        self.release()

    def _request(self, index: int) -> None:
        if index not in self.ready and index not in self.requested:
            self.requested[index] = Batch(self.ring, self.fills[index])

    def _fetch(self, index: int) -> None:
        if index in self.ready:
            return
        self._request(index)
        batch = self.requested.pop(index)
        with torch.no_grad():
            self.ready[index] = batch.complete(self.copy_stream)

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
        for owner, name, placeholder in self.placeholders[index]:
            getattr(owner, name).data = placeholder
        del self.ready[index]


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def load_outside_blocks(model: nn.Module, source: TensorSource, ring: StagingRing, dtype: torch.dtype, keep_fp32) -> None:
    """A streamed DiT's embeddings and head, which stay on the device: read once, through the ring."""
    names = [key for key in source.keys() if not key.startswith("blocks.")]
    with torch.no_grad():
        upload(ring, fills(model, source, dtype=dtype, keep_fp32=keep_fp32, names=names))


class ExpertSwap(Experts):
    """Only the active expert's blocks on the GPU: they stream in behind its first forward and stay until released."""

    def __init__(self, models: dict[str, nn.Module], sources: dict[str, TensorSource], ring: StagingRing, boundary: int, *,
                 dtype: torch.dtype, keep_fp32, ahead: int = 2):  # fmt: skip
        super().__init__(models["high"], models["low"], boundary)
        self.streams = {name: BlockStream(model.blocks, sources[name], ring, dtype=dtype, keep_fp32=keep_fp32, ahead=ahead, drop_after_use=False)
                        for name, model in self.models.items()}  # fmt: skip
        self.active: str | None = None

    def activate(self, name: str) -> nn.Module:
        if name != self.active:
            self.release()
            self.active = name  # first: an arrival that fails half-way is still released
            self.streams[name].prefetch(0)
        return self.models[name]

    def release(self) -> None:
        if self.active is None:
            return
        self.streams[self.active].release()
        self.active = None

    def remove(self) -> None:
        """Drop the active expert and take the hooks off the blocks."""
        self.release()
        for stream in self.streams.values():
            stream.remove()


class BlockOffload(BlockStream):
    """A DiT whose embeddings and head stay on the device while its blocks stream through it."""

    def __init__(self, model: nn.Module, source: TensorSource, ring: StagingRing, *, dtype: torch.dtype, keep_fp32, ahead: int = 1):
        super().__init__(model.blocks, source, ring, dtype=dtype, keep_fp32=keep_fp32, ahead=ahead, drop_after_use=True)


class StreamedExperts(Experts):
    """Both experts' blocks stream through the device one or two at a time (``--offload blocks``)."""

    def __init__(self, models: dict[str, nn.Module], sources: dict[str, TensorSource], ring: StagingRing, boundary: int, *,
                 dtype: torch.dtype, keep_fp32, ahead: int = 1):  # fmt: skip
        super().__init__(models["high"], models["low"], boundary)
        self.streams = {name: BlockOffload(model, sources[name], ring, dtype=dtype, keep_fp32=keep_fp32, ahead=ahead) for name, model in self.models.items()}
        self.active: str | None = None

    def activate(self, name: str) -> nn.Module:
        if name != self.active and self.active is not None:
            self.streams[self.active].release()  # the blocks it prefetched for its next forward
        self.active = name
        return self.models[name]

    def release(self) -> None:
        for stream in self.streams.values():
            stream.release()
        self.active = None
