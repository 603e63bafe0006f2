"""What a newcomer meets around the outputs: names, modes, locks, the official script's spellings."""

import fcntl
import json
import os
import re
import subprocess
import sys

import av
import pytest
import torch
from PIL import Image

from wan_i2v.cli import main

TINY = ["--size", "64*96", "--frame-num", "5", "--steps", "2", "--quiet", "--device", "cpu", "--prompt", "a boat"]


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "input.png"
    Image.new("RGB", (120, 80), (200, 120, 40)).save(path)
    return path


def run(ckpt, image, *extra):
    return main(["generate", "--ckpt-dir", str(ckpt), "--image", str(image), *TINY, *extra])


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tiny_checkpoint, image_file, tmp_path, mask, mode):
    out, latents = tmp_path / "out.mp4", tmp_path / "out.latents.pt"
    old = os.umask(mask)
    try:
        assert run(tiny_checkpoint, image_file, "--save-file", str(out), "--save-latents", str(latents)) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode and latents.stat().st_mode & 0o777 == mode


def test_default_outputs_never_overwrite_each_other_and_stdout_is_only_the_path(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(tiny_checkpoint, image_file, "--seed", "1") == 0
    first = capsys.readouterr()
    assert first.out == "wan-i2v-output.mp4\n"
    assert run(tiny_checkpoint, image_file, "--seed", "2") == 0
    second = capsys.readouterr()
    assert second.out == "wan-i2v-output-1.mp4\n" and "wan-i2v: writing wan-i2v-output-1.mp4 (wan-i2v-output.mp4 exists)" in second.err
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["wan-i2v-output-1.mp4", "wan-i2v-output.mp4"]
    assert not list(tmp_path.glob(".*.lock"))  # the lock goes with the run


def test_a_second_run_on_the_same_output_is_refused(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    with open(tmp_path / ".out.mp4.lock", "a") as held:  # what a run in progress holds
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run(tiny_checkpoint, image_file, "--save-file", str(out)) == 2
    assert capsys.readouterr().err.strip() == f"wan-i2v: error: another run is writing {out} (wait for it to finish, or give another --save-file)"
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--save-file", "out.mov"], "--save-file out.mov does not end in .mp4 (the video is an mp4: use out.mp4)"),
        (["--save-file", ""], "--save-file is empty"),
        (["--save-file", "clips/"], "output path clips/ is a directory"),
        (["--save-file", "a.mp4", "--save-latents", "a.mp4"], "--save-latents a.mp4 is the --save-file too"),
    ],
)
def test_output_names_that_cannot_be_right(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    assert run(tiny_checkpoint, image_file, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wan-i2v: error: {message}"), err
    assert not list(tmp_path.glob("*.mp4"))


def test_the_official_scripts_spellings(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code = main(["generate", "--ckpt_dir", str(tiny_checkpoint), "--image", str(image_file), "--prompt", "a", "--size", "64*96",
                 "--frame_num", "5", "--sample_steps", "3", "--sample_shift", "4", "--sample_guide_scale", "2.5",
                 "--base_seed", "-1", "--save_file", str(out), "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 0
    with av.open(str(out)) as container:
        settings = json.loads(container.metadata["comment"])
    assert (settings["frame_num"], settings["steps"], settings["shift"], settings["guide_scale"]) == (5, 3, 4.0, [2.5, 2.5])
    assert f"seed: {settings['seed']}" in capsys.readouterr().err  # -1: a random seed, as in the official script


def test_version_from_the_command_and_the_module(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("wan-i2v 0.")
    proc = subprocess.run([sys.executable, "-m", "wan_i2v", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("wan-i2v 0.")


def test_a_state_of_other_settings_is_discarded_with_a_word(tiny_checkpoint, image_file, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    state = out.with_suffix(".state.pt")
    import torch

    torch.save({"format": "wan-i2v-loop-state/1", "run": {"other": True}}, state)
    assert run(tiny_checkpoint, image_file, "--save-file", str(out)) == 0
    err = capsys.readouterr().err
    assert f"wan-i2v: warning: the saved state in {state} is of another run" in err


def test_a_directory_given_as_the_image_is_said_so(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(tmp_path), *TINY, "--save-file", str(tmp_path / "o.mp4")]) == 2
    assert capsys.readouterr().err.strip() == f"wan-i2v: error: image path {tmp_path} is a directory (give an image file (PNG, JPEG or WebP))"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "8192*8192"], "size 8192\\*8192 is too large"),
        (["--frame-num", "10001"], "--frame-num 10001 is too large"),
    ],
)
def test_sizes_no_machine_holds_are_refused_at_once(tiny_checkpoint, image_file, tmp_path, capsys, extra, message):
    import re

    assert run(tiny_checkpoint, image_file, "--save-file", str(tmp_path / "o.mp4"), *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_too_little_disk_for_the_outputs_is_refused_before_the_run(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert run(tiny_checkpoint, image_file, "--save-file", str(tmp_path / "o.mp4")) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"wan-i2v: error: not enough disk space in {tmp_path}: ") and " MiB to write, 1000 B free" in error, error


def test_a_full_disk_mid_run_is_one_line(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys):
    import errno

    from wan_i2v import pipeline

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o.mp4"))

    monkeypatch.setattr(pipeline, "mp4_writer", full)  # (where the run writes its video, as it decodes)
    assert run(tiny_checkpoint, image_file, "--save-file", str(tmp_path / "o.mp4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"wan-i2v: error: no space left on the disk writing {tmp_path / 'o.mp4'} (free some space; a run's saved state lets the same command resume)"
    assert not (tmp_path / "o.mp4").exists()


def test_cache_dir_finds_the_checkpoint_for_generate_and_decode(tiny_checkpoint, image_file, tmp_path, monkeypatch):
    from wan_i2v.models.spec import spec_for

    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "elsewhere"))
    snapshot = tmp_path / "cache" / f"models--{spec_for().repo_id.replace('/', '--')}" / "snapshots" / "abc"
    snapshot.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(tiny_checkpoint, snapshot)
    out, latents = tmp_path / "o.mp4", tmp_path / "o.latents.pt"
    code = main(["generate", "--cache-dir", str(tmp_path / "cache"), "--image", str(image_file), *TINY, "--save-file", str(out), "--save-latents", str(latents)])
    assert code == 0 and out.is_file()
    assert main(["decode", str(latents), "--cache-dir", str(tmp_path / "cache"), "--save-file", str(tmp_path / "again.mp4"), "--device", "cpu", "--quiet"]) == 0
    (tmp_path / "file").write_text("x")
    assert main(["generate", "--cache-dir", str(tmp_path / "file"), "--image", str(image_file), *TINY, "--save-file", str(out)]) == 2


def test_a_garbage_latents_file_is_one_plain_line(tiny_checkpoint, tmp_path, capsys):
    garbage = tmp_path / "x.latents.pt"
    garbage.write_bytes(b"garbage\nmore")
    assert main(["decode", str(garbage), "--ckpt-dir", str(tiny_checkpoint), "--save-file", str(tmp_path / "o.mp4"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wan-i2v: error: cannot read latents file {garbage}: not a wan-i2v latents file, or cut short (give the file written by --save-latents, or generate again)"]


def test_the_demos_seed_is_fixed_and_said_so(capsys):
    from wan_i2v.cli import build_parser

    demo = build_parser().parse_args(["demo"])
    assert demo.seed == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    assert "default 0: the same video each time" in " ".join(capsys.readouterr().out.split())


def test_the_apis_default_dtype_on_the_cpu_is_fp32(tiny_checkpoint):
    import torch

    from wan_i2v import I2VPipeline

    pipe = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu")
    assert pipe.plan.dtype == torch.float32 and pipe.experts.models["high"].blocks[0].ffn[0].weight.dtype == torch.float32


def test_the_same_frames_give_the_same_mp4_bytes(tiny_pipeline, tmp_path):
    import hashlib

    from wan_i2v.video import demo_image, write_mp4

    # A generated video (its smooth areas and noise are what made the encoder's bytes vary before).
    video = tiny_pipeline.generate(demo_image(160, 96), "a boat", max_area=96 * 160, frame_num=5, steps=2, seed=3, progress=False).video
    digests = set()
    for attempt in range(16):
        path = write_mp4(video, tmp_path / f"copy-{attempt}.mp4", fps=16, metadata={"seed": 3})
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_with_no_gpu_a_small_model_runs_on_the_cpu_and_says_so(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    without_device = [arg for arg in TINY if arg not in ("--device", "cpu")]
    assert main(["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file), *without_device, "--save-file", str(tmp_path / "o.mp4")]) == 0
    assert "wan-i2v: no GPU is visible: running on the CPU" in capsys.readouterr().err


def test_with_no_gpu_the_real_model_is_refused_unless_the_cpu_is_asked_for(image_file, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Every file the loader requires, empty: the configs say nothing (the official model's sizes).
    from wan_i2v.models.spec import SAFETENSORS_INDEX, spec_for

    official = tmp_path / "Wan2.2-I2V-A14B"
    for path in spec_for().needed_files(official):
        (official / path).parent.mkdir(parents=True, exist_ok=True)
        (official / path).write_text('{"weight_map": {}}' if path.endswith(SAFETENSORS_INDEX) else "{}")
    for gpus, why in (([], "no GPU is visible, and a video of this 14B-parameter model takes hours on the CPU"),
                      (["--gpus", "2"], "2 GPUs asked for but no GPU is visible")):  # fmt: skip
        args = ["generate", "--ckpt-dir", str(official), "--image", str(image_file), "--prompt", "a boat", *gpus]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and "--device cpu" in err[0]
    # Asked for, the CPU is tried (and here the empty files are what stop it).
    assert main(["generate", "--ckpt-dir", str(official), "--image", str(image_file), "--prompt", "a boat", "--device", "cpu", "--quiet"]) == 2
    assert "hours" not in capsys.readouterr().err


def test_fp8_on_the_cpu_says_it_does_nothing_and_offload_streams_from_the_files(tiny_checkpoint, image_file, tmp_path, capsys):
    plain, flagged, streamed = tmp_path / "plain.mp4", tmp_path / "flagged.mp4", tmp_path / "streamed.mp4"
    assert run(tiny_checkpoint, image_file, "--seed", "5", "--save-file", str(plain), "--save-latents", str(tmp_path / "plain.pt")) == 0
    capsys.readouterr()
    assert run(tiny_checkpoint, image_file, "--seed", "5", "--save-file", str(flagged), "--fp8") == 0
    assert "warning: --fp8 does nothing on the CPU" in capsys.readouterr().err
    assert flagged.read_bytes() == plain.read_bytes()  # ignored, not half-applied
    # Streamed from the checkpoint, on the CPU too: the experts wait in the files, not in host memory.
    for mode in ("blocks", "experts"):
        assert run(tiny_checkpoint, image_file, "--seed", "5", "--save-file", str(streamed), "--offload", mode, "--save-latents", str(tmp_path / "s.pt")) == 0
        assert torch.equal(torch.load(tmp_path / "s.pt")["latents"], torch.load(tmp_path / "plain.pt")["latents"])
        streamed.unlink()
    # A dry run shows the plan the run would follow.
    assert run(tiny_checkpoint, image_file, "--save-file", str(tmp_path / "dry.mp4"), "--fp8", "--offload", "blocks", "--dry-run") == 0
    out, err = capsys.readouterr()
    assert "warning: --fp8 does nothing on the CPU" in err and "FP8" not in out and "expert blocks streamed from the checkpoint" in out, out


def test_a_host_too_small_for_the_experts_streams_them_and_gives_the_same_video(tiny_checkpoint, image_file, tmp_path, capsys, monkeypatch):
    """The planner puts the experts where the host's memory allows: given less than the resident plan
    needs, the blocks stream from the checkpoint's files (the disk tier), and the latents are the same."""
    from wan_i2v.parallel import plan

    # The tiny model's weights are KiBs: without the process's own fixed share the tiers differ at that scale.
    monkeypatch.setattr(plan, "HOST_PROCESS_CPU", 0)
    monkeypatch.setattr(plan, "TEXT_ACTIVATIONS", 0)
    from wan_i2v.config import parse_size
    from wan_i2v.models.spec import spec_for
    from wan_i2v.session import RunOptions, plan_for

    height, width = spec_for().video_size(80, 120, parse_size("64*96")[0])

    def host_bytes(offload):
        options = RunOptions(ckpt_dir=tiny_checkpoint, device="cpu", offload=offload)
        return plan_for(options, height=height, width=width, frame_num=5, device="cpu", world=1, ckpt_dir=tiny_checkpoint).host.total

    resident, streaming = host_bytes(None), host_bytes("blocks")
    assert streaming < resident
    base = ["--seed", "5"]
    cap = f"{(streaming + resident) / 2 / 0.9 / 2**30:.12f}"  # between the two, past the planner's 10% headroom
    assert run(tiny_checkpoint, image_file, *base, "--host-memory", cap, "--save-file", str(tmp_path / "b.mp4"), "--dry-run") == 0
    assert re.match(r"plan: 1 process; (one expert at a time, streamed in|expert blocks streamed) from the checkpoint", capsys.readouterr().out)
    assert run(tiny_checkpoint, image_file, *base, "--save-file", str(tmp_path / "a.mp4"), "--save-latents", str(tmp_path / "a.pt")) == 0
    assert run(tiny_checkpoint, image_file, *base, "--host-memory", cap, "--save-file", str(tmp_path / "b.mp4"), "--save-latents", str(tmp_path / "b.pt")) == 0
    assert "streamed in from the checkpoint, to fit in memory" in capsys.readouterr().err
    assert torch.equal(torch.load(tmp_path / "a.pt")["latents"], torch.load(tmp_path / "b.pt")["latents"])


def test_the_summary_has_the_loading_time_and_loading_shows_progress(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys):
    from wan_i2v import pipeline

    monkeypatch.setattr(pipeline, "LOADING_BAR_DELAY_S", 0)  # the tiny model loads faster than the bar's delay
    quiet_free = [arg for arg in TINY if arg != "--quiet"]
    assert main(["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file), *quiet_free, "--save-file", str(tmp_path / "o.mp4")]) == 0
    err = capsys.readouterr().err
    assert "loading: 100%" in err and "4/4" in err and "image encoding: 100%" in err
    assert any(line.startswith("time: loading ") for line in err.splitlines())


def test_the_apis_errors_spell_keywords_and_the_clis_spell_flags(tiny_checkpoint, image_file, tmp_path, monkeypatch, capsys):
    import torch

    from wan_i2v import I2VPipeline
    from wan_i2v.errors import WanError
    from wan_i2v.session import RunOptions, RunSession
    from wan_i2v.video import check_writable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WanError) as raised:
        I2VPipeline.from_pretrained(tiny_checkpoint, device="cuda")
    assert "use device='cpu'" in str(raised.value) and "--" not in str(raised.value)
    with pytest.raises(WanError) as raised:
        RunSession.open(RunOptions(ckpt_dir=tiny_checkpoint, device="cpu", gpus=0))
    assert str(raised.value) == "gpus=0 (give 1 or more)"
    with pytest.raises(WanError) as raised:
        check_writable(tmp_path / "nowhere" / "out.mp4")
    assert "choose another save_file" in str(raised.value)
    # The same mistakes on the command line name the flags.
    assert main(["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image_file), "--prompt", "a", "--device", "cuda"]) == 2
    assert "use --device cpu" in capsys.readouterr().err
    assert main(["generate", "--ckpt-dir", str(tiny_checkpoint), *TINY, "--image", str(image_file), "--gpus", "0"]) == 2
    assert "wan-i2v: error: --gpus 0 (give 1 or more)" in capsys.readouterr().err
