"""What the server adds to a job: its mp4 is encoded while the frames are decoded (not after), the same
bytes as written whole, the video never travels back from the session; and bench/serve_throughput.py
measures it (its CPU check runs here so that it cannot rot)."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from server_process import png_bytes, wait_until
from wan_i2v.models.spec import spec_for
from wan_i2v.video import demo_image, image_to_tensor, mp4_writer, write_mp4

FPS = spec_for().fps

JOB = dict(max_area=48 * 80, frame_num=9, steps=1, shift=3.0, seed=3, progress=False)


def drifting_video(frames: int) -> torch.Tensor:
    """[3, F, 96, 160] in [-1, 1]: the demo picture moving, with noise (what x264 has to work for)."""
    picture = image_to_tensor(demo_image(160, 96))
    noise = torch.Generator().manual_seed(0)
    return torch.stack([picture.roll(3 * n, dims=2) + 0.05 * torch.randn(picture.shape, generator=noise) for n in range(frames)], dim=1).clamp(-1, 1)


def test_an_mp4_written_as_its_frames_come_is_the_file_written_whole(tmp_path):
    video = drifting_video(9)
    whole = write_mp4(video, tmp_path / "whole.mp4", fps=FPS, metadata={"seed": 3})
    with mp4_writer(tmp_path / "runs.mp4", fps=FPS, metadata={"seed": 3}) as write:
        for start, end in ((0, 1), (1, 5), (5, 9)):  # as a decode hands them: the first frame, then 4 a latent frame
            write(video[:, start:end])
    assert (tmp_path / "runs.mp4").read_bytes() == whole.read_bytes()


def test_an_mp4_whose_frames_stop_coming_leaves_no_file(tmp_path):
    class DecodeFailed(Exception):
        pass

    try:
        with mp4_writer(tmp_path / "video.mp4", fps=FPS) as write:
            write(drifting_video(5))
            raise DecodeFailed
    except DecodeFailed:
        pass
    assert list(tmp_path.iterdir()) == []  # neither the mp4 nor its temporary


def test_the_decode_hands_each_latent_frames_frames_on_as_it_comes(tiny_pipeline):
    latents = torch.randn(16, 3, 6, 10, generator=torch.Generator().manual_seed(0))  # 3 latent frames: 9 video frames
    decoded_so_far = []
    runs = []

    def on_frames(frames):
        runs.append(frames.clone())
        decoded_so_far.append(len(runs))

    video = tiny_pipeline.decode(latents, on_frames=on_frames)
    assert [run.shape[1] for run in runs] == [1, 4, 4]  # one run per latent frame, not the whole video at the end
    assert torch.equal(torch.cat(runs, dim=1), video)


def test_generate_writes_the_mp4_during_the_decode_with_the_bytes_of_write_mp4(tiny_pipeline, tmp_path):
    result = tiny_pipeline.generate(demo_image(160, 96), "a boat", video_file=tmp_path / "during.mp4", **JOB)
    after = write_mp4(result.video, tmp_path / "after.mp4", fps=FPS, metadata=result.metadata)
    assert (tmp_path / "during.mp4").read_bytes() == after.read_bytes()
    assert "mp4 after the decode" in result.timings


def test_a_run_that_dies_while_its_mp4_is_written_leaves_no_mp4_and_resumes_at_the_decode(tiny_pipeline, tmp_path, monkeypatch):
    import pytest

    import wan_i2v.pipeline

    class Died(Exception):
        pass

    real_writer = wan_i2v.pipeline.mp4_writer

    @contextmanager
    def dying_writer(path, **options):  # as a kill mid-decode: the second run of frames never comes
        with real_writer(path, **options) as write:
            handed = []

            def write_until_killed(frames):
                handed.append(frames)
                if len(handed) == 2:
                    raise Died
                write(frames)

            yield write_until_killed

    state, video = tmp_path / "run.state.pt", tmp_path / "video.mp4"
    monkeypatch.setattr(wan_i2v.pipeline, "mp4_writer", dying_writer)
    with pytest.raises(Died):
        tiny_pipeline.generate(demo_image(160, 96), "a boat", state_file=state, video_file=video, **JOB)
    assert sorted(path.name for path in tmp_path.iterdir()) == [state.name]  # no mp4, whole or half
    monkeypatch.setattr(wan_i2v.pipeline, "mp4_writer", real_writer)
    resumed = tiny_pipeline.generate(demo_image(160, 96), "a boat", state_file=state, video_file=video, **JOB)
    assert resumed.experts_used == []  # every step was saved: straight to the decode
    fresh = tiny_pipeline.generate(demo_image(160, 96), "a boat", **JOB)
    assert video.read_bytes() == write_mp4(fresh.video, tmp_path / "fresh.mp4", fps=FPS, metadata=fresh.metadata).read_bytes()


def test_a_video_file_that_cannot_be_written_is_refused_before_the_run(tiny_pipeline, tmp_path):
    import pytest

    from wan_i2v.errors import WanError

    steps = []
    with pytest.raises(WanError, match="does not exist"):
        tiny_pipeline.generate(demo_image(160, 96), "a boat", video_file=tmp_path / "missing" / "video.mp4",
                               callback_on_step_end=lambda *args: steps.append(args[1]), **JOB)  # fmt: skip
    assert steps == []  # no step ran


def test_a_session_writes_the_video_file_and_hands_back_no_frames(tiny_checkpoint, tiny_pipeline, tmp_path):
    from wan_i2v.session import RunOptions, RunSession

    with RunSession.open(RunOptions(ckpt_dir=tiny_checkpoint, device="cpu", dtype="fp32")) as session:
        result = session.generate(demo_image(160, 96), "a boat", video_file=tmp_path / "job.mp4", **JOB)
    assert result.video is None  # in a spawned session it would have crossed between processes (0.9 GB at 720P)
    alone = tiny_pipeline.generate(demo_image(160, 96), "a boat", **JOB)
    assert (tmp_path / "job.mp4").read_bytes() == write_mp4(alone.video, tmp_path / "alone.mp4", fps=FPS, metadata=alone.metadata).read_bytes()


def test_on_two_ranks_rank_0_writes_the_video_file_and_sends_back_no_frames(tiny_checkpoint, tmp_path):
    """The spawned session: rank 0 encodes the frames of the split decode as they come, and the
    0.9 GB (at 720P) of float frames no longer cross to this process."""
    from wan_i2v.session import RunOptions, RunSession

    job = {**JOB, "frame_num": 5}
    with RunSession.open(RunOptions(ckpt_dir=tiny_checkpoint, device="cpu", gpus=2, dtype="fp32")) as session:
        returned = session.generate(demo_image(160, 96), "a boat", **job)
        written = session.generate(demo_image(160, 96), "a boat", video_file=tmp_path / "job.mp4", **job)
    assert written.video is None and returned.video is not None
    expected = write_mp4(returned.video, tmp_path / "returned.mp4", fps=FPS, metadata=returned.metadata)
    assert (tmp_path / "job.mp4").read_bytes() == expected.read_bytes()


def test_the_runner_records_a_job_done_when_its_generate_returns_with_the_mp4_in_place(tiny_checkpoint, tmp_path):
    """No encode after the job, in the runner's thread or behind the next job: the mp4 is whole when
    the session returns, and the job is completed at once."""
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, Runner, job_settings
    from wan_i2v.session import RunOptions, RunSession

    store = JobStore(tmp_path / "state")
    seen_at_return = []

    class WatchedSession:
        def __init__(self):
            self.session, self.alive = RunSession.open(RunOptions(ckpt_dir=tiny_checkpoint, device="cpu")), True

        def generate(self, image, **options):
            result = self.session.generate(image, **options)
            seen_at_return.append((Path(options["video_file"]).is_file(), result.video is None, store.get(Path(options["video_file"]).parent.name).status))
            return result

        def keep_alive(self):
            pass

        def close(self):
            self.session.close()

    job = store.submit(png_bytes(), job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults()))[0]
    runner = Runner(store, WatchedSession)
    runner.start()
    wait_until(lambda: store.get(job.id).status == "completed", timeout=60)
    runner.stop()
    assert seen_at_return == [(True, True, "in_progress")]
    assert store.video_path(job.id).is_file() and not store.state_path(job.id).exists()


def test_the_overhead_bench_runs_on_the_cpu(tmp_path):
    """bench/serve_throughput.py --tiny: the pipeline alone, then the same job through a real server, timed stage by stage."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "serve_throughput.py"
    done = subprocess.run([sys.executable, str(bench), "--tiny", "--json", str(tmp_path / "report.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (job,) = json.loads((tmp_path / "report.json").read_text())["overhead"]["jobs"]
    assert job["same_mp4_bytes"]  # the server's mp4 is the pipeline's, to the byte
    assert 0 < job["pipeline_generate"] and 0 < job["server_to_completed"] <= job["server_to_downloaded"]
    assert job["overhead"] == pytest.approx(job["server_to_downloaded"] - job["pipeline_generate"], abs=0.0015)  # each figure rounded to ms on its own
    assert {"waiting", "denoising", "decoding", "mp4 after the decode", "run", "recording"} <= set(job["server_stages"])
    assert {"denoising", "decoding"} <= set(job["pipeline_stages"])
