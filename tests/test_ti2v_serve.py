"""Wan2.2-TI2V-5B behind `wan-i2v serve` and from the command line and the API, on one tiny checkpoint:
the server's job defaults are the model's (121 frames at 24 fps, 50 steps, guide scale 5), a job
without an image is text-to-video, a job naming another model is refused; a W*H size gives a video
without an image its orientation (704*1280 is portrait, as the official --size)."""

from __future__ import annotations

import pytest

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
