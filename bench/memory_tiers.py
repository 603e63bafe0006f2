"""The memory tiers as users run them: `wan-i2v generate` under a GPU cap and a host cap, per row.

    python bench/memory_tiers.py [--ckpt /tmp/wanckpt] [--rows default swap blocks disk 480p second cold] [--json FILE]

Each row runs the CLI in a process of its own (720P, 81 frames, ``--distilled --no-lightning``: no LoRA, seed 0, a full-size
random checkpoint in the official layout, ``multi_gpu.py``'s, written once) with ``--gpu-memory G``
(the run plans for G GiB and caps its allocator there) and ``--host-memory H``, inside a cgroup v2
whose ``memory.max`` is H GiB (page cache included; where the machine has no cgroup v2 the row runs
uncapped and says so). Before each row the page cache is dropped and, but for the cold rows, the
checkpoint read once from inside the row's cgroup: the cache then holds what a machine of that size
keeps of it (all of it only where it fits beside the run). It reports the wall time, the summary's loading, time to first step and
seconds per step after the first, the GPU peak against the estimate `--dry-run` prints, the host
peak (the process tree's anonymous + shared memory, sampled every 0.1 s: what cannot be reclaimed,
pinned memory included) against its estimate, and whether the latents equal the first row's (the
JSON also has the cgroup's peak, which counts the page cache the row's warm-up read, and the page
cache's counters: ``refaulted_gib``, what the run read again after the cache had let it go).

Rows: ``default`` (80 GiB GPU, 32 GiB host), ``swap`` (48/40: one expert on the GPU), ``blocks``
(24/32: blocks streamed; the page cache holds most of an expert), ``blocks-cached`` (the same with the
whole checkpoint in the page cache: the streaming's own cost, without the disk), ``blocks-eager`` (the same without torch.compile), ``blocks-expandable`` (PyTorch's allocator with expandable segments: no
retries that free cached memory under the cap), ``disk`` (24/16: the page cache
holds little of an expert, so most blocks come from the disk), ``480p`` (12/16: the text encoder's
blocks stream too; its reference ``480p-resident`` at 80/32), ``second`` (the
default row again: a new process whose compile comes from the cache; ``second-1-compile-thread``
the same with inductor's compile workers off, ``eager`` without torch.compile: the first step's
cost that is not compiling), ``cold`` (the default row with nothing in the page cache: loading
against the disk's sequential read time of the bytes read). With ``--fp8``: ``fp8`` (both experts
on the GPU, the reference of the rows below), ``blocks-fp8-converting`` (the first streamed run,
which writes the converted copy), ``blocks-fp8``, ``disk-fp8``, ``swap-fp8`` (streaming the copy).
Each row's latents are compared with its reference row's (``default`` or ``fp8``), also one run by an
earlier call on the same machine: the rows so far are kept in ``--work``'s ``report.json`` (remove it to start afresh).
The disk's rate is measured with ``dd`` from a shard after dropping the caches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wan_i2v.models.spec import WAN22_I2V_A14B as A14B  # noqa: E402
PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."
# name -> (size, GPU GiB, host GiB, how the page cache starts: "group" (the checkpoint read once from inside
# the row's cgroup: what a machine of that size keeps of it), "machine" (read from outside: all of it,
# as on a machine with the RAM to hold it), "cold" (empty); more options; environment; the row whose latents it must equal)
ROWS = {
    "default": ("720P", 80, 32, "group", [], {}, None),
    "swap": ("720P", 48, 40, "group", [], {}, "default"),
    "blocks": ("720P", 24, 32, "group", [], {}, "default"),
    "disk": ("720P", 24, 16, "group", [], {}, "default"),
    "blocks-cached": ("720P", 24, 32, "machine", [], {}, "default"),
    "blocks-eager": ("720P", 24, 32, "group", ["--no-compile"], {}, "default"),
    "blocks-expandable": ("720P", 24, 32, "group", [], {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "default"),
    "480p-resident": ("480P", 80, 32, "group", [], {}, None),
    "480p": ("480P", 12, 16, "group", [], {}, "480p-resident"),
    "second": ("720P", 80, 32, "machine", [], {}, "default"),
    "second-1-compile-thread": ("720P", 80, 32, "machine", [], {"TORCHINDUCTOR_COMPILE_THREADS": "1"}, "default"),
    "eager": ("720P", 80, 32, "machine", ["--no-compile"], {}, None),
    "cold": ("720P", 80, 32, "cold", [], {}, "default"),
    # --fp8: the reference has both experts on the GPU; the first streamed run writes the converted
    # copy (loading/converted.py), the next ones stream it.
    "fp8": ("720P", 80, 32, "group", ["--fp8"], {}, None),
    "blocks-fp8-converting": ("720P", 24, 32, "group", ["--fp8"], {}, "fp8"),
    "blocks-fp8": ("720P", 24, 32, "group", ["--fp8"], {}, "fp8"),
    "disk-fp8": ("720P", 24, 16, "group", ["--fp8"], {}, "fp8"),
    "swap-fp8": ("720P", 48, 40, "group", ["--fp8"], {}, "fp8"),
}
CGROUP = Path("/sys/fs/cgroup")


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def disk_read_rate(path: Path) -> float | None:
    """GB/s of a sequential read of ``path`` from the disk (the page cache dropped first), or None."""
    if not drop_caches():
        return None
    started = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M"], check=True, capture_output=True)
    return path.stat().st_size / (time.perf_counter() - started) / 1e9


def warm(paths, group: Path | None) -> None:
    """Read the checkpoint through the page cache from inside the row's cgroup: its pages are charged
    to the group, so the cache then holds what a machine of that size keeps of it after one read."""
    for path in paths:
        subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL, preexec_fn=_joiner(group))


def _joiner(group: Path | None):
    return (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group is not None else None


def checkpoint_files(root: Path) -> list[Path]:
    """Each distinct file the run reads (the low-noise expert's shards are hard links to the high-noise ones')."""
    seen, files = set(), []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.stat().st_ino not in seen:
            seen.add(path.stat().st_ino)
            files.append(path)
    return files


class Sampler(threading.Thread):
    """The peak of anonymous + shared resident memory over a process and its children."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
        return pids

    def run(self):
        while self.running:
            total = 0
            for pid in self.tree():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for key in ("RssAnon", "RssShmem"):
                    match = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
                    total += int(match.group(1)) * 1024 if match else 0
            self.peak = max(self.peak, total)
            time.sleep(0.1)


def cgroup_for(name: str, host_gib: float) -> Path | None:
    if not (CGROUP / "cgroup.controllers").is_file():
        return None
    group = CGROUP / f"wan-bench-{name}"
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(f"{int(host_gib * 2**30)}\n")
    return group


# The page cache's side of a row (cgroup v2 memory.stat): what the group's cache holds, and how many
# of its pages were read again after the kernel had reclaimed them (a refault: the cache was too
# small for what the run reads over and over, such as the streamed blocks each step).
CACHE_STATS = ("file", "active_file", "inactive_file", "workingset_refault_file", "workingset_activate_file", "pgmajfault")


def cgroup_stats(group: Path) -> dict[str, int]:
    stats = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    return {key: int(stats[key]) for key in CACHE_STATS if key in stats}


def run_row(name: str, args, image: Path, files: list[Path]) -> dict:
    size, gpu, host, cold, options, env, _ = ROWS[name]
    out = args.work / f"{name}.mp4"
    latents = args.work / f"{name}.latents.pt"
    # (a row cut short leaves its state file: the same row run again would resume from it, not be timed)
    for path in (out, latents, out.with_suffix(".state.pt")):
        path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "wan_i2v.cli", "generate", "--ckpt-dir", str(args.ckpt), "--image", str(image), "--prompt", PROMPT,
               "--distilled", "--no-lightning", "--seed", "0", "--host-memory", str(host), "--save-file", str(out), "--save-latents", str(latents)]  # fmt: skip
    command += ["--size", "64*96", "--frame-num", "9", "--device", "cpu"] if args.tiny else ["--size", size, "--gpu-memory", str(gpu)]
    command += options
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
                   "WAN_I2V_HOME": str(args.work / "home"), **env}  # fmt: skip
    dry = subprocess.run(command + ["--dry-run"], capture_output=True, text=True, env=environment)
    estimate = {"plan": _line(dry.stdout, "plan:"), "gpu": _gib(_line(dry.stdout, "memory:")), "host": _gib(_line(dry.stdout, "host memory:"))}
    group = cgroup_for(name, host)
    drop_caches()
    if cold != "cold":  # the converted copies last: the ones read while the cache filled up are the ones it keeps
        warm(files + sorted((args.work / "home" / "converted").glob("*/*.safetensors")), group if cold == "group" else None)
    cache_before = cgroup_stats(group) if group is not None else {}
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, preexec_fn=_joiner(group))
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    (args.work / f"{name}.log").write_text(stderr)  # the run's own words (its summary, warnings, TORCH_LOGS)
    wall = time.perf_counter() - started
    sampler.running = False
    row = {"size": size, "gpu_cap_gib": gpu, "host_cap_gib": host, "cgroup": group is not None, "returncode": proc.returncode, "wall_s": wall,
           "plan": estimate["plan"], "gpu_estimate_gib": estimate["gpu"], "host_estimate_gib": estimate["host"], "host_peak_gib": sampler.peak / 2**30}  # fmt: skip
    if group is not None:
        row["cgroup_peak_gib"] = int((group / "memory.peak").read_text()) / 2**30 if (group / "memory.peak").is_file() else None
        events = (group / "memory.events").read_text()
        row["oom_kills"] = int(re.search(r"oom_kill (\d+)", events).group(1))
        after = cgroup_stats(group)
        row["page_cache"] = {"before": cache_before, "after": after,
                             "refaulted_gib": (after.get("workingset_refault_file", 0) - cache_before.get("workingset_refault_file", 0)) * os.sysconf("SC_PAGE_SIZE") / 2**30}  # fmt: skip
    if proc.returncode != 0:
        row["error"] = stderr.strip().splitlines()[-3:]
        return row
    timings = {stage.strip(): float(seconds) for stage, seconds in re.findall(r"([a-z ]+) ([\d.]+)s", _line(stderr, "time:").partition(":")[2])}
    row["timings"] = timings
    row["loading_s"] = timings.get("loading")
    steps = re.search(r"first step ([\d.]+)s, then ([\d.]+)s a step", stderr)
    row["first_step_s"], row["step_s"] = (float(steps.group(1)), float(steps.group(2))) if steps else (None, None)
    each = re.search(r"; each ([\d., ]+)s\)", stderr)
    row["steps_s"] = [float(value) for value in each.group(1).split(", ")] if each else None
    streamed = re.search(r"streamed while denoising: ([\d.]+) GB of weights, read in ([\d.]+)s \(the reads waited ([\d.]+)s for free slots\); "
                         r"the host waited ([\d.]+)s for them(?:; the GPU waited ([\d.]+)s for their copies, the blocks computed for ([\d.]+)s)?"
                         r"(?:; (\d+) GPU allocator retries)?", stderr)  # fmt: skip
    if streamed:
        names = ("streamed_gb", "read_s", "slot_wait_s", "read_wait_s", "copy_wait_s", "blocks_computing_s")
        row |= {name: float(value) for name, value in zip(names, streamed.groups()) if value is not None} | {"allocator_retries": int(streamed.group(7) or 0)}
    first = re.search(r"first step done ([\d.]+)s after start", stderr)
    row["time_to_first_step_s"] = float(first.group(1)) if first else None
    row["gpu_peak_gib"] = _gib(_line(stderr, "peak GPU memory:"))
    row["gpu_stage_peaks"] = _line(stderr, "peak GPU memory:").partition("(")[2].rstrip(")")
    row["latents"] = str(latents)
    row["converted_gb"] = sum(path.stat().st_size for path in (args.work / "home" / "converted").glob("*/*.safetensors")) / 1e9
    return row


def _line(text: str, prefix: str) -> str:
    return next((line for line in text.splitlines() if line.startswith(prefix)), "")


def _gib(line: str) -> float | None:
    match = re.search(r"([\d.]+) GiB", line.split("peak", 1)[-1]) if line else None
    return float(match.group(1)) if match else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/wanckpt"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/wan-tiers"))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a check of this script on the CPU with the tiny checkpoint, not a measurement")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "torch": torch.__version__,
              "device": "cpu" if args.tiny else torch.cuda.get_device_name(), "rows": {}}  # fmt: skip
    # A run split over several calls adds its rows to the earlier ones: from --json, or from the copy kept
    # in --work (a device's output folder may be emptied between calls while the machine keeps /tmp).
    kept = args.work / "report.json"
    earlier = next((path for path in (args.json, kept) if path is not None and path.is_file()), None)
    if earlier is not None:
        report = json.loads(earlier.read_text())
        report["command"] += " ; " + " ".join(sys.argv)
    if args.tiny and not (args.ckpt / A14B.files.tokenizer_dir).is_dir():
        from wan_i2v.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(args.ckpt)
    if not (args.ckpt / A14B.files.tokenizer_dir).is_dir():
        sys.path.insert(0, str(ROOT / "bench"))
        from multi_gpu import write_random_checkpoint

        write_random_checkpoint(args.ckpt, 40)
    files = checkpoint_files(args.ckpt)
    report["checkpoint_gb"] = sum(path.stat().st_size for path in files) / 1e9
    if "disk_gb_s" not in report:
        shard = max(files, key=lambda path: path.stat().st_size)
        report["disk_gb_s"] = disk_read_rate(shard)
        print(f"disk: {report['disk_gb_s']} GB/s sequential ({shard.name})", flush=True)
    image = args.work / "input.png"
    from wan_i2v.video import demo_image

    demo_image().resize((1280, 720)).save(image)
    for name in args.rows:
        row = run_row(name, args, image, files)
        reference_row = ROWS[name][-1]
        reference = report["rows"].get(reference_row, {}).get("latents")
        if row.get("latents") and reference and Path(reference).is_file():  # (a reference of an earlier machine may be gone)
            row[f"latents_equal_{reference_row}"] = bool(torch.equal(torch.load(row["latents"])["latents"], torch.load(reference)["latents"]))
        if name == "cold" and row.get("loading_s") and report.get("disk_gb_s"):
            row["disk_read_s"] = report["checkpoint_gb"] / report["disk_gb_s"]
        report["rows"][name] = row
        print(f"{name}: " + json.dumps({k: v for k, v in row.items() if k != "timings"}), flush=True)
        for path in filter(None, (args.json, kept)):
            path.write_text(json.dumps(report, indent=2))
    print("\nrow | plan | wall | loading | first step at | s/step (vs its reference) | GPU peak / est | host peak / est | latents")
    for name, row in report["rows"].items():
        reference_row = ROWS[name][-1] or name
        resident = report["rows"].get(reference_row, {}).get("step_s")
        ratio = f" ({row['step_s'] / resident:.3f})" if resident and row.get("step_s") else ""
        print(f"{name} | {row.get('plan')} | {row['wall_s']:.1f} | {row.get('loading_s')} | {row.get('time_to_first_step_s')} | {row.get('step_s')}{ratio} | "
              f"{row.get('gpu_peak_gib')} / {row.get('gpu_estimate_gib')} | {row['host_peak_gib']:.1f} / {row.get('host_estimate_gib')} | "
              f"{row.get(f'latents_equal_{reference_row}', row.get('error'))}")  # fmt: skip


if __name__ == "__main__":
    main()
