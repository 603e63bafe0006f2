"""Model specs: everything the package knows of a model family, in one place (torchtitan's ``ModelSpec``).

A spec names its hub repository, its checkpoint's layout (read by the loader, the cache and
`wan-i2v cache status`), the builders of its parts, its experts and the timesteps each runs for,
how the image conditions the video, and its size rules, presets and frame rate. Code outside this
module asks the spec instead of naming a model's folders, experts or numbers.

No torch here, even indirectly: the builders are dotted names imported when first called, so that
`wan-i2v --help` and `cache status` read a spec without loading torch.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from wan_i2v.errors import WanError, counted

# How every expert is stored: diffusers' safetensors names, one file or an index and its shards.
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SHARD_GLOB = "diffusion_pytorch_model-*-of-*.safetensors"
# Beside the text encoder, for an encoder of another width than the spec's ``text_dim`` (the tiny test model's).
T5_CONFIG_FILE = "t5_config.json"


@dataclass(frozen=True)
class Lazy:
    """A callable named ``"package.module:attribute"``, imported on first use (so a spec stays torch-free)."""

    path: str

    @property
    def target(self):
        module, _, attribute = self.path.partition(":")
        target = importlib.import_module(module)
        for name in attribute.split("."):
            target = getattr(target, name)
        return target

    def __call__(self, *args, **kwargs):
        return self.target(*args, **kwargs)


@dataclass(frozen=True)
class ExpertSpec:
    """One denoiser of the model: it runs for timesteps >= ``boundary`` and below the previous expert's."""

    name: str
    folder: str  # its folder in the checkpoint directory (config.json and safetensors); "" for the directory itself
    boundary: int
    label: str = ""  # the word lists call it by, and "the <label> expert" ("high-noise"); its name where empty
    phrase: str = ""  # how a sentence names it where "the <label> expert" does not fit ("the DiT")

    def file(self, name: str) -> str:
        """The "/"-separated path of its file ``name`` in the checkpoint directory."""
        return f"{self.folder}/{name}" if self.folder else name

    def __str__(self) -> str:
        """How a sentence names it: "the high-noise expert", "the DiT"."""
        return self.phrase or f"the {self.label or self.name} expert"


@dataclass(frozen=True)
class Preset:
    max_area: int
    shift: float


@dataclass(frozen=True)
class CardDefaults:
    """The model card's sampling defaults (``config.SamplingDefaults.official`` reads them)."""

    frame_num: int
    steps: int
    guide_scale: tuple[float, float]  # (low-noise expert, high-noise expert); one model of one expert repeats its value
    text_to_video_shape: tuple[int, int] = (704, 1280)  # (height, width) whose aspect a video without an image takes (the official t2v size)


class AreaFit:
    """Wan2.2-I2V's sizing: the image's aspect ratio within the area, each side rounded down to whole
    latent patches; the image is stretched to it (bicubic, without antialiasing, as the official code)."""

    def video_size(self, image_height: int, image_width: int, max_area: int, stride: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
        aspect = image_height / image_width
        lat_h = round(math.sqrt(max_area * aspect) // stride[0] // patch[0] * patch[0])
        lat_w = round(math.sqrt(max_area / aspect) // stride[1] // patch[1] * patch[1])
        return lat_h * stride[0], lat_w * stride[1]

    def resize(self, pixels, height: int, width: int):
        """[3, h, w] in [-1, 1] -> [3, height, width], resized on the CPU in fp32."""
        import torch.nn.functional as F

        return F.interpolate(pixels[None], size=(height, width), mode="bicubic")[0]


class CropFit:
    """Wan2.2-TI2V's sizing (the official ``best_output_size``): whole multiples of a latent patch
    within the area, width-first or height-first, whichever keeps the aspect ratio closer; the image
    is scaled to cover it (Lanczos, on the 8-bit image) and cropped at the centre."""

    def video_size(self, image_height: int, image_width: int, max_area: int, stride: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
        step_h, step_w = stride[0] * patch[0], stride[1] * patch[1]
        ratio = image_width / image_height
        width = (max_area * ratio) ** 0.5
        height = max_area / width
        width_first_w = int(width // step_w * step_w)
        width_first = (int(max_area / max(width_first_w, 1) // step_h * step_h), width_first_w)
        height_first_h = int(height // step_h * step_h)
        height_first = (height_first_h, int(max_area / max(height_first_h, 1) // step_w * step_w))

        def distortion(size):
            other = size[1] / size[0] if min(size) > 0 else math.inf
            return max(ratio / other, other / ratio) if other else math.inf

        return width_first if distortion(width_first) < distortion(height_first) else height_first

    def resize(self, pixels, height: int, width: int):
        """[3, h, w] in [-1, 1] -> [3, height, width]: the 8-bit image scaled to cover the size, then its centre."""
        import numpy as np
        import torch
        from PIL import Image

        image = Image.fromarray(pixels.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        scale = max(width / image.width, height / image.height)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
        return array.float().div(255).sub_(0.5).div_(0.5)


@dataclass(frozen=True)
class CheckpointFiles:
    """The checkpoint's files besides the experts' folders, by name."""

    vae: str
    text_encoder: str
    tokenizer_dir: str
    # What transformers reads the tokenizer from. For umT5: the vocabulary in tokenizer.json, the special
    # tokens (padding) in tokenizer_config.json. (Without tokenizer.json it made a tokenizer of an empty
    # vocabulary from the config alone, and spiece.model is read only through a conversion that needs protobuf.)
    tokenizer_files: tuple[str, ...]
    text_dim: int  # the width of the text features the experts take from the stored text encoder


@dataclass(frozen=True)
class Builders:
    """How each part is made from the checkpoint's files."""

    dit_config: Lazy  # the DiT's config class; its defaults are the official shapes
    build_dit: Lazy  # (expert folder, dtype=, adapt=) -> (model on the meta device, its tensor source)
    load_dit: Lazy  # (expert folder, device=, dtype=, before_weights=, adapt=) -> a filled model (FSDP)
    load_vae: Lazy  # (path, device=, dtype=) -> the VAE
    load_text_encoder: Lazy  # (weights, tokenizer folder, text_len=, device=, dtype=, ...) -> the text encoder
    text_encoder_config: Lazy  # the text encoder's config class
    vae_config: Lazy  # the VAE's config class


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo_id: str  # on the Hugging Face hub
    experts: tuple[ExpertSpec, ...]  # from the highest boundary down; the last one's is 0
    files: CheckpointFiles
    builders: Builders
    model_type: str  # the experts' config.json says it: how a checkpoint tells its spec
    conditioning: Lazy  # the strategy class that turns the first frame into the condition (``models/conditioning.py``)
    fit: AreaFit | CropFit  # how an image of any size becomes the video's size
    guide_scale_order: tuple[str, ...]  # the expert each value of a guide-scale tuple belongs to
    presets: Mapping[str, Preset]
    default_preset: str
    fps: int
    vae_stride: tuple[int, int, int]  # (frames, height, width) of pixels per latent
    patch_size: tuple[int, int, int]  # (frames, height, width) of latents per DiT token
    latent_channels: int
    stored_bytes: int  # bytes per parameter of the released experts' safetensors (for an unread checkpoint)
    defaults: CardDefaults
    aliases: tuple[str, ...] = ()  # other names it is chosen by (``--model``, the official ``--task``), any case
    # The LoRAs that distill the experts to the 4-step recipe, by expert name, as hub files
    # (hf://OWNER/REPO/PATH): `wan-i2v cache quick --lightning` fetches them and `--distilled` merges them.
    distilled_loras: Mapping[str, str] | None = None

    def __post_init__(self):
        boundaries = [expert.boundary for expert in self.experts]
        if not self.experts or boundaries[-1] != 0 or boundaries != sorted(boundaries, reverse=True) or len(set(boundaries)) != len(boundaries):
            raise ValueError(f"{self.name}: the experts' boundaries must fall strictly to 0, not {boundaries}")
        if sorted(self.guide_scale_order) != sorted(expert.name for expert in self.experts):
            raise ValueError(f"{self.name}: guide_scale_order must name each expert once")
        if self.distilled_loras is not None and sorted(self.distilled_loras) != sorted(expert.name for expert in self.experts):
            raise ValueError(f"{self.name}: distilled_loras must name each expert once")

    # The guide scales.

    def guide_scales(self, values: Sequence[float]) -> dict[str, float]:
        """A guide-scale tuple by expert name: one value per expert, in ``guide_scale_order``, or one
        value repeated (the settings' pair given one value), which every expert takes."""
        values = tuple(values)
        if len(values) == len(self.guide_scale_order):
            return dict(zip(self.guide_scale_order, values))
        if len(set(values)) == 1:
            return dict.fromkeys(self.guide_scale_order, values[0])
        raise WanError(
            f"{self.name} has {counted(len(self.experts), 'expert')}: the guide scales {values} do not map to them",
            f"give one value, or one per expert ({', '.join(self.guide_scale_order)})",
        )

    # Sizes.

    @property
    def size_multiple(self) -> int:
        """The pixels of one latent patch's side: every video side is a multiple of it."""
        return self.vae_stride[1] * self.patch_size[1]

    def latent_frames(self, frame_num: int) -> int:
        return (frame_num - 1) // self.vae_stride[0] + 1

    def latent_shape(self, frame_num: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of the latents of a video of ``frame_num`` frames of ``height`` x ``width`` pixels."""
        return self.latent_channels, self.latent_frames(frame_num), height // self.vae_stride[1], width // self.vae_stride[2]

    def video_size(self, image_height: int, image_width: int, max_area: int) -> tuple[int, int]:
        """Pixel (height, width) of the video: the image's aspect ratio within ``max_area``, rounded
        down to whole latent patches exactly as the official code rounds."""
        height, width = self.fit.video_size(image_height, image_width, max_area, self.vae_stride[1:], self.patch_size[1:])
        if height < self.vae_stride[1] * self.patch_size[1] or width < self.vae_stride[2] * self.patch_size[2]:
            raise WanError(
                f"an image of {image_width}x{image_height} is too narrow for an area of {max_area} pixels",
                "crop the image closer to a common aspect ratio, or ask for a larger video",
            )
        return height, width

    def planned_size(self, max_area: int) -> tuple[int, int]:
        """The (height, width) a server plans its GPUs for at ``max_area``: the video of a landscape 16:9
        image, or for a model that makes videos without an image, the larger of that and its text-to-video one."""
        sizes = [self.video_size(720, 1280, max_area)]
        if not self.conditioning.target.needs_image:  # (imports the strategies, and torch: only a run plans)
            sizes.append(self.video_size(*self.defaults.text_to_video_shape, max_area))
        return max(sizes, key=lambda size: size[0] * size[1])

    def dit_tokens(self, frame_num: int, height: int, width: int) -> int:
        """The DiT's sequence length for a video of ``frame_num`` frames of ``height`` x ``width`` pixels."""
        return self.latent_frames(frame_num) * (height // self.size_multiple) * (width // self.size_multiple)

    # The checkpoint's layout: one rule for the loader, the cache and `cache status`.

    @property
    def repo_folder(self) -> str:
        """The hub cache's folder name for ``repo_id``."""
        return "models--" + self.repo_id.replace("/", "--")

    def needed_files(self, root: Path) -> list[str]:
        """The files the loader opens in the checkpoint directory ``root`` ("/"-separated, missing ones
        included): the loader requires them (``check_checkpoint_dir``) and `wan-i2v cache status` checks
        them, one rule for both."""
        files = self.files
        paths = []
        for expert in self.experts:
            paths += [expert.file(name) for name in ("config.json", *self._weight_files(root / expert.folder))]
        paths += [files.vae, files.text_encoder]
        if self._text_dim(root) not in (None, files.text_dim):  # another width: the encoder's shape is in its config
            paths.append(T5_CONFIG_FILE)
        return paths + [f"{files.tokenizer_dir}/{name}" for name in files.tokenizer_files]

    def hub_patterns(self) -> tuple[str, ...]:
        """The repository's files the model needs (the rest, assets/, examples/, README, is left out),
        as huggingface_hub's allow_patterns, so snapshot_download(allow_patterns=...) takes the same set."""
        files = self.files
        experts = [expert.file(name) for expert in self.experts for name in ("config.json", SAFETENSORS_INDEX, SHARD_GLOB)]
        return (*experts, files.vae, files.text_encoder, f"{files.tokenizer_dir}/*")

    def checkpoint_dir_of(self, path: Path) -> Path:
        """The checkpoint directory that a file of the layout lies in."""
        # Every file lies in the checkpoint directory itself, in an expert's folder, or in the tokenizer's.
        if path.parent.name in {expert.folder for expert in self.experts if expert.folder}:
            return path.parent.parent
        for folder in (path, path.parent):  # the tokenizer's folder, or a file in it
            if folder.as_posix().endswith(self.files.tokenizer_dir):
                return folder.parents[len(Path(self.files.tokenizer_dir).parts) - 1]
        return path.parent

    def _weight_files(self, expert_dir: Path) -> list[str]:
        """As the loader picks them: the index and the shards it names, else one unsharded file."""
        index = expert_dir / SAFETENSORS_INDEX
        if not index.is_file() and (expert_dir / SAFETENSORS_FILE).is_file():
            return [SAFETENSORS_FILE]
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            shards = {name for name in weight_map.values() if isinstance(name, str)}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            # The index's own error says what is wrong with it; the shards on disk are checked all the same.
            shards = {path.name for path in expert_dir.glob(SHARD_GLOB)}
        return [SAFETENSORS_INDEX, *sorted(shards)]

    def _text_dim(self, root: Path) -> int | None:
        """The width of the text features the experts take (their config's text_dim; None where it does not read)."""
        try:
            return json.loads((root / self.experts[0].folder / "config.json").read_bytes()).get("text_dim", self.files.text_dim)
        except (OSError, ValueError, AttributeError):
            return None  # the config's own error says what is wrong with it


UMT5_XXL_DIM = 4096  # umT5-XXL's width: the text features the Wan2.2 experts take
LIGHTNING_I2V_V1 = "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1"

WAN22_I2V_A14B = ModelSpec(
    name="Wan2.2-I2V-A14B",
    repo_id="Wan-AI/Wan2.2-I2V-A14B",
    # The high-noise expert runs for timesteps >= 900 (boundary 0.900 of 1000), the low-noise one below.
    experts=(ExpertSpec("high", "high_noise_model", 900, "high-noise"), ExpertSpec("low", "low_noise_model", 0, "low-noise")),
    files=CheckpointFiles(
        vae="Wan2.1_VAE.pth",
        text_encoder="models_t5_umt5-xxl-enc-bf16.pth",
        tokenizer_dir="google/umt5-xxl",
        tokenizer_files=("tokenizer_config.json", "tokenizer.json"),
        text_dim=UMT5_XXL_DIM,
    ),
    builders=Builders(
        dit_config=Lazy("wan_i2v.models.dit:DiTConfig"),
        build_dit=Lazy("wan_i2v.models.dit:build_dit"),
        load_dit=Lazy("wan_i2v.models.dit:load_dit"),
        load_vae=Lazy("wan_i2v.models.vae:load_vae"),
        load_text_encoder=Lazy("wan_i2v.models.text_encoder:TextEncoder.load"),
        text_encoder_config=Lazy("wan_i2v.models.text_encoder:T5Config"),
        vae_config=Lazy("wan_i2v.models.vae:VAEConfig"),
    ),
    model_type="i2v",
    conditioning=Lazy("wan_i2v.models.conditioning:KnownFramesMask"),
    fit=AreaFit(),
    guide_scale_order=("low", "high"),  # the official sample_guide_scale's order
    presets={"720P": Preset(1280 * 720, 5.0), "480P": Preset(832 * 480, 3.0)},
    default_preset="720P",
    fps=16,
    vae_stride=(4, 8, 8),
    patch_size=(1, 2, 2),
    latent_channels=16,
    stored_bytes=4,  # the official experts are stored in fp32 (57 GB each)
    # lightx2v's Wan2.2-Lightning, Seko V1: the repository's only I2V-A14B 4-step pair (its V1.1 is for
    # T2V), rank 64, in lightx2v's key names; its README's recipe is ours (euler, 4 steps, guide scale 1,
    # shift 5). lightx2v's later distillations live in other repositories, which --lora hf://... reaches.
    distilled_loras={
        "high": f"hf://lightx2v/Wan2.2-Lightning/{LIGHTNING_I2V_V1}/high_noise_model.safetensors",
        "low": f"hf://lightx2v/Wan2.2-Lightning/{LIGHTNING_I2V_V1}/low_noise_model.safetensors",
    },
    defaults=CardDefaults(frame_num=81, steps=40, guide_scale=(3.5, 3.5)),
    aliases=("i2v-a14b",),
)

WAN22_TI2V_5B = ModelSpec(
    name="Wan2.2-TI2V-5B",
    repo_id="Wan-AI/Wan2.2-TI2V-5B",
    experts=(ExpertSpec("dit", "", 0, phrase="the DiT"),),  # one dense DiT, its files at the top of the checkpoint
    files=CheckpointFiles(
        vae="Wan2.2_VAE.pth",
        text_encoder="models_t5_umt5-xxl-enc-bf16.pth",
        tokenizer_dir="google/umt5-xxl",
        tokenizer_files=("tokenizer_config.json", "tokenizer.json"),
        text_dim=UMT5_XXL_DIM,
    ),
    builders=Builders(
        dit_config=Lazy("wan_i2v.models.dit:TI2V5BConfig"),
        build_dit=Lazy("wan_i2v.models.dit:build_dit"),
        load_dit=Lazy("wan_i2v.models.dit:load_dit"),
        load_vae=Lazy("wan_i2v.models.vae2_2:load_vae"),
        load_text_encoder=Lazy("wan_i2v.models.text_encoder:TextEncoder.load"),
        text_encoder_config=Lazy("wan_i2v.models.text_encoder:T5Config"),
        vae_config=Lazy("wan_i2v.models.vae2_2:VAE22Config"),
    ),
    model_type="ti2v",
    conditioning=Lazy("wan_i2v.models.conditioning:KnownLatentFrames"),
    fit=CropFit(),
    guide_scale_order=("dit",),
    presets={"720P": Preset(1280 * 704, 5.0)},  # the official sizes 1280*704 and 704*1280: one area
    default_preset="720P",
    fps=24,
    vae_stride=(4, 16, 16),
    patch_size=(1, 2, 2),
    latent_channels=48,
    stored_bytes=4,  # the released DiT is stored in fp32 (20 GB)
    defaults=CardDefaults(frame_num=121, steps=50, guide_scale=(5.0, 5.0)),
    aliases=("ti2v-5b",),  # also the official --task ti2v-5B
)

DEFAULT_SPEC = WAN22_I2V_A14B.name
SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (WAN22_I2V_A14B, WAN22_TI2V_5B)}


def spec_for(name: str | ModelSpec = DEFAULT_SPEC) -> ModelSpec:
    """The registered spec called ``name`` or one of its aliases, in any case (a spec is returned as it is)."""
    if isinstance(name, ModelSpec):
        return name
    wanted = str(name).lower()
    spec = next((spec for spec in SPECS.values() if wanted in (spec.name.lower(), *spec.aliases)), None)
    if spec is None:
        raise WanError(f"unknown model {name!r}", f"choose one of {', '.join(SPECS)}")
    return spec


def spec_of_checkpoint(root: Path) -> ModelSpec:
    """The spec whose first expert's config.json in ``root`` names its model type; the default spec
    where none does (its loader then says what is missing)."""
    for spec in SPECS.values():
        try:
            config = json.loads((Path(root) / spec.experts[0].file("config.json")).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("model_type", "i2v") == spec.model_type:
            return spec
    return spec_for(DEFAULT_SPEC)
