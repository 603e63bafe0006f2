"""The machine's memory as the planner reads it, and the GPU cap as the run sets it (with a fake CUDA:
CI has no GPU, and the device index the API wants is what broke on the first GPU run)."""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from wan_i2v import session
from wan_i2v.errors import WanError
from wan_i2v.execution import ExecutionPlan, PlannedRun
from wan_i2v.parallel.plan import GiB, MemoryEstimate


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_available_host_memory_is_the_machines_within_its_cgroups_limit(tmp_path):
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "meminfo", "MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   100000000 kB\n")
    write(proc / "self" / "cgroup", "0::/wan-bench\n")
    assert session.available_host_bytes(proc, cgroups) == 100000000 * 1024  # no cgroup files: the machine's
    write(cgroups / "wan-bench" / "memory.max", "max\n")
    assert session.available_host_bytes(proc, cgroups) == 100000000 * 1024
    # A 32 GiB group using 20 GiB, 12 GiB of it page cache it can give back: 24 GiB are there for the run.
    write(cgroups / "wan-bench" / "memory.max", f"{32 * GiB}\n")
    write(cgroups / "wan-bench" / "memory.current", f"{20 * GiB}\n")
    write(cgroups / "wan-bench" / "memory.stat", f"anon {8 * GiB}\nfile {12 * GiB}\n")
    assert session.available_host_bytes(proc, cgroups) == 24 * GiB
    assert session.available_host_bytes(tmp_path / "nothing", tmp_path / "nothing") is None


class FakeCuda:
    """torch.cuda's calls that cap_gpu_memory makes; set_per_process_memory_fraction wants an index or a device with one."""

    def __init__(self):
        self.fractions = []

    def current_device(self):
        return 0

    def get_device_properties(self, index):
        assert isinstance(index, int)
        return type("Properties", (), {"total_memory": 140 * GiB})()

    def set_per_process_memory_fraction(self, fraction, index):
        if not isinstance(index, int):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{index}")
        self.fractions.append((fraction, index))


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_gpu_memory_caps_the_allocator_at_what_was_planned(monkeypatch, device):
    fake = FakeCuda()
    for name in ("current_device", "get_device_properties", "set_per_process_memory_fraction"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    estimate = MemoryEstimate({"denoising": 10 * GiB})
    planned = PlannedRun(ExecutionPlan(torch.device("cuda"), torch.bfloat16), estimate, True, 70 * GiB, capped=True)
    session.cap_gpu_memory(planned, device)
    assert fake.fractions == [(0.5, 0)]
    # Planned for the GPU's own memory (no --gpu-memory), or on the CPU: no cap.
    session.cap_gpu_memory(PlannedRun(planned.plan, estimate, True, 70 * GiB), device)
    session.cap_gpu_memory(planned, "cpu")
    assert fake.fractions == [(0.5, 0)]


@pytest.mark.parametrize("device", ["mps", "foo", "tpu", "cuda:x", "CUDA"])
def test_a_device_wan_i2v_does_not_run_on_is_one_line(device, tmp_path, capsys):
    from wan_i2v.cli import main
    from wan_i2v.errors import WanError

    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (64, 48)).save(image)
    for command in (["generate", "--image", str(image), "--prompt", "x", "--dry-run"], ["decode", str(tmp_path / "l.pt"), "--save-file", str(tmp_path / "o.mp4")]):
        assert main([*command, "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"argument --device: {device!r} is not a device wan-i2v runs on: use cuda, cuda:N or cpu" in err[0], err
    with pytest.raises(WanError, match=f"device={device!r} is not a device wan-i2v runs on"):
        session.RunSession.open(session.RunOptions(ckpt_dir=tmp_path, device=device))


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "1e400", "lots"])
@pytest.mark.parametrize("flag", ["--gpu-memory", "--host-memory"])
def test_a_memory_size_that_is_not_a_positive_number_is_one_line(flag, value, tmp_path, capsys):
    from PIL import Image

    from wan_i2v.cli import main

    image = tmp_path / "in.png"
    Image.new("RGB", (64, 48)).save(image)
    assert main(["generate", "--image", str(image), "--prompt", "x", "--dry-run", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wan-i2v: error: argument {flag}: "), err


def test_the_gpu_estimate_counts_fp8_blocks_in_one_byte_a_weight():
    # The official 14B expert: 26.6 GiB in bf16; its blocks' linear weights are 98% of it, so FP8
    # leaves about half (measured on an H200: 68.9 GiB peak in bf16, 42.6 GiB with --fp8).
    from wan_i2v.session import RunOptions, plan_for

    def planned(fp8):
        options = RunOptions(device="cuda", gpu_memory=80, host_memory=64, fp8=fp8, compile=False)
        return plan_for(options, height=720, width=1280, frame_num=81, device="cuda", world=1, ckpt_dir=None, query_gpu=False)

    bf16, fp8 = planned(False), planned(True)
    assert "both experts" in bf16.plan.describe() and "both experts" in fp8.plan.describe()
    saved = (bf16.estimate.total - fp8.estimate.total) / 2**30
    assert 2 * 12.5 < saved < 2 * 13.5, saved  # two experts, each 13.1 GiB lighter


def test_the_gpu_estimate_counts_the_step_caches_copies_of_the_stream():
    """Two copies of the stream (the first blocks' residual, the middle blocks') per guidance branch, in
    the compute dtype: at 720P x 81 frames (75600 tokens of 5120 values) 774 MB each in bf16."""
    from dataclasses import replace

    from wan_i2v.parallel.plan import ParallelDims, model_sizes
    from wan_i2v.transforms.step_cache_config import StepCacheConfig

    sizes, hd = model_sizes(None), dict(tokens=21 * 45 * 80, pixels=1280 * 720)
    exact = ExecutionPlan(torch.device("cuda"), torch.bfloat16)
    cached = replace(exact, step_cache=StepCacheConfig(threshold=0.1))
    added = cached.estimate(sizes, **hd).stages["denoising"] - exact.estimate(sizes, **hd).stages["denoising"]
    assert added == 2 * 2 * 75600 * 5120 * 2  # both branches on one GPU
    halves = [replace(plan, dims=ParallelDims(cfg=2)).estimate(sizes, **hd).stages["denoising"] for plan in (cached, exact)]
    assert halves[0] - halves[1] == 2 * 75600 * 5120 * 2  # under CFG parallel a GPU holds its branch's alone
    assert replace(cached, step_cache=StepCacheConfig(threshold=0)).estimate(sizes, **hd) == exact.estimate(sizes, **hd)
    assert cached.estimate(sizes, **hd).stages["text encoding"] == exact.estimate(sizes, **hd).stages["text encoding"]


def test_the_host_estimate_counts_the_step_caches_state_on_its_way_to_the_state_file():
    """The state file holds the step cache's tensors: rank 0 copies both branches' two streams to the
    host after every step (774 MB each at 720P x 81 frames in bf16), beside the rest of the run."""
    from wan_i2v.session import RunOptions, plan_for
    from wan_i2v.transforms.step_cache_config import StepCacheConfig

    def planned(step_cache):
        options = RunOptions(device="cuda", gpu_memory=80, host_memory=64, step_cache=step_cache, compile=False)
        return plan_for(options, height=720, width=1280, frame_num=81, device="cuda", world=1, ckpt_dir=None, query_gpu=False)

    exact, cached = planned(None), planned(StepCacheConfig(threshold=0.1))
    added = {stage: cached.host.stages[stage] - exact.host.stages[stage] for stage in exact.host.stages}
    assert added == {"text encoding": 0, "image encoding": 0, "denoising": 2 * 2 * 75600 * 5120 * 2, "decoding": 0}


def test_counts_take_the_number_of_their_noun():
    from wan_i2v.parallel.plan import ParallelDims
    from wan_i2v.server.store import QueueFull

    assert str(QueueFull(1)) == "the queue is full (1 job waiting)" and str(QueueFull(3)) == "the queue is full (3 jobs waiting)"
    with pytest.raises(WanError, match=r"uses 2 GPUs, not 1 \(with 1 GPU use ulysses=1\)"):
        ParallelDims(cfg=2).validate(1, 40)


def test_streamed_blocks_keep_what_the_gpu_has_room_for_and_a_small_gpu_streams_the_text_encoder():
    from wan_i2v.execution import Offload, plan_run
    from wan_i2v.parallel.plan import HEADROOM, model_sizes

    sizes = model_sizes(None)  # the official model in bf16: blocks of 0.66 GiB, umT5-XXL of 10.6 GiB
    base = ExecutionPlan(torch.device("cuda"), torch.bfloat16, compile=True)  # as a GPU run compiles
    hd, sd = dict(tokens=21 * 45 * 80, pixels=1280 * 720), dict(tokens=21 * 30 * 52, pixels=832 * 480)
    # 24 GiB at 720P: the blocks stream, and as many as fit beside the activations stay while their expert runs.
    run = plan_run(base, sizes, gpus=1, gpu_bytes=24 * GiB, host_bytes=32 * GiB, guided=False, **hd)
    assert run.fits and run.plan.offload is Offload.BLOCKS and not run.plan.stream_text_encoder
    kept = run.plan.kept_blocks
    assert 8 <= kept < sizes.blocks - 2, kept
    denoising = run.estimate.stages["denoising"]
    assert denoising <= 24 * GiB * HEADROOM < denoising + sizes.block  # one block more would not fit
    assert run.plan.estimate(sizes, **hd).stages == run.estimate.stages  # the plan's own estimate counts them too
    assert f"{kept} blocks of the active expert kept on the GPU" in run.plan.describe()
    # 12 GiB at 480P: the 10.6 GiB text encoder does not fit whole; its blocks stream through while it encodes.
    small = plan_run(base, sizes, gpus=1, gpu_bytes=12 * GiB, host_bytes=16 * GiB, guided=False, **sd)
    assert small.fits and small.plan.stream_text_encoder and small.plan.offload is Offload.BLOCKS, small.estimate.describe()
    assert small.estimate.stages["text encoding"] < sizes.text_encoder  # less than the whole encoder alone
    assert "the text encoder's blocks streamed" in small.plan.describe()
    # Where the text encoder does not visit (kept by a server, or on the CPU), nothing of it streams.
    kept_whole = plan_run(ExecutionPlan(torch.device("cuda"), torch.bfloat16, compile=True, keep_text_encoder=True), sizes, gpus=1, gpu_bytes=80 * GiB, guided=False, **hd)
    assert not kept_whole.plan.stream_text_encoder and kept_whole.plan.kept_blocks == 0
    # 8 GiB is too small even so: refused, naming the machine it needs.
    assert not plan_run(base, sizes, gpus=1, gpu_bytes=8 * GiB, host_bytes=16 * GiB, guided=False, **sd).fits


def test_without_compile_the_larger_activations_leave_room_for_fewer_kept_blocks():
    """--no-compile at 24 GiB, 720P ran out of GPU memory on the device: the plan had kept as many
    blocks as the compiled activations left room for."""
    from wan_i2v.execution import plan_run
    from wan_i2v.parallel.plan import HEADROOM, model_sizes

    sizes = model_sizes(None)
    hd = dict(tokens=21 * 45 * 80, pixels=1280 * 720)
    compiled, eager = (plan_run(ExecutionPlan(torch.device("cuda"), torch.bfloat16, compile=on), sizes, gpus=1, gpu_bytes=24 * GiB,
                                host_bytes=32 * GiB, guided=False, **hd) for on in (True, False))  # fmt: skip
    assert compiled.fits and eager.fits
    assert 0 < eager.plan.kept_blocks < compiled.plan.kept_blocks, (eager.plan.kept_blocks, compiled.plan.kept_blocks)
    # With the same blocks kept the eager forward needs more; each plan fits its cap with the headroom.
    same = replace(compiled.plan, compile=False).estimate(sizes, **hd).stages["denoising"]
    assert same > compiled.estimate.stages["denoising"]
    assert eager.estimate.stages["denoising"] <= 24 * GiB * HEADROOM


def test_the_cli_compiles_without_inductors_pool_of_processes_unless_told(monkeypatch, tmp_path):
    """The pool held 5.6 GiB of host memory for a whole run. Its size is read from the environment when
    inductor's config is imported, which the CLI has done before it runs: the config itself must change."""
    import torch._inductor.config as inductor_config

    from wan_i2v.commands.common import keep_compiled_code

    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path))
    for name in ("TORCHINDUCTOR_COMPILE_THREADS", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(inductor_config, "compile_threads", 16)  # as imported on a 16-core machine
    keep_compiled_code()
    assert inductor_config.compile_threads == 1
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).is_relative_to(tmp_path)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "16")  # the user's choice stands
    monkeypatch.setattr(inductor_config, "compile_threads", 16)
    keep_compiled_code()
    assert inductor_config.compile_threads == 16


def test_a_decode_that_does_not_fit_whole_is_planned_frame_by_frame_with_its_vaes_units():
    """TI2V-5B at 720P (1280x704, 121 frames): the Wan2.2 VAE's whole-chunk decode (14.2 units of 4
    output frames x 64 channels, measured on an H200) does not fit beside the DiT on a 26 GiB GPU, the
    frame-by-frame one (11.4 units) does, so the DiT stays on the GPU and the decode goes frame by
    frame; with room (80 GiB) the decode is whole; at 24 GiB neither fits beside the DiT, which then
    leaves the GPU for the decode (one expert at a time). A14B keeps Wan2.1's 11 and 8.5 units."""
    from wan_i2v.parallel.plan import ParallelDims, choose_plan, estimate_memory, model_sizes

    sizes = model_sizes(None, spec="ti2v-5b")
    assert model_sizes(None).vae_decode_units == (11.0, 8.5)
    shape = {"tokens": 31 * 22 * 40, "pixels": 1280 * 704}  # 31 latent frames of 44 x 80, patches of 2 x 2
    unit = 4 * 64 * 1280 * 704 * 4  # 4 fp32 frames at the decoder's 64 channels per full-resolution pixel
    whole = estimate_memory(ParallelDims(), sizes, **shape)
    by_frame = estimate_memory(ParallelDims(), sizes, decode_frame_by_frame=True, **shape)
    assert whole.stages["decoding"] - by_frame.stages["decoding"] == pytest.approx((14.2 - 11.4) * unit, rel=1e-6)
    roomy = choose_plan(1, sizes, gpu_bytes=80 * GiB, **shape)
    assert roomy.fits and roomy.placement.offload is None and not roomy.decode_frame_by_frame
    tight = choose_plan(1, sizes, gpu_bytes=26 * GiB, **shape)
    assert not whole.fits(26 * GiB) and tight.fits and tight.placement.offload is None and tight.decode_frame_by_frame
    assert tight.estimate.stages["decoding"] == by_frame.stages["decoding"]
    smaller = choose_plan(1, sizes, gpu_bytes=24 * GiB, **shape)
    assert smaller.fits and smaller.placement.offload == "experts" and not smaller.decode_frame_by_frame
    plan = ExecutionPlan(device=torch.device("cuda"), dtype=torch.bfloat16, decode_frame_by_frame=True)
    assert "fp32 decode frame by frame" in plan.describe_numerics()
    # The decode's own check at run time (whole frames only where the GPU has room) asks for what the plan counts.
    from wan_i2v.models.vae import VAEConfig, WanVAE

    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    assert vae.whole_decode_bytes((1, 16, 21, 90, 160)) == 11.0 * 4 * 96 * 1280 * 720 * 4  # Wan2.1's VAE, fp32, 720P
    assert vae.to(torch.bfloat16).whole_decode_bytes((1, 16, 21, 90, 160)) == 11.0 * 4 * 96 * 1280 * 720 * 2


@pytest.mark.parametrize("fraction_api", [True, False], ids=["torch>=2.6", "older torch"])
def test_the_decoders_free_memory_is_held_to_the_per_process_cap(monkeypatch, fraction_api):
    """``--gpu-memory`` caps the allocator with ``set_per_process_memory_fraction``, which the GPU's
    free memory does not show: on an 80 GiB GPU capped at 24 GiB with 20 GiB allocated, the decoder
    has 4 GiB (plus nothing reserved), not the GPU's 60. Torch without the query sees only the GPU."""
    from wan_i2v.pipeline import free_gpu_bytes

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (60 * GiB, 80 * GiB))
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 20 * GiB)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 21 * GiB)
    if fraction_api:
        monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 0.3, raising=False)
        assert free_gpu_bytes(torch.device("cuda")) == 24 * GiB - 20 * GiB
    else:
        monkeypatch.delattr(cuda, "get_per_process_memory_fraction", raising=False)
        assert free_gpu_bytes(torch.device("cuda")) == 61 * GiB


def test_kept_blocks_leave_the_page_cache_only_where_it_cannot_hold_what_the_run_reads():
    """The bench's machine (bf16 checkpoint: two experts of 40 blocks of 0.65 GiB, umT5 of 10.6 GiB,
    62.6 GiB read in all) at 24 GiB of GPU: with 32 GiB of host memory the kept blocks' pages make way
    for the streamed ones'; with 128 GiB the cache holds everything and keeps them."""
    from dataclasses import replace

    from wan_i2v.execution import plan_run
    from wan_i2v.parallel.plan import model_sizes

    sizes = model_sizes(None)
    sizes = replace(sizes, stored_block=sizes.block)  # stored in bf16, as the bench's checkpoint
    read = sizes.text_encoder + 2 * 40 * sizes.block
    assert 60 * GiB < read < 64 * GiB
    base = ExecutionPlan(torch.device("cuda"), torch.bfloat16, compile=True)  # as a GPU run compiles
    hd = dict(tokens=21 * 45 * 80, pixels=1280 * 720)
    small = plan_run(base, sizes, gpus=1, gpu_bytes=24 * GiB, host_bytes=32 * GiB, guided=False, **hd)
    assert small.plan.kept_blocks and small.plan.forget_kept_pages
    assert "(their pages left out of the page cache)" in small.plan.describe()
    large = plan_run(base, sizes, gpus=1, gpu_bytes=24 * GiB, host_bytes=128 * GiB, guided=False, **hd)
    assert large.plan.kept_blocks == small.plan.kept_blocks and not large.plan.forget_kept_pages
    resident = plan_run(base, sizes, gpus=1, gpu_bytes=80 * GiB, host_bytes=32 * GiB, guided=False, **hd)
    assert not resident.plan.kept_blocks and not resident.plan.forget_kept_pages  # nothing streams
