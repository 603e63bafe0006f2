"""How fast the staging ring moves an expert's blocks to the GPU, with no compute beside it.

    python bench/staging_rate.py [--ckpt /tmp/wanckpt] [--workers 8 16] [--json FILE]

Block streaming keeps up with the compute only if the ring delivers a block faster than the GPU
computes one (720P: about 0.2 s a block of 0.7 GB, so 3.5 GB/s). This times the ring alone: every
block of the high-noise expert submitted in order, each ticket copied into one GPU buffer as soon as
it is read, the page cache holding the whole expert (read once before), for each number of reader
threads. It reports GB/s end to end and the seconds the caller waited for the reads: a rate far
above 3.5 GB/s rules the ring's reads from the page cache out as what slows a streamed step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wan_i2v.loading.checkpoint import safetensors_ranges  # noqa: E402
from wan_i2v.loading.staging import StagingRing, aligned, pieces_of  # noqa: E402
from wan_i2v.models.spec import WAN22_I2V_A14B as A14B  # noqa: E402


def block_pieces(expert_dir: Path) -> list[list]:
    stored = {}
    for shard in sorted(expert_dir.glob("*.safetensors")):
        stored |= safetensors_ranges(shard)
    blocks: dict[int, list] = {}
    for key, entry in stored.items():
        match = re.match(r"blocks\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match.group(1)), []).extend(pieces_of(key, entry.file.nbytes, 2**40, entry.file))
    return [blocks[index] for index in sorted(blocks)]


def stream_once(ring: StagingRing, blocks: list[list], target: torch.Tensor, stream: torch.cuda.Stream) -> dict:
    ring.waited_s, ring.copied_bytes = 0.0, 0
    started = time.perf_counter()
    tickets = [ring.submit(pieces) for pieces in blocks]
    for ticket in tickets:
        views, offset = [], 0
        for piece in ticket.pieces:
            views.append(target[offset : offset + piece.nbytes])
            offset += aligned(piece.nbytes)
        ring.copy_out(ticket, views, stream)
    stream.synchronize()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "gb_s": ring.copied_bytes / seconds / 1e9, "read_wait_s": ring.waited_s, "gb": ring.copied_bytes / 1e9}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/wanckpt"))
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    blocks = block_pieces(args.ckpt / A14B.experts[0].folder)
    slot = max(sum(aligned(piece.nbytes) for piece in pieces) for pieces in blocks)
    for path in sorted((args.ckpt / A14B.experts[0].folder).glob("*.safetensors")):  # the page cache holds the expert
        with open(path, "rb") as file:
            while file.read(64 * 2**20):
                pass
    target = torch.empty(slot, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "blocks": len(blocks), "block_gb": slot / 1e9, "rows": []}
    for workers in args.workers:
        ring = StagingRing(slot, 3, "cuda", workers=workers)
        stream_once(ring, blocks[:3], target, stream)  # the threads and the first copies started
        row = {"workers": workers, **stream_once(ring, blocks, target, stream)}
        report["rows"].append(row)
        print(f"{workers} reader threads: {row['gb']:.1f} GB in {row['seconds']:.2f} s, {row['gb_s']:.2f} GB/s; waited {row['read_wait_s']:.2f} s for reads", flush=True)
        ring.arena.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
