"""Several processes (gloo, on the CPU) make the single-process video: Ulysses, CFG parallel, FSDP,
the split VAE decode, the plan, and a failing rank.

One launch of 4 ranks runs every case (2-rank cases on ranks 0 and 1 while 2 and 3 wait), so the
process start-up is paid once; the single-process references are computed in this process.
"""

import math
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

from wan_i2v.errors import WanError
from wan_i2v.models.vae import CausalConv3d, Resample, VAEConfig, WanVAE
from wan_i2v.parallel import ParallelDims, ParallelGroups, init_distributed
from wan_i2v.parallel.launch import RankFailed, launch
from wan_i2v.parallel.plan import GiB, Placement, choose_plan, estimate_host_memory, estimate_memory, machine_needed, model_sizes
from wan_i2v.parallel.vae import decode_tiled, encode_tiled, encoder_halo, spatial_halo
from wan_i2v.tiny import randomize_
from wan_i2v.video import demo_image

# demo_image() in 48*80 is 6x10 latents: 3 frames x 3 x 5 patches = 45 tokens, which neither 2 nor 4
# divides; 64*96 with 5 frames is 2 x 3 x 6 = 36 tokens, which both divide.
SIZES = {"odd": dict(max_area=48 * 80, frame_num=9), "even": dict(max_area=64 * 96, frame_num=5)}
RUN = dict(steps=3, shift=3.0, seed=7)  # 3 steps: the high-noise expert, then the low-noise one

# name -> (plan, size, dtype, other from_pretrained options)
CASES = {
    f"cfg{cfg}-u{u}{'-fsdp' if fsdp else ''}": (ParallelDims(cfg, u, fsdp), "odd", torch.float32, {})
    for fsdp in (False, True)
    for cfg, u in ((1, 2), (2, 1), (2, 2), (1, 4))
}
CASES["cfg2-u2-even"] = (ParallelDims(2, 2), "even", torch.float32, {})
CASES["cfg1-u4-even"] = (ParallelDims(1, 4), "even", torch.float32, {})
CASES["cfg1-u2-offload"] = (ParallelDims(1, 2), "odd", torch.float32, {"offload": True})
CASES["cfg2-u1-fsdp-offload"] = (ParallelDims(2, 1, True), "odd", torch.float32, {"offload": True})
CASES["cfg1-u4-batched-guidance"] = (ParallelDims(1, 4), "odd", torch.float32, {"batch_cfg": True})
CASES["cfg1-u2-split-encode"] = (ParallelDims(1, 2), "odd", torch.float32, {"split_encode": True})
CASES["cfg2-u2-fsdp-bf16"] = (ParallelDims(2, 2, True), "odd", torch.bfloat16, {})
# Compiled blocks (the default on GPUs): Ulysses' all-to-all inside the graph, FSDP's hooks around it.
COMPILED = {"cfg1-u2-compiled": ParallelDims(1, 2), "cfg2-u1-fsdp-compiled": ParallelDims(2, 1, True), "cfg1-u2-fsdp-compiled": ParallelDims(1, 2, True)}
CASES.update({name: (dims, "odd", torch.float32, {"compile": True}) for name, dims in COMPILED.items()})

# The decode split, on latents wide enough for real tiles: (VAE config, latents shape, ranks).
REAL_SHAPED_VAE = VAEConfig(dim=4, num_res_blocks=2)  # the real decoder's depth, few channels
DECODES = {
    "tiny-4": (None, (1, 16, 3, 4, 40), 4),
    "tiny-2": (None, (1, 16, 2, 36, 5), 2),  # the tiles along the height
    "tiny-more-ranks-than-columns": (None, (1, 16, 2, 2, 3), 4),
    "real-depth-4": (REAL_SHAPED_VAE, (1, 16, 3, 4, 64), 4),
}


# The encode split: (VAE config, video shape [B, 3, F, H, W], ranks).
ENCODES = {
    "encode-tiny-4": (None, (1, 3, 9, 32, 320), 4),
    "encode-tiny-2-height": (None, (1, 3, 5, 288, 40), 2),
    "encode-tiny-more-ranks-than-columns": (None, (1, 3, 5, 16, 24), 4),
    "encode-real-depth-2": (REAL_SHAPED_VAE, (1, 3, 5, 32, 512), 2),
}


def _video(shape):
    return torch.rand(shape, generator=torch.Generator().manual_seed(4)) * 2 - 1


def _vae(config, ckpt):
    if config is None:
        from wan_i2v.models.spec import spec_for
        from wan_i2v.models.vae import load_vae

        return load_vae(ckpt / spec_for().files.vae, device="cpu", dtype=torch.float32)
    return randomize_(WanVAE(config), seed=5).eval()


def _latents(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


def _all_cases(ckpt):
    """Each rank: every case it takes part in; rank 0 returns the results."""
    from torch._dynamo.utils import counters

    from wan_i2v import I2VPipeline

    torch.set_num_threads(1)
    device = init_distributed("cpu")
    results = {}
    for name, (dims, size, dtype, options) in CASES.items():
        groups = ParallelGroups.build(dims, device, ranks=range(dims.world))
        if groups is not None:
            counters.clear()
            pipe = I2VPipeline.from_pretrained(ckpt, device="cpu", dtype=dtype, parallel=groups, **options)
            result = pipe.generate(demo_image(), "a boat", progress=False, **SIZES[size], **RUN)
            if groups.is_main:
                results[name] = (result.latents, result.video)
                results[name, "graphs"] = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
            else:
                assert result.video is None
    groups = ParallelGroups.build(ParallelDims(2, 2), device)
    agreed = [None] * 4
    dist.all_gather_object(agreed, groups.agree(1000 + dist.get_rank()))  # a seed drawn on each rank
    results["agreed"] = agreed
    for name, (config, shape, ranks) in DECODES.items():
        group = dist.new_group(list(range(ranks)))
        if dist.get_rank() < ranks:
            video = decode_tiled(_vae(config, ckpt), _latents(shape), group)
            if dist.get_rank() == 0:
                results[name] = video
    for name, (config, shape, ranks) in ENCODES.items():
        group = dist.new_group(list(range(ranks)))
        if dist.get_rank() < ranks:
            latents = encode_tiled(_vae(config, ckpt), _video(shape), group)
            gathered = [torch.empty_like(latents) for _ in range(ranks)] if dist.get_rank() == 0 else None
            dist.gather(latents, gathered, group_dst=0, group=group)
            if dist.get_rank() == 0:
                results[name] = gathered
    dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def parallel_results(tiny_checkpoint):
    start = time.perf_counter()
    results = launch(_all_cases, (tiny_checkpoint,), 4)[0]
    print(f"4-rank launch with {len(CASES)} generations and {len(DECODES)} decodes: {time.perf_counter() - start:.1f}s")
    return results


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    from wan_i2v import I2VPipeline

    pipes = {dtype: I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    return {
        (size, dtype): pipes[dtype].generate(demo_image(), "a boat", progress=False, **SIZES[size], **RUN)
        for size, dtype in {(size, dtype) for _, size, dtype, _ in CASES.values()}
    }


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_run_equals_single_process(name, parallel_results, references):
    dims, size, dtype, _ = CASES[name]
    latents, video = parallel_results[name]
    reference = references[(size, dtype)]
    if dtype == torch.float32:
        assert relative(latents, reference.latents) <= 1e-5
        assert (video - reference.video).abs().max() <= 1e-4
    else:  # FSDP's gathered weights sit elsewhere in memory, so bf16 matmuls may round differently
        assert relative(latents, reference.latents) <= 2e-2


@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_parallel_blocks_have_no_graph_break(name, parallel_results):
    graphs, breaks = parallel_results[name, "graphs"]
    assert graphs >= 1 and breaks == 0


def test_every_rank_takes_rank_0s_seed(parallel_results):
    assert parallel_results["agreed"] == [1000] * 4


@pytest.mark.parametrize("name", list(DECODES))
def test_split_decode_equals_single_decode(name, parallel_results, tiny_checkpoint):
    config, shape, ranks = DECODES[name]
    single = _vae(config, tiny_checkpoint).decode(_latents(shape))
    assert parallel_results[name].shape == single.shape
    # fp32 rounding only: on the CPU, tiles of other widths take other vectorized paths (a missing
    # halo column shows as differences of 1e-2 and more).
    assert (parallel_results[name] - single).abs().max() <= 5e-5


@pytest.mark.parametrize("name", ENCODES)
def test_split_encode_equals_single_encode_on_every_rank(name, parallel_results, tiny_checkpoint):
    config, shape, ranks = ENCODES[name]
    single = _vae(config, tiny_checkpoint).encode(_video(shape))
    for rank_latents in parallel_results[name]:
        assert rank_latents.shape == single.shape
        assert (rank_latents - single).abs().max() <= 5e-5  # fp32 rounding only (see the decode's)


def test_encoder_halo_covers_its_receptive_field():
    # The real encoder before its middle block: conv1 and 4 3x3 convs at full size (5 pixels), a
    # downsampling (1 + 1 for its padding), 4 convs at half size (8), a downsampling (2 + 2), 4 at a
    # quarter (16), a downsampling (4 + 4), 4 at an eighth (32): 75 pixels, rounded up to 80.
    assert encoder_halo(_vae(REAL_SHAPED_VAE, None)) == 80


def test_halo_covers_the_decoders_receptive_field():
    # The real decoder: stage 0 has 6 3x3 convs at latent size, each later stage 6 at 2, 4, 8x, plus
    # the upsamplers' convs and the head: 6 + 3 + 1.5 + .75 + .5 + .25 + .125 + .125 = 12.25.
    assert spatial_halo(_vae(REAL_SHAPED_VAE, None)) == 13


def temporal_warmup(vae: WanVAE) -> int:
    """Latent frames a time chunk of the decode would have to decode first, and discard, for its
    causal caches to be exact: the decoder's temporal receptive field (38 for the real decoder)."""
    reach, rate, counted = 0.0, 1, set()
    for module in vae.decoder.modules():  # registration order is forward order, but for Resample:
        if isinstance(module, Resample) and module.temporal:  # its time conv runs before it upsamples
            reach += module.time_conv.context / rate
            counted.add(module.time_conv)
            rate *= 2
        elif isinstance(module, CausalConv3d) and module not in counted:
            reach += module.context / rate
    return math.ceil(reach)


def test_time_chunks_would_need_a_38_frame_warm_up():
    """Why the decode is split in space: a time chunk is exact only after re-decoding the 38 latent
    frames before it (the real decoder's temporal receptive field), more than a whole 81-frame video has."""
    vae = _vae(REAL_SHAPED_VAE, None)
    k = temporal_warmup(vae)
    assert k == 38
    latents = _latents((1, 16, k + 2, 1, 1))
    last = vae.decode(latents)[:, :, -4:]  # the video frames of the last latent frame
    assert torch.equal(vae.decode(latents[:, :, -1 - k :])[:, :, -4:], last)
    assert not torch.equal(vae.decode(latents[:, :, -k:])[:, :, -4:], last)  # one frame short: not exact


def _fail(kind):
    device = init_distributed("cpu")
    if dist.get_rank() == 1:
        time.sleep(0.5)  # rank 0 is waiting in a collective by now
        if kind == "crash":
            raise ValueError("simulated failure on rank 1")
        if kind == "wan":
            raise WanError("bad input seen on rank 1", "fix it")
        os._exit(3)
    dist.barrier()
    return device


@pytest.mark.parametrize("kind", ["crash", "wan", "death"])
def test_a_failing_rank_ends_the_run_with_its_error(kind):
    start = time.perf_counter()
    with pytest.raises(RankFailed) as failure:
        launch(_fail, (kind,), 2)
    assert time.perf_counter() - start < 60
    assert failure.value.rank == 1
    message = str(failure.value)
    if kind == "crash":
        assert "rank 1 failed: ValueError: simulated failure on rank 1" in message
    elif kind == "wan":
        assert message == "bad input seen on rank 1 (fix it)"
    else:
        assert "exited with code 3" in message
    assert "WORLD_SIZE" not in os.environ  # the launching process is not made a rank


def test_the_sigterm_that_stops_the_other_ranks_is_not_taken_for_the_cause(tmp_path):
    """Once a rank fails the launcher stops the others with SIGTERM, which they record as stopped; a
    pod stopping sends SIGTERM to every rank, and then being stopped is the whole story."""
    import json

    from wan_i2v.parallel.launch import _first_failure

    def record(rank, kind, at):
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "time": at, "kind": kind, "message": kind}))

    record(0, "terminated", 1.0)  # rank 1 was killed (no record of its own), then rank 0 was stopped
    assert _first_failure(str(tmp_path), failed_rank=1) is None
    record(1, "wan", 2.0)  # rank 1's own error, written after rank 0 was already being stopped
    assert _first_failure(str(tmp_path), failed_rank=1)["rank"] == 1
    record(1, "terminated", 1.5)  # every rank stopped by SIGTERM
    assert _first_failure(str(tmp_path), failed_rank=1)["kind"] == "terminated"


def test_plan_choice_and_validation():
    sizes = model_sizes(None)  # the official model: 40 heads, 2 experts of 14B, umT5-XXL
    shape = dict(tokens=21 * 45 * 80, pixels=1280 * 720)
    # 2x48 GB: both experts fit no GPU, but one at a time does, beside CFG parallel's activations;
    # the arriving expert streams from the checkpoint, so host memory holds a few blocks per rank.
    choice = choose_plan(2, sizes, gpu_bytes=48 * GiB, **shape)
    assert choice.fits and (choice.dims.cfg, choice.dims.ulysses, choice.placement) == (2, 1, Placement(offload="experts"))
    # The seed's machine (2 x 48 GB, 64 GB of RAM) runs it: two processes, each a staging ring of 3 fp32 blocks.
    seed = choose_plan(2, sizes, gpu_bytes=48 * GiB, host_bytes=64 * GiB, **shape)
    assert seed.fits and seed.placement == Placement(offload="experts") and seed.host.total < 32 * GiB, seed.host.describe()
    # 22 GB: only sharded, with the shards pinned in host memory (1.5x their 32 GiB per rank), or, on a machine
    # without that much host memory, with every block streamed from the checkpoint.
    assert choose_plan(2, sizes, gpu_bytes=22 * GiB, **shape).placement == Placement(True, "experts")
    small = choose_plan(2, sizes, gpu_bytes=22 * GiB, host_bytes=64 * GiB, **shape)
    assert small.fits and small.placement == Placement(offload="blocks")
    assert estimate_host_memory(ParallelDims(2, 1, True), sizes, small.estimate, pixels=shape["pixels"], offload="experts").total > 64 * GiB
    choice = choose_plan(2, sizes, gpu_bytes=80 * GiB, **shape)
    assert choice.fits and (choice.dims.cfg, choice.placement) == (2, Placement(fsdp=True))  # 80 GB: sharded on the GPU
    choice = choose_plan(8, sizes, gpu_bytes=141 * GiB, **shape)
    assert choice.fits and (choice.dims.cfg, choice.dims.ulysses, choice.placement) == (2, 4, Placement())  # enough memory: unsharded
    # One GPU: both experts fit an 80 GB card (measured 68.9 GiB), one at a time a 48 GB one, streamed blocks a 24 GB one.
    assert (choose_plan(1, sizes, gpu_bytes=80 * GiB, **shape).placement, choose_plan(1, sizes, gpu_bytes=80 * GiB, **shape).fits) == (Placement(), True)
    assert choose_plan(1, sizes, gpu_bytes=48 * GiB, host_bytes=40 * GiB, **shape).placement == Placement(offload="experts")
    assert choose_plan(1, sizes, gpu_bytes=24 * GiB, host_bytes=16 * GiB, tokens=21 * 30 * 52, pixels=832 * 480).placement == Placement(offload="blocks")
    # FSDP's host offload keeps no weights on the GPU outside the loop but the VAE.
    stages = estimate_memory(ParallelDims(2, 1, True), sizes, offload="experts", **shape).stages
    assert stages["decoding"] < stages["image encoding"] < 16 * GiB
    choice = choose_plan(4, sizes, gpu_bytes=None, **shape)
    assert (choice.dims, choice.placement) == (ParallelDims(2, 2, False), Placement())
    # Nothing fits: the plan that needs the least, and the machine it needs.
    tight = choose_plan(1, sizes, gpu_bytes=12 * GiB, host_bytes=4 * GiB, **shape)
    assert not tight.fits and tight.placement == Placement(offload="blocks")
    assert re.fullmatch(r"1 GPU of \d+ GiB and \d+ GiB of host memory", machine_needed(tight)), machine_needed(tight)
    from wan_i2v.errors import on_the_command_line

    with on_the_command_line():  # the CLI's spelling; from Python, the keywords'
        with pytest.raises(WanError, match=r"3 GPUs cannot split the model's 40 attention heads \(use --gpus 1, 2, 4, 5, 8"):
            choose_plan(3, sizes, gpu_bytes=None, **shape)
        with pytest.raises(WanError, match="--ulysses 3 does not divide the model's 40 attention heads"):
            ParallelDims(1, 3).validate(3, 40)
        with pytest.raises(WanError, match="uses 8 GPUs, not 4.*--ulysses 2 --cfg-parallel or --ulysses 4"):
            ParallelDims(2, 4).validate(4, 40)
    with pytest.raises(WanError, match="ulysses=3 does not divide the model's 40 attention heads"):
        ParallelDims(1, 3).validate(3, 40)
    with pytest.raises(WanError, match="uses 8 GPUs, not 4.*ulysses=2, cfg_parallel=True or ulysses=4"):
        ParallelDims(2, 4).validate(4, 40)


def _rank_and_world():
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def test_launch_on_a_torch_whose_launcher_lacks_newer_options(monkeypatch):
    """torch before 2.12 (the GPU machines' 2.11) has no LaunchConfig.shutdown_timeout and raises
    TypeError for it: the launch must leave it out there and still run every rank."""
    import dataclasses

    from torch.distributed.launcher import api

    real = api.LaunchConfig

    class OlderLaunchConfig(real):
        __dataclass_fields__ = {name: f for name, f in real.__dataclass_fields__.items() if name != "shutdown_timeout"}

        def __init__(self, **options):
            if "shutdown_timeout" in options:
                raise TypeError("LaunchConfig.__init__() got an unexpected keyword argument 'shutdown_timeout'")
            super().__init__(**options)

    assert "shutdown_timeout" not in {f.name for f in dataclasses.fields(OlderLaunchConfig)}
    monkeypatch.setattr(api, "LaunchConfig", OlderLaunchConfig)
    assert launch(_rank_and_world, (), 2) == {0: (0, 2), 1: (1, 2)}


def test_a_launcher_that_cannot_start_is_one_error(monkeypatch):
    from torch.distributed.launcher import api

    def broken(*args, **kwargs):
        raise RuntimeError("rendezvous failed: address in use")

    monkeypatch.setattr(api, "elastic_launch", broken)
    with pytest.raises(WanError, match=r"^could not start 2 processes: RuntimeError: rendezvous failed: address in use \(start them with torchrun"):
        launch(_rank_and_world, (), 2)


def _elements_read(ckpt):
    """Each rank: how many elements of the experts' files it read while loading an FSDP pipeline."""
    from wan_i2v import I2VPipeline
    from wan_i2v.loading import checkpoint

    device = init_distributed("cpu")
    read = {"experts": 0}
    original = checkpoint.TensorSource.read

    def counting(self, key, rows=None):
        tensor = original(self, key, rows)
        if "noise_model" in self.files[key]:
            read["experts"] += tensor.numel()
        return tensor

    checkpoint.TensorSource.read = counting
    pipe = I2VPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32, parallel=ParallelGroups.build(ParallelDims(2, 1, True), device))
    total = sum(p.numel() for expert in pipe.experts.models.values() for p in expert.parameters())
    dist.destroy_process_group()
    return read["experts"], total


def test_fsdp_ranks_read_only_their_rows_of_the_experts(tiny_checkpoint):
    counts = launch(_elements_read, (tiny_checkpoint,), 2)
    (first, total), (second, _) = counts[0], counts[1]
    # Each rank reads its half of every sharded tensor and the blocks' few fp32 tensors whole.
    assert first + second < 1.1 * total
    assert max(first, second) < 0.6 * total
