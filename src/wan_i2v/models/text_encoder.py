"""The text side of Wan2.2-I2V: umT5-XXL encoder, its tokenizer and the official prompt cleaning.

The model is transformers' ``UMT5EncoderModel``; the official checkpoint
(``models_t5_umt5-xxl-enc-bf16.pth``) uses the key names of Wan's own T5Encoder, so
a name adapter maps between the two. The numerics follow ``wan/modules/t5.py``:
per-layer relative position bias, unscaled attention, gated tanh-GELU feed-forward,
RMS norms computed in fp32, and the output cut to the real tokens of each prompt.
"""

from __future__ import annotations

import dataclasses
import html
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import ftfy
import torch
from torch import Tensor
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from wan_i2v.loading.checkpoint import cast_parameters, checkpoint_hint, load_strict, missing_file_error, read_config, torch_file_source
from wan_i2v.errors import WanError, first_line
from wan_i2v.models.spec import T5_CONFIG_FILE, UMT5_XXL_DIM



@dataclass(frozen=True)
class T5Config:
    """Shape of the umT5 encoder; the defaults are umT5-XXL, tiny test models override them."""

    vocab_size: int = 256384
    dim: int = UMT5_XXL_DIM
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    encoder_layers: int = 24
    num_buckets: int = 32

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise WanError(f"T5 config: {field.name} must be a positive integer, got {value!r}")
        if self.dim_attn % self.num_heads:
            raise WanError(f"T5 config: dim_attn {self.dim_attn} is not a multiple of num_heads {self.num_heads}")

    @classmethod
    def from_json_file(cls, path) -> "T5Config":
        return read_config(cls, path, "T5 config")


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    # Stdlib `re` instead of the official `regex`: ftfy has already dropped the
    # \x1c-\x1f separators, the only characters on which their `\s` disagree.
    return re.sub(r"\s+", " ", text).strip()


# Official T5Encoder name -> transformers UMT5EncoderModel name, within one block and outside blocks.
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK_KEYS_BACK = {new: old for old, new in _BLOCK_KEYS.items()}
# state_dict() also lists the shared embedding under its second name; both are the one official tensor.
_TOP_KEYS_BACK = {new: old for old, new in _TOP_KEYS.items()}
_TOP_KEYS_BACK["encoder.embed_tokens.weight"] = "token_embedding.weight"


def _rename(name: str, top: dict[str, str], block: dict[str, str], block_prefix: str, new_block_prefix: str) -> str:
    if name in top:
        return top[name]
    match = re.fullmatch(rf"{re.escape(block_prefix)}(\d+)\.(.+)", name)
    if match and match[2] in block:
        return f"{new_block_prefix}{match[1]}.{block[match[2]]}"
    # Unknown names pass through unchanged so that the strict loader reports them by the name in the file.
    return name


def official_to_transformers_key(name: str) -> str:
    return _rename(name, _TOP_KEYS, _BLOCK_KEYS, "blocks.", "encoder.block.")


def transformers_to_official_key(name: str) -> str:
    return _rename(name, _TOP_KEYS_BACK, _BLOCK_KEYS_BACK, "encoder.block.", "blocks.")


def build_umt5(config: T5Config) -> UMT5EncoderModel:
    """An umT5 encoder of this shape, weights not loaded (build it under ``torch.device("meta")``)."""
    umt5_config = UMT5Config(
        vocab_size=config.vocab_size,
        d_model=config.dim,
        d_kv=config.dim_attn // config.num_heads,
        d_ff=config.dim_ffn,
        num_heads=config.num_heads,
        num_layers=config.encoder_layers,
        relative_attention_num_buckets=config.num_buckets,
        relative_attention_max_distance=128,  # the official T5RelativeEmbedding max_dist
        feed_forward_proj="gated-gelu",  # tanh-approximated GELU, as the official GELU
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        # Eager attention keeps the official order of operations (scores + bias + mask,
        # softmax); the encoder runs once per video, so a fused kernel would buy nothing.
        attn_implementation="eager",
    )
    model = UMT5EncoderModel(umt5_config)
    # UMT5EncoderModel has two embedding modules, `shared` and `encoder.embed_tokens`,
    # tied only by sharing one Parameter, which the strict loader would see as two
    # tensors and then untie by replacing one. Making them one module leaves a single
    # `shared.weight` (named_modules() lists a module once), which the official
    # `token_embedding.weight` fills.
    model.set_input_embeddings(model.shared)
    return model.eval()


class TextEncoder:
    """Prompts in, per-prompt umT5 features out (``[tokens, dim]``, padding cut off)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int, run_device: torch.device | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.run_device = run_device  # where it computes, if not where its weights are (shards in host memory)

    @classmethod
    def load(cls, t5_path: Path, tokenizer_dir: Path, *, text_len: int, device, dtype, before_weights=None, run_device=None, ring=None) -> "TextEncoder":
        """``before_weights(model)`` transforms the umT5 model on the meta device (as ``load_dit``);
        ``ring``: a staging ring on ``device`` that the weights come up through (``load_strict``)."""
        t5_path, tokenizer_dir = Path(t5_path), Path(tokenizer_dir)
        tokenizer = _load_tokenizer(tokenizer_dir)  # first: it fails fast, the weights take minutes
        config_path = t5_path.with_name(T5_CONFIG_FILE)
        config = T5Config.from_json_file(config_path) if config_path.exists() else T5Config()
        with torch.device("meta"):
            model = build_umt5(config)
        source = torch_file_source(t5_path, "T5 weights").renamed(official_to_transformers_key)
        if before_weights is not None:
            before_weights(cast_parameters(model, dtype))
        load_strict(model, source, device=device, dtype=dtype, ring=ring)
        return cls(model, tokenizer, text_len, run_device)

    @property
    def device(self) -> torch.device:
        return self.run_device or self.model.shared.weight.device

    def encode(self, prompts: list[str]) -> list[Tensor]:
        cleaned = [clean_prompt(prompt) for prompt in prompts]
        for prompt, ids in zip(prompts, self.tokenizer(cleaned, add_special_tokens=True)["input_ids"]):
            if len(ids) > self.text_len:
                warnings.warn(
                    f"prompt is {len(ids)} tokens long, the text encoder keeps only the first {self.text_len} "
                    f"(text_len): {prompt[:60]!r}...",
                    stacklevel=2,
                )
        tokens = self.tokenizer(
            cleaned,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = self.model(input_ids=tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        return [features[:length] for features, length in zip(hidden, mask.sum(dim=1).tolist())]


def _load_tokenizer(tokenizer_dir: Path):
    if not tokenizer_dir.is_dir():
        raise missing_file_error(tokenizer_dir, "umT5 tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise WanError(f"cannot load the umT5 tokenizer from {tokenizer_dir}: {first_line(exc)}", checkpoint_hint(tokenizer_dir)) from None
