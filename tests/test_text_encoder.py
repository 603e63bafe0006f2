"""umT5 text encoder: parity with the official T5 encoder semantics, prompt cleaning, strict loading."""

import json
import math
import re

import pytest
import torch

from wan_i2v.errors import WanError
from wan_i2v.tiny import write_tiny_tokenizer
from wan_i2v.models.text_encoder import (
    T5Config,
    TextEncoder,
    build_umt5,
    clean_prompt,
    official_to_transformers_key,
    transformers_to_official_key,
)

# Few buckets, so that a 24-token text reaches the logarithmic buckets and the last, clamped one.
TINY = T5Config(vocab_size=128, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, encoder_layers=2, num_buckets=8)
TEXT_LEN = 24
PROMPTS = ["a cat walks along the beach", "rain", "a small boat drifts on a calm lake"]  # the last fills TEXT_LEN


def official_state_dict(config: T5Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official T5Encoder names; norms away from 1 so a misplaced one shows."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=gen)

    c = config
    state = {"token_embedding.weight": randn(c.vocab_size, c.dim), "norm.weight": randn(c.dim, std=0.2, mean=1.0)}
    for i in range(c.encoder_layers):
        state |= {
            f"blocks.{i}.norm1.weight": randn(c.dim, std=0.2, mean=1.0),
            f"blocks.{i}.norm2.weight": randn(c.dim, std=0.2, mean=1.0),
            f"blocks.{i}.pos_embedding.embedding.weight": randn(c.num_buckets, c.num_heads),
            f"blocks.{i}.attn.o.weight": randn(c.dim, c.dim_attn, std=c.dim_attn**-0.5),
            f"blocks.{i}.ffn.gate.0.weight": randn(c.dim_ffn, c.dim, std=c.dim**-0.5),
            f"blocks.{i}.ffn.fc1.weight": randn(c.dim_ffn, c.dim, std=c.dim**-0.5),
            f"blocks.{i}.ffn.fc2.weight": randn(c.dim, c.dim_ffn, std=c.dim_ffn**-0.5),
        }
        state |= {f"blocks.{i}.attn.{n}.weight": randn(c.dim_attn, c.dim, std=c.dim**-0.5) for n in "qkv"}
    return state


def reference_t5_encoder(state, ids, mask, num_heads, num_buckets, max_dist=128):
    """The official T5Encoder forward (wan/modules/t5.py, shared_pos=False), written out on a state dict.

    Casts as the official code does, so that it is also the reference in bfloat16.
    """

    def rms_norm(x, weight):  # statistics in fp32, result back in the weights' dtype
        return weight * (x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + 1e-6)).to(weight.dtype)

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    def bidirectional_bucket(relative):  # keys after the query use the upper half of the buckets
        half = num_buckets // 2
        exact = half // 2
        distance = relative.abs()
        far = exact + (torch.log(distance.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
        return (relative > 0).long() * half + torch.where(distance < exact, distance, far.clamp(max=half - 1))

    batch, length = ids.shape
    positions = torch.arange(length)
    buckets = bidirectional_bucket(positions[None, :] - positions[:, None])
    padded_keys = (mask == 0)[:, None, None, :]
    x = state["token_embedding.weight"][ids]
    layers = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for i in range(layers):
        w = {key[len(f"blocks.{i}.") :]: value for key, value in state.items() if key.startswith(f"blocks.{i}.")}
        h = rms_norm(x, w["norm1.weight"])
        q, k, v = ((h @ w[f"attn.{n}.weight"].T).view(batch, length, num_heads, -1) for n in "qkv")
        bias = w["pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]  # [1, heads, Lq, Lk]
        bias = bias.masked_fill(padded_keys, torch.finfo(x.dtype).min)
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias  # T5 does not scale by 1/sqrt(head_dim)
        weights = scores.float().softmax(dim=-1).to(scores.dtype)
        attended = torch.einsum("bnij,bjnc->binc", weights, v).reshape(batch, length, -1)
        x = x + attended @ w["attn.o.weight"].T
        h = rms_norm(x, w["norm2.weight"])
        gated = gelu_tanh(h @ w["ffn.gate.0.weight"].T) * (h @ w["ffn.fc1.weight"].T)
        x = x + gated @ w["ffn.fc2.weight"].T
    return rms_norm(x, state["norm.weight"])


def write_checkpoint(folder, state, config=TINY):
    folder.mkdir(exist_ok=True)
    torch.save(state, folder / "t5.pth")
    (folder / "t5_config.json").write_text(json.dumps(config.__dict__))
    return folder / "t5.pth"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(path, TINY.vocab_size)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tokenizer_dir):
    t5_path = write_checkpoint(tmp_path_factory.mktemp("t5"), official_state_dict(TINY))
    return TextEncoder.load(t5_path, tokenizer_dir, text_len=TEXT_LEN, device="cpu", dtype=torch.float32)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def test_matches_official_encoder_on_padded_batch(encoder):
    tokens = encoder.tokenizer(
        [clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=TEXT_LEN, return_tensors="pt"
    )
    assert tokens.attention_mask.sum(1).tolist() == [18, 4, TEXT_LEN]  # two padded, one full
    expected = reference_t5_encoder(
        official_state_dict(TINY), tokens.input_ids, tokens.attention_mask, TINY.num_heads, TINY.num_buckets
    )
    with torch.no_grad():
        hidden = encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert relative_error(hidden, expected) <= 1e-5
    for features, reference, length in zip(encoder.encode(PROMPTS), expected, tokens.attention_mask.sum(1)):
        assert features.shape == (length, TINY.dim)
        assert relative_error(features, reference[:length]) <= 1e-5


def test_bfloat16_matches_official_casts(tmp_path, tokenizer_dir):
    state = official_state_dict(TINY)
    t5_path = write_checkpoint(tmp_path, state)
    bf16 = TextEncoder.load(t5_path, tokenizer_dir, text_len=TEXT_LEN, device="cpu", dtype=torch.bfloat16)
    tokens = bf16.tokenizer(PROMPTS, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    state = {key: value.to(torch.bfloat16) for key, value in state.items()}
    expected = reference_t5_encoder(state, tokens.input_ids, tokens.attention_mask, TINY.num_heads, TINY.num_buckets)
    for features, reference, length in zip(bf16.encode(PROMPTS), expected, tokens.attention_mask.sum(1)):
        assert features.dtype == torch.bfloat16
        assert relative_error(features.float(), reference[:length].float()) <= 1e-3


def test_adapter_covers_every_parameter_once():
    with torch.device("meta"):
        model_names = {name for name, _ in build_umt5(TINY).named_parameters()}
    official_names = set(official_state_dict(TINY))
    assert {official_to_transformers_key(name) for name in official_names} == model_names
    assert {transformers_to_official_key(name) for name in model_names} == official_names
    with torch.device("meta"):  # state_dict() lists the shared embedding twice, both go to one official key
        assert {transformers_to_official_key(name) for name in build_umt5(TINY).state_dict()} == official_names


def test_clean_prompt():
    assert clean_prompt("Tom &amp; Jerry") == "Tom & Jerry"
    assert clean_prompt("x < y &amp;amp; z") == "x < y & z"  # ftfy leaves HTML alone here; the double unescape does not
    assert clean_prompt("cafÃ© au lait") == "café au lait"
    assert clean_prompt("  a\tb\n\n c\u3000d  ") == "a b c d"


def test_encode_lengths_are_real_token_counts(encoder):
    prompts = PROMPTS + ["", "   "]
    counts = [len(encoder.tokenizer(clean_prompt(p))["input_ids"]) for p in prompts]
    assert counts[-2:] == [1, 1]  # an empty prompt is just EOS
    features = encoder.encode(prompts)
    assert [f.shape[0] for f in features] == counts
    assert all(f.dtype == torch.float32 and f.device.type == "cpu" for f in features)


def test_long_prompt_is_truncated_with_a_warning(encoder):
    long_prompt = " ".join(PROMPTS * 4)
    with pytest.warns(UserWarning, match=f"keeps only the first {TEXT_LEN}"):
        (features,) = encoder.encode([long_prompt])
    assert features.shape == (TEXT_LEN, TINY.dim)


def test_tiny_tokenizer_is_t5_style(tokenizer_dir, encoder):
    tokenizer = encoder.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.eos_token == "</s>" and len(tokenizer) <= TINY.vocab_size
    assert tokenizer("a cat")["input_ids"][-1] == 1
    with pytest.raises(WanError, match="at least"):
        write_tiny_tokenizer(tokenizer_dir / "too_small", 16)


# The strict loader names a tensor the model lacks or shapes differently by its transformers name;
# a tensor unknown to the adapter keeps the name it has in the file.
@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.pop("blocks.1.ffn.fc2.weight"), "encoder.block.1.layer.1.DenseReluDense.wo.weight"),
        (lambda s: s.update({"blocks.0.attn.extra.weight": torch.zeros(2)}), "blocks.0.attn.extra.weight"),
        (lambda s: s.update({"blocks.0.attn.q.weight": torch.zeros(3, 3)}), "encoder.block.0.layer.0.SelfAttention.q"),
    ],
    ids=["missing", "extra", "misshaped"],
)
def test_strict_loading_names_the_bad_key(tmp_path, tokenizer_dir, change, named):
    state = official_state_dict(TINY)
    change(state)
    t5_path = write_checkpoint(tmp_path, state)
    with pytest.raises(WanError, match=re.escape(named)):
        TextEncoder.load(t5_path, tokenizer_dir, text_len=8, device="cpu", dtype=torch.float32)


def test_missing_tokenizer_folder(tmp_path):
    t5_path = write_checkpoint(tmp_path, official_state_dict(TINY))
    with pytest.raises(WanError, match="cache status"):
        TextEncoder.load(t5_path, tmp_path / "absent", text_len=8, device="cpu", dtype=torch.float32)


def test_config_rejects_unknown_key(tmp_path):
    (tmp_path / "t5_config.json").write_text(json.dumps({"dim": 32, "num_layers": 2}))
    with pytest.raises(WanError, match="num_layers"):
        T5Config.from_json_file(tmp_path / "t5_config.json")
