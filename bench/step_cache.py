"""The step cache's speed and error: the same video exact and at several thresholds, in one script run.

    python bench/step_cache.py [--ckpt /tmp/wanckpt] [--thresholds 0.05 0.1 0.2] [--size 720P --frames 81 --steps 40] [--json FILE]
    python bench/step_cache.py --tiny            # a check of this script on the CPU (tiny checkpoint, small video)

Each row (``exact``: no cache; then one per threshold, with ``--step-cache-blocks``/``--step-cache-max``
as given) runs in a process of its own on one GPU, with the stack ``wan-i2v generate`` runs (the plan's
default, guidance on: two forwards a step) on a full-size random checkpoint (``multi_gpu.py``'s,
written once). A process loads the pipeline, runs one untimed step of the same video (compile, kernel
autotuning), then samples the video with its state saved after each step, timing each step (the GPU
synchronized) and noting which of its forwards the cache skipped. A row cut short (the device's call
limit) resumes from its state in the next run of the same command: rows and steps already measured
are kept in ``--work``, so the table fills over several calls.

Per row: forwards skipped of all, per expert, and the step pattern; the denoising time (the sum of its
steps) against the exact row's; the prediction for that time, (forwards run) / (all forwards) of the
exact time, and the measured time's ratio to it (the issue's 3%: a skipped forward still runs its
first and last blocks); the latents' and the decoded video's relative error against the exact row's,
and PSNR/SSIM of the 8-bit frames (``wan-i2v compare``'s metrics; where scikit-image is not installed,
as on a device call whose wheels cannot carry it beside PyAV's, the exact video is written as
``exact.mp4`` beside the rows' and ``wan-i2v compare`` gives them from the mp4s afterwards). Random weights do not behave like trained ones: the
skip pattern is reported with the figures, and nothing is claimed about quality on real weights.

The video's error and PSNR/SSIM are computed in the row's process, against the exact row's latents
decoded again there (the 8-bit frames, as the mp4 would hold them, for PSNR/SSIM): a finished row
keeps only its latents (19 MB at 720P), its steps and its figures in ``--work``, so the folder can be
carried from one machine to the next (the exact row measured on one, the thresholds on another: the
times are then of two machines of one kind, as the table says, and each row's time is also compared
with the prediction from its own steps that skipped nothing). A device returns files of up to 16 MiB,
so the exact latents (19 MB in fp32 at 720P) may be carried in half precision: they are read back as
fp32, and the errors against them then carry fp16's rounding (about 3e-4 of the latents' norm).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wan_i2v.sampling.loop import LoopHook  # noqa: E402

PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."
SEED = 0


class StepTimer(LoopHook):
    """Each step's seconds (the device synchronized at both ends) and its forwards skipped, appended to
    a JSON-lines file as the step ends, so that a killed run keeps every finished step."""

    def __init__(self, path: Path, device: torch.device, skipped_so_far):
        self.path, self.device, self.skipped_so_far = path, device, skipped_so_far

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, step):
        self._sync()
        self.begun, self.skipped_before = time.perf_counter(), self.skipped_so_far()

    def on_step_end(self, step, latent):
        self._sync()
        record = {"step": step.index, "expert": step.expert, "seconds": time.perf_counter() - self.begun,
                  "skipped": self.skipped_so_far() - self.skipped_before}  # fmt: skip
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def run_row(args) -> None:
    """One row, in this process: load, warm up, sample (resuming), decode; everything into ``--work``."""
    from wan_i2v.compare import compare_frames
    from wan_i2v.pipeline import I2VPipeline
    from wan_i2v.transforms.step_cache import skipped_forwards
    from wan_i2v.transforms.step_cache_config import StepCacheConfig
    from wan_i2v.video import demo_image, rgb24_frames, write_mp4

    work = Path(args.work)
    threshold = float(args.row_threshold)
    first, last = args.step_cache_blocks
    step_cache = StepCacheConfig(threshold, first_blocks=first, last_blocks=last, max_reuses=args.step_cache_max) if threshold > 0 else None
    options = {"device": "cpu"} if args.tiny else {}
    pipe = I2VPipeline.from_pretrained(args.ckpt, step_cache=step_cache, **options)
    image = demo_image(1280, 720)
    settings = dict(prompt=PROMPT, max_area=args.max_area, frame_num=args.frames, seed=SEED)

    warm = pipe.prepare(image, _settings(settings, steps=1))
    pipe.sample(warm)  # the loop resets the cache's state and counts before each video

    name = args.row
    steps_file = work / f"{name}.steps.jsonl"
    skipped_total = lambda: sum(skipped for skipped, _ in skipped_forwards(pipe.experts.models).values())  # noqa: E731
    timer = StepTimer(steps_file, pipe.device, skipped_total)
    state = work / f"{name}.state.pt"
    result = pipe.generate(image, steps=args.steps, state_file=state, hooks=[timer], **settings)
    torch.save(result.latents, work / f"{name}.latents.pt")
    write_mp4(result.video, work / f"{name}.mp4", fps=pipe.spec.fps)
    done = {"step_cache": result.step_cache, "timings": result.timings}
    exact_latents = work / "exact.latents.pt"
    if name != "exact" and exact_latents.exists():  # the exact video decoded again here: rows carried between machines hold latents only
        exact_video = pipe.decode(torch.load(exact_latents).to(pipe.device, torch.float32))
        done["video_rel_error"] = relative_error(result.video, exact_video)
        if importlib.util.find_spec("skimage") is not None:
            comparison = compare_frames(rgb24_frames(exact_video), rgb24_frames(result.video), ("exact", name))
            done |= {"psnr_db": comparison.psnr, "ssim": comparison.ssim}
        elif not (work / "exact.mp4").exists():  # for `wan-i2v compare exact.mp4 ROW.mp4` afterwards, where scikit-image is
            write_mp4(exact_video, work / "exact.mp4", fps=pipe.spec.fps)
    state.unlink(missing_ok=True)  # the step cache's part of it is GBs at 720P; a finished row never resumes
    (work / f"{name}.done").write_text(json.dumps(done))


def _settings(fields: dict, steps: int):
    from wan_i2v.config import GenerationSettings

    return GenerationSettings.of(fields["prompt"], None, max_area=fields["max_area"], frame_num=fields["frame_num"], steps=steps,
                                 seed=fields["seed"])  # fmt: skip


def step_records(path: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run measures again the step that was cut)."""
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["step"]] = record
    return records


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def summarize(name: str, threshold: float, work: Path, steps: int, exact: dict | None) -> dict:
    records = step_records(work / f"{name}.steps.jsonl")
    forwards_per_step = 2  # guidance: the conditional and the unconditional forward
    row = {
        "row": name, "threshold": threshold, "steps_measured": len(records),
        "denoising_s": sum(r["seconds"] for r in records.values()),
        "skipped": sum(r["skipped"] for r in records.values()), "forwards": forwards_per_step * len(records),
        "pattern": "".join(str(records[i]["skipped"]) if i in records else "?" for i in range(steps)),
    }  # fmt: skip
    row["skipped_per_expert"] = {}
    for record in records.values():
        counts = row["skipped_per_expert"].setdefault(record["expert"], [0, 0])
        counts[0] += record["skipped"]
        counts[1] += forwards_per_step
    # The prediction again from this run's own steps that skipped nothing: free of the difference
    # between two machines of one kind when the exact row was measured on another.
    whole = sorted(r["seconds"] for r in records.values() if r["skipped"] == 0)
    if whole:
        median = whole[len(whole) // 2]
        row["predicted_from_own_steps_s"] = sum(median * (forwards_per_step - r["skipped"]) / forwards_per_step for r in records.values())
        row["measured_vs_own_prediction"] = row["denoising_s"] / row["predicted_from_own_steps_s"]
    if exact is not None and (work / f"{name}.done").exists() and len(records) == steps:
        predicted = exact["denoising_s"] * (row["forwards"] - row["skipped"]) / row["forwards"]
        row |= {"time_vs_exact": row["denoising_s"] / exact["denoising_s"], "predicted_s": predicted, "measured_vs_predicted": row["denoising_s"] / predicted}
        row["latents_rel_error"] = relative_error(torch.load(work / f"{name}.latents.pt"), torch.load(work / "exact.latents.pt"))
        done = json.loads((work / f"{name}.done").read_text())
        row |= {key: done.get(key) for key in ("video_rel_error", "psnr_db", "ssim")}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/wanckpt"), help="full-size random checkpoint (written if absent)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.05, 0.1, 0.2], help="none: the exact row alone")
    parser.add_argument("--step-cache-blocks", type=lambda text: tuple(int(x) for x in text.split(",")), default=(1, 0), metavar="F,B")
    parser.add_argument("--step-cache-max", type=int, default=3)
    parser.add_argument("--size", default="720P", choices=["720P", "480P"])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path("/tmp/step-cache-bench"), help="rows and steps measured so far (kept across runs)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU: a check of this script")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--row-threshold", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_area = {"720P": 1280 * 720, "480P": 832 * 480}[args.size]
    args.work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from wan_i2v.tiny import ensure_tiny_checkpoint

        args.max_area, args.frames, args.steps = 96 * 160, 9, 6
        args.ckpt = ensure_tiny_checkpoint(args.work / "tiny-checkpoint")
    if args.row is not None:
        return run_row(args)

    if not args.ckpt.exists():
        from multi_gpu import write_random_checkpoint

        write_random_checkpoint(args.ckpt, 40)
    rows = [("exact", 0.0)] + [(f"threshold-{t:g}", t) for t in args.thresholds]
    for name, threshold in rows:
        if (args.work / f"{name}.done").exists():
            print(f"{name}: measured earlier", flush=True)
            continue
        print(f"{name}: running", flush=True)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--row", name, "--row-threshold", str(threshold)], check=True)

    exact = summarize("exact", 0.0, args.work, args.steps, None)
    table = [exact] + [summarize(name, threshold, args.work, args.steps, exact) for name, threshold in rows[1:]]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "CPU"
    report = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__, "command": " ".join(sys.argv),
              "size": args.size, "frames": args.frames, "steps": args.steps, "rows": table}  # fmt: skip
    for row in table:
        extra = "" if "time_vs_exact" not in row else (
            f"; {row['time_vs_exact']:.3f}x exact, {row['measured_vs_predicted']:.3f}x predicted "
            f"({row.get('measured_vs_own_prediction', float('nan')):.3f}x from its own whole steps); latents {row['latents_rel_error']:.2e}, "
            f"video {row['video_rel_error']:.2e}" + ("" if row["psnr_db"] is None else f", PSNR {row['psnr_db']:.1f} dB, SSIM {row['ssim']:.3f}"))  # fmt: skip
        print(f"{row['row']:>16}: skipped {row['skipped']} of {row['forwards']} forwards {row['skipped_per_expert']}, "
              f"denoising {row['denoising_s']:.1f} s{extra}\n{'':>18}pattern {row['pattern']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
