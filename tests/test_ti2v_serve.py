"""Wan2.2-TI2V-5B behind `wan-i2v serve` and from the command line and the API, on one tiny checkpoint:
the server's job defaults are the model's (121 frames at 24 fps, 50 steps, guide scale 5), a job
without an image is text-to-video, a job naming another model is refused; a W*H size gives a video
without an image its orientation (704*1280 is portrait, as the official --size)."""

from __future__ import annotations

import io
import json
import os

import av
import pytest
import torch

import server_process
from server_process import Server, png_bytes
from wan_i2v.cli import main
from wan_i2v.tiny import write_tiny_checkpoint

# The server's only job default: W*H, with an image its area, without one a portrait video 96 wide and
# 160 high. The rest are the model's, which the tests check (the jobs take 2 steps, not 50, for time).
SIZE = "96*160"


@pytest.fixture(scope="module")
def ti2v_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ti2v") / "tiny", spec="ti2v-5b")


@pytest.fixture(scope="module")
def server(ti2v_checkpoint, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_process, "JOB_OPTIONS", ["--size", SIZE])
        running = Server(ti2v_checkpoint, tmp_path_factory.mktemp("serve-ti2v") / "state").start()
    yield running
    assert running.stop() == 0


@pytest.fixture()
def client(server):
    with server.client() as http:
        yield http


def video_of(client, job_id: str) -> tuple[tuple[int, ...], int, dict]:
    """The mp4's (frames, height, width), its frame rate and its metadata."""
    content = client.get(f"/v1/videos/{job_id}/content").content
    with av.open(io.BytesIO(content)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
        metadata = json.loads(container.metadata["comment"])
    return (len(frames), *frames[0].shape[:2]), rate, metadata


def test_the_server_serves_the_models_card(client):
    [card] = client.get("/v1/models").json()["data"]
    assert (card["id"], card["default_frame_num"], card["fps"], card["text_to_video"]) == ("wan2.2-ti2v-5b", 121, 24, True)
    defaults = client.get("/health").json()["defaults"]
    assert (defaults["frame_num"], defaults["steps"], defaults["guide_scale"], defaults["size"]) == (121, 50, [5.0, 5.0], SIZE)


def test_jobs_with_and_without_an_image_take_the_models_defaults(server, client):
    with_image = server.submit(client, "a red boat", image=png_bytes(160, 96), seed=1, steps=2, model="ti2v-5b")  # (the model by its alias)
    files = {"prompt": (None, "a red boat"), "seed": (None, "1"), "steps": (None, "2")}
    text_only = client.post("/v1/videos", files=files)  # a multipart form without input_reference
    assert with_image.status_code == 200 and text_only.status_code == 200, (with_image.text, text_only.text)
    for job in (with_image.json(), text_only.json()):
        assert job["model"] == "wan2.2-ti2v-5b" and job["seconds"] == "5"  # 120 frames' time at 24 frames a second
        assert (job["settings"]["frame_num"], job["settings"]["fps"], job["settings"]["guide_scale"], job["settings"]["shift"]) == (121, 24, [5.0, 5.0], 5.0)
    for job in (with_image.json(), text_only.json()):
        assert server.wait_for(client, job["id"], timeout=300)["status"] == "completed"
    shape, rate, metadata = video_of(client, with_image.json()["id"])
    assert shape == (121, 96, 160) and rate == 24 and metadata["conditioning"] == "first frame"
    shape, rate, metadata = video_of(client, text_only.json()["id"])
    assert shape == (121, 160, 96) and rate == 24 and metadata["conditioning"] == "text only"  # 96*160 is 96 wide: portrait


def test_a_job_naming_another_model_is_refused(server, client):
    answer = server.submit(client, model="wan2.2-i2v-a14b")
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "model 'wan2.2-i2v-a14b' is not served here: only 'wan2.2-ti2v-5b' (or leave model out)"
    last_alone = client.post("/v1/videos", files={"prompt": (None, "a boat"), "last_image": ("last.png", png_bytes(), "image/png")})
    assert last_alone.status_code == 400 and "last_image needs input_reference" in last_alone.json()["error"]["message"]
    seconds = server.submit(client, seconds=4)
    assert seconds.status_code == 400 and "24 frames a second, 4n+1 frames: 121 is 5 s" in seconds.json()["error"]["message"]


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


def test_the_page_shows_the_models_defaults_and_makes_a_video_without_an_image(server):
    from test_server_page import CHROMIUM, page_with_token

    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = page_with_token(browser, server)
            page.goto(server.url)
            page.wait_for_function("() => document.querySelector('#model').textContent.includes('24 fps')")
            assert page.locator("#model").inner_text() == f"wan2.2-ti2v-5b: {SIZE}, 121 frames at 24 fps, 50 steps"
            assert page.locator("#frames").get_attribute("placeholder") == "121" and "optional" in page.locator("#drop-text").inner_text()
            page.fill("#prompt", "a paper boat on a pond")
            page.fill("#frames", "5")
            page.fill("#steps", "1")
            page.click("#submit")  # no image chosen
            page.wait_for_selector(".job[data-status=completed] video", timeout=120_000)
            assert "text_to_video: true" in page.locator(".job .settings").first.inner_text()
        finally:
            browser.close()


def test_a_server_of_another_model_fails_a_job_it_takes_from_a_shared_queue(tmp_path):
    from server_process import wait_until
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import Runner, job_settings
    from wan_i2v.server.store import JobStore

    class Unused:
        def generate(self, *args, **kwargs):
            raise AssertionError("the job ran")

        def keep_alive(self):
            pass

        def close(self):
            pass

    store = JobStore(tmp_path / "state")
    job = store.submit(png_bytes(), job_settings({"prompt": "a boat"}, SamplingDefaults()))[0]  # an A14B server's job
    runner = Runner(store, Unused, model="wan2.2-ti2v-5b")
    runner.start()
    wait_until(lambda: store.get(job.id).status == "failed", timeout=30)
    runner.stop()
    assert store.get(job.id).error == ("the job is for wan2.2-i2v-a14b, and the server that took it runs wan2.2-ti2v-5b: "
                                       "the servers sharing a queue must serve one model")  # fmt: skip
