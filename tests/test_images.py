"""Input images in any mode and orientation become upright RGB; sizes follow the official rounding."""

import numpy as np
import pytest
from PIL import Image

from wan_i2v.config import check_frame_num, parse_size
from wan_i2v.errors import WanError
from wan_i2v.models.spec import spec_for
from wan_i2v.video import image_to_tensor, load_image


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "I;16", "CMYK", "1"])
def test_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("image.tiff" if mode in ("CMYK", "I;16") else "image.png")
    Image.new(mode, (40, 30)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    pixels = np.asarray(load_image(path))
    assert 120 <= pixels.min() <= pixels.max() <= 135


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert np.all(np.asarray(load_image(path)) == 255)


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    image = Image.new("RGB", (60, 20), "blue")
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 60)


def test_tensor_is_official_normalisation():
    image = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    assert image_to_tensor(image).flatten().tolist() == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1])


@pytest.mark.parametrize(
    "image_hw,area,expected",
    [
        # Official: lat = floor(sqrt(area*h/w) / 8 / 2) * 2 latents, times 8 pixels.
        ((720, 1280), 1280 * 720, (720, 1280)),
        ((1080, 1920), 1280 * 720, (720, 1280)),
        # A 480x832 image at 480P: sqrt(399360 * 480/832) is 479.99999... in float64, so the official
        # code keeps 58 latent rows (464 pixels), not 60.
        ((480, 832), 832 * 480, (464, 832)),
        ((1000, 1000), 1280 * 720, (960, 960)),  # sqrt(921600)=960 -> 960
        ((600, 800), 832 * 480, (544, 720)),  # sqrt(399360*0.75)=547.3 -> 544; sqrt(399360/0.75)=729.7 -> 720
    ],
)
def test_video_size_rounds_like_official(image_hw, area, expected):
    assert spec_for().video_size(*image_hw, area) == expected


def test_presets_and_sizes():
    assert parse_size("720P") == (1280 * 720, 5.0)
    assert parse_size("480p") == (832 * 480, 3.0)
    assert parse_size("1024*576") == (1024 * 576, None)


def test_frame_num_hints_nearest_valid():
    with pytest.raises(WanError, match="use 77 or 81"):
        check_frame_num(80)
    check_frame_num(81)


def test_settings_want_whole_numbers():
    from wan_i2v.config import GenerationSettings

    with pytest.raises(WanError, match="steps must be a whole number"):
        GenerationSettings("p", "n", steps=2.5)
    with pytest.raises(WanError, match="frame_num must be a whole number"):
        GenerationSettings("p", "n", frame_num=9.0)
