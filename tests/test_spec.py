"""The model spec registry: one definition of a model's layout, experts and sizes, read by the loader,
the cache, the loop and the planner."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from wan_i2v.errors import WanError
from wan_i2v.models.spec import DEFAULT_SPEC, SPECS, WAN22_I2V_A14B, ExpertSpec, spec_for
from wan_i2v.sampling.loop import Experts
from wan_i2v.tiny import write_tiny_checkpoint
from wan_i2v.video import demo_image

# A model of one expert: the tiny model's layout with a single expert folder.
ONE_EXPERT = replace(WAN22_I2V_A14B, name="tiny-one-expert", experts=(ExpertSpec("only", "transformer", 0),), guide_scale_order=("only",),
                     distilled_loras=None)


def test_the_registry_holds_wan22_i2v_a14b_by_default_and_refuses_an_unknown_name():
    assert spec_for() is spec_for(DEFAULT_SPEC) is SPECS["Wan2.2-I2V-A14B"] is WAN22_I2V_A14B
    assert spec_for(ONE_EXPERT) is ONE_EXPERT
    with pytest.raises(WanError, match="unknown model 'Wan9'") as error:
        spec_for("Wan9")
    assert error.value.hint == "choose one of Wan2.2-I2V-A14B, Wan2.2-TI2V-5B"


def test_the_a14b_layout_is_the_official_one(tiny_checkpoint):
    # The files the loader opens in the tiny checkpoint (the high-noise expert in one file, the
    # low-noise one in two shards; a text encoder of another width than umT5-XXL's, so its config).
    assert WAN22_I2V_A14B.needed_files(tiny_checkpoint) == [
        "high_noise_model/config.json",
        "high_noise_model/diffusion_pytorch_model.safetensors",
        "low_noise_model/config.json",
        "low_noise_model/diffusion_pytorch_model.safetensors.index.json",
        "low_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors",
        "low_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors",
        "Wan2.1_VAE.pth",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "t5_config.json",
        "google/umt5-xxl/tokenizer_config.json",
        "google/umt5-xxl/tokenizer.json",
    ]
    # What the cache downloads of the hub repository, in huggingface_hub's allow_patterns.
    assert WAN22_I2V_A14B.hub_patterns() == (
        "high_noise_model/config.json",
        "high_noise_model/diffusion_pytorch_model.safetensors.index.json",
        "high_noise_model/diffusion_pytorch_model-*-of-*.safetensors",
        "low_noise_model/config.json",
        "low_noise_model/diffusion_pytorch_model.safetensors.index.json",
        "low_noise_model/diffusion_pytorch_model-*-of-*.safetensors",
        "Wan2.1_VAE.pth",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "google/umt5-xxl/*",
    )
    assert WAN22_I2V_A14B.repo_folder == "models--Wan-AI--Wan2.2-I2V-A14B"


def test_the_a14b_experts_and_guide_scales():
    experts = Experts({expert.name: nn.Identity() for expert in WAN22_I2V_A14B.experts}, WAN22_I2V_A14B.experts)
    assert [experts.name_for(t) for t in (999, 900, 899.9, 0)] == ["high", "high", "low", "low"]  # the official boundary, 900
    assert WAN22_I2V_A14B.guide_scales((2.0, 5.0)) == {"low": 2.0, "high": 5.0}  # the official (low, high) order
    assert ONE_EXPERT.guide_scales((4.0, 4.0)) == {"only": 4.0}  # one value for every expert
    with pytest.raises(WanError, match="tiny-one-expert has 1 expert"):
        ONE_EXPERT.guide_scales((2.0, 5.0))


def test_a_spec_whose_boundaries_do_not_fall_to_zero_is_refused():
    with pytest.raises(ValueError, match="boundaries"):
        replace(WAN22_I2V_A14B, experts=(ExpertSpec("high", "a", 900), ExpertSpec("low", "b", 100)))
    with pytest.raises(ValueError, match="guide_scale_order"):
        replace(WAN22_I2V_A14B, guide_scale_order=("low",))


def test_experts_pick_by_boundaries_for_three_experts():
    specs = [ExpertSpec("middle", "m", 400), ExpertSpec("last", "l", 0), ExpertSpec("first", "f", 800)]  # in any order
    models = {name: nn.Identity() for name in ("first", "middle", "last")}
    experts = Experts(models, specs)
    picked = [experts.name_for(t) for t in (999, 800, 799.5, 400, 399, 1, 0)]
    assert picked == ["first", "first", "middle", "middle", "last", "last", "last"]
    assert experts.activate("middle") is models["middle"]


def test_a_model_of_one_expert_loads_and_generates(tmp_path):
    from wan_i2v import I2VPipeline

    root = write_tiny_checkpoint(tmp_path / "one", spec=ONE_EXPERT)
    assert sorted(path.name for path in root.iterdir() if path.is_dir()) == ["google", "transformer"]
    pipe = I2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, spec=ONE_EXPERT)
    assert list(pipe.experts.models) == ["only"]
    result = pipe.generate(demo_image(96, 64), "a boat", max_area=64 * 96, frame_num=5, steps=3, shift=3.0, guide_scale=4.0, seed=1, progress=False)
    assert result.experts_used == ["only"] * 3
    assert result.video.shape == (3, 5, 64, 96) and torch.isfinite(result.video).all()
    with pytest.raises(WanError, match="checkpoint file not found: .*transformer/config.json"):  # the spec's layout is the one checked
        I2VPipeline.from_pretrained(tmp_path, device="cpu", dtype=torch.float32, spec=ONE_EXPERT)
    # LoRAs go to the spec's experts, by name.
    from safetensors.torch import save_file

    weight = pipe.experts.models["only"].blocks[0].self_attn.q.weight
    save_file({"diffusion_model.blocks.0.self_attn.q.diff": torch.ones_like(weight)}, str(tmp_path / "only.safetensors"))
    with_lora = I2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, spec=ONE_EXPERT, loras={"only": [tmp_path / "only.safetensors"]})
    assert [lora["expert"] for lora in with_lora.loras] == ["only"]
    assert torch.equal(with_lora.experts.models["only"].blocks[0].self_attn.q.weight, weight + 1)


def test_the_memory_estimate_counts_the_specs_experts():
    from wan_i2v.parallel.plan import ParallelDims, estimate_memory, model_sizes

    two, one = model_sizes(None), model_sizes(None, spec=ONE_EXPERT)
    assert (two.experts, one.experts) == (2, 1)
    assert replace(two, experts=1) == one  # the same official shapes otherwise
    shape = dict(tokens=21 * 45 * 80, pixels=1280 * 720)
    for offload, each in ((None, two.expert), ("experts", two.expert_root), ("blocks", two.expert_root)):
        both = estimate_memory(ParallelDims(), two, offload=offload, **shape).stages
        alone = estimate_memory(ParallelDims(), one, offload=offload, **shape).stages
        assert {stage: both[stage] - alone[stage] for stage in both} == dict.fromkeys(both, each), offload


def test_loras_are_keyed_by_the_specs_expert_names():
    from wan_i2v.loading.lora import Loras, LoraSpec

    loras = Loras.of({"only": [("a.safetensors", 0.5)]}, spec=ONE_EXPERT)
    assert loras.for_expert("only") == (LoraSpec("a.safetensors", 0.5),) and loras.for_expert("high") == ()
    with pytest.raises(WanError) as error:
        Loras.of({"high": ["a.safetensors"]}, spec=ONE_EXPERT)
    assert str(error.value) == """LoRAs for an unknown expert 'high' (the experts are "only")"""
    with pytest.raises(WanError) as error:
        Loras.of({"mid": ["a.safetensors"]})
    assert str(error.value) == """LoRAs for an unknown expert 'mid' (the experts are "high" and "low")"""
    assert Loras.of({"high": [], "low": []}) == Loras.of(None)  # an expert given no LoRA has none
    assert Loras.of({"low": ["b.safetensors"], "high": ["a.safetensors"]}) == Loras.of({"high": ["a.safetensors"], "low": ["b.safetensors"]})
