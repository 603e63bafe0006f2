"""LoRA adapters and the distilled recipe on the tiny checkpoint: merged as the official formula says, in every format."""

import json
import re
import shutil
import warnings

import av
import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_i2v import I2VPipeline
from wan_i2v.cli import main
from wan_i2v.errors import WanError
from wan_i2v.loading import checkpoint as ckpt
from wan_i2v.loading.lora import LoraSpec
from wan_i2v.loading.names import official_to_diffusers
from wan_i2v.video import demo_image

RUN = dict(max_area=64 * 96, frame_num=5, steps=3, shift=3.0, seed=5, progress=False)
TARGETS = ["blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight", "blocks.0.cross_attn.o.weight"]


def expert_weights(root, expert="high_noise_model"):
    """All of an expert's tensors, from its one file or its shards."""
    return {key: value for shard in sorted((root / expert).glob("*.safetensors")) for key, value in load_file(str(shard)).items()}


def random_pair(weight, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, weight.shape[1], generator=g) * 0.1, torch.randn(weight.shape[0], rank, generator=g) * 0.1


def lightx2v_lora(path, weights, seed, rank=4, alpha=2.0):
    tensors, deltas = {}, {}
    for i, name in enumerate(TARGETS):
        module = name.removesuffix(".weight")
        down, up = random_pair(weights[name], rank, seed + i)
        tensors[f"diffusion_model.{module}.lora_down.weight"] = down
        tensors[f"diffusion_model.{module}.lora_up.weight"] = up
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
        deltas[name] = ("lora", down, up, alpha / rank)
    g = torch.Generator().manual_seed(seed + 99)
    bias, modulation = weights["blocks.1.self_attn.k.bias"], weights["blocks.0.modulation"]
    tensors["diffusion_model.blocks.1.self_attn.k.diff_b"] = torch.randn(bias.shape, generator=g) * 0.1
    tensors["diffusion_model.blocks.0.diff_m"] = torch.randn(modulation.shape, generator=g) * 0.1
    tensors["diffusion_model.blocks.1.cross_attn.v.diff"] = torch.randn(weights["blocks.1.cross_attn.v.weight"].shape, generator=g) * 0.1
    deltas["blocks.1.self_attn.k.bias"] = ("diff", tensors["diffusion_model.blocks.1.self_attn.k.diff_b"])
    deltas["blocks.0.modulation"] = ("diff", tensors["diffusion_model.blocks.0.diff_m"])
    deltas["blocks.1.cross_attn.v.weight"] = ("diff", tensors["diffusion_model.blocks.1.cross_attn.v.diff"])
    save_file(tensors, str(path))
    return deltas


def peft_lora(path, weights, seed, rank=3, prefix="model.diffusion_model.", diffusers=False):
    tensors, deltas = {}, {}
    for i, name in enumerate(TARGETS):
        module = (official_to_diffusers(name) if diffusers else name).removesuffix(".weight")
        down, up = random_pair(weights[name], rank, seed + i)
        tensors[f"{prefix}{module}.lora_A.weight"] = down
        tensors[f"{prefix}{module}.lora_B.weight"] = up
        deltas[name] = ("lora", down, up, 1.0)  # no alpha: scale 1
    save_file(tensors, str(path))
    return deltas


def merge_by_hand(source_root, target_root, expert, loras):
    """Copy the checkpoint with ``loras`` [(deltas, strength), ...] merged into ``expert``: W + s * scale * up @ down, in fp32."""
    if not target_root.exists():
        shutil.copytree(source_root, target_root)
    weights = expert_weights(target_root, expert)
    for shard in (target_root / expert).glob("diffusion_pytorch_model*"):
        shard.unlink()  # written back as one file
    for name in weights:
        merged = weights[name].float()
        for deltas, strength in loras:
            if name in deltas:
                kind, *parts = deltas[name]
                merged = merged + (strength * parts[2] * (parts[1] @ parts[0]) if kind == "lora" else strength * parts[0])
        weights[name] = merged.to(weights[name].dtype)
    save_file(weights, str(target_root / expert / ckpt.SAFETENSORS_FILE))
    return target_root


def generate(root, **options):
    return I2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, **options).generate(demo_image(), "a boat", **RUN)


def test_a_zero_lora_leaves_the_video_bit_identical(tiny_checkpoint, tmp_path):
    weights = expert_weights(tiny_checkpoint)
    name = TARGETS[0].removesuffix(".weight")
    zero = tmp_path / "zero.safetensors"
    save_file({f"diffusion_model.{name}.lora_down.weight": torch.randn(4, weights[TARGETS[0]].shape[1]),
               f"diffusion_model.{name}.lora_up.weight": torch.zeros(weights[TARGETS[0]].shape[0], 4)}, str(zero))  # fmt: skip
    plain = generate(tiny_checkpoint)
    with_zero = generate(tiny_checkpoint, loras={"high": [(zero, 1.0)], "low": [str(zero)]})
    assert torch.equal(plain.latents, with_zero.latents) and torch.equal(plain.video, with_zero.video)


@pytest.mark.parametrize("fmt", ["lightx2v", "peft", "peft-no-prefix", "diffusers"])
def test_a_lora_equals_the_checkpoint_merged_by_hand(tiny_checkpoint, tmp_path, fmt):
    weights = expert_weights(tiny_checkpoint)
    path = tmp_path / f"{fmt}.safetensors"
    if fmt == "lightx2v":
        deltas = lightx2v_lora(path, weights, seed=1)
    else:
        prefix = {"peft": "model.diffusion_model.", "peft-no-prefix": "", "diffusers": "transformer."}[fmt]
        deltas = peft_lora(path, weights, seed=1, prefix=prefix, diffusers=fmt == "diffusers")
    merged = merge_by_hand(tiny_checkpoint, tmp_path / "merged", "high_noise_model", [(deltas, 0.7)])
    with_lora = generate(tiny_checkpoint, loras={"high": [(path, 0.7)]})
    assert torch.equal(with_lora.latents, generate(merged).latents)
    assert not torch.equal(with_lora.latents, generate(tiny_checkpoint).latents)
    assert with_lora.loras == [{"expert": "high", "file": path.name, "sha256": with_lora.loras[0]["sha256"], "strength": 0.7}]


def test_two_loras_on_one_expert_apply_in_order_and_switch_without_reloading(tiny_checkpoint, tmp_path):
    low_weights = expert_weights(tiny_checkpoint, "low_noise_model")
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a, b = lightx2v_lora(first, low_weights, seed=3), peft_lora(second, low_weights, seed=7)
    merged = merge_by_hand(tiny_checkpoint, tmp_path / "merged", "low_noise_model", [(a, 1.0), (b, -0.5)])
    expected = generate(merged).latents
    pipe = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, loras={"low": [(first, 1.0), (second, -0.5)]})
    # The hand merge multiplies the LoRA factors as the test holds them and the loader as the file
    # holds them: other memory layouts, so the CPU's matmul kernels (AVX-512 ones, say) may sum in
    # another order. fp32 rounding, amplified by the denoising steps, stays far under 1e-4.
    latents = pipe.generate(demo_image(), "a boat", **RUN).latents
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    assert (latents - generate(tiny_checkpoint).latents).abs().max() > 1e-2  # the LoRAs changed the video
    # Switched on the loaded pipeline: the same as loading without, then with one of them.
    pipe.set_loras(None)
    assert pipe.loras == [] and "loras" not in pipe.identity
    assert torch.equal(pipe.generate(demo_image(), "a boat", **RUN).latents, generate(tiny_checkpoint).latents)
    pipe.set_loras({"high": [str(first)]})
    assert torch.equal(pipe.generate(demo_image(), "a boat", **RUN).latents, generate(tiny_checkpoint, loras={"high": [str(first)]}).latents)


def test_loras_switch_on_an_fp8_pipeline_as_if_loaded_with_them(tiny_checkpoint, tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lightx2v_lora(first, expert_weights(tiny_checkpoint), seed=3)
    peft_lora(second, expert_weights(tiny_checkpoint, "low_noise_model"), seed=7)
    loras = {"high": [(first, 0.8)], "low": [(second, 1.0)]}

    def fp8_pipeline(**options):
        return I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, fp8=True, **options)

    def weights(pipe):
        """Copies of the experts' tensors, as bytes (FP8 has no comparison of its own on the CPU)."""
        return {f"{name}.{key}": value.detach().clone().view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value.detach().clone()
                for name in ("high", "low") for key, value in pipe.experts.models[name].state_dict().items()}  # fmt: skip

    loaded_with, switched = weights(fp8_pipeline(loras=loras)), fp8_pipeline()
    plain = weights(switched)
    switched.set_loras(loras)
    after = weights(switched)
    assert after.keys() == loaded_with.keys() and all(torch.equal(after[key], loaded_with[key]) for key in after)
    assert sum(value.dtype == torch.uint8 for value in after.values()) == 10 * 2 * 2  # FP8: q, k, v, o twice and the FFN's two, 2 blocks, 2 experts
    assert not torch.equal(after["high.blocks.0.self_attn.q.weight"], plain["high.blocks.0.self_attn.q.weight"])
    switched.set_loras(None)
    back = weights(switched)
    assert all(torch.equal(back[key], plain[key]) for key in back)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_peft_and_kohya_files_give_lightx2v_s_delta(layout, tiny_checkpoint, tmp_path):
    from wan_i2v.loading.checkpoint import safetensors_source
    from wan_i2v.loading.lora import read_lora

    weights, rank, alpha = expert_weights(tiny_checkpoint), 4, 2.0
    reference, other = {}, {}
    for i, name in enumerate(TARGETS):
        module = name.removesuffix(".weight")
        down, up = random_pair(weights[name], rank, i)
        reference.update({f"diffusion_model.{module}.lora_down.weight": down, f"diffusion_model.{module}.lora_up.weight": up,
                          f"diffusion_model.{module}.alpha": torch.tensor(alpha)})
        if layout == "kohya":
            kohya = "lora_unet_" + module.replace(".", "_")
            other.update({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up, f"{kohya}.alpha": torch.tensor(alpha)})
        else:  # PEFT saves no alpha here: its scale alpha/rank = 0.5 is in lora_B
            other.update({f"base_model.model.{module}.lora_A.weight": down, f"base_model.model.{module}.lora_B.weight": up * (alpha / rank)})
    save_file(reference, str(tmp_path / "lightx2v.safetensors"))
    save_file(other, str(tmp_path / f"{layout}.safetensors"))
    base = safetensors_source(tiny_checkpoint / "high_noise_model")
    expected = read_lora(LoraSpec(str(tmp_path / "lightx2v.safetensors")), base).deltas
    got = read_lora(LoraSpec(str(tmp_path / f"{layout}.safetensors")), base).deltas
    assert sorted(got) == sorted(expected) == sorted(TARGETS)
    for name in TARGETS:
        # (scaling by 0.5, a power of two, before or after the product rounds the same: equal to the bit)
        assert torch.equal(got[name].tensor(None, torch.device("cpu")), expected[name].tensor(None, torch.device("cpu")))


def test_lora_spec_parses_an_optional_strength():
    assert LoraSpec.parse("style.safetensors") == LoraSpec("style.safetensors", 1.0)
    assert LoraSpec.parse("/x/style.safetensors:0.6") == LoraSpec("/x/style.safetensors", 0.6)
    assert LoraSpec.parse("C:/x/style.safetensors") == LoraSpec("C:/x/style.safetensors", 1.0)


def test_a_lora_strength_that_is_not_a_number_is_refused():
    with pytest.raises(WanError, match="the LoRA strength 'abc' in a.safetensors:abc is not a number"):
        LoraSpec.parse("a.safetensors:abc")


def test_image_embedding_keys_are_skipped_with_one_warning(tiny_checkpoint, tmp_path):
    weights = expert_weights(tiny_checkpoint)
    path = tmp_path / "with_img.safetensors"
    deltas = peft_lora(path, weights, seed=2)
    tensors = load_file(str(path))
    tensors.update({"diffusion_model.img_emb.proj.1.lora_A.weight": torch.zeros(2, 8), "diffusion_model.img_emb.proj.1.lora_B.weight": torch.zeros(8, 2),
                    "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": torch.zeros(2, 8)})  # fmt: skip
    save_file(tensors, str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_lora = generate(tiny_checkpoint, loras={"high": [path]})
    assert [str(w.message) for w in caught if "image-embedding" in str(w.message)] == [
        "with_img.safetensors: skipped 3 keys of image-embedding layers that Wan2.2-I2V does not have"
    ]
    merged = merge_by_hand(tiny_checkpoint, tmp_path / "merged", "high_noise_model", [(deltas, 1.0)])
    assert torch.equal(with_lora.latents, generate(merged).latents)


def _write(path, tensors):
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, w: d / "missing.safetensors", "LoRA file not found: .*missing.safetensors"),
        (lambda d, w: (d / "style.pt").write_bytes(b"x") and d / "style.pt", "is not a .safetensors file"),
        (lambda d, w: (d / "bad.safetensors").write_bytes(b"not safetensors") and d / "bad.safetensors", "cannot read LoRA file .*bad.safetensors"),
        (lambda d, w: _write(d / "model.safetensors", {"blocks.0.self_attn.q.weight": w["blocks.0.self_attn.q.weight"]}),
         "key 'blocks.0.self_attn.q.weight' is not a LoRA key"),
        (lambda d, w: _write(d / "other.safetensors", {"diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.zeros(2, 64),
                                                       "diffusion_model.blocks.9.self_attn.q.lora_up.weight": torch.zeros(64, 2)}),
         "key 'diffusion_model.blocks.9.self_attn.q.lora_down.weight' matches no parameter"),
        (lambda d, w: _write(d / "wide.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 5120),
                                                      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 2)}),
         r"the delta of 'blocks.0.self_attn.q.weight' has shape \(5120, 5120\), the parameter \(64, 64\)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_bad_lora_is_one_line_before_any_video(tiny_checkpoint, tmp_path, capsys, make, message, dry_run):
    """The run refuses it before sampling; --dry-run the same way, without loading the model."""
    image = tmp_path / "in.png"
    demo_image(96, 64).save(image)
    lora = make(tmp_path, expert_weights(tiny_checkpoint))
    out = tmp_path / "out.mp4"
    code = main(["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image), "--prompt", "a", "--save-file", str(out),
                 "--size", "96*64", "--frame-num", "5", "--steps", "2", "--device", "cpu", "--lora", f"{lora}:0.5", *(["--dry-run"] if dry_run else [])])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not out.exists()


def test_the_distilled_recipe_and_a_lora_through_the_cli(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "in.png"
    demo_image(96, 64).save(image)
    lora = tmp_path / "lightning.safetensors"
    lightx2v_lora(lora, expert_weights(tiny_checkpoint), seed=4)
    out = tmp_path / "out.mp4"
    base = ["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image), "--prompt", "a", "--size", "96*64", "--frame-num", "5",
            "--device", "cpu", "--seed", "1", "--distilled"]  # fmt: skip
    assert main([*base, "--save-file", str(out), "--lora-high", str(lora)]) == 0
    with av.open(str(out)) as container:
        metadata = json.loads(container.metadata["comment"])
    assert (metadata["solver"], metadata["steps"], metadata["guide_scale"], metadata["shift"]) == ("euler", 4, [1.0, 1.0], 5.0)
    assert metadata["loras"] == [{"expert": "high", "file": "lightning.safetensors", "sha256": metadata["loras"][0]["sha256"], "strength": 1.0}]
    assert re.fullmatch("[0-9a-f]{64}", metadata["loras"][0]["sha256"])
    capsys.readouterr()
    assert main([*base, "--save-file", str(tmp_path / "six.mp4"), "--steps", "6"]) == 0  # each setting overridable
    with av.open(str(tmp_path / "six.mp4")) as container:
        assert json.loads(container.metadata["comment"])["steps"] == 6
    # Without guidance the planner gives both GPUs to Ulysses, not a CFG half with nothing to run.
    capsys.readouterr()
    assert main([*base, "--save-file", str(out), "--gpus", "2", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("plan: 2 processes, no CFG parallel, Ulysses 2;")


def test_guide_scale_1_runs_one_forward_per_step(tiny_pipeline):
    from wan_i2v.pipeline import LoopHook

    class Branches(LoopHook):
        def __init__(self):
            self.seen = []

        def around_model(self, step, branch, run):
            self.seen.append(branch)
            return run()

    hook = Branches()
    result = tiny_pipeline.generate(demo_image(), "a boat", guide_scale=1.0, solver="euler", hooks=[hook], **{**RUN, "steps": 4})
    assert hook.seen == ["cond"] * 4 and result.experts_used == ["high", "high", "low", "low"]
    mixed = Branches()
    tiny_pipeline.generate(demo_image(), "a boat", guide_scale=(1.0, 3.5), solver="euler", hooks=[mixed], **{**RUN, "steps": 4})
    assert mixed.seen == ["cond", "uncond", "cond", "uncond", "cond", "cond"]  # the high-noise expert's scale is the second


def test_a_run_with_loras_does_not_resume_a_state_without(tiny_checkpoint, tmp_path):
    weights = expert_weights(tiny_checkpoint)
    lora = tmp_path / "l.safetensors"
    peft_lora(lora, weights, seed=9)
    state = tmp_path / "run.state.pt"
    plain = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)
    plain.generate(demo_image(), "a boat", state_file=state, **RUN)
    saved = torch.load(state, weights_only=True)
    assert "loras" not in saved["run"]
    with_lora = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, loras={"high": [lora]})
    assert with_lora.identity["loras"][0]["file"] == "l.safetensors"
    assert len(with_lora.generate(demo_image(), "a boat", state_file=state, **RUN).experts_used) == RUN["steps"]  # started over


def test_unknown_expert_in_loras_is_an_error(tiny_checkpoint):
    with pytest.raises(WanError, match="LoRAs for an unknown expert 'mid'"):
        I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, loras={"mid": []})
