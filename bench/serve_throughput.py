"""What `wan-i2v serve` costs a job: the same jobs run by the pipeline alone and through the server,
in one run on one GPU (the default); and jobs per hour of server layouts on two GPUs (``--layouts``).

    python bench/serve_throughput.py [--ckpt /tmp/wanckpt] [--jobs 1] [--json FILE]       # the overhead, one GPU
    python bench/serve_throughput.py --tiny [--size 720P --frames 9]                       # a check of the script, on the CPU
    python bench/serve_throughput.py --layouts 2gpu 1gpu+1gpu [--sizes 480P 720P] [--probe-steps 2] [--jobs-per-server 1]

**The overhead** (default: 720P, 81 frames, the distilled recipe: euler, 4 steps, guide scale 1,
shift 5; the full-size random checkpoint of ``multi_gpu.py``, written once, ~65 s). First the
pipeline alone, in a process of its own: a run session opened as ``wan-i2v serve --distilled`` opens
it (the same options, hence the same plan), a warm-up job of 2 steps (both experts compile, the VAE
warms up), then ``--jobs`` jobs as ``wan-i2v generate`` runs them (``session.generate`` with the state
saved after each step and the latents before the decode, then ``write_mp4``), each timed. That
process ends; then a real ``wan-i2v serve`` process on the same GPU, the same warm-up job, and the
same jobs submitted over HTTP one at a time, each timed from its submission until its status is
completed (polled every 20 ms) and until its mp4 is downloaded. The server's log gives its side of
each job (``timings of <id>``: waiting, the pipeline's stages, the run, recording its end). The
overhead of a job is the server's time to the downloadable mp4 less the pipeline's ``generate``
(the issue's measure); the pipeline's own ``write_mp4`` after it is reported beside. The mp4 bytes
of both are compared (same seed, same settings). About 5 minutes on one H200, the checkpoint's
writing included.

**Jobs per hour** (``--layouts``): one server on two GPUs against two one-GPU servers sharing one
queue, at ``--sizes``, with the distilled recipe and with the default 40 steps. Each layout's
servers start, load, and run warm-up jobs per size and recipe with the steps measured (they compile;
not counted); then for each case ``--jobs-per-server`` jobs per server are submitted at once (every
GPU busy) and timed from the submission to the last completion: jobs per hour = jobs x 3600 / that
time. The two-GPU server is started once per recipe, since its plan depends on guidance (CFG parallel
with it, Ulysses without); the one-GPU servers serve both. 40 steps at 720P take about 15 minutes a
video on one H200: the 40-step rows run ``--probe-steps`` steps and add the remaining steps at the
seconds per step the server measured for those jobs (``seconds_per_step``, steps after the first):
computed, not run to the end, and marked so.

``--tiny`` runs either on the tiny checkpoint on the CPU (a check of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RECIPES = {
    "distilled": {"solver": "euler", "steps": "4", "guide_scale": "1", "shift": "5"},
    "40 steps": {"solver": "unipc", "guide_scale": "3.5"},  # steps: --probe-steps, extrapolated to 40
}
PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."
WARM_UP_STEPS = 2  # at shift 5, step 0 is the high-noise expert's and step 1 the low-noise one's: both compile
POLL_SECONDS = 0.02
TIMINGS_LINE = re.compile(r"timings of (\S+): (.*)$")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_servers(ckpt: Path, state: Path, groups: list[tuple[str, int]], extra: list[str], device: str, log_dir: Path, name: str):
    """One ready server per (CUDA_VISIBLE_DEVICES, GPUs) group, all on the state directory ``state``:
    [(process, url, log path)]."""
    servers = []
    for visible, gpus in groups:
        port = free_port()
        command = [sys.executable, "-m", "wan_i2v", "serve", "--ckpt-dir", str(ckpt), "--state-dir", str(state), "--port", str(port),
                   "--device", device, "--max-queue", "100", *extra]  # fmt: skip
        # The servers import this tree's package, installed or not (as this script does through sys.path).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = visible
            command += ["--gpus", str(gpus)]
        log_path = log_dir / f"{name}-{visible.replace(',', '')}.log"
        with open(log_path, "w") as log:
            servers.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), f"http://127.0.0.1:{port}", log_path))
    started = time.perf_counter()
    for process, url, log_path in servers:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"a server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if httpx2.get(f"{url}/health", timeout=5).json()["status"] == "ready":
                    break
            except (httpx2.HTTPError, ValueError):
                pass
            time.sleep(0.5)
    print(f"{name}: ready in {time.perf_counter() - started:.0f} s", flush=True)
    return servers


def stop_servers(servers) -> None:
    for process, _, _ in servers:
        process.terminate()
    for process, _, _ in servers:
        process.wait(timeout=120)


def shape_of(size: str) -> tuple[int, int]:
    """(height, width) of the size's landscape picture (``720P``, ``480P`` or ``H*W``)."""
    return {"720P": (720, 1280), "480P": (480, 832)}.get(size) or tuple(map(int, size.split("*")))


def image_bytes(size: str) -> bytes:
    """The demo picture at the size's landscape shape, as a PNG."""
    from wan_i2v.video import demo_image

    height, width = shape_of(size)
    buffer = io.BytesIO()
    demo_image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def time_mp4_encode(size: str, frames: int) -> float:
    """Seconds to encode one video of the size (the demo picture, drifting) with ``write_mp4``."""
    import torch

    from wan_i2v.models.spec import spec_for
    from wan_i2v.video import image_to_tensor, load_image, write_mp4

    picture = image_to_tensor(load_image(image_bytes(size)))
    video = torch.stack([picture.roll(n, dims=2) for n in range(frames)], dim=1)  # [3, F, H, W]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        write_mp4(video, Path(folder) / "clip.mp4", fps=spec_for().fps)
        return round(time.perf_counter() - started, 2)


def job_fields(size: str, frames: int, recipe: str, seed: int, steps: int | None = None) -> dict:
    fields = {"prompt": PROMPT, "size": size, "frame_num": str(frames), **RECIPES[recipe], "seed": str(seed)}
    return fields if steps is None else {**fields, "steps": str(steps)}


def run_jobs(url: str, fields_list: list[dict], image: bytes) -> tuple[float, list[dict]]:
    """Submit every job at once; (seconds until the last completes, the finished jobs)."""
    with httpx2.Client(base_url=url, timeout=60) as client:
        started = time.perf_counter()
        ids = []
        for fields in fields_list:
            answer = client.post("/v1/videos", files={"input_reference": ("image.png", image, "image/png")}, data=fields)
            answer.raise_for_status()
            ids.append(answer.json()["id"])
        pending, done = set(ids), {}
        while pending:
            for job_id in list(pending):
                job = client.get(f"/v1/videos/{job_id}").json()
                if job["status"] in ("completed", "failed", "cancelled"):
                    if job["status"] != "completed":
                        raise RuntimeError(f"{job_id} {job['status']}: {job['error']}")
                    done[job_id] = job
                    pending.discard(job_id)
            time.sleep(0.2)
        return time.perf_counter() - started, [done[i] for i in ids]


def pipeline_alone(ckpt: str, device: str, size: str, frames: int, seeds: list[int], folder: str) -> list[dict]:
    """In a process of its own: the session ``wan-i2v serve --distilled`` opens, a warm-up job, then a
    job per seed as ``wan-i2v generate`` runs it; each job's seconds (``generate``, its stages, then
    ``write_mp4``) and its mp4's path."""
    import torch

    from wan_i2v.commands.common import keep_compiled_code
    from wan_i2v.config import parse_size
    from wan_i2v.models.spec import spec_for
    from wan_i2v.session import RunOptions, RunSession
    from wan_i2v.video import load_image, write_mp4

    keep_compiled_code()  # as serve and generate do
    max_area, _ = parse_size(size)
    height, width = spec_for().video_size(720, 1280, max_area)  # what serve plans for
    image = load_image(image_bytes(size))
    recipe = {"solver": "euler", "steps": 4, "guide_scale": (1.0, 1.0), "shift": 5.0}
    settings = {"negative_prompt": None, "max_area": max_area, "frame_num": frames, **recipe}
    folder = Path(folder)
    rows = []
    with RunSession.open(RunOptions(ckpt_dir=ckpt, device=device, gpus=1), height=height, width=width, frame_num=frames, guided=False) as session:
        session.generate(image, PROMPT, **{**settings, "steps": WARM_UP_STEPS}, seed=0, progress=False)
        for seed in seeds:
            video_file, state_file, latents_file = (folder / f"pipeline-{seed}{suffix}" for suffix in (".mp4", ".state.pt", ".latents.pt"))
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = session.generate(image, PROMPT, **settings, seed=seed, progress=False, state_file=state_file, latents_file=latents_file)
            generated = time.perf_counter()
            write_mp4(result.video, video_file, fps=spec_for().fps, metadata=result.metadata)
            written = time.perf_counter()
            latents_file.unlink(missing_ok=True)
            state_file.unlink(missing_ok=True)
            rows.append({"seed": seed, "generate": generated - started, "write_mp4": written - generated, "stages": result.timings, "mp4": str(video_file)})
    return rows


def server_jobs(url: str, log_path: Path, size: str, frames: int, seeds: list[int], folder: Path) -> list[dict]:
    """The warm-up job, then one job per seed submitted over HTTP, one at a time: seconds from the
    submission until it shows completed and until its mp4 is downloaded; the server's own timings."""
    image = image_bytes(size)
    run_jobs(url, [job_fields(size, frames, "distilled", 0, WARM_UP_STEPS)], image)
    rows = []
    with httpx2.Client(base_url=url, timeout=60) as client:
        for seed in seeds:
            started = time.perf_counter()
            answer = client.post("/v1/videos", files={"input_reference": ("image.png", image, "image/png")}, data=job_fields(size, frames, "distilled", seed))
            answer.raise_for_status()
            job_id = answer.json()["id"]
            while (job := client.get(f"/v1/videos/{job_id}").json())["status"] in ("queued", "in_progress"):
                time.sleep(POLL_SECONDS)
            visible = time.perf_counter()
            if job["status"] != "completed":
                raise RuntimeError(f"{job_id} {job['status']}: {job['error']}")
            content = client.get(f"/v1/videos/{job_id}/content")
            content.raise_for_status()
            downloaded = time.perf_counter()
            video_file = folder / f"server-{seed}.mp4"
            video_file.write_bytes(content.content)
            rows.append({"seed": seed, "id": job_id, "submitted_to_completed": visible - started, "submitted_to_downloaded": downloaded - started, "mp4": str(video_file)})
    logged = {}
    for line in log_path.read_text().splitlines():
        if found := TIMINGS_LINE.search(line):
            logged[found[1]] = {stage: float(seconds) for stage, seconds in re.findall(r"(.+?) ([\d.]+) s(?:, |$)", found[2])}
    for row in rows:
        row["server"] = logged.get(row["id"], {})
    return rows


def measure_overhead(args, log_dir: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="serve-overhead-"))
    seeds = [100 + n for n in range(args.jobs)]
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as alone:  # its GPU memory freed when it ends
        pipeline = alone.submit(pipeline_alone, str(args.ckpt), args.device, args.size, args.frames, seeds, str(folder)).result()
    print(f"the pipeline alone: {time.perf_counter() - started:.0f} s", flush=True)
    servers = start_servers(args.ckpt, folder / "state", [("0", 1)], ["--distilled", "--size", args.size, "--frame-num", str(args.frames)],
                            args.device, log_dir, "overhead")  # fmt: skip
    try:
        served = server_jobs(servers[0][1], servers[0][2], args.size, args.frames, seeds, folder)
    finally:
        stop_servers(servers)
    jobs = []
    for alone_job, server_job in zip(pipeline, served):
        row = {
            "seed": alone_job["seed"],
            "pipeline_generate": round(alone_job["generate"], 3),
            "pipeline_write_mp4_after": round(alone_job["write_mp4"], 3),
            "server_to_completed": round(server_job["submitted_to_completed"], 3),
            "server_to_downloaded": round(server_job["submitted_to_downloaded"], 3),
            "overhead": round(server_job["submitted_to_downloaded"] - alone_job["generate"], 3),
            "pipeline_stages": {stage: round(seconds, 3) for stage, seconds in alone_job["stages"].items()},
            "server_stages": server_job["server"],
            "same_mp4_bytes": Path(alone_job["mp4"]).read_bytes() == Path(server_job["mp4"]).read_bytes(),
        }
        print(json.dumps(row), flush=True)
        jobs.append(row)
    mean = sum(job["overhead"] for job in jobs) / len(jobs)
    print(f"the server's overhead per job: {mean:.2f} s on average (submitted -> mp4 downloaded, less the pipeline's generate)", flush=True)
    return {"size": args.size, "frames": args.frames, "recipe": "distilled", "jobs": jobs, "mean_overhead": round(mean, 3)}


def measure_layout(layout: str, recipes: list[str], args, log_dir: Path) -> list[dict]:
    """Every recipe's rows for one layout. The one-GPU servers' plan does not depend on guidance, so
    they serve both recipes; the two-GPU server is started for each (CFG parallel or Ulysses)."""
    rows = []
    groups = [("0,1", 2)] if layout == "2gpu" else [("0", 1), ("1", 1)]
    for group in [recipes] if layout == "1gpu+1gpu" else [[recipe] for recipe in recipes]:
        state = Path(tempfile.mkdtemp(prefix=f"serve-{layout}-"))
        guided = "40 steps" in group
        servers = start_servers(args.ckpt, state, groups, [] if guided else ["--distilled"], args.device, log_dir, f"{layout}-{'guided' if guided else 'distilled'}")
        url = servers[0][1]  # the servers share the queue: any of them takes the jobs
        jobs = len(servers) * args.jobs_per_server  # every GPU busy
        try:
            for recipe in group:
                for size in args.sizes:
                    image = image_bytes(size)
                    steps = 4 if recipe == "distilled" else args.probe_steps
                    # Warm-up, as many steps as measured: every server compiles, for each expert the steps reach.
                    run_jobs(url, [job_fields(size, args.frames, recipe, s, steps) for s in range(jobs)], image)
                    seconds, done = run_jobs(url, [job_fields(size, args.frames, recipe, 100 + n, steps) for n in range(jobs)], image)
                    step_seconds = sum(job["seconds_per_step"] for job in done) / jobs
                    computed = recipe != "distilled"
                    if computed:  # each server's job goes on to 40 steps at the rate it measured
                        seconds += (40 - args.probe_steps) * step_seconds
                    row = {"layout": layout, "recipe": recipe, "size": size, "jobs": jobs, "seconds": round(seconds, 1),
                           "seconds_per_step": round(step_seconds, 2), "jobs_per_hour": round(jobs * 3600 / seconds, 1), "computed": computed}  # fmt: skip
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            stop_servers(servers)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="a full-size checkpoint (written there once if missing)")
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU: a check of this script")
    parser.add_argument("--size", default=None, help="the overhead's video size (default 720P; --tiny: 96*160)")
    parser.add_argument("--frames", type=int, default=None, help="frames a video (default 81; --tiny: 5)")
    parser.add_argument("--jobs", type=int, default=1, help="the overhead's jobs (each run alone, then through the server)")
    parser.add_argument("--layouts", nargs="+", default=[], choices=["2gpu", "1gpu+1gpu"], help="measure jobs per hour of these layouts instead")
    parser.add_argument("--sizes", nargs="+", default=["480P", "720P"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--probe-steps", type=int, default=3)
    parser.add_argument("--jobs-per-server", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        from wan_i2v.tiny import write_tiny_checkpoint

        args.ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
        args.sizes = ["96*160"]
    elif args.ckpt is None or not args.ckpt.exists():
        from multi_gpu import write_random_checkpoint

        args.ckpt = write_random_checkpoint(args.ckpt or Path(tempfile.mkdtemp()) / "wanckpt", 40)
        import torch

        torch.cuda.empty_cache()  # the weights were drawn on the GPU: its memory is the runs' now
    args.size = args.size or ("96*160" if args.tiny else "720P")
    args.frames = args.frames or (5 if args.tiny else 81)
    log_dir = Path(tempfile.mkdtemp(prefix="serve-logs-"))
    report = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "logs": str(log_dir)}
    if args.layouts:
        report["mp4_encode_seconds"] = {size: time_mp4_encode(size, args.frames) for size in args.sizes}
        print(f"mp4 encoding, {args.frames} frames: {report['mp4_encode_seconds']}", flush=True)
        report["rows"] = [row for layout in args.layouts for row in measure_layout(layout, args.recipes, args, log_dir)]
    else:
        report["overhead"] = measure_overhead(args, log_dir)
    import torch

    report.update(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
