"""``compare``: PSNR and SSIM of two videos per frame and overall, against figures worked out by hand."""

import math
import sys

import av
import numpy as np
import pytest

from wan_i2v.compare import compare_videos, format_report
from wan_i2v.errors import WanError

FRAMES = 4
OFFSET = 5  # gray levels added to every pixel of one frame


def write_lossless(path, frames: np.ndarray):
    """[F, H, W, 3] uint8 frames in an mp4 that decodes to them exactly (x264's lossless RGB)."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264rgb", rate=16)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def random_frames(shape=(FRAMES, 32, 48, 3)) -> np.ndarray:
    # Between 20 and 200: an offset of OFFSET levels never clips.
    return np.random.default_rng(0).integers(20, 200, size=shape, dtype=np.uint8)


def test_equal_videos_have_infinite_psnr_and_ssim_1(tmp_path):
    frames = random_frames()
    report = compare_videos(write_lossless(tmp_path / "a.mp4", frames), write_lossless(tmp_path / "b.mp4", frames))
    assert [frame.psnr for frame in report.frames] == [math.inf] * FRAMES and report.psnr == math.inf
    assert [frame.ssim for frame in report.frames] == [1.0] * FRAMES and report.ssim == 1.0


def test_an_offset_on_one_frame_gives_the_psnr_worked_out_by_hand(tmp_path):
    frames = random_frames()
    changed = frames.copy()
    changed[2] += OFFSET
    report = compare_videos(write_lossless(tmp_path / "a.mp4", frames), write_lossless(tmp_path / "b.mp4", changed))
    # Every pixel of frame 2 is off by OFFSET: its mean squared error is OFFSET², the video's OFFSET² / FRAMES.
    assert report.frames[2].psnr == pytest.approx(20 * math.log10(255 / OFFSET))  # 34.15 dB
    assert report.psnr == pytest.approx(10 * math.log10(255**2 * FRAMES / OFFSET**2))
    assert [frame.psnr for index, frame in enumerate(report.frames) if index != 2] == [math.inf] * 3
    assert report.frames[2].ssim < 1 and [frame.ssim for index, frame in enumerate(report.frames) if index != 2] == [1.0] * 3
    assert report.ssim == pytest.approx((3 + report.frames[2].ssim) / 4)

    lines = format_report(report).splitlines()
    assert lines[0].split() == ["frame", "PSNR", "(dB)", "SSIM"]
    assert lines[3].split()[:2] == ["2", "34.15"] and lines[1].split() == ["0", "inf", "1.0000"]
    assert lines[-1].split()[:2] == ["all", f"{10 * math.log10(255**2 * FRAMES / OFFSET**2):.2f}"]


def test_a_video_and_its_mp4_as_wan_i2v_writes_it_are_close_but_not_equal(tmp_path):
    import torch

    from wan_i2v.video import write_mp4

    y, x = np.mgrid[0:32, 0:48]
    smooth = np.stack([x * 5, y * 7, x * 2 + y * 3], axis=-1).astype(np.uint8)  # gradients, as a picture has and noise lacks
    frames = np.stack([smooth] * 3)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
    report = compare_videos(write_lossless(tmp_path / "a.mp4", frames), write_mp4(video, tmp_path / "b.mp4", fps=16))
    assert 30 < report.psnr < math.inf and 0.9 < report.ssim < 1  # H.264 at the quality wan-i2v writes: lossy, yet near


@pytest.mark.parametrize(
    "other, message",
    [
        (random_frames((FRAMES - 1, 32, 48, 3)), r"a\.mp4 has 4 frames and .*b\.mp4 3 \(compare videos of the same length\)"),
        (random_frames((FRAMES, 32, 64, 3)), r"a\.mp4 is 48x32 and .*b\.mp4 64x32 \(compare videos of the same size\)"),
    ],
)
def test_videos_of_other_lengths_or_sizes_are_a_one_line_error(tmp_path, other, message):
    with pytest.raises(WanError, match=message) as error:
        compare_videos(write_lossless(tmp_path / "a.mp4", random_frames()), write_lossless(tmp_path / "b.mp4", other))
    assert "\n" not in str(error.value)


def test_a_missing_or_unreadable_file_is_a_one_line_error(tmp_path):
    video = write_lossless(tmp_path / "a.mp4", random_frames())
    with pytest.raises(WanError, match="no video at"):
        compare_videos(video, tmp_path / "missing.mp4")
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(WanError, match="is not a video that can be read"):
        compare_videos(tmp_path / "text.mp4", video)


def test_compare_is_torch_free(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch now fails
    for name in [name for name in sys.modules if name == "wan_i2v.compare"]:
        monkeypatch.delitem(sys.modules, name)
    import wan_i2v.compare  # noqa: F401
