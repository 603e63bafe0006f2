"""A streamed expert's blocks kept as the device holds them: converted once, then streamed as they are.

A streamed block is read from the checkpoint in the dtype the checkpoint stores (fp32 in the
official files, 4 bytes a weight) and converted on the device: the LoRA merge, the run dtype, the
FP8 layers' quantization. Every forward reads the whole expert again, so what it costs is the bytes
read: with ``--fp8`` the device holds 1 byte a weight. The first streamed run therefore writes each
expert's blocks after their conversion on the device (the same operations in the same order, so a
video is the same to the bit) into a safetensors file under ``$WAN_I2V_HOME/converted``, and later
runs stream those bytes as they are: a quarter of the official checkpoint's, half of a bf16 one's,
and an expert the page cache of a 32 GB machine can hold.

A copy is named by everything its bytes follow from: the expert's shard files (name, size, mtime,
inode), the LoRAs (content hash, strength), the run dtype, FP8, the device kind and torch's version
(a LoRA's merge is a matmul, rounded as the device's kernels round it). It is written to a
temporary file and renamed into place, so a copy that exists is whole; one that does not fit on the
disk is not written (the blocks then convert as they stream, as before).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from wan_i2v import locks
from wan_i2v.disk import human_size
from wan_i2v.loading.checkpoint import SAFETENSORS_FILE, SAFETENSORS_NAMES, TensorSource, safetensors_source
from wan_i2v.loading.staging import StagingRing

# Bumped when what a copy holds changes (the FP8 layers' form, the names): older copies are not read.
FORMAT = 1
# A copy is worth its disk only if the stream then reads at most this share of the checkpoint's bytes.
WORTH_IT = 0.75
# Left free on the disk after a copy (the run's own outputs, the system).
KEEP_FREE = 4 * 2**30
COPY_NOTE = "copy.json"  # whose copy it is: the expert folder it was converted from
HEADER_ALIGN = 8  # the safetensors header is padded so that the data starts aligned


def default_converted_dir() -> Path:
    return Path(os.environ.get("WAN_I2V_HOME") or Path.home() / ".cache" / "wan-i2v") / "converted"


def block_tensors(blocks: Sequence[nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor the blocks hold (parameters and persistent buffers), by checkpoint name."""
    return [(f"blocks.{index}.{name}", tensor) for index, block in enumerate(blocks) for name, tensor in block.state_dict(keep_vars=True).items()]


def converted_blocks(blocks: Sequence[nn.Module], source: TensorSource, ring: StagingRing, *, folder: Path, identity: dict,
                     dtype: torch.dtype, keep_fp32, what: str, progress: bool = False) -> TensorSource:  # fmt: skip
    """The source ``blocks`` stream from: their converted copy in ``folder`` (written now if there is
    none and it pays), else ``source`` itself. ``identity``: what the copy's bytes follow from besides
    the stored files (the LoRAs, the run's settings)."""
    tensors = block_tensors(blocks)
    converted_bytes = sum(tensor.nbytes for _, tensor in tensors)
    stored_bytes = sum(source.stored(key).dtype.itemsize * math.prod(source.shape(key)) for key in source.keys() if key.startswith("blocks."))
    if converted_bytes > WORTH_IT * stored_bytes:
        return source
    key = copy_key(source, identity)
    copy_dir = Path(folder) / key
    existing = _open(copy_dir, tensors)
    if existing is not None:
        return existing
    try:
        copy_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(copy_dir).free
        if free < converted_bytes + KEEP_FREE:
            warnings.warn(
                f"the converted copy of {what} ({human_size(converted_bytes)}) does not fit in {folder} ({human_size(free)} free): "
                "its blocks convert as they stream, which reads more"
            )
            return source
        existing = _write_once(blocks, source, ring, Path(folder), copy_dir, tensors, dtype=dtype, keep_fp32=keep_fp32, what=what, progress=progress)
    except OSError as exc:  # a folder not ours to write, the disk filled meanwhile: the run goes on without the copy
        warnings.warn(f"cannot write the converted copy of {what} in {folder} ({exc.strerror or exc}): its blocks convert as they stream")
        return source
    return existing if existing is not None else source


def _write_once(blocks, source, ring, folder: Path, copy_dir: Path, tensors, *, dtype, keep_fp32, what: str, progress: bool) -> TensorSource | None:
    """The copy, written by this process unless another one writes it now (then None: not waited for)."""
    lock = locks.hold(copy_dir / ".lock")
    if lock is None:
        return None
    with lock:
        existing = _open(copy_dir, tensors)  # written by a process that held the lock before us
        if existing is None:
            for stale in copy_dir.glob(f"{SAFETENSORS_FILE}.partial-*"):  # a writer killed half-way (we hold the lock)
                stale.unlink()
            _write(blocks, source, ring, copy_dir / SAFETENSORS_FILE, dtype=dtype, keep_fp32=keep_fp32, tensors=tensors,
                   label=f"converting {what} (once)", progress=progress)  # fmt: skip
            expert_dir = str(Path(next(iter(source.files.values()))).resolve().parent)
            (copy_dir / COPY_NOTE).write_text(json.dumps({"expert_dir": expert_dir, "expert": what}))
            _remove_older_copies(folder, copy_dir, expert_dir)
            existing = _open(copy_dir, tensors)
    return existing


def copy_key(source: TensorSource, identity: dict) -> str:
    files = []
    for path in sorted({source.files[key] for key in source.keys() if key.startswith("blocks.")}):
        stat = os.stat(path)
        files.append([Path(path).name, stat.st_size, stat.st_mtime_ns, stat.st_ino])
    device = torch.cuda.get_device_name() if identity.get("device") == "cuda" and torch.cuda.is_available() else identity.get("device")
    described = {"format": FORMAT, "files": files, "torch": torch.__version__, **identity, "device": device}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _remove_older_copies(folder: Path, kept: Path, expert_dir: str) -> None:
    """Other copies of the same expert folder (other LoRAs, an older torch): one copy per expert stays
    on the disk, not one per setting ever used. A copy another process is writing is left alone; one
    being read stays readable to its reader until it closes it."""
    for other in folder.iterdir():
        note = other / COPY_NOTE
        if other == kept or not note.is_file() or locks.held(other / ".lock"):
            continue
        try:
            if json.loads(note.read_text()).get("expert_dir") == expert_dir:
                shutil.rmtree(other, ignore_errors=True)
        except ValueError:
            continue


def _open(copy_dir: Path, tensors: list[tuple[str, torch.Tensor]]) -> TensorSource | None:
    """The copy in ``copy_dir`` if it is there and holds exactly the blocks' tensors, else None."""
    if not (copy_dir / SAFETENSORS_FILE).is_file():
        return None
    try:
        source = safetensors_source(copy_dir, converted=True)
    except Exception:  # unreadable: written again
        return None
    expected = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors}
    found = {key: (source.stored(key).dtype, source.shape(key)) for key in source.keys()}
    return source if found == expected else None


def _write(blocks: Sequence[nn.Module], source: TensorSource, ring: StagingRing, path: Path, *, dtype: torch.dtype, keep_fp32,
           tensors: list[tuple[str, torch.Tensor]], label: str, progress: bool) -> None:  # fmt: skip
    """Stream every block through the device as a run would, and write what it holds there to ``path``."""
    from wan_i2v.transforms.streaming import BlockStream

    header, offset = {}, 0
    for name, tensor in tensors:
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % HEADER_ALIGN)
    data_start = 8 + len(encoded)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    stream = BlockStream(blocks, source, ring, dtype=dtype, keep_fp32=keep_fp32, ahead=1, keep=())
    try:
        with open(partial, "wb") as file:
            file.write(len(encoded).to_bytes(8, "little") + encoded)
            for index in tqdm(stream.each_on_device(), total=len(blocks), desc=label, unit="block", disable=not progress):
                for name, tensor in blocks[index].state_dict().items():
                    begin = header[f"blocks.{index}.{name}"]["data_offsets"][0]
                    os.pwrite(file.fileno(), tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy(), data_start + begin)
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        stream.remove()
        partial.unlink(missing_ok=True)

