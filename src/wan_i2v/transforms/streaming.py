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

import math
from collections.abc import Collection, Iterator, Sequence

import torch
from torch import nn

from wan_i2v.loading.checkpoint import TensorSource, fills
from wan_i2v.loading.staging import Batch, Fill, StagingRing, mark_cold, placeholder, upload
from wan_i2v.models.spec import ExpertSpec
from wan_i2v.sampling.loop import Experts


def module_tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


class HostCopy:
    """A module whose weights wait in host memory as they are (a memory-mapped file's pages: no copy
    of their own) and visit the device through the staging ``ring`` (the text encoder: 11 GB, needed
    once per video). With ``blocks_of`` (the module's blocks, for a GPU without room for all of it)
    only the rest comes up whole; the blocks stream through while it runs, one or two at a time."""

    def __init__(self, module: nn.Module, ring: StagingRing, blocks_of: Sequence[nn.Module] | None = None):
        self.module, self.ring = module, ring
        # The blocks' tensors as they are held (their bytes are the value: nothing converts them on the way).
        held = {f"blocks.{index}.{name}": tensor for index, block in enumerate(blocks_of or ()) for name, tensor in block.state_dict(keep_vars=True).items()}
        streamed = {id(tensor) for tensor in held.values()}
        self.host: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
        for sub in module.modules():
            for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                self.host.append((sub, name, tensor.data, id(tensor) in streamed))
        self.blocks = None
        if held:
            data = {key: tensor.data for key, tensor in held.items()}
            source = TensorSource({key: (lambda rows, tensor=tensor: tensor if rows is None else tensor[rows]) for key, tensor in data.items()},
                                  dict.fromkeys(data, "host memory"), {key: (lambda tensor=tensor: tensor.shape) for key, tensor in data.items()},
                                  converted=True)  # fmt: skip
            self.blocks = BlockStream(blocks_of, source, ring, dtype=torch.float32, keep_fp32=lambda key: False, ahead=1, keep=(), timed=False)

    def to_device(self) -> nn.Module:
        whole = [(owner, name, tensor) for owner, name, tensor, streamed in self.host if not streamed]
        with torch.no_grad():
            upload(self.ring, [Fill(f"{id(owner)}.{name}", tensor.dtype, tuple(tensor.shape), [(owner, name)], tensor=tensor) for owner, name, tensor in whole])
        return self.module

    def to_host(self) -> None:
        if self.blocks is not None:
            self.blocks.release()
        for owner, name, tensor, _ in self.host:
            getattr(owner, name).data = tensor
        mark_cold([tensor for _, _, tensor, _ in self.host])  # read once a video: the first pages to give up


class BlockStream:
    """Blocks whose weights are read from the checkpoint and copied to the device just ahead of their use.

    Before block i runs, a forward pre-hook makes sure block i and the ``ahead`` blocks not on the
    device after it (cyclically) are on their way, the reads of the next one begun, and makes the
    compute stream wait for block i's copy alone. The blocks in ``keep`` stay once they arrived
    (until :meth:`release`); a forward hook drops each other block's device copy once it has run, so
    at most ``ahead`` + 1 of those are on the device. A dropped block's tensors are placeholders.

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
                 keep_fp32, ahead: int, keep: Collection[int], forget_kept: bool = False, timed: bool = True):  # fmt: skip
        self.blocks = list(blocks)
        self.keep = frozenset(keep)
        self.forget_kept = forget_kept  # the kept blocks' file pages are dropped from the page cache once they arrived
        self.ring = ring
        self.device = ring.device
        self.dtype, self.keep_fp32 = dtype, keep_fp32
        self.ahead = min(ahead, len(self.blocks) - 1)  # further ahead would wrap onto the running block
        self.use_source(source)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Resident blocks: index -> the end of its copy, None once the compute stream has waited for it.
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.requested: dict[int, Batch] = {}  # reads under way
        # Where a streamed step's time goes on the GPU: how long the compute stream stood waiting for the
        # copies, and how long the blocks computed (the rest of a step is the embeddings, the head, and
        # the GPU idle while the host was late). The host's waits for the reads cannot say it: the host
        # waits while the GPU still computes what was queued before.
        self.timed = timed and self.copy_stream is not None
        self.copy_waits, self.computing = DeviceSpans(), DeviceSpans()
        self.started: dict[int, torch.cuda.Event] = {}
        self.handles = []
        for index, block in enumerate(self.blocks):
            # The hooks run eagerly even when the block is compiled (Module.compile traces hooks
            # too): they move storage between devices and order streams, which is not graph material.
            before = torch.compiler.disable(lambda module, args, index=index: self._before(index))
            self.handles.append(block.register_forward_pre_hook(before))
            if index not in self.keep or self.timed:
                after = torch.compiler.disable(lambda module, args, output, index=index: self._after(index))
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
            sizes.append(sum(aligned(source.stored(key).dtype.itemsize * math.prod(source.shape(key))) for key in source.keys() if key.startswith(prefix)))
        return max(sizes)

    def resident_blocks(self) -> list[int]:
        """Indices of the blocks whose weights are on the device now (or being copied there)."""
        return sorted(self.ready)

    def prefetch(self, index: int) -> None:
        """Start the copies of block ``index`` and of the blocks not on the device after it, up to
        ``ahead`` dropped ones, and the reads of the next one. Kept blocks already there are skipped,
        so the reads run as far ahead of the compute as they spread out."""
        count = len(self.blocks)
        missing = [block for block in ((index + step) % count for step in range(count)) if block not in self.ready][: self.ahead + 2]
        for block in missing:
            self._request(block)
        passing = sum(1 for block in self.ready if block not in self.keep)  # dropped after they run: at most ahead + 1
        for block in missing:  # in the order they were requested: the ring fills its slots in that order
            if block != index and block not in self.keep and passing > self.ahead:
                break
            self._fetch(block)
            passing += block not in self.keep

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
        if self.forget_kept and index in self.keep:  # its reads are done: complete waited for them
            self.ring.forget_pages([fill.file for fill in self.fills[index] if fill.file is not None])

    def _wait(self, index: int, before_running: bool = False) -> None:
        event = self.ready[index]
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            timed = self.timed and before_running  # (a release's waits hold up no compute)
            waiting = timing_event(stream) if timed else None
            stream.wait_event(event)
            if timed:
                self.copy_waits.add(waiting, timing_event(stream))
            self.ready[index] = None  # waited for once, in stream order, is enough for every later use

    def _before(self, index: int) -> None:
        self.prefetch(index)
        self._wait(index, before_running=True)
        if self.timed:
            self.started[index] = timing_event(torch.cuda.current_stream(self.device))

    def _after(self, index: int) -> None:
        started = self.started.pop(index, None)
        if started is not None:
            self.computing.add(started, timing_event(torch.cuda.current_stream(self.device)))
        if index not in self.keep:
            self._drop(index)

    def _drop(self, index: int) -> None:
        self._wait(index)  # a copy still under way must not write into memory the compute stream reuses
        for owner, name, placeholder in self.placeholders[index]:
            getattr(owner, name).data = placeholder
        del self.ready[index]


def timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


class DeviceSpans:
    """Spans of a GPU stream's timeline, each between two of its events, summed once the GPU has passed them."""

    def __init__(self):
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.passed_s = 0.0

    def add(self, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self.pending.append((start, end))
        if len(self.pending) >= 256:  # a long run holds no more events than the GPU has yet to pass
            self.seconds()

    def seconds(self) -> float:
        """The spans the GPU has passed so far, in seconds."""
        waiting = []
        for start, end in self.pending:
            if end.query():
                self.passed_s += start.elapsed_time(end) / 1000
            else:
                waiting.append((start, end))
        self.pending = waiting
        return self.passed_s


def load_outside_blocks(model: nn.Module, source: TensorSource, ring: StagingRing, dtype: torch.dtype, keep_fp32) -> None:
    """A streamed DiT's embeddings and head, which stay on the device: read once, through the ring."""
    names = [key for key in source.keys() if not key.startswith("blocks.")]
    with torch.no_grad():
        upload(ring, fills(model, source, dtype=dtype, keep_fp32=keep_fp32, names=names))


class ExpertSwap(Experts):
    """Only the active expert's blocks on the GPU: they stream in behind its first forward and stay until released."""

    def __init__(self, models: dict[str, nn.Module], sources: dict[str, TensorSource], ring: StagingRing, experts: Sequence[ExpertSpec], *,
                 dtype: torch.dtype, keep_fp32, ahead: int = 2):  # fmt: skip
        super().__init__(models, experts)
        self.streams = {name: BlockStream(model.block_stack(), sources[name], ring, dtype=dtype, keep_fp32=keep_fp32, ahead=ahead, keep=range(len(model.block_stack())))
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
    """A DiT whose embeddings and head stay on the device while its blocks stream through it; the
    blocks in ``keep`` (what the GPU has room for) stay once they arrived."""

    def __init__(self, model: nn.Module, source: TensorSource, ring: StagingRing, *, dtype: torch.dtype, keep_fp32, ahead: int = 1, keep: Collection[int] = (),
                 forget_kept: bool = False):  # fmt: skip
        super().__init__(model.block_stack(), source, ring, dtype=dtype, keep_fp32=keep_fp32, ahead=ahead, keep=keep, forget_kept=forget_kept)


def spread(kept: int, count: int) -> list[int]:
    """``kept`` of ``count`` block indices, evenly spaced: each streamed block then has the compute
    of the kept ones around it to arrive in, rather than a run of streamed blocks in a row."""
    return sorted({index * count // kept for index in range(kept)}) if kept > 0 else []


class StreamedExperts(Experts):
    """Every expert's blocks stream through the device one or two at a time (``--offload blocks``);
    ``kept`` blocks of the active expert (what the GPU has room for, spread out) stay on it while
    the expert runs; with ``forget_kept`` their file pages leave the page cache once they arrived."""

    def __init__(self, models: dict[str, nn.Module], sources: dict[str, TensorSource], ring: StagingRing, experts: Sequence[ExpertSpec], *,
                 dtype: torch.dtype, keep_fp32, ahead: int = 1, kept: int = 0, forget_kept: bool = False):  # fmt: skip
        super().__init__(models, experts)
        self.streams = {name: BlockOffload(model, sources[name], ring, dtype=dtype, keep_fp32=keep_fp32, ahead=ahead,
                                           keep=spread(kept, len(model.block_stack())), forget_kept=forget_kept)
                        for name, model in self.models.items()}  # fmt: skip
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
