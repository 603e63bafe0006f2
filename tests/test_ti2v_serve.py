"""Wan2.2-TI2V-5B behind `wan-i2v serve` and from the command line and the API, on one tiny checkpoint:
the server's job defaults are the model's (121 frames at 24 fps, 50 steps, guide scale 5), a job
without an image is text-to-video, a job naming another model is refused; a W*H size gives a video
without an image its orientation (704*1280 is portrait, as the official --size)."""

from __future__ import annotations

import pytest
import torch

from wan_i2v.cli import main
from wan_i2v.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def ti2v_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ti2v") / "tiny", spec="ti2v-5b")


def test_the_converted_copys_warning_names_the_dit_once(ti2v_checkpoint, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from wan_i2v.execution import ExecutionPlan
    from wan_i2v.options import RunOptions
    from wan_i2v.pipeline import I2VPipeline

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))  # no room for the copy
    plan = ExecutionPlan.for_device("cpu", RunOptions(dtype="fp32", offload="blocks", fp8=True, model="ti2v-5b"), converted_dir=tmp_path / "converted")
    with pytest.warns(UserWarning, match=r"^the converted copy of the DiT \(.*\) does not fit in "):
        I2VPipeline.load(ti2v_checkpoint, plan)


@pytest.mark.parametrize("size, video", [(["--size", "64*128"], "64x128"), (["--size", "128*64"], "128x64"), (["--height", "128", "--width", "64"], "64x128")])
def test_a_text_to_video_dry_run_takes_the_sizes_orientation(ti2v_checkpoint, capsys, size, video):
    assert main(["generate", "--ckpt-dir", str(ti2v_checkpoint), "--prompt", "a boat", "--device", "cpu", "--dry-run", "--frame-num", "5", *size]) == 0
    assert f"video: {video}, 5 frames" in capsys.readouterr().out  # (width x height)


def test_a_text_to_video_from_the_api_takes_the_sizes_orientation(ti2v_checkpoint):
    from wan_i2v import I2VPipeline
    from wan_i2v.config import GenerationSettings, SamplingDefaults

    pipe = I2VPipeline.from_pretrained(ti2v_checkpoint, device="cpu", dtype=torch.float32)
    for size, shape in (("64*128", (128, 64)), ("128*64", (64, 128))):
        settings = GenerationSettings.of("a boat", defaults=SamplingDefaults.official("ti2v-5b"), size=size, frame_num=5, steps=1, seed=0)
        result = pipe.generate(None, settings=settings, progress=False)
        assert tuple(result.video.shape[-2:]) == shape and result.settings.fps == 24
