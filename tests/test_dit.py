"""The DiT against diffusers' WanTransformer3DModel, and its strict loading."""

import importlib.util
import json

import pytest
import torch

from wan_i2v.errors import WanError
from diffusers_names import diffusers_transformer

from wan_i2v.models.dit import ROPE_CACHE_SIZES, DiT, DiTConfig, load_dit, rope_tables
from wan_i2v.tiny import randomize_

CONFIG = DiTConfig(dim=48, ffn_dim=96, freq_dim=32, num_heads=4, num_layers=2, text_len=16, text_dim=24)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("grid,timestep", [((3, 4, 6), 999.0), ((2, 6, 4), 420.0)])
def test_matches_diffusers(grid, timestep):
    torch.manual_seed(0)
    model = randomize_(DiT(CONFIG), seed=1).eval()
    reference = diffusers_transformer(model)
    f, h, w = grid
    latent = torch.randn(2, CONFIG.out_dim, f, 2 * h, 2 * w)
    condition = torch.randn(2, CONFIG.in_dim - CONFIG.out_dim, f, 2 * h, 2 * w)
    context = torch.randn(2, CONFIG.text_len, CONFIG.text_dim)
    context[:, 5:] = 0  # zero padding after the real tokens, as the pipeline feeds it
    t = torch.tensor([timestep, timestep])
    with torch.no_grad():
        ours = model(latent, t, context, condition)
        theirs = reference(torch.cat([latent, condition], 1), t, context, return_dict=False)[0]
    assert ours.shape == latent.shape
    assert relative_error(ours, theirs) <= 1e-5


def test_rope_tables_follow_official_axis_split():
    # head_dim 128 -> 64 rotary pairs split 22 (frames), 21 (height), 21 (width); the frame
    # part of a token at frame 2 rotates by 2 * 10000^(-2j/44) for pair j.
    cos, sin = rope_tables((3, 2, 2), 128, "cpu")
    token = 2 * 4 + 1 * 2 + 1  # frame 2, row 1, column 1
    angles = torch.atan2(sin[token], cos[token]).double()
    frame_pairs = torch.arange(22, dtype=torch.float64)
    expected_frame = torch.remainder(2 * 10000.0 ** (-2 * frame_pairs / 44) + torch.pi, 2 * torch.pi) - torch.pi
    assert torch.allclose(angles[:22], expected_frame, atol=1e-6)
    height_pairs = torch.arange(21, dtype=torch.float64)
    assert torch.allclose(angles[22:43], 1 * 10000.0 ** (-2 * height_pairs / 42), atol=1e-6)


def write_expert(directory, model, *, shards=1):
    from wan_i2v.tiny import save_dit

    save_dit(model, directory, shards=shards)
    return directory


@pytest.mark.parametrize("shards", [1, 3])
def test_load_round_trip(tmp_path, shards):
    model = randomize_(DiT(CONFIG), seed=2)
    loaded = load_dit(write_expert(tmp_path / "expert", model, shards=shards), device="cpu", dtype=torch.float32)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_bf16_load_keeps_fp32_islands(tmp_path):
    model = randomize_(DiT(CONFIG), seed=2)
    loaded = load_dit(write_expert(tmp_path / "expert", model), device="cpu", dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.ffn.0.weight"] == torch.bfloat16
    for fp32 in ("blocks.0.modulation", "head.head.weight", "time_projection.1.weight", "blocks.1.norm3.weight", "blocks.0.self_attn.norm_q.weight"):
        assert dtypes[fp32] == torch.float32, fp32


def test_bf16_forward_close_to_fp32(tmp_path):
    model = randomize_(DiT(CONFIG), seed=3).eval()
    bf16 = load_dit(write_expert(tmp_path / "expert", model), device="cpu", dtype=torch.bfloat16)
    latent = torch.randn(1, 16, 2, 8, 8)
    condition = torch.randn(1, 20, 2, 8, 8)
    context = torch.randn(1, CONFIG.text_len, CONFIG.text_dim)
    t = torch.tensor([900.0])
    with torch.no_grad():
        error = relative_error(bf16(latent, t, context, condition), model(latent, t, context, condition))
    assert 0 < error < 0.05


def test_strict_loading_errors_name_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = write_expert(tmp_path / "expert", randomize_(DiT(CONFIG), seed=2))
    weights = directory / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))

    missing = dict(state)
    del missing["blocks.1.ffn.2.bias"]
    save_file(missing, str(weights))
    with pytest.raises(WanError, match=r"missing tensor 'blocks.1.ffn.2.bias'"):
        load_dit(directory, device="cpu", dtype=torch.float32)

    save_file({**state, "blocks.9.extra": torch.zeros(1)}, str(weights))
    with pytest.raises(WanError, match=r"unexpected tensor 'blocks.9.extra'"):
        load_dit(directory, device="cpu", dtype=torch.float32)

    save_file({**state, "head.head.bias": torch.zeros(3)}, str(weights))
    with pytest.raises(WanError, match=r"'head.head.bias' has shape \(3,\)"):
        load_dit(directory, device="cpu", dtype=torch.float32)

    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WanError, match="diffusion_pytorch_model.safetensors"):
        load_dit(directory, device="cpu", dtype=torch.float32)

    weights.unlink()
    with pytest.raises(WanError, match="not found.*cache status"):
        load_dit(directory, device="cpu", dtype=torch.float32)


def test_config_of_another_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t2v", "dim": 64}))
    with pytest.raises(WanError, match="'t2v' model, not image-to-video"):
        DiTConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "i2v", "dim": 64, "foo": 1}))
    with pytest.raises(WanError, match="unknown config key 'foo'"):
        DiTConfig.from_json_file(tmp_path / "config.json")


def test_attention_kernels_are_checked_before_loading():
    from wan_i2v.kernels.attention import check_kernel

    check_kernel("sdpa", torch.device("cpu"))
    with pytest.raises(WanError, match="unknown attention kernel 'flash3'"):
        check_kernel("flash3", torch.device("cpu"))
    with pytest.raises(WanError, match="needs a CUDA GPU"):
        check_kernel("sage", torch.device("cpu"))
    if importlib.util.find_spec("sageattention") is None:  # as on CI: the opt-in package is not a dependency
        with pytest.raises(WanError, match="pip install sageattention"):
            check_kernel("sage", torch.device("cuda"))


def test_fused_norms_apply_to_every_block_and_fall_back_on_the_cpu():
    """The Triton kernel itself runs only on a GPU (bench/dit_forward.py's fused_norm_check compares it
    with the plain module there); here: every block gets it, and a CPU model computes what it did."""
    from wan_i2v.transforms.fused_norms import FusedNormRope, FusedResidualNorm, apply_fused_norms

    config = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=2, text_len=8, text_dim=16)
    model = randomize_(DiT(config), seed=0).eval()
    inputs = (torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 16), torch.randn(1, 20, 2, 4, 4))
    with torch.no_grad():
        expected = model(*inputs)
        apply_fused_norms(model)
        assert all(isinstance(block.residual_norm, FusedResidualNorm) for block in model.blocks)
        assert all(isinstance(attention.norm_rope, FusedNormRope) for block in model.blocks for attention in (block.self_attn, block.cross_attn))
        assert torch.equal(model(*inputs), expected)  # the kernel is for GPUs; bench/dit_forward.py checks it there


def test_fused_gelu_takes_each_plain_ffn_and_keeps_names_and_numbers():
    """The cuBLASLt epilogue itself runs only on a GPU (bench/dit_forward.py compares it with the tanh
    GELU there); here: which FFNs it takes, the parameter names, and the CPU path's numbers."""
    from wan_i2v.transforms.fused_gelu import LinearGELU, apply_fused_gelu
    from wan_i2v.transforms.fp8 import FP8Linear

    config = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=2, text_len=8, text_dim=16)
    model = randomize_(DiT(config), seed=0).eval()
    names = list(model.state_dict())
    model.blocks[1].ffn[0] = FP8Linear(model.blocks[1].ffn[0])  # not a plain Linear: left alone
    inputs = (torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 16), torch.randn(1, 20, 2, 4, 4))
    with torch.no_grad():
        expected = model(*inputs)
        apply_fused_gelu(model)
        assert isinstance(model.blocks[0].ffn[0], LinearGELU) and isinstance(model.blocks[0].ffn[1], torch.nn.Identity)
        assert isinstance(model.blocks[1].ffn[0], FP8Linear) and isinstance(model.blocks[1].ffn[1], torch.nn.GELU)
        assert torch.equal(model(*inputs), expected)
    model.blocks[1].ffn[0] = torch.nn.Linear(config.dim, config.ffn_dim)
    assert list(model.state_dict()) == names


def test_rope_cache_keeps_only_the_latest_sizes():
    """A long-lived process (a server) sees many video sizes: the tables of the least recently used go."""
    config = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=1, text_len=8, text_dim=16)
    model = randomize_(DiT(config), seed=0).eval()
    with torch.no_grad():
        for frames in (1, 2, 3, 4, 5, 6, 2):
            model(torch.randn(1, 16, frames, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 16), torch.randn(1, 20, frames, 4, 4))
    assert ROPE_CACHE_SIZES == 4 and [grid[0] for grid, _ in model.rope_cache] == [4, 5, 6, 2]


def test_rope_tables_are_built_once_per_video_size():
    config = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=1, text_len=8, text_dim=16)
    model = randomize_(DiT(config), seed=0).eval()

    def inputs(frames):
        return torch.randn(1, 16, frames, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 16), torch.randn(1, 20, frames, 4, 4)

    with torch.no_grad():
        small, large = inputs(2), inputs(3)
        first = model(*small)
        tables = model.rope_cache[((2, 2, 2), torch.device("cpu"))]
        model(*large)
        assert torch.equal(model(*small), first)
        assert model.rope_cache[((2, 2, 2), torch.device("cpu"))] is tables and len(model.rope_cache) == 2
        cos, sin = tables
        expected_cos, expected_sin = rope_tables((2, 2, 2), config.head_dim, "cpu")
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
