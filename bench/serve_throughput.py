"""Jobs per hour through `wan-i2v serve`: one server on two GPUs against two one-GPU servers sharing
one queue, at 480P and 720P, with the distilled 4-step recipe and with the default 40 steps.

    python bench/serve_throughput.py [--ckpt /tmp/wanckpt] [--sizes 480P 720P] [--probe-steps 2] [--jobs-per-server 1] [--json FILE]

The servers are real `wan-i2v serve` processes on the full-size random checkpoint of
``multi_gpu.py`` (written once), driven over HTTP as a client would. Each layout's servers start,
load, and run warm-up jobs per size and recipe with the steps measured (they compile; not counted); then for each case
``--jobs-per-server`` jobs per server are submitted at once (every GPU busy) and timed from the
submission to the last completion: jobs per hour = jobs x 3600 / that time. With more than one job
per server, a server's next job runs while the last one's mp4 is encoded, as in a busy queue. The
mp4 encoding of one video of each size on this machine's CPU is timed first. The two-GPU server is started once per recipe, since its
plan depends on guidance (CFG parallel with it, Ulysses without); the one-GPU servers serve both.

40 steps at 720P take about 15 minutes a video on one H200: the 40-step rows run ``--probe-steps``
steps and add the remaining steps at the seconds per step the server measured for those jobs
(``seconds_per_step``, steps after the first): computed, not run to the end, and marked so.
``--device cpu`` runs it all on a tiny checkpoint (a check of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RECIPES = {
    "distilled": {"solver": "euler", "steps": "4", "guide_scale": "1", "shift": "5"},
    "40 steps": {"solver": "unipc", "guide_scale": "3.5"},  # steps: --probe-steps, extrapolated to 40
}
PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_servers(ckpt: Path, state: Path, layout: str, recipe: str, device: str, log_dir: Path) -> list[tuple[subprocess.Popen, str]]:
    """The layout's servers, loaded and ready: "2gpu" is one server on both GPUs, "1gpu+1gpu" one per GPU."""
    guided = recipe != "distilled"
    groups = [("0,1", 2)] if layout == "2gpu" else [("0", 1), ("1", 1)]
    servers = []
    for visible, gpus in groups:
        port = free_port()
        command = [sys.executable, "-m", "wan_i2v", "serve", "--ckpt-dir", str(ckpt), "--state-dir", str(state), "--port", str(port),
                   "--device", device, "--max-queue", "100"] + ([] if guided else ["--distilled"])  # fmt: skip
        env = dict(os.environ)
        if device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = visible
            command += ["--gpus", str(gpus)]
        log = open(log_dir / f"{layout}-{recipe.replace(' ', '')}-{visible.replace(',', '')}.log", "w")
        servers.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), f"http://127.0.0.1:{port}"))
    started = time.perf_counter()
    for process, url in servers:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"a server exited ({process.returncode}); see {log_dir}")
            try:
                if httpx2.get(f"{url}/health", timeout=5).json()["status"] == "ready":
                    break
            except (httpx2.HTTPError, ValueError):
                pass
            time.sleep(0.5)
    print(f"{layout} ({recipe}): ready in {time.perf_counter() - started:.0f} s", flush=True)
    return servers


def image_bytes(size: str) -> bytes:
    """The demo picture at the size's landscape shape (``720P``, ``480P`` or ``H*W``)."""
    from wan_i2v.video import demo_image

    height, width = {"720P": (720, 1280), "480P": (480, 832)}.get(size) or map(int, size.split("*"))

    buffer = io.BytesIO()
    demo_image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def time_mp4_encode(size: str, frames: int) -> float:
    """Seconds to encode one video of the size (the demo picture, drifting) as the server does."""
    import torch

    from wan_i2v.config import FPS
    from wan_i2v.video import load_image, write_mp4

    picture = torch.from_numpy(__import__("numpy").asarray(load_image(image_bytes(size)))).permute(2, 0, 1).float() / 127.5 - 1
    video = torch.stack([picture.roll(n, dims=2) for n in range(frames)], dim=1)  # [3, F, H, W]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        write_mp4(video, Path(folder) / "clip.mp4", fps=FPS)
        return round(time.perf_counter() - started, 2)


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


def measure(layout: str, recipes: list[str], args, log_dir: Path) -> list[dict]:
    """Every recipe's rows for one layout. The one-GPU servers' plan does not depend on guidance, so
    they serve both recipes; the two-GPU server is started for each (CFG parallel or Ulysses)."""
    rows = []
    for group in [recipes] if layout == "1gpu+1gpu" else [[recipe] for recipe in recipes]:
        state = Path(tempfile.mkdtemp(prefix=f"serve-{layout}-"))
        servers = start_servers(args.ckpt, state, layout, "40 steps" if "40 steps" in group else "distilled", args.device, log_dir)
        url = servers[0][1]  # the servers share the queue: any of them takes the jobs
        jobs = len(servers) * args.jobs_per_server  # every GPU busy
        try:
            for recipe in group:
                for size in args.sizes:
                    image = image_bytes(size)
                    steps = "4" if recipe == "distilled" else str(args.probe_steps)
                    fields = {"prompt": PROMPT, "size": size, "frame_num": str(args.frames), **RECIPES[recipe], "steps": steps}
                    # Warm-up, as many steps as measured: every server compiles, for each expert the steps reach.
                    run_jobs(url, [{**fields, "seed": str(s)} for s in range(jobs)], image)
                    seconds, done = run_jobs(url, [{**fields, "seed": str(100 + n)} for n in range(jobs)], image)
                    step_seconds = sum(job["seconds_per_step"] for job in done) / jobs
                    computed = recipe != "distilled"
                    if computed:  # each server's job goes on to 40 steps at the rate it measured
                        seconds += (40 - args.probe_steps) * step_seconds
                    row = {"layout": layout, "recipe": recipe, "size": size, "jobs": jobs, "seconds": round(seconds, 1),
                           "seconds_per_step": round(step_seconds, 2), "jobs_per_hour": round(jobs * 3600 / seconds, 1), "computed": computed}  # fmt: skip
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            for process, _ in servers:
                process.terminate()
            for process, _ in servers:
                process.wait(timeout=120)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="a full-size checkpoint (written there once if missing)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--sizes", nargs="+", default=["480P", "720P"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--layouts", nargs="+", default=["2gpu", "1gpu+1gpu"], choices=["2gpu", "1gpu+1gpu"])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--probe-steps", type=int, default=3)
    parser.add_argument("--jobs-per-server", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cpu":  # a check of the script: the tiny checkpoint, tiny videos
        from wan_i2v.tiny import write_tiny_checkpoint

        args.ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
        args.sizes, args.frames = ["96*160"], 5
    elif args.ckpt is None or not args.ckpt.exists():
        from multi_gpu import write_random_checkpoint

        args.ckpt = write_random_checkpoint(args.ckpt or Path(tempfile.mkdtemp()) / "wanckpt", 40)
    log_dir = Path(tempfile.mkdtemp(prefix="serve-logs-"))
    encode_seconds = {size: time_mp4_encode(size, args.frames) for size in args.sizes}
    print(f"mp4 encoding, {args.frames} frames: {encode_seconds}", flush=True)
    rows = [row for layout in args.layouts for row in measure(layout, args.recipes, args, log_dir)]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__, "command": " ".join(sys.argv),
              "mp4_encode_seconds": encode_seconds, "rows": rows}  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
