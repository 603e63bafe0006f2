"""The step cache's speed and error: the same video exact and at several thresholds, in one script run.

    python bench/step_cache.py [--ckpt /tmp/wanckpt] [--thresholds 0.05 0.1 0.2] [--size 720P --frames 81 --steps 40] [--json FILE]
    python bench/step_cache.py --tiny            # a check of this script on the CPU (tiny checkpoint, small video)
    python bench/step_cache.py --cpu-probe --thresholds 0.7 0.8   # the changes random weights make, on the CPU (minutes)

The stack ``wan-i2v generate`` runs (the plan's default, guidance on: two forwards a step, the state
saved after each step) on one GPU, on a full-size random checkpoint (``multi_gpu.py``'s, written
once). The exact row (no cache) runs in a process of its own; the threshold rows (``--step-cache-blocks``
and ``--step-cache-max`` as given) share one, as a server's jobs share its loaded pipeline: each
video runs with its row's threshold (``session.job_step_cache``, what a job's ``step_cache`` does).
A process loads the pipeline, runs one untimed step of the same video (compile, kernel autotuning),
then samples each video timing each step (the GPU synchronized) and noting which of its forwards the
cache skipped and the change each measured (``StepCache.last_change``).

Per row: forwards skipped of all, per expert, and the step pattern; the change the forwards measured
(random weights do not behave like trained ones: their first block's residual changes by much more
from one step to the next, so the thresholds that skip differ; the pattern and the changes are
reported with the figures, and nothing is claimed about quality on real weights); the denoising time
(the sum of its steps, and the stage's wall time, which also holds the state saves) against the exact
row's; the prediction for it, (forwards run) / (all forwards) of the exact time, and the measured
time's ratio to it (the issue's 3%); the same with the share of a forward that a skipped one still
runs, its first and last blocks (1 of 40 at the defaults: 2.5% of a forward for each one skipped); the
latents' and the decoded video's relative error against the exact row's, and PSNR/SSIM of the 8-bit
frames (``wan-i2v compare``'s metrics; where scikit-image is not installed, the exact video is written
as ``exact.mp4`` beside the rows' and ``wan-i2v compare`` gives them from the mp4s afterwards).

Rows finished are kept in ``--work`` (their latents, steps and figures) and not run again; a row cut
short resumes from its state. The folder can be carried from one machine to the next (the exact row
measured on one, the thresholds on another: the times are then of two machines of one kind, and each
row's time is also compared with the prediction from its own steps that skipped nothing, counting
the blocks a skip runs). A device returns files of up to 16 MiB: the exact latents (19 MB at 720P)
travel as two halves of their channels, which ``--work`` may hold instead (``exact.latents.0.pt``
and ``.1.pt``). The 720P rows measured so far are kept in ``bench/measured/step-cache-720p`` (the
exact latents in fp16: 2.1e-4 from the fp32 ones): ``--work`` a copy of it to measure the thresholds
not there against them.

``--cpu-probe`` runs the same rows on the CPU with a full-width random DiT of 2 blocks (and a
2-layer text encoder) at 160x96, 9 frames, 40 steps: the first block's change is of the width's
and the weights' making, so the probe tells the thresholds at which random weights skip, before any
GPU time is spent. It also prints how much the blocks' modulation, made from the timestep alone,
changes from one step to the next.
"""


from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
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
FORWARDS_PER_STEP = 2  # guidance: the conditional and the unconditional forward


class StepTimer(LoopHook):
    """Each step's seconds (the device synchronized at both ends), its forwards skipped and the change
    each forward measured (None: the rules that need no statistic decided), appended to a JSON-lines
    file as the step ends, so that a killed run keeps every finished step."""

    def __init__(self, path: Path, device: torch.device, caches: dict):
        self.path, self.device, self.caches = path, device, caches  # caches: expert -> its StepCache (none for the exact row)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, step):
        self._sync()
        self.begun, self.skipped_before, self.changes = time.perf_counter(), self._skipped(), {}

    def around_model(self, step, branch, run):
        output = run()
        if step.expert in self.caches:
            self.changes[branch] = self.caches[step.expert].last_change
        return output

    def on_step_end(self, step, latent):
        self._sync()
        record = {"step": step.index, "expert": step.expert, "timestep": step.timestep, "seconds": time.perf_counter() - self.begun,
                  "skipped": self._skipped() - self.skipped_before, "changes": self.changes}  # fmt: skip
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    def _skipped(self) -> int:
        return sum(skipped for cache in self.caches.values() for skipped, _ in cache.skipped().values())


def run_rows(args, rows: list[tuple[str, float]]) -> None:
    """The rows ``rows`` (the exact one, or threshold rows) in this process: load, warm up, and per
    row sample (resuming), decode and compare with the exact row; everything into ``--work``."""
    from wan_i2v.compare import compare_frames
    from wan_i2v.pipeline import I2VPipeline
    from wan_i2v.session import job_step_cache
    from wan_i2v.transforms.step_cache import step_caches
    from wan_i2v.transforms.step_cache_config import StepCacheConfig
    from wan_i2v.video import demo_image, rgb24_frames, write_mp4

    work = Path(args.work)
    first, last = args.step_cache_blocks
    cached = rows[0][1] > 0  # the exact row runs without the cache's hooks at all
    step_cache = StepCacheConfig(rows[0][1], first_blocks=first, last_blocks=last, max_reuses=args.step_cache_max) if cached else None
    options = {"device": "cpu"} if args.tiny or args.cpu_probe else {}
    pipe = I2VPipeline.from_pretrained(args.ckpt, step_cache=step_cache, **options)
    caches = step_caches(pipe.experts.models)
    image = demo_image(1280, 720)
    settings = dict(prompt=PROMPT, max_area=args.max_area, frame_num=args.frames, seed=SEED)

    pipe.sample(pipe.prepare(image, _settings(settings, steps=1)))  # the loop resets the cache's state and counts before each video
    exact_latents = read_latents(work, "exact") if cached else None
    exact_video = None
    for name, threshold in rows:
        state = work / f"{name}.state.pt"
        timer = StepTimer(work / f"{name}.steps.jsonl", pipe.device, caches)
        with job_step_cache(pipe, threshold if cached else None):
            result = pipe.generate(image, steps=args.steps, state_file=state, hooks=[timer], **settings)
        torch.save(result.latents, work / f"{name}.latents.pt")
        write_mp4(result.video, work / f"{name}.mp4", fps=pipe.spec.fps)
        done = {"step_cache": result.step_cache, "timings": result.timings, "steps_run": len(result.experts_used),  # fewer: resumed
                "layers": len(next(iter(pipe.experts.models.values())).block_stack())}  # fmt: skip
        if exact_latents is not None:
            if exact_video is None:  # decoded here: rows carried between machines hold latents only
                exact_video = pipe.decode(exact_latents.to(pipe.device, torch.float32))
            done |= {"latents_rel_error": relative_error(result.latents, exact_latents), "video_rel_error": relative_error(result.video, exact_video)}
            if importlib.util.find_spec("skimage") is not None:
                comparison = compare_frames(rgb24_frames(exact_video), rgb24_frames(result.video), ("exact", name))
                done |= {"psnr_db": comparison.psnr, "ssim": comparison.ssim}
            elif not (work / "exact.mp4").exists():  # for `wan-i2v compare exact.mp4 ROW.mp4` afterwards, where scikit-image is
                write_mp4(exact_video, work / "exact.mp4", fps=pipe.spec.fps)
        state.unlink(missing_ok=True)  # the step cache's part of it is GBs at 720P; a finished row never resumes
        (work / f"{name}.done").write_text(json.dumps(done))
        print(f"{name}: done", flush=True)


def read_latents(work: Path, name: str) -> torch.Tensor:
    """A row's latents, whole or as the two halves of their channels a device returns."""
    whole = work / f"{name}.latents.pt"
    if whole.exists():
        return torch.load(whole)
    return torch.cat([torch.load(work / f"{name}.latents.{half}.pt") for half in (0, 1)])


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
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def summarize(name: str, threshold: float, work: Path, steps: int, exact: dict | None) -> dict:
    records = step_records(work / f"{name}.steps.jsonl")
    row = {
        "row": name, "threshold": threshold, "steps_measured": len(records),
        "denoising_s": sum(r["seconds"] for r in records.values()),
        "skipped": sum(r["skipped"] for r in records.values()), "forwards": FORWARDS_PER_STEP * len(records),
        "pattern": "".join(str(records[i]["skipped"]) if i in records else "?" for i in range(steps)),
    }  # fmt: skip
    row["skipped_per_expert"], row["changes_per_expert"] = {}, {}
    for record in records.values():
        counts = row["skipped_per_expert"].setdefault(record["expert"], [0, 0])
        counts[0] += record["skipped"]
        counts[1] += FORWARDS_PER_STEP
        row["changes_per_expert"].setdefault(record["expert"], []).extend(c for c in record.get("changes", {}).values() if c is not None)
    row["changes_per_expert"] = {expert: _spread(changes) for expert, changes in row["changes_per_expert"].items() if changes}
    done_file = work / f"{name}.done"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    if done.get("steps_run") == steps:  # the stage unbroken: its steps and the state saves between them
        row["denoising_wall_s"] = done["timings"]["denoising"]
    # A skipped forward still runs its first and last blocks: that share of a forward (none for the
    # exact row; unknown for rows measured before the blocks were recorded).
    cache = done.get("step_cache")
    kept = (cache["first_blocks"] + cache["last_blocks"]) / done["layers"] if cache and "layers" in done else None
    # The prediction again from this run's own steps that skipped nothing: free of the difference
    # between two machines of one kind when the exact row was measured on another.
    whole = sorted(r["seconds"] for r in records.values() if r["skipped"] == 0)
    if whole:
        median = whole[len(whole) // 2]
        forwards_run = sum(FORWARDS_PER_STEP - r["skipped"] + r["skipped"] * (kept or 0) for r in records.values())
        row["predicted_from_own_steps_s"] = median * forwards_run / FORWARDS_PER_STEP
        row["measured_vs_own_prediction"] = row["denoising_s"] / row["predicted_from_own_steps_s"]
    if exact is not None and done and len(records) == steps:
        run = (row["forwards"] - row["skipped"]) / row["forwards"]  # the share of the forwards that ran
        predicted = exact["denoising_s"] * run
        row |= {"time_vs_exact": row["denoising_s"] / exact["denoising_s"], "predicted_s": predicted, "measured_vs_predicted": row["denoising_s"] / predicted}
        if "denoising_wall_s" in row and "denoising_wall_s" in exact:
            row["wall_vs_predicted"] = row["denoising_wall_s"] / (exact["denoising_wall_s"] * run)
        if kept is not None:
            with_kept = run + (1 - run) * kept
            row |= {"predicted_with_kept_blocks_s": exact["denoising_s"] * with_kept,
                    "measured_vs_predicted_with_kept_blocks": row["denoising_s"] / (exact["denoising_s"] * with_kept)}  # fmt: skip
            if "denoising_wall_s" in row and "denoising_wall_s" in exact:
                row["wall_vs_predicted_with_kept_blocks"] = row["denoising_wall_s"] / (exact["denoising_wall_s"] * with_kept)
        row |= {key: done.get(key) for key in ("latents_rel_error", "video_rel_error", "psnr_db", "ssim")}
    return row


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "measured": len(values)}


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
    parser.add_argument("--cpu-probe", action="store_true", help="a full-width random DiT of 2 blocks on the CPU, a small video")
    parser.add_argument("--rows", help=argparse.SUPPRESS)  # run these rows ("name=threshold,...") in this process
    args = parser.parse_args()
    args.max_area = {"720P": 1280 * 720, "480P": 832 * 480}[args.size]
    args.work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from wan_i2v.tiny import ensure_tiny_checkpoint

        args.max_area, args.frames, args.steps = 96 * 160, 9, 6
        args.ckpt = ensure_tiny_checkpoint(args.work / "tiny-checkpoint")
    if args.cpu_probe:
        args.max_area, args.frames = 160 * 96, 9
        args.ckpt = args.work / "probe-checkpoint"
        if args.rows is None and not args.ckpt.exists():
            from multi_gpu import write_random_checkpoint

            write_random_checkpoint(args.ckpt, 2, text_layers=2, device="cpu")
    if args.rows is not None:
        return run_rows(args, [(name, float(threshold)) for name, threshold in (row.split("=") for row in args.rows.split(","))])

    exact_row, threshold_rows = ("exact", 0.0), [(f"threshold-{t:g}", t) for t in args.thresholds]
    for group in ([exact_row], threshold_rows):
        pending = [(name, threshold) for name, threshold in group if not (args.work / f"{name}.done").exists()]
        for name, _ in group:
            print(f"{name}: {'running' if (name, _) in pending else 'measured earlier'}", flush=True)
        if pending:
            if not args.ckpt.exists():
                from multi_gpu import write_random_checkpoint

                write_random_checkpoint(args.ckpt, 40)
            rows = ",".join(f"{name}={threshold}" for name, threshold in pending)
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--rows", rows], check=True)

    exact = summarize(*exact_row, args.work, args.steps, None)
    table = [exact] + [summarize(name, threshold, args.work, args.steps, exact) for name, threshold in threshold_rows]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not (args.tiny or args.cpu_probe) else "CPU"
    report = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__, "command": " ".join(sys.argv),
              "size": args.size, "frames": args.frames, "steps": args.steps, "rows": table}  # fmt: skip
    for row in table:
        print(describe(row))
    if args.cpu_probe:
        exact_steps = step_records(args.work / "exact.steps.jsonl")
        print_modulation_changes(args.ckpt, [exact_steps[i]["timestep"] for i in sorted(exact_steps)])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


@torch.no_grad()
def print_modulation_changes(ckpt: Path, timesteps: list[float]) -> None:
    """The relative L1 change of the blocks' modulation (shift, scale, gate: made from the timestep
    alone) between the successive ``timesteps`` of a run."""
    from wan_i2v.models.dit import load_dit, sinusoidal_embedding
    from wan_i2v.models.spec import DEFAULT_SPEC, spec_for

    model = load_dit(ckpt / spec_for(DEFAULT_SPEC).experts[0].folder, device=torch.device("cpu"), dtype=torch.float32)
    embed = lambda t: model.time_projection(model.time_embedding(sinusoidal_embedding(torch.tensor([t]), model.config.freq_dim)))  # noqa: E731
    modulation = [embed(t) for t in timesteps]
    changes = [((b - a).abs().sum() / a.abs().sum()).item() for a, b in zip(modulation, modulation[1:])]
    print(f"the modulation's change from one step to the next: {min(changes):.2f}-{max(changes):.2f} ({timesteps[0]:.0f} to "
          f"{timesteps[1]:.0f}: {changes[0]:.2f}; {timesteps[-2]:.0f} to {timesteps[-1]:.0f}: {changes[-1]:.2f})")  # fmt: skip


def describe(row: dict) -> str:
    line = f"{row['row']:>16}: skipped {row['skipped']} of {row['forwards']} forwards {row['skipped_per_expert']}, denoising {row['denoising_s']:.1f} s"
    if "denoising_wall_s" in row:
        line += f" ({row['denoising_wall_s']:.1f} s wall)"
    if "time_vs_exact" in row:
        line += (f"; {row['time_vs_exact']:.3f}x exact, {row['measured_vs_predicted']:.3f}x predicted"
                 f" ({row.get('wall_vs_predicted', float('nan')):.3f}x in wall time)")  # fmt: skip
        if "measured_vs_predicted_with_kept_blocks" in row:
            line += (f", {row['measured_vs_predicted_with_kept_blocks']:.3f}x predicted with the blocks a skip runs"
                     f" ({row.get('wall_vs_predicted_with_kept_blocks', float('nan')):.3f}x in wall time)")  # fmt: skip
        line += f", {row.get('measured_vs_own_prediction', float('nan')):.3f}x the prediction from its own whole steps"
        if row["latents_rel_error"] is not None:
            line += f"; latents {row['latents_rel_error']:.2e}, video {row['video_rel_error']:.2e}"
        if row["psnr_db"] is not None:
            line += f", PSNR {row['psnr_db']:.1f} dB, SSIM {row['ssim']:.3f}"
    changes = ", ".join(f"{expert} {c['min']:.3f}-{c['median']:.3f}-{c['max']:.3f}" for expert, c in row["changes_per_expert"].items())
    return line + f"\n{'':>18}pattern {row['pattern']}" + (f"\n{'':>18}change measured (min-median-max) {changes}" if changes else "")


if __name__ == "__main__":
    main()
