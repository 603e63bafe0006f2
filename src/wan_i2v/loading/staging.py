"""Host -> device copies through a small ring of pinned buffers, filled from the checkpoint's files.

A weight that waits off the GPU does not wait in a pinned copy of its own: it stays where it is on
disk (the page cache serves what fits), and on its way to the device it passes through one of
``depth`` pinned slots. Reader threads fill the next slots with ``pread`` (or a copy, for a tensor
that is already in host memory, such as a memory-mapped ``torch.save`` file) while the device
copies out of the earlier ones, so a 24 GB card runs a 14B expert with a few GiB of host memory.

The slots are one host allocation, page-locked as a whole (``cudaHostRegister``): PyTorch's pinned
allocator rounds every allocation up to a power of two, which cost up to half the memory it held.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from wan_i2v.errors import WanError, first_line

ALIGN = 64  # each piece starts at a multiple of this in its slot: any dtype's view is aligned
CHUNK = 16 * 2**20  # bytes one reader thread reads at a time


@dataclass(frozen=True)
class FileRange:
    """Where a tensor's bytes are in a file (a safetensors shard)."""

    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Piece:
    """The bytes ``start:start + nbytes`` of one tensor, read from a file range or copied from a host tensor."""

    key: str
    start: int
    nbytes: int
    file: FileRange | None = None
    tensor: torch.Tensor | None = None  # a host tensor (memory-mapped or not), when there is no file range


def pieces_of(key: str, nbytes: int, slot_bytes: int, file: FileRange | None = None, tensor: torch.Tensor | None = None) -> list[Piece]:
    """A tensor's bytes cut into pieces that each fit a slot."""
    return [Piece(key, start, min(slot_bytes, nbytes - start), file, tensor) for start in range(0, max(nbytes, 1), slot_bytes)]


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class PinnedArena:
    """One host buffer of exactly ``nbytes`` (rounded to a page), page-locked for ``pin_for``'s GPU
    when given."""

    def __init__(self, nbytes: int, pin_for: torch.device | None = None):
        page = os.sysconf("SC_PAGE_SIZE")
        pages = -(-nbytes // page) * page
        self.buffer = torch.empty(pages + page, dtype=torch.uint8)
        # cudaHostRegister takes any range, but a page-aligned start keeps the pinned pages the buffer's own.
        skip = (-self.buffer.data_ptr()) % page
        self.data = self.buffer[skip : skip + pages]
        if pin_for is not None and pin_for.index is None:  # the caller's GPU: the registering thread starts on GPU 0
            pin_for = torch.device("cuda", torch.cuda.current_device())
        self.device = pin_for
        self.registered = False
        if pin_for is not None:
            result = page_lock(self.data, pin_for)
            if result != 0:
                raise WanError(f"cannot page-lock {self.data.numel() / 2**30:.1f} GiB of host memory for the GPU copies (CUDA error {result})",
                               "the machine's locked-memory limit may be low (ulimit -l); give --host-memory less, or free host memory")  # fmt: skip
            self.registered = True

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def holding(self, like: torch.Tensor) -> torch.Tensor:
        """The arena (made for ``like``'s bytes) as a contiguous tensor of ``like``'s shape and dtype,
        every other byte of its allocation zeroed: ``torch.save`` writes a view's whole allocation, so
        a file it goes into gets no stray bytes."""
        start = self.data.storage_offset()
        self.buffer[:start].zero_()
        self.buffer[start + like.nbytes :].zero_()
        return self.data[: like.nbytes].view(like.dtype).view(like.shape)

    def close(self) -> None:
        if self.registered:
            with torch.cuda.device(self.device):
                torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self.registered = False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may be gone
            pass


def page_lock(data: torch.Tensor, device: torch.device) -> int:
    """cudaHostRegister of ``data``'s bytes for ``device``'s context; its CUDA error code (0: done).
    It runs in a thread of its own: the runtime keeps each thread's last error, which a failed call
    leaves behind, and the caller's next kernel launch would raise it as its own (a run that goes on
    without the pinning would fail at its next step)."""
    outcome: list = []

    def register():
        try:
            with torch.cuda.device(device):
                outcome.append(int(torch.cuda.cudart().cudaHostRegister(data.data_ptr(), data.numel(), 0)))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=register, name="wan-i2v-page-lock")
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


MADV_COLD = 20  # Linux >= 5.4


def mark_cold(tensors: Sequence[torch.Tensor]) -> None:
    """Tell the kernel that these host tensors' pages (a memory-mapped file's: the text encoder's) are
    done with for now: under memory pressure they are reclaimed before the pages read again and again
    (a streamed expert's, every step), which otherwise lost to them, since mapped pages that were
    touched are kept longest. Nothing is lost: a reclaimed page is read from its file when touched
    again, and with room to spare nothing is reclaimed. A kernel without MADV_COLD ignores it."""
    page = os.sysconf("SC_PAGE_SIZE")
    libc = ctypes.CDLL(None, use_errno=True)
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors if tensor.device.type == "cpu"}
    for start, nbytes in storages.items():
        first, end = -(-start // page) * page, (start + nbytes) // page * page
        if end > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), MADV_COLD)


class Ticket:
    """One slot's worth of pieces on their way: filled by the readers, copied out by the caller,
    then released (after the copies' event, on a GPU) for the pieces of a later ticket."""

    def __init__(self, pieces: Sequence[Piece], index: int):
        self.pieces = list(pieces)
        self.index = index
        self.offsets: list[int] = []
        offset = 0
        for piece in self.pieces:
            self.offsets.append(offset)
            offset += aligned(piece.nbytes)
        self.nbytes = offset
        self.filled = threading.Event()
        self.released = threading.Event()
        self.error: BaseException | None = None
        self.slot: torch.Tensor | None = None

    def wait(self) -> list[torch.Tensor]:
        """The pieces' bytes in the slot (uint8 views), once read; a read that failed raises here."""
        self.filled.wait()
        if self.error is not None:
            raise self.error
        return [self.slot[offset : offset + piece.nbytes] for offset, piece in zip(self.offsets, self.pieces)]


class StagingRing:
    """``depth`` pinned slots of ``slot_bytes``; tickets are filled in the order they are submitted,
    each into the next slot once the ticket that used it before has been released.

    The caller waits for a ticket, copies out of its slot and releases it, in submission order (the
    slot of ticket n is the slot of ticket n - depth). ``reads`` counts each piece read, by key."""

    def __init__(self, slot_bytes: int, depth: int, device: torch.device | str, workers: int | None = None):
        self.device = torch.device(device)
        self.slot_bytes = aligned(slot_bytes)
        self.depth = depth
        self.arena = PinnedArena(self.slot_bytes * depth, pin_for=self.device if self.device.type == "cuda" else None)
        self.slots = [self.arena.data[i * self.slot_bytes : (i + 1) * self.slot_bytes] for i in range(depth)]
        self.pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1), thread_name_prefix="wan-i2v-read")
        self.pending: queue.Queue[Ticket | None] = queue.Queue()
        self.submitted: list[Ticket | None] = [None] * depth  # the last ticket of each slot
        self.copies: list[torch.cuda.Event | None] = [None] * depth  # the device copies out of each slot, last queued
        self.count = 0
        self.reads: dict[str, int] = {}
        self.files: dict[str, int] = {}
        self.lock = threading.Lock()
        self.in_use_peak = 0
        # What went up through the slots, and how long the callers waited for reads not yet done: a
        # stall that shows whether the reads (disk, page cache) or something else sets a streamed run's pace.
        self.copied_bytes = 0
        self.waited_s = 0.0
        # The readers' side of it: seconds spent reading into the slots, and waiting for a slot to come
        # free (the device copies out of it, which wait for the compute queued before them).
        self.read_s = 0.0
        self.slot_wait_s = 0.0
        # The dispatcher holds the ring only while it stages a ticket: whoever lets go of the ring lets
        # go of its threads, its open files and its slots (a pipeline loaded again in a notebook).
        self.dispatcher = threading.Thread(target=_dispatch, args=(weakref.ref(self), self.pending), name="wan-i2v-staging", daemon=True)
        self.dispatcher.start()
        release = weakref.finalize(self, _release, self.pending, self.pool, self.files, self.lock, self.copies, self.arena, self.device)
        release.atexit = False  # an exiting process lets go of it all anyway, CUDA perhaps first

    # -- the caller's side ------------------------------------------------------------------------

    def submit(self, pieces: Sequence[Piece]) -> Ticket:
        ticket = Ticket(pieces, self.count)
        if ticket.nbytes > self.slot_bytes:
            raise ValueError(f"{ticket.nbytes} bytes do not fit a slot of {self.slot_bytes}")
        self.count += 1
        self.pending.put(ticket)
        return ticket

    def release(self, ticket: Ticket, copied: torch.cuda.Event | None = None) -> None:
        """The slot may be filled again once ``copied`` (the device copies out of it) has happened."""
        self.copies[ticket.index % self.depth] = copied
        ticket.released.set()

    def copy_out(self, ticket: Ticket, targets: Sequence[torch.Tensor], stream: torch.cuda.Stream | None) -> None:
        """Wait for ``ticket``, copy each piece into the uint8 view ``targets[i]`` (on ``stream``, async,
        from pinned memory; at once on the CPU) and release the slot after the copies."""
        waiting = time.perf_counter()
        views = ticket.wait()
        self.waited_s += time.perf_counter() - waiting
        self.copied_bytes += sum(piece.nbytes for piece in ticket.pieces)
        if stream is None:
            for target, view in zip(targets, views):
                target.copy_(view)
            self.release(ticket)
            return
        with torch.cuda.stream(stream):
            for target, view in zip(targets, views):
                target.copy_(view, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self.release(ticket, event)

    # -- the readers' side ------------------------------------------------------------------------

    def _stage(self, ticket: Ticket) -> None:
        """Fill ``ticket``'s slot once the ticket before it in that slot is copied out."""
        slot_index = ticket.index % self.depth
        previous = self.submitted[slot_index]
        try:
            waiting = time.perf_counter()
            if previous is not None:
                previous.released.wait()
                if self.copies[slot_index] is not None:  # (the previous ticket's copies, recorded before its release)
                    self.copies[slot_index].synchronize()
            self.submitted[slot_index] = ticket
            ticket.slot = self.slots[slot_index]
            in_use = sum(1 for t in self.submitted if t is not None and not t.released.is_set())
            self.in_use_peak = max(self.in_use_peak, in_use)
            reading = time.perf_counter()
            self.slot_wait_s += reading - waiting
            self._fill(ticket)
            self.read_s += time.perf_counter() - reading
        except BaseException as exc:  # reported to the caller that waits for the ticket, without the frames that hold the ring
            ticket.error = (exc if isinstance(exc, WanError) else WanError(f"cannot stage weights: {first_line(exc)}")).with_traceback(None)
        ticket.filled.set()

    def _fill(self, ticket: Ticket) -> None:
        jobs: list[Callable[[], None]] = []
        for piece, offset in zip(ticket.pieces, ticket.offsets):
            with self.lock:
                self.reads[piece.key] = self.reads.get(piece.key, 0) + (piece.start == 0)
            for start in range(0, piece.nbytes, CHUNK):
                size = min(CHUNK, piece.nbytes - start)
                target = ticket.slot[offset + start : offset + start + size]
                jobs.append(lambda piece=piece, start=start, target=target: self._read(piece, start, target))
        for future in [self.pool.submit(job) for job in jobs]:
            future.result()

    def _read(self, piece: Piece, start: int, target: torch.Tensor) -> None:
        if piece.file is None:
            source = piece.tensor.detach().reshape(-1).view(torch.uint8)
            target.copy_(source[piece.start + start : piece.start + start + target.numel()])
            return
        fd = self._fd(piece.file.path)
        view = memoryview(target.numpy())
        position = piece.file.offset + piece.start + start
        done = 0
        while done < len(view):
            try:
                count = os.preadv(fd, [view[done:]], position + done)
            except OSError as exc:
                raise self._read_error(piece, f"{exc.strerror or first_line(exc)}") from None
            if count == 0:
                raise self._read_error(piece, f"the file ends before byte {position + len(view)} (it is {os.fstat(fd).st_size} bytes: truncated?)")
            done += count

    def forget_pages(self, ranges: Sequence[FileRange]) -> None:
        """Let the page cache drop these file ranges' pages now (``POSIX_FADV_DONTNEED``): their bytes
        are on the device for as long as they are needed, and a machine whose cache cannot hold a
        whole expert keeps the pages read every step (the streamed blocks') instead. Nothing is lost:
        a dropped page is read from the file when asked for again."""
        for file in ranges:
            os.posix_fadvise(self._fd(file.path), file.offset, file.nbytes, os.POSIX_FADV_DONTNEED)

    def open(self, paths) -> None:
        """Open the files now (a file removed later is then still read as it was)."""
        for path in sorted(paths):
            self._fd(path)

    def _fd(self, path: str) -> int:
        with self.lock:
            fd = self.files.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    from wan_i2v.loading.checkpoint import checkpoint_hint

                    raise WanError(f"cannot open {path}: {exc.strerror}", checkpoint_hint(path)) from None
                self.files[path] = fd
            return fd

    @staticmethod
    def _read_error(piece: Piece, why: str) -> WanError:
        from wan_i2v.loading.checkpoint import checkpoint_hint

        return WanError(f"cannot read tensor {piece.key!r} from {piece.file.path}: {why}", checkpoint_hint(piece.file.path))


def _dispatch(ring_ref: weakref.ref, pending: queue.Queue) -> None:
    """The ring's dispatcher thread: each ticket staged in turn, until it is told to stop or the ring is gone."""
    while (ticket := pending.get()) is not None:
        ring = ring_ref()
        if ring is None:
            return
        ring._stage(ticket)
        del ring, ticket  # nothing of the ring held while waiting for the next


def _release(pending: queue.Queue, pool: ThreadPoolExecutor, files: dict[str, int], lock: threading.Lock,
             copies: list[torch.cuda.Event | None], arena: PinnedArena, device: torch.device) -> None:  # fmt: skip
    """A ring let go of: its dispatcher and readers stop, its files close, its slots are unpinned
    (on its own GPU: the collector may run this on any thread)."""
    pending.put(None)
    pool.shutdown(wait=False, cancel_futures=True)
    with lock:
        for fd in files.values():
            os.close(fd)
        files.clear()
    with torch.cuda.device(device) if device.type == "cuda" else _nothing():
        for copied in copies:  # a copy still reading a slot (a run that failed) ends before the slot goes
            if copied is not None:
                copied.synchronize()
        arena.close()


class Fill:
    """One checkpoint tensor on its way to the device tensors of a module that hold it.

    ``dtype``/``shape``/``file``/``tensor``: the bytes as they are stored. ``targets``: the module's
    tensors it becomes (owner, attribute name): one parameter or buffer, or several when the owner
    keeps the weight in another form (an FP8 layer's ``stored_weight``: the FP8 weight and its
    scales). ``convert(value)``: the value on the device from the stored one (the run dtype, a
    LoRA's merge); None when the stored bytes are the value.
    """

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple, targets: list[tuple[torch.nn.Module, str]], *,
                 file: FileRange | None = None, tensor: torch.Tensor | None = None, convert: Callable[[torch.Tensor], dict] | None = None):  # fmt: skip
        self.key, self.dtype, self.shape, self.targets = key, dtype, tuple(shape), targets
        self.file, self.tensor, self.convert = file, tensor, convert
        self.nbytes = dtype.itemsize * math.prod(self.shape)
        for owner, name in targets:
            if getattr(owner, name).device.type == "meta":
                hold_placeholder(owner, name)

    def outputs(self, device: torch.device) -> list[torch.Tensor]:
        """The device tensors it fills, allocated on the current stream (the compute stream's memory)."""
        return [torch.empty(tuple(getattr(owner, name).shape), dtype=getattr(owner, name).dtype, device=device) for owner, name in self.targets]

    def finish(self, arrived: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """Write the value of the ``arrived`` bytes into ``outputs`` and point the module at them."""
        if self.convert is not None:
            values = self.convert(arrived)
            for (owner, name), output in zip(self.targets, outputs):
                output.copy_(values[name])
        for (owner, name), output in zip(self.targets, outputs):
            getattr(owner, name).data = output

    @property
    def direct(self) -> bool:
        """The stored bytes are the value: they are copied straight into the module's tensor."""
        return self.convert is None


def placeholder(shape, dtype: torch.dtype) -> torch.Tensor:
    """What a module holds for a tensor whose value is elsewhere (in the files, or on its way): its
    shape and dtype, one element of host memory. A host tensor, so that ``.data`` can point it at a
    device copy and back (a meta tensor cannot trade places with a real one)."""
    return torch.empty((), dtype=dtype).expand(tuple(shape))


def hold_placeholder(owner: torch.nn.Module, name: str) -> torch.Tensor:
    """Replace ``owner``'s tensor ``name`` (a meta one, before the module runs) by its placeholder."""
    tensor = getattr(owner, name)
    held = placeholder(tensor.shape, tensor.dtype)
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(held, requires_grad=False)
    else:
        owner._buffers[name] = held
    return held


class Batch:
    """Fills submitted to a ring (the reads start at once, in the background), completed later."""

    def __init__(self, ring: StagingRing, fills: Sequence[Fill]):
        self.ring, self.fills = ring, list(fills)
        # Each fill cut into slot-sized pieces, packed into tickets in order.
        self.parts: list[list[tuple[int, Piece]]] = []  # per ticket: (fill index, piece)
        self.piece_counts: list[int] = []  # per fill
        current: list[tuple[int, Piece]] = []
        used = 0
        for index, fill in enumerate(self.fills):
            pieces = pieces_of(fill.key, fill.nbytes, ring.slot_bytes, fill.file, fill.tensor)
            self.piece_counts.append(len(pieces))
            for piece in pieces:
                if current and used + aligned(piece.nbytes) > ring.slot_bytes:
                    self.parts.append(current)
                    current, used = [], 0
                current.append((index, piece))
                used += aligned(piece.nbytes)
        if current:
            self.parts.append(current)
        self.tickets = [ring.submit([piece for _, piece in part]) for part in self.parts]
        self.completed = False

    def complete(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """Wait for the reads, copy to the device on ``stream`` and finish each fill there; returns the
        event that ends it (None on the CPU). Device memory for the values is taken on the current
        stream, so it is reused in that stream's order once the module lets go of it."""
        device = self.ring.device
        arrived: dict[int, torch.Tensor] = {}
        seen: dict[int, int] = {}
        context = torch.cuda.stream(stream) if stream is not None else _nothing()
        try:
            outputs = [fill.outputs(device) for fill in self.fills]  # (out of memory here gives the slots back too)
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(device))  # the memory handed out may be what queued kernels read
            for part, ticket in zip(self.parts, self.tickets):
                with context:
                    targets = []
                    for index, piece in part:
                        fill = self.fills[index]
                        if index not in arrived:  # the stored bytes land in the module's tensor, or a staging tensor of this stream
                            arrived[index] = outputs[index][0] if fill.direct else torch.empty(fill.shape, dtype=fill.dtype, device=device)
                        targets.append(arrived[index].view(-1).view(torch.uint8)[piece.start : piece.start + piece.nbytes] if fill.nbytes else arrived[index].view(torch.uint8))
                self.ring.copy_out(ticket, targets, stream)
                with context:
                    for index, _ in part:
                        seen[index] = seen.get(index, 0) + 1
                        if seen[index] == self.piece_counts[index]:
                            self.fills[index].finish(arrived.pop(index), outputs[index])
        except BaseException:
            self.cancel()
            raise
        self.completed = True
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def cancel(self) -> None:
        """Give back the slots of tickets not copied out (their reads finish first)."""
        for ticket in self.tickets:
            if not ticket.released.is_set():
                ticket.filled.wait()
                self.ring.release(ticket)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def upload(ring: StagingRing, fills: Sequence[Fill]) -> None:
    """Fill every module tensor of ``fills`` on the ring's device, the reads running ahead of the copies."""
    device = ring.device
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    Batch(ring, fills).complete(stream)
    if stream is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
