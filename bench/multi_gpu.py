"""Plans on one and several GPUs, through the real loaders and the real API, on one machine.

    python bench/multi_gpu.py --sizes 720P 480P [--plans ...] [--layers 40] [--json FILE]

A full-size checkpoint with random weights is written to disk once (``--ckpt DIR`` reuses it;
``--layers 2`` writes a full-width one with few blocks), in the official layout: every process
then reads the same weights through the loaders users run, and loading is timed from the page
cache. The second expert's files are hard links to the first's (the run switches experts as
usual; the weights are alike). Each plan runs in processes of its own, started as ``--gpus N``
starts them, with the plan chosen (or forced) as the CLI chooses it; each rank:

- loads the pipeline (seconds, and host memory: peak resident and anonymous, per rank);
- runs ``generate`` once with one step (compiles), then with ``--steps`` steps, reported:
  seconds per denoising step, each stage's seconds and peak GPU memory (the largest over the
  ranks) against the planner's estimate for that stage, and the latents against the one-GPU plan.

``cap`` plans run under ``torch.cuda.set_per_process_memory_fraction`` (a smaller card) and let
the planner choose, as ``--gpus N`` does with no other flag. ``--device cpu`` runs it on CPU
processes with a tiny checkpoint (a check of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wan_i2v.models.spec import WAN22_I2V_A14B as A14B  # noqa: E402
from wan_i2v.parallel.launch import launch  # noqa: E402
from wan_i2v.parallel.plan import GiB  # noqa: E402
from wan_i2v.session import RunOptions, plan_for  # noqa: E402
from wan_i2v.video import demo_image  # noqa: E402

PROMPT = "A white cat wearing sunglasses sits on a surfboard, relaxed posture, slight head movements, beach, natural sunlight."
# name -> (GPUs, forced plan as RunOptions takes it, memory cap in GiB or None)
PLANS = {
    "1gpu": (1, {}, None),
    "default": (2, {}, None),
    "cfg-fsdp": (2, dict(cfg_parallel=True, fsdp=True), None),
    "cfg-fsdp-offload": (2, dict(cfg_parallel=True, fsdp=True, offload="experts"), None),
    "ulysses": (2, dict(ulysses=2), None),
    "ulysses-fsdp": (2, dict(ulysses=2, fsdp=True), None),
    "cap44": (2, {}, 44.0),
    "cap22": (2, {}, 22.0),
}


def write_random_checkpoint(directory: Path, layers: int, text_layers: int | None = None, device: str = "cuda") -> Path:
    """The official layout at full width with random weights, made on ``device`` (the GPU: fast) and
    saved: the DiT with ``layers`` blocks (both experts the same), umT5-XXL (with ``text_layers``
    layers, its config then saved beside it), the Wan2.1 VAE. It is written beside ``directory`` and
    renamed to it once whole: the benches reuse a checkpoint that exists, and one cut short is none."""
    from common import random_model
    from dataclasses import asdict

    from wan_i2v.models.dit import DiT, DiTConfig, keeps_fp32
    from wan_i2v.models.spec import T5_CONFIG_FILE
    from wan_i2v.models.text_encoder import T5Config, build_umt5
    from wan_i2v.models.vae import VAEConfig, WanVAE
    from wan_i2v.tiny import save_dit, save_text_encoder, write_tiny_tokenizer

    started = time.perf_counter()
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a run cut short
    partial.mkdir(parents=True)
    expert = random_model(lambda: DiT(replace(DiTConfig(), num_layers=layers)), torch.bfloat16, keeps_fp32, seed=0, device=device).cpu()
    save_dit(expert, partial / A14B.experts[0].folder, shards=4)
    del expert
    low = partial / A14B.experts[1].folder
    low.mkdir()
    for path in (partial / A14B.experts[0].folder).iterdir():
        os.link(path, low / path.name)
    t5_config = T5Config() if text_layers is None else T5Config(encoder_layers=text_layers)
    save_text_encoder(random_model(lambda: build_umt5(t5_config), torch.bfloat16, seed=2, device=device), partial / A14B.files.text_encoder)
    if text_layers is not None:
        (partial / T5_CONFIG_FILE).write_text(json.dumps(asdict(t5_config)))
    torch.save({k: v.cpu() for k, v in random_model(lambda: WanVAE(VAEConfig()), torch.float32, seed=3, device=device).state_dict().items()},
               partial / A14B.files.vae)  # fmt: skip
    write_tiny_tokenizer(partial / A14B.files.tokenizer_dir, t5_config.vocab_size)
    partial.rename(directory)
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"checkpoint with {layers} blocks written in {time.perf_counter() - started:.0f} s: {directory}", flush=True)
    return directory


def host_memory() -> dict:
    """This process's peak resident memory, and now its private (anonymous), mapped-file (the page
    cache's checkpoint pages, shared by the ranks) and shared (pinned) memory, in GiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(status.get(key, "0 kB").split()[0]) / 2**20  # noqa: E731
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "anon_gb": kib("RssAnon"),
            "file_gb": kib("RssFile"), "shmem_gb": kib("RssShmem")}  # fmt: skip


def run_plan(ckpt_dir: Path, size: str, world: int, forced: dict, cap_gb: float | None, steps: int, device_type: str) -> dict:
    """One rank of one plan: planned as the CLI plans (``session.plan_for``), loaded, warmed up, measured."""
    from wan_i2v import I2VPipeline
    from wan_i2v.parallel import ParallelGroups, init_distributed

    cuda = device_type == "cuda"
    device = init_distributed(device_type) if world > 1 else torch.device(device_type)
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        if cap_gb is not None:
            torch.cuda.set_per_process_memory_fraction(cap_gb * GiB / total, device)
    preset, image = A14B.presets[size], demo_image(*{"480P": (832, 480), "720P": (1280, 720)}.get(size, (160, 96)))
    height, width = A14B.video_size(image.height, image.width, preset.max_area)
    frames = 81 if cuda else 5
    options = RunOptions(ckpt_dir=ckpt_dir, device=device_type, gpus=world, gpu_memory=cap_gb, **forced)
    planned = plan_for(options, height=height, width=width, frame_num=frames, device=device_type, world=world, ckpt_dir=ckpt_dir)
    dims, estimate = planned.plan.dims, planned.estimate
    groups = ParallelGroups.build(dims, device) if world > 1 else None
    started = time.perf_counter()
    pipe = I2VPipeline.load(ckpt_dir, replace(planned.plan, device=device), groups)
    load_seconds = time.perf_counter() - started
    memory = host_memory()
    settings = dict(max_area=preset.max_area, frame_num=frames, shift=preset.shift, seed=7, progress=False)
    pipe.generate(image, PROMPT, steps=1, **settings)  # compiles; warms cuDNN and the allocator
    result = pipe.generate(image, PROMPT, steps=steps, **settings)
    if groups is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {
        "plan": f"{dims.describe()}; {planned.plan.placement.describe(dims)}",
        "fits": planned.fits,
        "estimate_gb": {stage: value / GiB for stage, value in estimate.stages.items()},
        "load_seconds": load_seconds,
        **memory,
        "seconds": result.timings,
        "step_seconds": result.timings["denoising"] / steps,
        "stage_peaks_gb": result.stage_peaks_gb,
        "latents": result.latents,
    }


def summarize(name: str, ranks: dict, reference) -> dict:
    first = ranks[0]
    peaks = {stage: max(r["stage_peaks_gb"].get(stage, 0.0) for r in ranks.values()) for stage in first["seconds"]}
    row = {key: first[key] for key in ("plan", "fits", "estimate_gb", "seconds", "step_seconds")}
    row.update(
        load_seconds=max(r["load_seconds"] for r in ranks.values()),
        host_peak_rss_gb=[round(r["peak_rss_gb"], 2) for r in ranks.values()],
        host_anon_gb=[round(r["anon_gb"], 2) for r in ranks.values()],
        host_file_gb=[round(r["file_gb"], 2) for r in ranks.values()],
        host_shmem_gb=[round(r["shmem_gb"], 2) for r in ranks.values()],
        stage_peaks_gb=peaks,
    )
    if reference is not None:
        row["latents_vs_1gpu"] = float((first["latents"] - reference).norm() / reference.norm())
        row["latents_equal_1gpu"] = bool(torch.equal(first["latents"], reference))
    estimate = first["estimate_gb"]
    errors = ", ".join(f"{stage} {peaks[stage]:.1f}/{estimate[stage]:.1f}" for stage in estimate if peaks.get(stage))
    print(f"{name:>17}: {row['plan']}; {row['step_seconds']:.2f} s/step; load {row['load_seconds']:.1f} s; "
          f"host GiB: peak RSS {row['host_peak_rss_gb']}, anon {row['host_anon_gb']}, file {row['host_file_gb']}, shmem {row['host_shmem_gb']}; GiB measured/estimated: {errors}"
          + (f"; latents vs 1 GPU {row['latents_vs_1gpu']:.2e} (equal: {row['latents_equal_1gpu']})" if reference is not None else ""),
          flush=True)  # fmt: skip
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["720P", "480P"])
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--ckpt", type=Path, default=None, help="where the checkpoint is, or is written if absent (default: a new folder)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    report = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "torch": torch.__version__,
              "device": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}" if cuda else "cpu", "runs": {}}  # fmt: skip
    print(report["device"], report["torch"], flush=True)
    ckpt_dir = args.ckpt or Path(tempfile.mkdtemp(prefix="wan-i2v-bench-")) / "ckpt"
    if not (ckpt_dir / A14B.files.tokenizer_dir).is_dir():  # the last file written
        if cuda:
            write_random_checkpoint(ckpt_dir, args.layers)
        else:
            from wan_i2v.tiny import write_tiny_checkpoint

            write_tiny_checkpoint(ckpt_dir)
    for size in args.sizes:
        reference = None
        for name in args.plans:
            world, forced, cap = PLANS[name]
            ranks = launch(run_plan, (ckpt_dir, size, world, forced, cap, args.steps, args.device), world)
            if name == "1gpu":
                reference = ranks[0]["latents"]
            row = summarize(f"{size} {name}", ranks, reference if name != "1gpu" else None)
            report["runs"][f"{size} {name}"] = row
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
        if reference is not None and "1gpu" in args.plans:
            one = report["runs"][f"{size} 1gpu"]["step_seconds"]
            for name in args.plans:
                row = report["runs"][f"{size} {name}"]
                row["scaling_efficiency"] = one / (row["step_seconds"] * PLANS[name][0])
            print(f"{size} scaling efficiency against one GPU: "
                  + ", ".join(f"{n} {report['runs'][f'{size} {n}']['scaling_efficiency']:.1%}" for n in args.plans), flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
