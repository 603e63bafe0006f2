"""Video extension (``I2VPipeline.extend``, ``wan-i2v extend``) on the tiny checkpoint: a 9-frame
source, 9-frame clips conditioned on its last 5 frames, 2 steps."""

import hashlib
import json

import av
import numpy as np
import pytest
import torch

from wan_i2v.errors import WanError
from wan_i2v.video import write_mp4

CLIP = dict(frame_num=9, steps=2, context_frames=5)
SOURCE_FRAMES, HEIGHT, WIDTH = 9, 32, 48


def decoded_frames(path) -> torch.Tensor:
    """An mp4's frames as PyAV decodes them, as [3, F, H, W] in [-1, 1]."""
    with av.open(str(path)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def source_file(tmp_path_factory):
    """A 9-frame mp4 at 24 fps, not the model's 16: a bright square moving over a gradient."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, HEIGHT), torch.linspace(-1, 1, WIDTH), indexing="ij")
    frames = torch.stack([torch.stack([x, y, x * y]) for _ in range(SOURCE_FRAMES)], dim=1) * 0.6
    for index in range(SOURCE_FRAMES):
        frames[:, index, 8:20, 2 + 3 * index : 14 + 3 * index] = 0.9
    return write_mp4(frames, tmp_path_factory.mktemp("source") / "source.mp4", fps=24, metadata={"prompt": "where it began", "seed": 7})


@pytest.fixture(scope="module")
def once(tiny_pipeline, source_file):
    return tiny_pipeline.extend(source_file, "a boat", seed=1, progress=False, **CLIP)


@pytest.fixture(scope="module")
def twice(tiny_pipeline, source_file):
    return tiny_pipeline.extend(source_file, "a boat", seed=1, extend_times=2, progress=False, **CLIP)


def new_frames(result):
    return result.video[:, SOURCE_FRAMES:]


def test_4m_plus_1_context_frames_are_whole_latent_frames_of_the_mask():
    """The mask's first latent frame stands for frame 0 alone, each later one for 4 frames: the 5 context
    frames at positions 0-4 mark the first two latent frames whole and leave the third unmarked."""
    from wan_i2v.extend import context
    from wan_i2v.models.conditioning import KnownFramesMask

    latents = torch.zeros(16, 3, 2, 3)
    condition = KnownFramesMask().condition(context(torch.ones(3, 9, 16, 24), 5), 9, 4, lambda video: latents)
    mask = condition.channels[:4]
    assert mask[:, :2].eq(1).all() and mask[:, 2].eq(0).all()


def test_the_join_repeats_no_frame(once, source_file):
    """The source's frames as the file decodes, then the clip's frames after its 5 context frames."""
    assert once.video.shape == (3, SOURCE_FRAMES + CLIP["frame_num"] - CLIP["context_frames"], HEIGHT, WIDTH)
    # (both from the same 8-bit frames: the division's rounding is all that differs)
    torch.testing.assert_close(once.video[:, :SOURCE_FRAMES], decoded_frames(source_file), rtol=0, atol=1e-6)
    assert once.fps == 24 and len(once.segments) == 1 and once.segments[0].video is None


def test_the_context_frames_condition_the_new_clip(tiny_pipeline, source_file, once):
    """Other last 5 frames: another clip. Other frames before them: the same clip, bit for bit."""
    frames = decoded_frames(source_file)
    other_context, other_start = frames.clone(), frames.clone()
    other_context[:, -CLIP["context_frames"] :] = other_context[:, -CLIP["context_frames"] :].flip(-1)
    other_start[:, : SOURCE_FRAMES - CLIP["context_frames"]] = 0
    changed = tiny_pipeline.extend(other_context, "a boat", seed=1, progress=False, **CLIP)
    kept = tiny_pipeline.extend(other_start, "a boat", seed=1, progress=False, **CLIP)
    assert (new_frames(changed) - new_frames(once)).abs().mean() > 0.01
    assert torch.equal(new_frames(kept), new_frames(once))
    assert torch.equal(kept.video[:, : SOURCE_FRAMES - CLIP["context_frames"]], other_start[:, : SOURCE_FRAMES - CLIP["context_frames"]])


def test_extending_twice_conditions_each_clip_on_the_end_of_the_one_before(tiny_pipeline, once, twice):
    assert twice.video.shape[1] == SOURCE_FRAMES + 2 * (CLIP["frame_num"] - CLIP["context_frames"])
    assert torch.equal(twice.video[:, : once.video.shape[1]], once.video)
    assert [segment.settings.seed for segment in twice.segments] == [1, 2]
    continued = tiny_pipeline.extend(once.video, "a boat", seed=2, progress=False, **CLIP)
    assert torch.equal(continued.video, twice.video)


def test_the_metadata_records_the_chain(once, twice, source_file, tmp_path):
    from wan_i2v.extend import read_source
    from wan_i2v.models.spec import spec_for

    sha256 = hashlib.sha256(source_file.read_bytes()).hexdigest()
    (link,) = once.metadata["chain"]
    assert {key: link[key] for key in ("source_sha256", "source_frames", "context_frames")} == {"source_sha256": sha256, "source_frames": 9, "context_frames": 5}
    assert [(segment["prompt"], segment["seed"], segment["frame_num"]) for segment in link["segments"]] == [("a boat", 1, 9)]
    assert [segment["seed"] for segment in twice.metadata["chain"][0]["segments"]] == [1, 2]
    extended = write_mp4(twice.video, tmp_path / "extended.mp4", fps=twice.fps, metadata=twice.metadata)
    # (the next extension's chain starts from it; as JSON, the guide scale's pair is a list)
    assert read_source(extended, spec_for()).chain == json.loads(json.dumps(twice.metadata["chain"]))


@pytest.mark.parametrize("size", [(40, 48), (32, 24)])
def test_a_source_of_a_size_the_model_does_not_take_is_refused(tiny_pipeline, size):
    with pytest.raises(WanError, match=rf"the video is {size[1]}x{size[0]}, a size the model does not take \(resize it to sides that are multiples of 16"):
        tiny_pipeline.extend(torch.zeros(3, 9, *size), "a boat", progress=False, **CLIP)


# -- the command ---------------------------------------------------------------------------------


def extend(ckpt, video, out, *extra):
    from wan_i2v.cli import main

    return main(["extend", str(video), "--ckpt-dir", str(ckpt), "--prompt", "a boat", "--save-file", str(out), "--seed", "1",
                 "--frame-num", "9", "--steps", "2", "--quiet", "--device", "cpu", *extra])  # fmt: skip


def read_metadata(path) -> dict:
    with av.open(str(path)) as container:
        return json.loads(container.metadata["comment"])


def test_an_interrupted_extension_resumes_with_the_same_command(tiny_checkpoint, source_file, twice, tmp_path, monkeypatch, capsys):
    """Stopped in the second clip's second step: the same command keeps the first clip (no forward of
    it again), resumes the second from its saved step, and writes the video of a run never stopped."""
    from wan_i2v.models.dit import DiT

    out, forward, calls = tmp_path / "longer.mp4", DiT.forward, []

    def counted(self, *args, **kwargs):
        calls.append(len(calls))
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DiT, "forward", counted)
    stop_at = 7  # 2 guided steps of 2 forwards a clip: the 7th forward is the second clip's second step
    assert extend(tiny_checkpoint, source_file, out, "--extend-times", "2") == 130
    states = tmp_path / "longer.extend"
    assert f"the denoising states are saved in {states}; the same command resumes from them" in capsys.readouterr().err and not out.exists()
    assert [torch.load(states / f"segment-{n}.state.pt", weights_only=True)["step"] for n in (1, 2)] == [2, 1]
    stop_at, calls[:] = None, []
    assert extend(tiny_checkpoint, source_file, out, "--extend-times", "2") == 0
    assert len(calls) == 2 and not states.exists()
    unbroken = write_mp4(twice.video, tmp_path / "unbroken.mp4", fps=24)
    assert torch.equal(decoded_frames(out), decoded_frames(unbroken))
    with av.open(str(out)) as container:
        assert container.streams.video[0].average_rate == 24
    assert read_metadata(out) == json.loads(json.dumps(twice.metadata))


def test_extending_an_extension_continues_its_chain(tiny_checkpoint, twice, tmp_path, capsys):
    extended = write_mp4(twice.video, tmp_path / "extended.mp4", fps=24, metadata=twice.metadata)
    out = tmp_path / "again.mp4"
    assert extend(tiny_checkpoint, extended, out) == 0
    assert capsys.readouterr().out.strip() == str(out)
    first, second = read_metadata(out)["chain"]
    assert first == json.loads(json.dumps(twice.metadata["chain"][0]))
    assert second["source_sha256"] == hashlib.sha256(extended.read_bytes()).hexdigest() and second["source_frames"] == twice.video.shape[1]
    assert [(segment["prompt"], segment["seed"]) for segment in second["segments"]] == [("a boat", 1)]
    assert decoded_frames(out).shape[1] == twice.video.shape[1] + 4


def test_a_dry_run_says_what_it_extends_and_writes_nothing(tiny_checkpoint, source_file, tmp_path, capsys):
    out = tmp_path / "longer.mp4"
    assert extend(tiny_checkpoint, source_file, out, "--dry-run", "--context-frames", "1") == 0
    printed = capsys.readouterr().out
    assert f"extending 1 frame of {source_file}" in printed and "video: 48x32, 9 frames" in printed and "plan: " in printed
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--context-frames", "4"], "--context-frames 4 is not of the form 4m+1 (so that the context fills whole latent frames: use 1 or 5)"),
        (["--context-frames", "9"], "--context-frames 9 leaves no new frame in a clip of --frame-num 9"),
        (["--context-frames", "13", "--frame-num", "17"], "the source video has 9 frames, fewer than --context-frames 13"),
        (["--extend-times", "0"], "--extend-times 0: extend at least once"),
        (["--frame-num", "8"], "--frame-num 8 is not of the form 4n+1"),
    ],
)
def test_bad_extensions_are_one_line(tiny_checkpoint, source_file, tmp_path, capsys, args, message):
    assert extend(tiny_checkpoint, source_file, tmp_path / "out.mp4", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wan-i2v: error: {message}") and err.count("\n") == 1, err
    assert sorted(tmp_path.iterdir()) == []


def test_a_source_that_is_not_an_mp4_is_one_line(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    image, text, missing = tmp_path / "image.png", tmp_path / "notes.mp4", tmp_path / "missing.mp4"
    Image.new("RGB", (48, 32)).save(image)
    text.write_text("not a video")
    for source, message in ((image, f"{image} is not an mp4 video"), (text, f"cannot read {text}"), (missing, f"video not found: {missing}")):
        assert extend(tiny_checkpoint, source, tmp_path / "out.mp4") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"wan-i2v: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out.mp4").exists()


def test_the_output_is_not_the_source(tiny_checkpoint, source_file, capsys):
    assert extend(tiny_checkpoint, source_file, source_file) == 2
    assert capsys.readouterr().err.startswith(f"wan-i2v: error: --save-file {source_file} is the video to extend")


def test_two_processes_extend_as_one_does(tiny_checkpoint, source_file, twice, tmp_path):
    """`--gpus 2 --device cpu` (two gloo ranks, CFG parallel): rank 0's context goes to both ranks,
    clip after clip, and the video is the one process's."""
    out = tmp_path / "longer.mp4"
    assert extend(tiny_checkpoint, source_file, out, "--extend-times", "2", "--gpus", "2") == 0
    two, one = decoded_frames(out).float(), decoded_frames(write_mp4(twice.video, tmp_path / "one.mp4", fps=24)).float()
    # Not to the bit: the ranks' fp32 differs from one process's in the last places on some CPUs (other
    # vectorized paths for other shapes), which can move a pixel by a level and x264 by a few more
    # (seen: at most 10 levels, 1.5e-4 on average); another clip's context moves every pixel.
    assert (two - one).abs().mean() <= 1e-3 and (two - one).abs().max() <= 0.1
