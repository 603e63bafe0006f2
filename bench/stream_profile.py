"""One streamed denoising step under the profiler: where the GPU's time goes when blocks stream.

    python bench/stream_profile.py [--ckpt /tmp/wanckpt] [--gpu-memory 24] [--host-memory 32] [--out DIR]

Runs the plan ``wan-i2v generate --gpu-memory G --host-memory H --distilled --no-lightning`` makes
(720P, 81 frames, 4 steps), through the session API the CLI uses, and profiles the third step (the
low-noise expert's second: its kept blocks are on the GPU, only the streamed ones move) with
``torch.profiler``, host and GPU. It prints how much of the step the GPU was busy (kernels and copies
on any stream, their union), its idle gaps (how many, their total, the longest), the busiest kernels,
and the host calls that took longest; the trace (Chrome's format, gzipped) goes to ``--out``. A step
that is slow with the GPU idle is the host's doing (it queued the work late); one that is slow with
the GPU busy is the kernels' own.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wan_i2v.options import RunOptions  # noqa: E402
from wan_i2v.session import RunSession  # noqa: E402
from wan_i2v.video import demo_image  # noqa: E402

PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."
PROFILED_STEP = 2  # (from 0) the third step


def busy_and_gaps(events: list[dict], begin: float, end: float) -> tuple[float, list[float]]:
    """The union of the GPU's activity (microseconds) within [begin, end] and the gaps between."""
    spans = sorted((max(e["ts"], begin), min(e["ts"] + e["dur"], end)) for e in events if e["ts"] + e["dur"] > begin and e["ts"] < end)
    busy, gaps, reached = 0.0, [], begin
    for start, stop in spans:
        if start > reached:
            gaps.append(start - reached)
        if stop > reached:
            busy += stop - max(start, reached)
            reached = stop
    if end > reached:
        gaps.append(end - reached)
    return busy, gaps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/wanckpt"))
    parser.add_argument("--gpu-memory", type=float, default=24)
    parser.add_argument("--host-memory", type=float, default=32)
    parser.add_argument("--out", type=Path, default=Path("/tmp/stream-profile"))
    parser.add_argument("--tiny", action="store_true", help="a check of this script on the CPU with the tiny checkpoint, not a measurement")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for earlier in ("video.mp4", "video.state.pt"):  # a run left there would be resumed, not profiled
        (args.out / earlier).unlink(missing_ok=True)
    size = dict(height=720, width=1280, frame_num=81)
    options = RunOptions(ckpt_dir=args.ckpt, gpu_memory=args.gpu_memory, host_memory=args.host_memory, distilled=True, lightning=False)
    if args.tiny:
        from wan_i2v.tiny import ensure_tiny_checkpoint

        size = dict(height=64, width=96, frame_num=9)
        options = RunOptions(ckpt_dir=ensure_tiny_checkpoint(args.out / "tiny-checkpoint"), distilled=True, lightning=False, device="cpu")
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
    marks = {}

    def on_step(step):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks[step.index] = time.perf_counter()
        if step.index == PROFILED_STEP - 1:
            profiler.start()
        elif step.index == PROFILED_STEP:
            profiler.stop()

    with RunSession.open(options, **size, guided=False) as session:
        print(f"plan: {session.plan}", flush=True)
        # as the CLI runs it: the state saved after each step
        session.generate(demo_image(1280, 720), PROMPT, seed=0, progress=False, on_step=on_step, video_file=args.out / "video.mp4",
                         state_file=args.out / "video.state.pt", height=size["height"], width=size["width"], frame_num=size["frame_num"])  # fmt: skip
    step_s = marks[PROFILED_STEP] - marks[PROFILED_STEP - 1]
    trace = args.out / "trace.json"
    profiler.export_chrome_trace(str(trace))
    with trace.open("rb") as raw, gzip.open(args.out / "trace.json.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    trace.unlink()
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    host = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver", "python_function")]
    begin = min((e["ts"] for e in gpu), default=0)
    end = max((e["ts"] + e["dur"] for e in gpu), default=0)
    busy, gaps = busy_and_gaps(gpu, begin, end)
    kernels = sum(e["dur"] for e in gpu if e["cat"] == "kernel")
    report = {"step_s": step_s, "gpu_span_s": (end - begin) / 1e6, "gpu_busy_s": busy / 1e6, "kernels_s": kernels / 1e6,
              "idle_gaps_over_1ms": sum(1 for gap in gaps if gap > 1000), "idle_s": sum(gaps) / 1e6, "longest_gap_ms": max(gaps, default=0) / 1e3}  # fmt: skip
    kernel_time: dict[str, list[float]] = {}
    for e in gpu:
        kernel_time.setdefault(e["name"][:80], []).append(e["dur"])
    report["kernels_by_total_ms"] = {name: [round(sum(d) / 1e3, 1), len(d)] for name, d in sorted(kernel_time.items(), key=lambda item: -sum(item[1]))[:25]}
    print(json.dumps(report, indent=1))
    by_name: dict[str, list[float]] = {}
    for e in host:
        by_name.setdefault(e["name"], []).append(e["dur"])
    print("host calls by total time (ms): " + "; ".join(f"{name[:60]} {sum(d) / 1e3:.0f} ({len(d)}x)" for name, d in
                                                         sorted(by_name.items(), key=lambda item: -sum(item[1]))[:15]))  # fmt: skip
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
