import pytest
import torch

from wan_i2v.models.conditioning import KnownFrames, KnownFramesMask


def _encode_every_fourth(video):
    # A stand-in for the VAE with its temporal layout: latent frame 0 is pixel frame 0, latent j the
    # pixel frames 4j-3..4j (here: the last of them), halved in size.
    return torch.cat([video[:, :1], video[:, 4::4]], dim=1)[:, :, ::2, ::2]


def test_the_mask_marks_first_and_last_frames_in_the_official_channel_layout():
    first, last = torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), -0.5)
    known = KnownFrames(torch.stack([first, last], dim=1), (0, 8))
    condition = KnownFramesMask().condition(known, 9, 4, _encode_every_fourth).channels
    assert condition.shape == (4 + 3, 3, 2, 2)
    # 9 pixel frames, the first repeated 4 times: 12 mask entries, 4 per latent frame. The first latent
    # frame is wholly known; the last's fourth channel is pixel frame 8.
    expected = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]], dtype=torch.float32)
    assert torch.equal(condition[:4, :, 0, 0], expected)
    assert torch.equal(condition[4:, 0], torch.full((3, 2, 2), 0.5))
    assert torch.equal(condition[4:, 1], torch.zeros(3, 2, 2))  # frame 4: not given, black
    assert torch.equal(condition[4:, 2], torch.full((3, 2, 2), -0.5))


def test_positions_and_frames_must_agree():
    with pytest.raises(ValueError, match="2 known frames for 1 positions"):
        KnownFrames(torch.zeros(3, 2, 4, 4), (0,))
