"""The `wan-i2v` command: real runs on the tiny checkpoint, and every bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from wan_i2v.cli import main

TINY_RUN = ["--size", "64*96", "--frame-num", "9", "--steps", "4", "--quiet", "--device", "cpu"]


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "input.png"
    Image.new("RGB", (120, 80), (200, 120, 40)).save(path)
    return path


def generate(ckpt, image, out, *extra):
    return main(["generate", "--ckpt-dir", str(ckpt), "--image", str(image), "--prompt", "a boat", "--save-file", str(out), *TINY_RUN, *extra])


def read_mp4_metadata(path):
    with av.open(str(path)) as container:
        comment = container.metadata.get("comment")
    return json.loads(comment) if comment else {}


def mp4_frames(path):
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    return np.stack(frames), rate


def test_generate_writes_a_playable_mp4_with_settings(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert generate(tiny_checkpoint, image_file, out, "--seed", "42") == 0
    frames, rate = mp4_frames(out)
    # 120x80 image in a 64*96 area: sqrt(6144*80/120)=64 -> 64 rows; sqrt(6144*1.5)=96 -> 96 columns.
    assert frames.shape == (9, 64, 96, 3)
    assert rate == 16
    meta = read_mp4_metadata(out)
    assert meta["seed"] == 42 and meta["prompt"] == "a boat" and meta["frame_num"] == 9
    assert not list(tmp_path.glob(".out*"))  # no temporary left behind
    assert not (tmp_path / "out.latents.pt").exists()  # the automatic latents are removed on success
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "seed: 42" in captured.err and "denoising" in captured.err


def test_random_seed_is_printed_and_stored(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert generate(tiny_checkpoint, image_file, out) == 0
    seed = read_mp4_metadata(out)["seed"]
    assert f"seed: {seed}" in capsys.readouterr().err


def test_saved_latents_decode_again(tiny_checkpoint, image_file, tmp_path):
    out, latents, again = tmp_path / "out.mp4", tmp_path / "run.pt", tmp_path / "again.mp4"
    assert generate(tiny_checkpoint, image_file, out, "--seed", "1", "--save-latents", str(latents)) == 0
    assert main(["decode", str(latents), "--save-file", str(again), "--ckpt-dir", str(tiny_checkpoint), "--device", "cpu", "--quiet"]) == 0
    assert_same_video(out, again)
    assert read_mp4_metadata(again)["seed"] == 1
    # The decoder in bf16: the same picture within bf16 rounding (3.7 levels on average here), not another video.
    bf16 = tmp_path / "bf16.mp4"
    assert main(["decode", str(latents), "--save-file", str(bf16), "--ckpt-dir", str(tiny_checkpoint), "--device", "cpu",
                 "--quiet", "--decode-dtype", "bf16"]) == 0
    first, _ = mp4_frames(out)
    second, _ = mp4_frames(bf16)
    assert first.shape == second.shape and 1.5 < np.abs(first.astype(int) - second).mean() < 8.0  # fp32 again: <= ~1


def test_decoding_saved_latents_gives_the_generated_video(tiny_pipeline, tmp_path):
    from wan_i2v.video import demo_image

    latents_file = tmp_path / "run.pt"
    result = tiny_pipeline.generate(
        demo_image(), "a boat", max_area=64 * 96, frame_num=9, steps=3, seed=4, progress=False,
        before_decode=lambda latents, settings: torch.save({"latents": latents}, latents_file),
    )
    saved = torch.load(latents_file, weights_only=True)["latents"]
    assert torch.equal(tiny_pipeline.decode(saved), result.video)


def test_a_decode_failure_keeps_the_latents(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys):
    from wan_i2v.models.vae import WanVAE

    def broken(self, *args, **kwargs):
        raise RuntimeError("simulated crash in the decoder")

    monkeypatch.setattr(WanVAE, "decode", broken)
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        generate(tiny_checkpoint, image_file, out, "--seed", "5")
    assert not out.exists()
    saved = torch.load(tmp_path / "out.latents.pt", weights_only=True)
    assert saved["latents"].shape == (16, 3, 8, 12) and saved["settings"]["seed"] == 5
    assert "wan-i2v decode" in capsys.readouterr().err


def test_demo_runs_from_the_command_line(tmp_path):
    out = tmp_path / "demo.mp4"
    env = {"WAN_I2V_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "wan_i2v.cli", "demo", "--save-file", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "random weights" in proc.stderr
    frames, _ = mp4_frames(out)
    assert frames.shape[0] == 17


def test_demo_keeps_an_existing_video(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wan-i2v-demo.mp4").write_bytes(b"an earlier video")
    assert main(["demo", "--quiet", "--steps", "1", "--frame-num", "5"]) == 0
    assert (tmp_path / "wan-i2v-demo.mp4").read_bytes() == b"an earlier video"
    assert mp4_frames(tmp_path / "wan-i2v-demo-1.mp4")[0].shape[0] == 5


def assert_same_video(first_path, second_path):
    """Two mp4s of the same frames: libx264's threads may round pixels a level or two apart
    (seen: up to ~1 on average), while different videos differ by tens of levels."""
    first, _ = mp4_frames(first_path)
    second, _ = mp4_frames(second_path)
    assert first.shape == second.shape
    assert np.abs(first.astype(int) - second).mean() < 2.0


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--frame-num", "8"], "not of the form 4n\\+1 \\(use 5 or 9\\)"),
        (["--frame-num", "1"], "too small"),
        (["--size", "1000*720"], "not a multiple of 16"),
        (["--size", "16*16"], "too small"),
        (["--size", "999P"], "unknown size"),
        (["--guide-scale", "-1"], "guide scale"),
        (["--guide-scale", "1", "2", "3"], "one or two values"),
        (["--steps", "0"], "steps 0 out of range"),
        (["--steps", "99999"], "out of range"),
        (["--solver", "heun"], "invalid choice"),
        (["--attention", "fast"], "unknown attention kernel 'fast' \\(choose one of cudnn, sage, sdpa\\)"),
        (["--attention", "sage"], "attention kernel 'sage' needs a CUDA GPU"),
    ],
)
def test_bad_settings(tiny_checkpoint, image_file, tmp_path, capsys, args, message):
    out = tmp_path / "out.mp4"
    assert generate(tiny_checkpoint, image_file, out, *args) == 2
    assert re.search(message, error_line(capsys))
    assert not out.exists()


def test_bad_images(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.mp4"
    assert generate(tiny_checkpoint, tmp_path / "missing.png", out) == 2
    assert "image not found" in error_line(capsys)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert generate(tiny_checkpoint, text, out) == 2
    assert "cannot read image" in error_line(capsys)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    assert generate(tiny_checkpoint, truncated, out) == 2
    assert "cannot read image" in error_line(capsys)
    monkeypatch.setattr("wan_i2v.video.MAX_IMAGE_PIXELS", 1000)
    assert generate(tiny_checkpoint, tmp_path / "full.png", out) == 2
    assert "megapixels" in error_line(capsys)
    assert not out.exists()


def test_bad_checkpoints(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert generate(tmp_path / "nowhere", image_file, out) == 2
    assert "checkpoint directory not found" in error_line(capsys)

    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_checkpoint, incomplete)
    (incomplete / "Wan2.1_VAE.pth").unlink()
    assert generate(incomplete, image_file, out) == 2
    line = error_line(capsys)
    assert "Wan2.1_VAE.pth" in line and "cache status" in line

    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    config = other / "high_noise_model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "t2v"}))
    assert generate(other, image_file, out) == 2
    assert "not image-to-video" in error_line(capsys)

    shard = next((tiny_checkpoint / "low_noise_model").glob("*-00001-of-*.safetensors"))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, truncated)
    target = truncated / "low_noise_model" / shard.name
    target.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert generate(truncated, image_file, out) == 2
    assert shard.name in error_line(capsys)
    assert not out.exists()


def test_unwritable_output(tiny_checkpoint, image_file, tmp_path, capsys):
    assert generate(tiny_checkpoint, image_file, tmp_path / "no" / "such" / "dir.mp4") == 2
    assert "does not exist" in error_line(capsys)
    assert generate(tiny_checkpoint, image_file, tmp_path) == 2
    assert "is a directory" in error_line(capsys)


def test_empty_prompt_is_allowed(tiny_checkpoint, image_file, tmp_path):
    out = tmp_path / "out.mp4"
    assert main(["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file), "--prompt", "", "--save-file", str(out), *TINY_RUN]) == 0
    assert out.is_file()


def test_make_tiny_checkpoint_refuses_existing(tmp_path, capsys):
    assert main(["make-tiny-checkpoint", str(tmp_path)]) == 2
    assert "already exists" in error_line(capsys)


def progress_bars(err: str, label: str) -> int:
    """How many progress bars called ``label`` the stderr shows (each ends its line when done)."""
    return sum(f"{label}:" in line for line in err.split("\n"))


def test_two_processes_write_the_single_process_video(tiny_checkpoint, image_file, tmp_path, capfd):
    """`--gpus 2 --device cpu`: two gloo ranks (CFG parallel), one mp4 from rank 0, one summary and
    one progress bar per stage (rank 0's); and a second such run started alongside does not collide
    with it (each picks a free port)."""
    single, double, beside = tmp_path / "single.mp4", tmp_path / "double.mp4", tmp_path / "beside.mp4"
    assert generate(tiny_checkpoint, image_file, single, "--seed", "9") == 0
    capfd.readouterr()
    other = subprocess.Popen(
        [sys.executable, "-m", "wan_i2v.cli", "generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file),
         "--prompt", "a boat", "--save-file", str(beside), *TINY_RUN, "--gpus", "2", "--seed", "9"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with_progress = [arg for arg in TINY_RUN if arg != "--quiet"]
    assert main(["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file), "--prompt", "a boat", "--save-file", str(double),
                 *with_progress, "--gpus", "2", "--seed", "9"]) == 0  # fmt: skip
    _, other_err = other.communicate(timeout=120)
    assert other.returncode == 0, other_err
    out, err = capfd.readouterr()
    assert out.strip() == str(double)  # printed once, by rank 0
    assert err.count("seed: 9") == 1 and "error" not in err
    for stage in ("text encoding", "image encoding", "denoising", "decoding"):
        assert progress_bars(err, stage) == 1, (stage, err)
    assert_same_video(single, double)
    assert read_mp4_metadata(double)["seed"] == 9
    assert not (tmp_path / "double.latents.pt").exists()
    assert_same_video(single, beside)


def test_a_failing_multi_process_run_prints_one_error_line(tiny_checkpoint, image_file, tmp_path, capfd):
    shard = next((tiny_checkpoint / "low_noise_model").glob("*-00001-of-*.safetensors"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "low_noise_model" / shard.name).write_bytes(shard.read_bytes()[:100])
    out = tmp_path / "out.mp4"
    assert generate(broken, image_file, out, "--gpus", "2") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wan-i2v: error: ") and shard.name in err[0], err
    assert not out.exists()


def test_dry_run_explains_the_plan(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert generate(tiny_checkpoint, image_file, out, "--gpus", "4", "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    # On the CPU (--device cpu) the plan speaks of processes and host memory, not of GPUs.
    assert lines[0] == "plan: 4 processes, CFG parallel 2, Ulysses 2; both experts in host memory, text encoder sharded; on the CPU"
    assert re.match(r"host memory: peak .* GiB on this machine \(text encoding .*, image encoding .*, denoising .*, decoding .* GiB\) \(of .* GiB\)", lines[1])
    assert lines[2] == "video: 96x64, 9 frames, 72 tokens per DiT forward"
    assert not any("GPU" in line for line in lines), lines
    assert not out.exists()
    assert generate(tiny_checkpoint, image_file, out, "--dry-run") == 0
    assert capsys.readouterr().out.startswith("plan: 1 process; both experts in host memory; on the CPU\nhost memory: peak ")
    # The same plan for GPUs speaks of them.
    assert generate(tiny_checkpoint, image_file, out, "--gpus", "4", "--dry-run", "--device", "cuda") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "plan: 4 GPUs, CFG parallel 2, Ulysses 2; both experts on the GPU, text encoder sharded; on GPUs"
    assert re.match(r"memory: peak .* GiB per GPU \(text encoding .*, image encoding .*, denoising .*, decoding .* GiB\)", lines[1])
    # Too little host memory for any plan: the plan that needs the least, then the machine it needs, exit 2.
    assert generate(tiny_checkpoint, image_file, out, "--gpus", "2", "--dry-run", "--host-memory", "0.5") == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("plan: 2 processes") and "host memory: peak" in captured.out and "(of 0.5 GiB)" in captured.out
    error = captured.err.strip()
    assert re.fullmatch(r"wan-i2v: error: this video needs a machine with at least \d+ GiB of host memory; planned for 0 GiB of host memory "
                        r"\(use a smaller --size, fewer --frame-num, or give --host-memory if more is free\)", error), error  # no GPU memory on the CPU
    # The run refuses it the same way, before loading anything.
    assert generate(tiny_checkpoint, image_file, out, "--gpus", "2", "--host-memory", "0.5") == 2
    assert capsys.readouterr().err.strip() == error and not out.exists()
    # A forced plan.
    assert generate(tiny_checkpoint, image_file, out, "--gpus", "4", "--ulysses", "4", "--fsdp", "--dry-run") == 0
    assert capsys.readouterr().out.startswith("plan: 4 processes, no CFG parallel, Ulysses 4; experts and text encoder sharded (FSDP); on the CPU")


def test_a_dry_run_says_what_the_run_would_write_and_writes_nothing(tiny_checkpoint, image_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wan-i2v-output.mp4").write_bytes(b"an earlier video")
    assert main(["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file), "--prompt", "x", *TINY_RUN, "--dry-run"]) == 0
    assert "wan-i2v: the run would write wan-i2v-output-1.mp4 (wan-i2v-output.mp4 exists)" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["input.png", "wan-i2v-output.mp4"]


def test_a_refused_combination_is_the_refusal_alone_without_a_plan(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert generate(tiny_checkpoint, image_file, out, "--gpus", "2", "--fsdp", "--offload", "blocks", "--dry-run") == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # a combination refused has no plan to show: the refusal alone
    assert captured.err.strip() == "wan-i2v: error: --offload blocks does not combine with --fsdp (FSDP's own offload is --fsdp --offload)"
    # The run itself refuses it the same way, before loading anything.
    assert generate(tiny_checkpoint, image_file, out, "--gpus", "2", "--fsdp", "--offload", "blocks") == 2
    assert capsys.readouterr().err.strip() == "wan-i2v: error: --offload blocks does not combine with --fsdp (FSDP's own offload is --fsdp --offload)"
    assert not out.exists()


def test_dry_run_without_a_checkpoint_plans_for_the_official_model(image_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    args = ["generate", "--image", str(image_file), "--prompt", "x", "--device", "cpu", "--dtype", "bf16", "--gpus", "2", "--gpu-memory", "48",
            "--host-memory", "64", "--dry-run"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "plan: 2 processes" in text and "FSDP" in text and "warning" not in text


def test_dry_run_without_a_checkpoint_checks_loras_against_the_official_model(image_file, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    base = ["generate", "--image", str(image_file), "--prompt", "x", "--gpu-memory", "80", "--host-memory", "64", "--dry-run"]
    fits, small = tmp_path / "fits.safetensors", tmp_path / "small.safetensors"
    save_file({"diffusion_model.blocks.39.self_attn.q.lora_down.weight": torch.zeros(2, 5120),
               "diffusion_model.blocks.39.self_attn.q.lora_up.weight": torch.zeros(5120, 2)}, str(fits))  # fmt: skip
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 2)}, str(small))  # fmt: skip
    assert main([*base, "--lora", str(fits)]) == 0
    assert "plan: " in capsys.readouterr().out
    assert main([*base, "--lora-low", str(small)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the plan, as the run refuses it before sampling
    assert captured.err.strip() == (f"wan-i2v: error: {small}: the delta of 'blocks.0.self_attn.q.weight' has shape (64, 64), the parameter (5120, 5120) "
                                    "(the LoRA is for another model (it must be for Wan2.2-I2V-A14B's 14B transformer))")


def test_dry_run_on_a_machine_without_a_gpu_plans_for_gpus(image_file, tmp_path, capsys, monkeypatch):
    """No --device: the plan is for the GPUs the run is meant for, in their dtype (bf16), whatever this machine has."""
    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    base = ["generate", "--image", str(image_file), "--prompt", "x", "--size", "1280*720", "--dry-run"]
    assert main([*base, "--gpu-memory", "80"]) == 0
    text = capsys.readouterr().out
    # bf16 experts (26.6 GiB each) resident on one 80 GB card; fp32 ones (53 GiB each) would not fit.
    assert text.startswith("plan: 1 GPU; both experts on the GPU; on a GPU\n") and "warning" not in text
    # 2 x 22 GB: sharded with the shards pinned in host memory where the host has room for them, else
    # every block streamed from the checkpoint.
    assert main([*base, "--gpus", "2", "--gpu-memory", "22", "--host-memory", "160"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("plan: 2 GPUs, CFG parallel 2, Ulysses 1; experts and text encoder sharded (FSDP), the shards in host memory; on GPUs")
    assert main([*base, "--gpus", "2", "--gpu-memory", "22", "--host-memory", "64"]) == 0
    # (64 GiB cannot cache the 62.6 GiB the run reads beside it: the kept blocks' pages make way for the streamed ones')
    assert re.match(r"plan: 2 GPUs, CFG parallel 2, Ulysses 1; expert blocks streamed from the checkpoint; \d+ blocks of the active expert kept on the GPU "
                    r"\(their pages left out of the page cache\); on GPUs", capsys.readouterr().out)  # fmt: skip


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpus", "3"], r"3 GPUs cannot split the model's 4 attention heads \(use --gpus 1, 2, 4, 8\)"),
        (["--gpus", "2", "--ulysses", "3"], r"--ulysses 3 does not divide the model's 4 attention heads \(choose one of 1, 2, 4\)"),
        (["--gpus", "4", "--ulysses", "4", "--cfg-parallel"], r"uses 8 GPUs, not 4 \(with 4 GPUs use --ulysses 2 --cfg-parallel or --ulysses 4\)"),
        (["--gpus", "0"], r"--gpus 0"),
        (["--fsdp"], r"--fsdp shards over several GPUs \(give --gpus 2 or more"),
    ],
)
def test_impossible_plans(tiny_checkpoint, image_file, tmp_path, capsys, args, message):
    out = tmp_path / "out.mp4"
    assert generate(tiny_checkpoint, image_file, out, *args) == 2
    assert re.search(message, error_line(capsys))
    assert not out.exists()


def test_several_gpus_without_a_gpu_need_device_cpu(tiny_checkpoint, image_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o.mp4"
    args = ["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file), "--prompt", "x", "--save-file", str(out)]
    assert main([*args, "--gpus", "2"]) == 2
    assert error_line(capsys) == ("wan-i2v: error: 2 GPUs asked for but no GPU is visible "
                                  "(check the GPU driver (nvidia-smi), or give --device cpu to run 2 processes on the CPU)")
    monkeypatch.setenv("WORLD_SIZE", "2")  # the same under torchrun, whose world size is the GPUs asked for
    assert main(args) == 2
    assert "2 GPUs asked for but no GPU is visible" in error_line(capsys)
    assert not out.exists()


def test_more_gpus_than_the_machine_has(tiny_checkpoint, image_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = ["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file), "--prompt", "x", "--save-file", str(tmp_path / "o.mp4")]
    assert main([*args, "--device", "cuda", "--gpus", "2"]) == 2
    assert "--gpus 2 but this machine has 1 GPU (use --gpus 1 or fewer)" in error_line(capsys)
    assert main([*args, "--device", "cuda:1", "--gpus", "2"]) == 2
    assert "--device cuda:1 names one GPU but --gpus is 2" in error_line(capsys)


def assert_every_process_gone(proc) -> None:
    """Every process of the run's group (its ranks, multiprocessing's helper) is gone within seconds."""
    for _ in range(100):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail("processes of the run are still alive")


def test_ctrl_c_stops_every_rank(tiny_checkpoint, image_file, tmp_path):
    """SIGINT to the terminal's process group (what Ctrl-C sends) ends the launcher and both ranks."""
    import os
    import signal
    import time

    out = tmp_path / "out.mp4"
    command = [sys.executable, "-m", "wan_i2v.cli", "generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file),
               "--prompt", "a boat", "--save-file", str(out), "--size", "128*128", "--frame-num", "17", "--steps", "1000",
               "--device", "cpu", "--gpus", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(5)  # started (an interrupt while starting must work as well)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "wan-i2v: interrupted"
    assert_every_process_gone(proc)
    assert not out.exists()


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until ``path`` exists (the run has saved a step), while ``proc`` runs."""
    import time

    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert path.exists(), proc.communicate()


def test_sigterm_stops_a_run_as_ctrl_c_does_and_the_same_command_resumes(tiny_checkpoint, image_file, tmp_path, capsys):
    """SIGTERM (a pod stopping): the resume hint, exit 143, no lock file and no temporary left; and
    the temporary a kill -9 in the middle of a state write leaves is removed by the run that resumes."""
    import signal

    out, state = tmp_path / "out.mp4", tmp_path / "out.state.pt"
    args = ["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file), "--prompt", "a boat", "--save-file", str(out),
            "--size", "64*96", "--frame-num", "9", "--steps", "60", "--device", "cpu", "--seed", "3"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "wan_i2v.cli", *args, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(state, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-2:] == [f"wan-i2v: the denoising state is saved in {state}; the same command resumes from it",
                                             "wan-i2v: stopped by SIGTERM"], err  # fmt: skip
    assert sorted(path.name for path in tmp_path.iterdir()) == ["input.png", "out.state.pt"]  # no .out.mp4.lock, no temporary
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < 60
    (tmp_path / ".out.state.k2x9q0ab.pt").write_bytes(b"half a state")  # what a kill -9 mid-write leaves
    assert main(args) == 0
    assert f"resuming from step {step} of 60" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["input.png", "out.mp4"]


def test_sigterm_to_every_process_of_a_multi_gpu_run_stops_it_as_ctrl_c_does(tiny_checkpoint, image_file, tmp_path):
    """A pod stopping sends SIGTERM to every process: the launcher and both ranks stop, rank 0's state
    is saved with the hint to resume, and no lock file or temporary is left."""
    import os
    import signal
    import time

    out, state = tmp_path / "out.mp4", tmp_path / "out.state.pt"
    command = [sys.executable, "-m", "wan_i2v.cli", "generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file),
               "--prompt", "a boat", "--save-file", str(out), "--size", "64*96", "--frame-num", "9", "--steps", "400",
               "--device", "cpu", "--gpus", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(state, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-2:] == [f"wan-i2v: the denoising state is saved in {state}; the same command resumes from it",
                                             "wan-i2v: stopped by SIGTERM"], err  # fmt: skip
    assert_every_process_gone(proc)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["input.png", "out.state.pt"]  # no .out.mp4.lock, no temporary


def test_an_interrupted_generate_resumes_with_the_same_command(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys):
    from wan_i2v.models.dit import DiT

    out = tmp_path / "out.mp4"
    calls = {"n": 0}
    forward = DiT.forward

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # in the third step: two saved
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DiT, "forward", interrupted)
    assert generate(tiny_checkpoint, image_file, out) == 130
    err = capsys.readouterr().err
    assert "the same command resumes" in err and not out.exists()
    state = tmp_path / "out.state.pt"
    assert torch.load(state, weights_only=True)["step"] == 2
    monkeypatch.setattr(DiT, "forward", forward)
    resumed = tmp_path / "resumed.pt"
    assert generate(tiny_checkpoint, image_file, out, "--save-latents", str(resumed)) == 0
    assert out.is_file() and not state.exists()
    seed = read_mp4_metadata(out)["seed"]
    again, straight = tmp_path / "again.mp4", tmp_path / "straight.pt"
    assert generate(tiny_checkpoint, image_file, again, "--seed", str(seed), "--save-latents", str(straight)) == 0
    assert torch.equal(torch.load(resumed, weights_only=True)["latents"], torch.load(straight, weights_only=True)["latents"])


def test_a_run_stopped_while_decoding_resumes_straight_to_the_decode(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys):
    """Every step is saved when the decode starts: the same command decodes them, without encoding
    the prompt and the image again, into the video of a run never stopped."""
    from wan_i2v.models.text_encoder import TextEncoder
    from wan_i2v.models.vae import WanVAE

    out = tmp_path / "out.mp4"
    decode = WanVAE.decode

    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    resumed, straight = tmp_path / "resumed.pt", tmp_path / "straight.pt"
    monkeypatch.setattr(WanVAE, "decode", stopped)
    assert generate(tiny_checkpoint, image_file, out, "--seed", "4", "--save-latents", str(resumed)) == 130
    assert (f"wan-i2v: the latents are saved in {resumed}; the same command finishes the video, as does wan-i2v decode {resumed} --save-file {out}"
            in capsys.readouterr().err) and not out.exists()  # fmt: skip
    monkeypatch.setattr(WanVAE, "decode", decode)
    encoded = []
    for model in (TextEncoder, WanVAE):
        monkeypatch.setattr(model, "encode", lambda self, *args, model=model, encode=model.encode, **kwargs: encoded.append(model) or encode(self, *args, **kwargs))
    assert generate(tiny_checkpoint, image_file, out, "--seed", "4", "--save-latents", str(resumed)) == 0
    assert encoded == [] and "text encoding" not in capsys.readouterr().err
    assert not (tmp_path / "out.state.pt").exists()
    assert generate(tiny_checkpoint, image_file, tmp_path / "straight.mp4", "--seed", "4", "--save-latents", str(straight)) == 0
    assert set(encoded) == {TextEncoder, WanVAE}  # (the counting sees the encoders of a run that needs them)
    assert torch.equal(torch.load(resumed, weights_only=True)["latents"], torch.load(straight, weights_only=True)["latents"])
    assert_same_video(out, tmp_path / "straight.mp4")


def test_decode_refuses_to_overwrite_unless_asked(tiny_checkpoint, image_file, tmp_path, capsys):
    out, latents = tmp_path / "out.mp4", tmp_path / "run.pt"
    assert generate(tiny_checkpoint, image_file, out, "--save-latents", str(latents)) == 0
    kept = out.read_bytes()
    decode = ["decode", str(latents), "--save-file", str(out), "--ckpt-dir", str(tiny_checkpoint), "--device", "cpu", "--quiet"]
    capsys.readouterr()
    assert main(decode) == 2
    assert error_line(capsys) == f"wan-i2v: error: {out} exists (give another --save-file, or add --overwrite to replace it)"
    assert out.read_bytes() == kept
    assert main([*decode, "--overwrite"]) == 0


def test_every_command_has_help_and_one_error_prefix(capsys):
    assert main(["decode", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--save-latents" in help_text and "the .mp4 to write" in help_text
    assert main(["generate", "--image"]) == 2
    assert error_line(capsys).startswith("wan-i2v: error: argument --image: expected one argument (see `wan-i2v generate --help`)")


def test_an_unrecognized_option_points_to_the_commands_help(capsys):
    assert main(["generate", "--image", "x.png", "--prompt", "p", "--no-such-option", "1"]) == 2
    assert error_line(capsys) == "wan-i2v: error: unrecognized arguments: --no-such-option 1 (see `wan-i2v generate --help`)"


def test_the_guide_scale_help_says_one_or_two_values(capsys):
    assert main(["generate", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--guide-scale LOW [HIGH]" in help_text and "HIGH ...]" not in help_text


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_every_run_option_is_a_flag_with_its_help(command, capsys):
    """The run options and the command's flags cannot drift: each field has its flags in --help, with its
    help, and what its flag sets comes back as the field."""
    from dataclasses import fields

    from wan_i2v.cli import _parse
    from wan_i2v.options import Offload, RunOptions, expert_loras, options_from
    from wan_i2v.transforms.step_cache_config import StepCacheConfig

    assert main([command, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for field in fields(RunOptions):
        assert field.metadata["flags"], f"{field.name} has no flag"
        for flag in field.metadata["flags"]:
            assert all(name in help_text for name in flag.names) and " ".join(flag.help.split()) in help_text, field.name
    required = ["--image", "x.png", "--prompt", "p"] if command == "generate" else []
    given = [command, *required, "--ckpt-dir", "ckpt", "--cache-dir", "cache", "--offload", "blocks", "--lora", "a.safetensors",
             "--lora-high", "h.safetensors:0.5", "--fp8", "--no-compile", "--device", "cpu", "--dtype", "bf16", "--decode-dtype", "bf16",
             "--encode-dtype", "bf16", "--attention", "sdpa", "--keep-text-encoder", "--batch-cfg", "--gpus", "2", "--ulysses", "2",
             "--cfg-parallel", "--fsdp", "--gpu-memory", "24", "--host-memory", "32", "--split-encode", "--step-cache-blocks", "2,1",
             "--step-cache", "0.2", "--step-cache-max", "4"]  # fmt: skip
    parsed = options_from(_parse(given))
    # --lora's files go to every expert of the run's model (known once its checkpoint is: expert_loras), before an expert's own
    assert expert_loras(parsed.loras) == {"high": ["a.safetensors", "h.safetensors:0.5"], "low": ["a.safetensors"]}
    assert parsed == RunOptions(
        ckpt_dir="ckpt", cache_dir="cache", offload=Offload.BLOCKS, loras={"both": ["a.safetensors"], "high": ["h.safetensors:0.5"]},
        fp8=True, compile=False, device="cpu", dtype="bf16", decode_dtype="bf16", encode_dtype="bf16", attention="sdpa", keep_text_encoder=True,
        batch_cfg=True, gpus=2, ulysses=2, cfg_parallel=True, fsdp=True, gpu_memory=24.0, host_memory=32.0, split_encode=True,
        step_cache=StepCacheConfig(threshold=0.2, first_blocks=2, last_blocks=1, max_reuses=4),
    )  # fmt: skip
    assert options_from(_parse([command, *required])) == RunOptions()


@pytest.mark.parametrize("command", ["generate", "demo", "serve"])
def test_every_sampling_flag_is_declared_once_and_sets_its_setting(command, capsys, monkeypatch):
    """The video's settings and their flags cannot drift: every setting has a flag of the one declaration,
    each in the command's --help with its help (the server's in its wording), and what a flag sets comes back
    in the video's settings (the server's: each job's defaults), under our spelling and the official one."""
    import inspect
    from dataclasses import fields

    from wan_i2v.cli import _parse
    from wan_i2v.commands.common import settings_from
    from wan_i2v.config import OFFICIAL, SAMPLING_FLAGS, GenerationSettings, SamplingDefaults, sampling_given

    monkeypatch.setenv("COLUMNS", "10000")  # the help unwrapped: argparse breaks lines at hyphens too
    dests = {flag.dest for flag in SAMPLING_FLAGS}
    # (--size sets max_area, and text_to_video_shape)
    assert {field.name for field in fields(GenerationSettings)} - {"seed_drawn", "max_area", "text_to_video_shape"} <= dests and "size" in dests
    assert dests - {"distilled"} <= set(inspect.signature(GenerationSettings.of).parameters)
    assert main([command, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    own_defaults = {
        "demo": {"frame_num": 17, "steps": 12, "prompt": "A small paper boat drifts on a calm pond.", "seed": 0},
        "generate": {"frame_num": "the model's: 81 for i2v-a14b, 121 for ti2v-5b", "steps": "the model's: 40 for i2v-a14b, 50 for ti2v-5b"},
        "serve": {"frame_num": "the model's: 81 for i2v-a14b, 121 for ti2v-5b", "steps": "the model's: 40 for i2v-a14b, 50 for ti2v-5b"},
    }[command]
    shown = {"generate": dests, "demo": dests - {"size", "shift", "height", "width"}, "serve": dests - {"prompt", "negative_prompt", "seed", "height", "width", "fps"}}[command]
    for flag in SAMPLING_FLAGS:
        if flag.dest == "distilled" and command != "demo":  # there a run option (it merges the 4-step LoRAs too): RunOptions' flag
            continue
        assert all(name in help_text for name in flag.names) == (flag.dest in shown), flag.names
        wording = flag.job_help if command == "serve" else flag.given_help if command == "demo" and flag.given_help else flag.help
        if flag.dest in shown:
            wording = wording.format(**own_defaults)
            assert " ".join(wording.split()) in help_text, flag.names
    ours = ["--size", "480P", "--frame-num", "33", "--steps", "7", "--guide-scale", "2", "4", "--shift", "2.5", "--solver", "dpm++"]
    official = ["--size", "480P", "--frame_num", "33", "--sample_steps", "7", "--sample_guide_scale", "2", "4", "--sample_shift", "2.5", "--sample_solver", "dpm++"]
    if command == "serve":
        for line in (ours, official):
            assert SamplingDefaults().given(**sampling_given(_parse(["serve", *line]))) == SamplingDefaults("480P", 33, 7, (2.0, 4.0), 2.5, "dpm++")
        assert SamplingDefaults().given(**sampling_given(_parse(["serve"]))) == OFFICIAL
        return
    required = ["--image", "x.png"] if command == "generate" else []
    sizes = [] if command == "demo" else ["--size", "480P", "--shift", "2.5"]
    for line in (ours, official):
        given = [arg for arg in line if arg not in ("--size", "480P", "--shift", "--sample_shift", "2.5")] + sizes
        settings = settings_from(_parse([command, *required, *given, "--prompt", "p", "--negative-prompt", "n", "--base_seed", "5"]))
        assert (settings.prompt, settings.negative_prompt, settings.frame_num, settings.steps, settings.guide_scale, settings.seed, settings.solver) == (
            "p", "n", 33, 7, (2.0, 4.0), 5, "dpm++")
        if command == "generate":
            assert (settings.max_area, settings.shift) == (832 * 480, 2.5)
    defaults = settings_from(_parse([command, *required, "--prompt", "p"]))
    assert (defaults.frame_num, defaults.steps, defaults.seed_drawn) == ((81, 40, True) if command == "generate" else (17, 12, False))
    distilled = settings_from(_parse([command, *required, "--prompt", "p", "--distilled"]))
    assert (distilled.steps, distilled.solver, distilled.guide_scale) == (4, "euler", (1.0, 1.0))


def test_the_official_command_line_runs_unchanged(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "official.mp4"
    assert main(["generate", "--task", "i2v-A14B", "--size", "64*96", "--ckpt_dir", str(tiny_checkpoint), "--offload_model", "True",
                 "--convert_model_dtype", "--t5_cpu", "--image", str(image_file), "--prompt", "a boat", "--sample_solver", "dpm++",
                 "--sample_steps", "2", "--sample_shift", "3", "--sample_guide_scale", "4", "--base_seed", "7", "--frame_num", "5",
                 "--save_file", str(out), "--device", "cpu", "--quiet", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    # --offload_model True is --offload experts, --convert_model_dtype is --dtype bf16.
    assert "one expert at a time, streamed in" in plan and "numerics: bf16 weights" in plan, plan


def test_the_official_multi_gpu_options_force_the_same_plan(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "official.mp4"
    assert generate(tiny_checkpoint, image_file, out, "--gpus", "2", "--dit_fsdp", "--t5_fsdp", "--ulysses_size", "2", "--dry-run") == 0
    # (left to itself, the plan for 2 GPUs is CFG parallel 2, Ulysses 1)
    assert capsys.readouterr().out.splitlines()[0] == "plan: 2 processes, no CFG parallel, Ulysses 2; experts and text encoder sharded (FSDP); on the CPU"


@pytest.mark.parametrize("task", ["t2v-A14B", "s2v-14B"])
def test_other_official_tasks_are_refused_in_one_line(task, capsys):
    assert main(["generate", "--task", task, "--image", "x.png", "--prompt", "p"]) == 2
    assert error_line(capsys) == (f"wan-i2v: error: argument --task: task '{task}' is not run here: wan-i2v runs i2v-A14B and ti2v-5B "
                                  "(see `wan-i2v generate --help`)")


def test_decode_refuses_other_files(tiny_checkpoint, tmp_path, capsys):
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "wan-i2v-latents/1", "latents": torch.zeros(8, 3, 4, 4)}, wrong)
    assert main(["decode", str(wrong), "--save-file", str(tmp_path / "x.mp4"), "--ckpt-dir", str(tiny_checkpoint), "--device", "cpu"]) == 2
    assert "not a wan-i2v latents file" in error_line(capsys)


def test_demo_checks_the_guide_scale_count(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "home"))
    assert main(["demo", "--guide-scale", "1", "2", "3", "--save-file", str(tmp_path / "d.mp4")]) == 2
    assert "one or two values" in error_line(capsys)


def _rank_pids(parent: int) -> list[int]:
    """The pids of the ranks a launcher process started: its children started by multiprocessing's spawn."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_a_multi_gpu_run_whose_rank_is_killed_resumes_with_the_same_command(tiny_checkpoint, image_file, tmp_path):
    """Rank 0 saves the state after each step; kill -9 of rank 1 mid-run ends the run with one error
    line, and the same command goes on from the saved step to the latents of an uninterrupted run."""
    import os
    import signal
    import time

    out, state = tmp_path / "out.mp4", tmp_path / "out.state.pt"
    steps = 60
    command = [sys.executable, "-m", "wan_i2v.cli", "generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file),
               "--prompt", "a boat", "--save-file", str(out), "--size", "128*128", "--frame-num", "17", "--steps", str(steps),
               "--device", "cpu", "--gpus", "2", "--quiet", "--save-latents", str(tmp_path / "resumed.pt")]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert lines[0] == f"wan-i2v: the denoising state is saved in {state}; the same command resumes from it", err
    assert re.match(r"wan-i2v: error: rank [01] exited with code -9", lines[1]), err
    saved = torch.load(state, weights_only=True)
    assert 0 < saved["step"] < steps and not out.exists()
    resumed = subprocess.run([c for c in command if c != "--quiet"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {saved['step']} of {steps}" in resumed.stderr and out.is_file() and not state.exists()
    straight = tmp_path / "straight.pt"
    seed = str(saved["settings"]["seed"])
    assert generate(tiny_checkpoint, image_file, tmp_path / "straight.mp4", "--size", "128*128", "--frame-num", "17", "--steps", str(steps),
                    "--seed", seed, "--save-latents", str(straight)) == 0  # fmt: skip
    first, second = torch.load(tmp_path / "resumed.pt", weights_only=True)["latents"], torch.load(straight, weights_only=True)["latents"]
    assert float((first - second).norm() / second.norm()) <= 1e-5


@pytest.mark.parametrize("command", [["--version"], ["--help"], ["generate", "--help"], ["serve", "--help"], ["cache", "status", "--ckpt-dir", "CKPT"]])
def test_the_cheap_commands_run_without_torch(command, tiny_checkpoint):
    """--version, the help and `cache status` answer at once: torch (seconds to import) is never imported."""
    command = [str(tiny_checkpoint) if arg == "CKPT" else arg for arg in command]
    code = f"import sys; sys.modules['torch'] = None\nfrom wan_i2v.cli import main\nsys.exit(main({command!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.strip(), "nothing printed"
    assert subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\nimport wan_i2v\nfrom wan_i2v.config import GenerationSettings"]).returncode == 0


def test_the_step_cache_runs_from_the_command_line_and_the_summary_and_the_mp4_say_what_it_skipped(tiny_checkpoint, image_file, tmp_path, capsys):
    exact, cached = tmp_path / "exact.mp4", tmp_path / "cached.mp4"
    assert generate(tiny_checkpoint, image_file, exact, "--steps", "8", "--seed", "1", "--step-cache", "0") == 0
    assert "step cache" not in capsys.readouterr().err and "step_cache" not in read_mp4_metadata(exact)
    # A threshold no change reaches: every forward the rules allow reuses the cache.
    assert generate(tiny_checkpoint, image_file, cached, "--steps", "8", "--seed", "1", "--step-cache", "1000", "--step-cache-max", "2") == 0
    summary = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step cache:")]
    recorded = read_mp4_metadata(cached)["step_cache"]
    assert recorded["threshold"] == 1000 and recorded["max_reuses"] == 2
    skipped = {expert: tuple(counts) for expert, counts in recorded["skipped"].items()}
    assert sum(total for _, total in skipped.values()) == 16  # 8 steps, two guidance branches each
    assert 0 < sum(skips for skips, _ in skipped.values()) < 16
    skips = sum(s for s, _ in skipped.values())
    assert summary == [f"step cache: skipped {skips} of 16 forwards (" + ", ".join(f"{e} {s} of {t}" for e, (s, t) in skipped.items()) + ")"]
    assert not np.array_equal(mp4_frames(exact)[0], mp4_frames(cached)[0])


def test_compare_prints_each_frame_and_the_whole_video_and_refuses_a_missing_one_in_a_line(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "a.mp4"
    assert generate(tiny_checkpoint, image_file, out) == 0
    capsys.readouterr()
    assert main(["compare", str(out), str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["frame", "PSNR", "(dB)", "SSIM"] and lines[-1].split() == ["all", "inf", "1.0000"]
    assert len(lines) == 2 + mp4_frames(out)[0].shape[0]
    assert main(["compare", str(out), str(tmp_path / "missing.mp4")]) == 2
    assert capsys.readouterr().err.strip() == f"wan-i2v: error: no video at {tmp_path / 'missing.mp4'} (check the path)"


def test_the_step_summary_gives_each_step_of_a_short_run():
    from wan_i2v.commands.common import StepClock

    clock = StepClock()
    clock.started, clock.ends = 100.0, [110.0, 112.0, 115.0]  # denoising begins after 1 + 2 s of encoding: at 103
    line = clock.describe({"text encoding": 1.0, "image encoding": 2.0})
    assert "first step 7.0s, then 2.50s a step; each 7.00, 2.00, 3.00s)" in line
    clock.ends = [110.0 + step for step in range(11)]  # a long run: the pace alone
    assert "each" not in clock.describe({}) and "then 1.00s a step" in clock.describe({})


def test_on_a_gpu_the_steps_after_the_first_are_timed_by_the_gpu_s_events(monkeypatch):
    """The host queues a step well before the GPU has run it: the host's clock at the callbacks put an
    8 s step at 1.7 s and the next at 11.2 s. The events recorded at each step's end say when the GPU
    got there (a fake of torch.cuda's events here: this machine has no GPU)."""
    import torch

    from wan_i2v.commands.common import StepClock

    gpu_time = iter([10.0, 18.0, 26.5])  # when the GPU reaches each step's end, in seconds

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream):
            assert stream == ("stream of", torch.device("cuda", 1))
            self.at = next(gpu_time)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.at - self.at) * 1000  # milliseconds, as CUDA's

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: ("stream of", device))
    clock = StepClock(torch.device("cuda", 1))  # the run's GPU, not the process's current one
    clock.started = 100.0
    for host_time in (110.0, 111.7, 122.9):  # what the callbacks saw: the host ran ahead in step 2
        clock(None)
        clock.ends[-1] = host_time
    assert "first step 10.0s, then 8.25s a step; each 10.00, 8.00, 8.50s)" in clock.describe({})
    assert not StepClock(torch.device("cpu")).device_ends and StepClock(torch.device("cpu")).device is None  # the CPU: the host's clock
