"""The official checkpoint's layout: the files the loader opens, by name. No torch here: `wan-i2v
cache status` and the command's help read it (``loading/checkpoint.py`` re-exports its names)."""

from __future__ import annotations

import json
from pathlib import Path

HIGH_NOISE_DIR = "high_noise_model"
LOW_NOISE_DIR = "low_noise_model"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
T5_CONFIG_FILE = "t5_config.json"  # beside the text encoder, for an encoder other than umT5-XXL
TEXT_DIM = 4096  # umT5-XXL's width: the text features the official experts take

# What transformers reads the umT5 tokenizer from: the vocabulary in tokenizer.json, the special tokens
# (padding) in tokenizer_config.json. (Without tokenizer.json it made a tokenizer of an empty vocabulary
# from the config alone, and spiece.model is read only through a conversion that needs protobuf.)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
SHARD_GLOB = "diffusion_pytorch_model-*-of-*.safetensors"


def needed_files(root: Path) -> list[str]:
    """The files the loader opens in the checkpoint directory ``root`` ("/"-separated, missing ones
    included): the loader requires them (``check_checkpoint_dir``) and `wan-i2v cache status` checks
    them, one rule for both."""
    paths = []
    for expert in (HIGH_NOISE_DIR, LOW_NOISE_DIR):
        paths += [f"{expert}/{name}" for name in ("config.json", *_weight_files(root / expert))]
    paths += [VAE_FILE, T5_FILE]
    if _text_dim(root) not in (None, TEXT_DIM):  # not umT5-XXL's width: the encoder's shape is in its config
        paths.append(T5_CONFIG_FILE)
    return paths + [f"{TOKENIZER_DIR}/{name}" for name in TOKENIZER_FILES]


def _weight_files(expert_dir: Path) -> list[str]:
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


def _text_dim(root: Path) -> int | None:
    """The width of the text features the experts take (their config's text_dim; None where it does not read)."""
    try:
        return json.loads((root / HIGH_NOISE_DIR / "config.json").read_bytes()).get("text_dim", TEXT_DIM)
    except (OSError, ValueError, AttributeError):
        return None  # the config's own error says what is wrong with it
