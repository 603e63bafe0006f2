"""A tiny random checkpoint in the official layout, for tests and the demo.

Same classes as the real model, small shapes given by the config files the loaders
read. The weights are random: the video it makes is noise-like, not a real video.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
import math
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from wan_i2v.errors import WanError
from wan_i2v.models.dit import DiT, DiTConfig
from wan_i2v.models.spec import DEFAULT_SPEC, SAFETENSORS_FILE, SAFETENSORS_INDEX, T5_CONFIG_FILE, ModelSpec, spec_for
from wan_i2v.models.text_encoder import T5Config, build_umt5, transformers_to_official_key
from wan_i2v.models.vae import VAE_CONFIG_FILE

TINY_T5 = T5Config(vocab_size=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, encoder_layers=2, num_buckets=32)
TINY_DIT = DiTConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, text_len=32, text_dim=TINY_T5.dim)
# The VAE's widths and depth in a tiny checkpoint, whichever the spec's VAE (those of its fields it has).
TINY_VAE_SHAPE = {"dim": 8, "dec_dim": 8, "num_res_blocks": 1}
MARKER = "wan-i2v-tiny.json"


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with random values of a sensible scale (no zero-initialised layers).

    Values are drawn in fp32 on each parameter's device from a generator seeded
    per parameter, so the same seed gives the same weights in any dtype.
    """
    with torch.no_grad():
        for index, (name, param) in enumerate(module.named_parameters()):
            generator = torch.Generator(device=param.device).manual_seed(seed * 100_003 + index)
            noise = torch.randn(param.shape, generator=generator, device=param.device)
            if "norm" in name and param.dim() == 1 and name.endswith("weight"):
                noise = 1 + 0.1 * noise
            elif param.dim() >= 2:
                fan_in = param[0].numel() if param.shape[0] != 1 else param.shape[-1]
                noise = noise / math.sqrt(fan_in)
            else:
                noise = 0.05 * noise
            param.copy_(noise)
    return module


def save_dit(model: DiT, directory: Path, shards: int, model_type: str = "i2v") -> None:
    """An expert in its official folder layout: config.json (naming ``model_type``) and safetensors
    (one file or ``shards``); ``directory`` may exist (a checkpoint whose DiT is at its top)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "WanModel", "model_type": model_type, **asdict(model.config)}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        save_file(state, str(directory / SAFETENSORS_FILE))
        return
    keys = sorted(state)
    weight_map = {}
    for index in range(shards):
        name = f"diffusion_pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[index::shards]
        save_file({k: state[k] for k in part}, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def save_text_encoder(model: nn.Module, path: Path) -> None:
    """An umT5 encoder as the official .pth: official key names, the tied embedding saved once."""
    official = {}
    for key, value in model.state_dict().items():
        official.setdefault(transformers_to_official_key(key), value.detach().to("cpu", copy=True))
    torch.save(official, path)


def write_tiny_checkpoint(directory: Path, seed: int = 0, spec: ModelSpec | str = DEFAULT_SPEC) -> Path:
    """Write a complete tiny checkpoint of ``spec``'s layout into ``directory`` (which must not exist
    yet). The experts are stored in turn as one file, then as 2, 3... shards, so both forms are read."""
    spec = spec_for(spec)
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent))
    # The official channels (the latents', and the condition's beside them) at the tiny width.
    official = spec.builders.dit_config.target()
    dit_config = replace(TINY_DIT, in_dim=official.in_dim, out_dim=official.out_dim)
    vae_class = spec.builders.vae_config.target
    vae_config = vae_class(**{f.name: TINY_VAE_SHAPE[f.name] for f in fields(vae_class) if f.name in TINY_VAE_SHAPE})
    try:
        for index, expert in enumerate(spec.experts):
            save_dit(randomize_(DiT(dit_config), seed + 1 + index), staging / expert.folder, shards=index + 1, model_type=spec.model_type)
        others = seed + 1 + len(spec.experts)

        torch.save(randomize_(vae_config.build(), others).state_dict(), staging / spec.files.vae)
        (staging / VAE_CONFIG_FILE).write_text(json.dumps(asdict(vae_config)))

        save_text_encoder(randomize_(build_umt5(TINY_T5), others + 1), staging / spec.files.text_encoder)
        (staging / T5_CONFIG_FILE).write_text(json.dumps(asdict(TINY_T5)))
        write_tiny_tokenizer(staging / spec.files.tokenizer_dir, TINY_T5.vocab_size)

        (staging / MARKER).write_text(json.dumps({"seed": seed, "note": "random weights, for tests and the demo"}))
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def ensure_tiny_checkpoint(directory: Path, spec: ModelSpec | str = DEFAULT_SPEC) -> Path:
    """The tiny checkpoint of ``spec`` at ``directory``, made if missing (an interrupted one is redone)."""
    directory = Path(directory)
    if (directory / MARKER).is_file():
        return directory
    if directory.exists():
        shutil.rmtree(directory)
    return write_tiny_checkpoint(directory, spec=spec)


# Lower-case text keeps the alphabet small: the trainer keeps every character of the
# corpus (24 here) besides the three special tokens.
_TINY_CORPUS = [
    "a cat walks along the beach at sunset while waves roll in",
    "the camera slowly pans across a quiet city street in the rain",
    "a woman in a red dress dances in a field of flowers",
    "close up of a dog running through the snow with its ears flapping",
    "a small boat drifts on a calm lake under a grey sky",
    "two birds fly over green hills and a river at dawn",
]
# Below this the trainer fails or overshoots the requested size; from here on it stays within it.
TINY_TOKENIZER_MIN_VOCAB = 32


def write_tiny_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Train a small T5-style tokenizer (pad 0, eos ``</s>`` 1, unk 2) and save it to ``out_dir``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    if vocab_size < TINY_TOKENIZER_MIN_VOCAB:
        raise WanError(f"a tiny tokenizer needs a vocabulary of at least {TINY_TOKENIZER_MIN_VOCAB}, got {vocab_size}")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    unigram = Tokenizer(models.Unigram())
    # The pre-tokenizer T5Tokenizer uses, so that the trained pieces are the ones it will look up.
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    unigram.train_from_iterator(_TINY_CORPUS, trainer)
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(out_dir))
