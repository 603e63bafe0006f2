"""Wan2.2-TI2V-5B on several processes (gloo, on the CPU) makes the single-process video: Ulysses with
a timestep per latent frame (an image) and one per sample (text-to-video), CFG parallel, FSDP, and the
Wan2.2 VAE's decode and encode split into tiles over the ranks; and the memory the planner counts for
the modulation per token that a timestep per latent frame makes.

One launch of 2 ranks runs every case; the single-process references are computed in this process.
"""

import weakref

import pytest
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from wan_i2v.models.vae2_2 import VAE22Config, WanVAE22
from wan_i2v.parallel import ParallelDims, ParallelGroups, init_distributed
from wan_i2v.parallel.launch import launch
from wan_i2v.parallel.vae import decode_tiled, encode_tiled
from wan_i2v.tiny import randomize_, write_tiny_checkpoint
from wan_i2v.video import demo_image

# A square video of 96*96 is 3 x 3 patches a latent frame: 9 frames make 3 latent frames, 27 tokens,
# which 2 ranks do not divide (the padding), and a frame's tokens straddle the ranks' shards.
RUN = dict(max_area=96 * 96, frame_num=9, steps=3, shift=5.0, seed=7)
IMAGE = demo_image(96, 96)

# name -> (plan, with an image, other from_pretrained options)
CASES = {
    "u2-image": (ParallelDims(1, 2), True, {}),
    "u2-text": (ParallelDims(1, 2), False, {}),
    "u2-batched-guidance-image": (ParallelDims(1, 2), True, {"batch_cfg": True}),  # two samples' timesteps per frame
    "u2-split-encode-image": (ParallelDims(1, 2), True, {"split_encode": True}),
    "cfg2-image": (ParallelDims(2, 1), True, {}),
    "cfg2-fsdp-image": (ParallelDims(2, 1, True), True, {}),
    "u2-fsdp-image": (ParallelDims(1, 2, True), True, {}),
}

# The Wan2.2 VAE's decoder at its real depth, few channels; the checkpoint's tiny one is shallower.
REAL_DEPTH = VAE22Config(dim=4, dec_dim=8, num_res_blocks=2)
# (VAE config or None: the checkpoint's, latents [B, 48, f, h, w]), split over the 2 ranks: tiles wide
# enough to be real ones (their halo inside the frame), across the width or the height.
DECODES = {
    "decode-tiny-width": (None, (1, 48, 2, 3, 24)),
    "decode-tiny-height": (None, (1, 48, 2, 20, 2)),
    "decode-tiny-more-ranks-than-columns": (None, (1, 48, 2, 1, 1)),
    "decode-real-depth": (REAL_DEPTH, (1, 48, 2, 3, 32)),
}
# (VAE config or None, video [B, 3, F, H, W]); the encoder folds 2x2 pixels into channels first.
ENCODES = {"encode-tiny": (None, (1, 3, 5, 32, 384)), "encode-real-depth": (REAL_DEPTH, (1, 3, 5, 32, 512))}


def _vae(config, ckpt):
    if config is None:
        from wan_i2v.models.spec import spec_for
        from wan_i2v.models.vae2_2 import load_vae

        return load_vae(ckpt / spec_for("ti2v-5b").files.vae, device="cpu", dtype=torch.float32)
    return randomize_(WanVAE22(config), seed=5).eval()


def _random(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).clamp(-3, 3) / 3


def _all_cases(ckpt):
    """Each rank: every case; rank 0 returns the results."""
    from wan_i2v import I2VPipeline

    torch.set_num_threads(1)
    device = init_distributed("cpu")
    results = {}
    for name, (dims, with_image, options) in CASES.items():
        groups = ParallelGroups.build(dims, device, ranks=range(dims.world))
        pipe = I2VPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32, parallel=groups, **options)
        result = pipe.generate(IMAGE if with_image else None, "a boat", progress=False, **RUN)
        if groups.is_main:
            results[name] = (result.latents, result.video)
    for name, (config, shape) in DECODES.items():
        video = decode_tiled(_vae(config, ckpt), _random(shape, 3), dist.group.WORLD)
        if dist.get_rank() == 0:
            results[name] = video
    for name, (config, shape) in ENCODES.items():
        latents = encode_tiled(_vae(config, ckpt), _random(shape, 4), dist.group.WORLD)
        gathered = [torch.empty_like(latents) for _ in range(2)]
        dist.all_gather(gathered, latents)
        results[name] = gathered
    dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ti2v") / "tiny", spec="ti2v-5b")


@pytest.fixture(scope="module")
def parallel_results(checkpoint):
    return launch(_all_cases, (checkpoint,), 2)[0]


@pytest.fixture(scope="module")
def references(checkpoint):
    from wan_i2v import I2VPipeline

    pipe = I2VPipeline.from_pretrained(checkpoint, device="cpu", dtype=torch.float32)
    return {with_image: pipe.generate(IMAGE if with_image else None, "a boat", progress=False, **RUN) for with_image in (True, False)}


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_run_equals_single_process(name, parallel_results, references):
    _, with_image, _ = CASES[name]
    latents, video = parallel_results[name]
    reference = references[with_image]
    assert latents.shape == reference.latents.shape == ((48, 3, 6, 6) if with_image else (48, 3, 4, 8))  # text-to-video: 16:9 in the area
    # fp32 rounding only: the ranks run other shapes (a shard of the tokens or of the heads, both
    # guidance branches in one batch) on another number of threads, which may take other vectorized
    # paths on the CPU (where this was written only batched guidance differed: by 7e-7). A rank that
    # gave its tokens the modulation of the first rank's frames differed by 0.12.
    assert relative(latents, reference.latents) <= 1e-5
    assert (video - reference.video).abs().max() <= 1e-4
    if with_image:  # the image's latent frame stays as it was given (its encode, fp32 rounding only): not denoised
        assert relative(latents[:, 0], reference.latents[:, 0]) <= 1e-6


@pytest.mark.parametrize("name", list(DECODES))
def test_split_decode_equals_single_decode(name, parallel_results, checkpoint):
    config, shape = DECODES[name]
    single = _vae(config, checkpoint).decode(_random(shape, 3))
    assert parallel_results[name].shape == single.shape == (1, 3, 5, 16 * shape[3], 16 * shape[4])
    # fp32 rounding only (see test_parallel.py's): a halo too narrow shows as differences of 1e-2 and more.
    assert (parallel_results[name] - single).abs().max() <= 5e-5


@pytest.mark.parametrize("name", list(ENCODES))
def test_split_encode_equals_single_encode_on_every_rank(name, parallel_results, checkpoint):
    config, shape = ENCODES[name]
    single = _vae(config, checkpoint).encode(_random(shape, 4))
    for rank_latents in parallel_results[name]:
        assert rank_latents.shape == single.shape == (1, 48, 2, shape[3] // 16, shape[4] // 16)
        assert (rank_latents - single).abs().max() <= 5e-5  # fp32 rounding only


def test_the_denoising_estimate_counts_the_modulation_per_token_of_a_timestep_per_frame():
    """TI2V-5B's DiT takes a timestep per latent frame, so each of a rank's tokens has its own [6, 3072]
    fp32 modulation, three times over (the DiT's, a block's sum with its own, the previous block's; see
    the next test): at 720P x 121 frames (27280 tokens) 1.9 GiB each on one GPU. The A14B's timestep is
    one per sample: nothing added."""
    from dataclasses import replace

    from wan_i2v.parallel.plan import ParallelDims, estimate_memory, model_sizes

    ti2v, a14b = model_sizes(None, spec="ti2v-5b"), model_sizes(None)
    assert ti2v.timestep_per_frame and not a14b.timestep_per_frame
    shape = dict(tokens=27280, pixels=1280 * 704)
    # (plan, tokens on a rank): Ulysses divides them (3 does not: 9094 on each, padded), CFG parallel does not.
    for dims, local in ((ParallelDims(), 27280), (ParallelDims(2, 1), 27280), (ParallelDims(1, 2), 13640), (ParallelDims(1, 3), 9094)):
        for offload in (None, "blocks"):
            per_frame = estimate_memory(dims, ti2v, offload=offload, **shape).stages
            per_sample = estimate_memory(dims, replace(ti2v, timestep_per_frame=False), offload=offload, **shape).stages
            assert per_frame["denoising"] - per_sample["denoising"] == 3 * local * 6 * 3072 * 4, (dims, offload)
            assert {stage: per_frame[stage] for stage in per_frame if stage != "denoising"} == {
                stage: per_sample[stage] for stage in per_sample if stage != "denoising"
            }


class PeakBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors the ops under it made (their storages, each counted while it lives)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.held = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)):
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.held and storage.nbytes():
                self.held.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key, nbytes):
        self.held.discard(key)
        self.live -= nbytes


def test_the_counted_modulations_are_what_a_forward_holds_more_with_a_timestep_per_frame():
    from wan_i2v.models.dit import DiT, DiTConfig
    from wan_i2v.parallel.plan import PER_TOKEN_MODULATIONS

    # Wide and short, so that the modulation's copies stand out of the rest.
    config = DiTConfig(dim=256, ffn_dim=256, freq_dim=32, in_dim=48, out_dim=48, num_heads=2, num_layers=2, text_len=16, text_dim=24)
    model = randomize_(DiT(config), seed=0).eval()
    latent, context = torch.randn(1, 48, 5, 16, 16), torch.randn(1, 16, 24)
    peaks = []
    for timestep in (torch.tensor([500.0]), torch.tensor([[0.0, 500.0, 500.0, 500.0, 500.0]])):
        with torch.no_grad(), PeakBytes() as measured:
            model(latent, timestep, context)
        peaks.append(measured.peak)
    copies = (peaks[1] - peaks[0]) / (5 * 8 * 8 * 6 * config.dim * 4)  # of [tokens, 6, dim] fp32
    # Beside the copies, a few [tokens, dim] tensors (a sixth of one each): 1 + scale, the head's modulation.
    assert PER_TOKEN_MODULATIONS <= copies < PER_TOKEN_MODULATIONS + 0.5, copies
