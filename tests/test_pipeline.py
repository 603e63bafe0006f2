"""The whole pipeline on a tiny checkpoint, on the CPU in fp32."""

import threading
from dataclasses import replace

import pytest
import torch
from PIL import Image

from wan_i2v.config import GenerationSettings
from wan_i2v.errors import WanError
from wan_i2v.models.spec import spec_for
from wan_i2v.pipeline import Cancelled, LoopHook
from wan_i2v.video import demo_image

SMALL = dict(max_area=64 * 96, frame_num=9, steps=6, shift=3.0)


def test_same_seed_same_video_other_seed_other_video(tiny_pipeline):
    image = demo_image()
    first = tiny_pipeline.generate(image, "a boat", seed=11, progress=False, **SMALL)
    again = tiny_pipeline.generate(image, "a boat", seed=11, progress=False, **SMALL)
    other = tiny_pipeline.generate(image, "a boat", seed=12, progress=False, **SMALL)
    assert torch.equal(first.video, again.video)
    assert torch.equal(first.latents, again.latents)
    assert (first.latents - other.latents).abs().max() > 1e-2


def test_shapes_range_and_both_experts(tiny_pipeline):
    image = demo_image(320, 192)
    result = tiny_pipeline.generate(image, "a boat", seed=3, progress=False, **SMALL)
    height, width = spec_for().video_size(192, 320, SMALL["max_area"])
    assert (height, width) == (48, 96)  # sqrt(6144*0.6)=60.7 -> 56 rows of 8 -> 6 latents -> 48; 101.2 -> 96
    assert result.video.shape == (3, 9, height, width)
    assert result.latents.shape == (16, 3, height // 8, width // 8)
    assert result.video.dtype == torch.float32 and result.video.device.type == "cpu"
    assert result.video.min() >= -1 and result.video.max() <= 1
    # 6 steps at shift 3: t >= 900 while 3s/(1+2s) >= 0.9, i.e. s >= 0.75, with s_i = 0.999(1 - i/6):
    # i <= 1.49, so the first two steps are the high-noise expert's.
    assert result.experts_used == ["high", "high", "low", "low", "low", "low"]
    assert set(result.timings) == {"text encoding", "image encoding", "denoising", "decoding"}


def test_each_expert_matters(tiny_pipeline):
    """Swapping in the other expert for the high-noise steps changes the result: both are really used."""
    image = demo_image()
    normal = tiny_pipeline.generate(image, "a boat", seed=5, progress=False, **SMALL)
    models = tiny_pipeline.experts.models
    high = models["high"]
    models["high"] = models["low"]
    try:
        swapped = tiny_pipeline.generate(image, "a boat", seed=5, progress=False, **SMALL)
    finally:
        models["high"] = high
    assert (normal.latents - swapped.latents).abs().max() > 1e-3


def test_conditioning_follows_official_layout(tiny_pipeline):
    pixels = torch.rand(3, 50, 70) * 2 - 1
    settings = GenerationSettings.of("a boat", max_area=64 * 64, frame_num=9)
    condition = tiny_pipeline.encode_frames(tiny_pipeline.known_frames(pixels, settings), 9).channels
    # The official sizing: rows sqrt(4096 * 50/70) = 54.1 -> 6 latent rows (// 8, then even),
    # columns sqrt(4096 * 70/50) = 75.7 -> 9 -> 8 latent columns.
    assert condition.shape == (20, 3, 6, 8)
    mask = condition[:4]
    assert torch.all(mask[:, 0] == 1) and torch.all(mask[:, 1:] == 0)


def test_noise_is_the_official_draw(tiny_pipeline):
    expected = torch.randn(16, 3, 6, 12, dtype=torch.float32, generator=torch.Generator().manual_seed(99))
    assert torch.equal(tiny_pipeline.initial_noise((3, 6, 12), 99), expected)


def test_text_is_padded_to_text_len_with_zeros(tiny_pipeline):
    context, empty = tiny_pipeline.encode_text(["a small boat", ""])
    assert context.shape == (tiny_pipeline.text_len, tiny_pipeline.config.text_dim)
    real = int((context.abs().sum(1) > 0).sum())
    assert 2 <= real < tiny_pipeline.text_len
    assert torch.all(context[real:] == 0)
    assert int((empty.abs().sum(1) > 0).sum()) == 1  # the empty prompt is just EOS


def test_batched_guidance_equals_sequential(tiny_pipeline):
    image = demo_image()
    sequential = tiny_pipeline.generate(image, "a boat", seed=4, progress=False, **SMALL)
    calls = []
    unbatched = tiny_pipeline.plan
    tiny_pipeline.plan = replace(unbatched, batch_cfg=True)  # (the attribute the test set before was read by nothing)
    try:
        batched = tiny_pipeline.generate(image, "a boat", seed=4, progress=False, hooks=[BranchLog(calls)], **SMALL)
    finally:
        tiny_pipeline.plan = unbatched
    assert set(calls) == {"both"}  # one batched call a step, not a call per branch
    # A batch of two is the same arithmetic, but the CPU's matmuls may split it differently: within rounding, not to the bit.
    assert ((batched.latents - sequential.latents).norm() / sequential.latents.norm()) < 1e-5


class BranchLog(LoopHook):
    """The guidance branch of each model call."""

    def __init__(self, calls: list):
        self.calls = calls

    def around_model(self, step, branch, call):
        self.calls.append(branch)
        return call()


def test_offload_gives_the_same_video(tiny_checkpoint):
    from wan_i2v import I2VPipeline

    kwargs = dict(seed=8, progress=False, **SMALL)
    plain = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)
    offloaded = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, offload=True)
    expected = plain.generate(demo_image(), "x", **kwargs).latents
    for _ in range(2):  # the swapper and its hooks are made once, not once per run
        assert torch.equal(offloaded.generate(demo_image(), "x", **kwargs).latents, expected)
    swap = offloaded.experts
    assert all(len(block._forward_pre_hooks) == 1 for expert in swap.models.values() for block in expert.blocks)
    assert swap.active is None
    swap.remove()
    assert all(not block._forward_pre_hooks for expert in swap.models.values() for block in expert.blocks)


def test_guide_scale_and_prompt_change_the_video(tiny_pipeline):
    image = demo_image()
    base = tiny_pipeline.generate(image, "a boat", seed=2, progress=False, **SMALL)
    scaled = tiny_pipeline.generate(image, "a boat", seed=2, guide_scale=(1.0, 6.0), progress=False, **SMALL)
    prompt = tiny_pipeline.generate(image, "a red car", seed=2, progress=False, **SMALL)
    assert (base.latents - scaled.latents).abs().max() > 1e-3
    assert (base.latents - prompt.latents).abs().max() > 1e-3


def test_dpm_solver_runs(tiny_pipeline):
    result = tiny_pipeline.generate(Image.new("RGB", (90, 60), "white"), "", seed=1, solver="dpm++", progress=False, **SMALL)
    assert torch.isfinite(result.video).all()


def test_long_prompt_is_truncated_with_a_warning(tiny_pipeline):
    with pytest.warns(UserWarning, match="keeps only the first 32"):
        tiny_pipeline.encode_text([" ".join(["boat"] * 200)])


def test_block_offload_and_fp8_through_the_pipeline(tiny_checkpoint, tiny_pipeline):
    from wan_i2v import I2VPipeline, WanError

    kwargs = dict(seed=8, progress=False, **SMALL)
    reference = tiny_pipeline.generate(demo_image(), "x", **kwargs).latents
    blocks = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, offload="blocks")
    assert torch.equal(blocks.generate(demo_image(), "x", **kwargs).latents, reference)
    fp8 = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, fp8=True)
    quantized = fp8.generate(demo_image(), "x", **kwargs).latents
    assert 0 < ((quantized - reference).norm() / reference.norm()) < 0.2
    with pytest.raises(WanError, match="unknown offload mode 'gpu'"):
        I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, offload="gpu")


class Crash(Exception):
    pass


class crash_after:
    """Within the block, the experts raise Crash after ``calls`` forwards in all."""

    def __init__(self, pipe, calls):
        self.pipe, self.calls, self.count = pipe, calls, 0

    def hook(self, module, args):
        self.count += 1
        if self.count > self.calls:
            raise Crash

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self.hook) for m in self.pipe.experts.models.values()]

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_an_interrupted_run_resumes_where_it_stopped(tiny_pipeline, tmp_path):
    state = tmp_path / "run.state.pt"
    image = demo_image()
    settings = dict(progress=False, **{**SMALL, "steps": 8})
    # Two guided forwards a step: crash in the fourth step, with three steps saved.
    with crash_after(tiny_pipeline, 7), pytest.raises(Crash):
        tiny_pipeline.generate(image, "a boat", state_file=state, **settings)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 3
    resumed = tiny_pipeline.generate(image, "a boat", state_file=state, **settings)  # no seed: the saved one
    assert resumed.settings.seed == saved["settings"]["seed"]
    assert len(resumed.experts_used) == 8 - 3
    straight = tiny_pipeline.generate(image, "a boat", seed=resumed.settings.seed, **settings)
    assert torch.equal(resumed.latents, straight.latents)


def test_a_state_for_other_settings_is_not_resumed(tiny_pipeline, tmp_path):
    state = tmp_path / "run.state.pt"
    settings = dict(progress=False, seed=6, **SMALL)
    with crash_after(tiny_pipeline, 3), pytest.raises(Crash):
        tiny_pipeline.generate(demo_image(), "a boat", state_file=state, **settings)
    assert state.is_file()
    other_prompt = tiny_pipeline.generate(demo_image(), "a car", state_file=state, **settings)
    assert len(other_prompt.experts_used) == SMALL["steps"]
    assert torch.equal(other_prompt.latents, tiny_pipeline.generate(demo_image(), "a car", **settings).latents)


def test_settings_have_one_set_of_defaults_and_one_seed_policy(tiny_pipeline):
    from wan_i2v.config import DEFAULT_NEGATIVE_PROMPT, DISTILLED

    drawn = GenerationSettings.of("a boat")
    assert drawn.seed_drawn and 0 <= drawn.seed < 2**53  # a drawn seed is exact in JSON's numbers
    assert drawn == GenerationSettings("a boat", DEFAULT_NEGATIVE_PROMPT, max_area=1280 * 720, frame_num=81, steps=40, shift=5.0,
                                       guide_scale=(3.5, 3.5), seed=drawn.seed, solver="unipc")  # fmt: skip
    distilled = GenerationSettings.of("a boat", defaults=DISTILLED, size="480P", seed=-1, steps=6)
    assert (distilled.max_area, distilled.steps, distilled.guide_scale, distilled.shift, distilled.solver) == (832 * 480, 6, (1.0, 1.0), 5.0, "euler")
    given = GenerationSettings.of("a boat", size="480P", guide_scale=2, seed=7)
    assert (given.shift, given.guide_scale, given.seed, given.seed_drawn) == (3.0, (2.0, 2.0), 7, False)
    assert "seed_drawn" not in given.as_dict()
    assert 0 <= tiny_pipeline.generate(demo_image(), "a boat", progress=False, **{**SMALL, "steps": 1}).settings.seed < 2**53


def test_the_stages_run_on_their_own_give_the_same_video(tiny_pipeline):
    image = demo_image()
    whole = tiny_pipeline.generate(image, "a boat", seed=4, progress=False, **SMALL)
    prepared = tiny_pipeline.prepare(image, GenerationSettings.of("a boat", seed=4, **SMALL))
    latents = tiny_pipeline.sample(prepared)
    assert torch.equal(latents.cpu(), whole.latents)
    assert torch.equal(tiny_pipeline.decode(latents), whole.video)


class Recorder(LoopHook):
    """Sees every step and model call; its state (a running sum) must survive a resume."""

    name = "recorder"

    def __init__(self):
        self.calls, self.total = [], 0.0

    def on_step_begin(self, step):
        self.calls.append(("step", step.index, step.timestep, step.expert, step.guide_scale))

    def around_model(self, step, branch, run):
        self.calls.append((branch, step.index))
        return run()

    def on_step_end(self, step, latent):
        self.total += float(latent.double().sum())

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, state):
        self.total = state["total"]


def test_hooks_see_step_timestep_expert_and_branch(tiny_pipeline):
    recorder = Recorder()
    tiny_pipeline.generate(demo_image(), "a boat", seed=2, progress=False, guide_scale=(2.0, 4.0), hooks=[recorder], **SMALL)
    steps = [c for c in recorder.calls if c[0] == "step"]
    assert [s[3] for s in steps] == ["high", "high", "low", "low", "low", "low"]
    assert [s[4] for s in steps] == [4.0, 4.0, 2.0, 2.0, 2.0, 2.0]  # the high-noise expert's scale is the second
    assert steps[0][2] > 900 > steps[2][2]
    # Each step: its begin, then the conditional and the unconditional call, in the official order.
    assert recorder.calls[:3] == [steps[0], ("cond", 0), ("uncond", 0)] and len(recorder.calls) == 6 * 3


def test_a_cancelled_run_stops_within_a_step_and_resumes_exactly_with_its_hooks_state(tiny_pipeline, tmp_path):
    state = tmp_path / "run.state.pt"
    settings = dict(progress=False, seed=8, **{**SMALL, "steps": 8})
    cancel = threading.Event()

    def cancel_at_step_3(pipe, index, timestep, kwargs):
        if index == 2:
            cancel.set()  # asked for during step 3: the run stops before step 4
        return {}

    first = Recorder()
    with pytest.raises(Cancelled) as stopped:
        tiny_pipeline.generate(demo_image(), "a boat", state_file=state, cancel=cancel, hooks=[first],
                               callback_on_step_end=cancel_at_step_3, **settings)  # fmt: skip
    assert (stopped.value.step, stopped.value.total) == (3, 8) and str(stopped.value) == "cancelled after 3 of 8 steps"
    assert torch.load(state, weights_only=True)["step"] == 3
    resumed_hook = Recorder()
    resumed = tiny_pipeline.generate(demo_image(), "a boat", state_file=state, hooks=[resumed_hook], **settings)
    assert len(resumed.experts_used) == 5
    straight_hook = Recorder()
    straight = tiny_pipeline.generate(demo_image(), "a boat", hooks=[straight_hook], **settings)
    assert torch.equal(resumed.latents, straight.latents)
    assert resumed_hook.total == straight_hook.total != 0  # the sum carried over the resume


def hold_the_first_state_write(monkeypatch, until: threading.Event) -> tuple[list[int], list[bool]]:
    """State writes that note the step each wrote; the first holds until ``until`` is set, giving up
    after 10 s (False in the second list: a loop that waited for the write never set it)."""
    from wan_i2v.sampling import resume

    real_write = resume.write_atomically
    written, released = [], []

    def write(path, write_to):
        if not released:
            released.append(until.wait(timeout=10))
        real_write(path, write_to)
        written.append(torch.load(path, weights_only=True)["step"])

    monkeypatch.setattr(resume, "write_atomically", write)
    return written, released


class SetsWhenStepBegins(LoopHook):
    def __init__(self, index: int, event: threading.Event):
        self.index, self.event = index, event

    def on_step_begin(self, step):
        if step.index == self.index:
            self.event.set()


def test_a_step_s_state_is_written_while_the_next_step_runs(tiny_pipeline, tmp_path, monkeypatch):
    """With the step cache a state is GBs at 720P: the loop does not wait for its file. Here the write
    of step 1's state holds until step 2 has begun, which a loop waiting for the write would never
    reach."""
    second_step = threading.Event()
    written, released = hold_the_first_state_write(monkeypatch, until=second_step)
    state = tmp_path / "run.state.pt"
    settings = dict(progress=False, seed=8, **{**SMALL, "steps": 3})
    result = tiny_pipeline.generate(demo_image(), "a boat", state_file=state, hooks=[SetsWhenStepBegins(1, second_step)], **settings)
    assert released == [True] and written == [1, 2, 3]
    saved = torch.load(state, weights_only=True)  # the last step's, complete once the run returned
    assert saved["step"] == 3 and torch.equal(saved["latent"][0], result.latents.to(saved["latent"].dtype))


def test_a_large_state_is_not_waited_for_and_a_run_resumed_from_the_last_one_written_equals_the_unbroken_one(tiny_pipeline, tmp_path,
                                                                                                               monkeypatch):  # fmt: skip
    """The step cache's state is GBs at 720P and a step that skips takes under a second: the steps
    that end while such a state is written go on unsaved. Here every state counts as large, and step
    1's write holds until the fourth step has begun, which a loop waiting for it would never reach;
    that step crashes. Steps 2 and 3 were not saved, the file holds step 1's, and the run resumed
    from it makes the unbroken run's video."""
    from wan_i2v.sampling import resume

    fourth_step = threading.Event()
    written, released = hold_the_first_state_write(monkeypatch, until=fourth_step)
    monkeypatch.setattr(resume, "LARGE_STATE_BYTES", 1)
    state = tmp_path / "run.state.pt"
    settings = dict(progress=False, seed=8, **{**SMALL, "steps": 5})
    with crash_after(tiny_pipeline, 7), pytest.raises(Crash):  # two guided forwards a step: in the fourth step
        tiny_pipeline.generate(demo_image(), "a boat", state_file=state, hooks=[SetsWhenStepBegins(3, fourth_step)], **settings)
    assert released == [True] and written == [1]
    assert torch.load(state, weights_only=True)["step"] == 1
    resumed = tiny_pipeline.generate(demo_image(), "a boat", state_file=state, **settings)
    assert len(resumed.experts_used) == 5 - 1
    assert torch.equal(resumed.latents, tiny_pipeline.generate(demo_image(), "a boat", **settings).latents)


def test_the_last_step_s_large_state_is_written_whatever_is_under_way(tiny_pipeline, tmp_path, monkeypatch):
    """Every state counts as large, and step 1's write holds until the writer is waited for (each
    write starts with a wait for the one before, step 1's too: the second wait): steps 2 to 4 go
    unsaved, but the last step's state waits for that write and is written, so the file holds every
    step and the same call goes straight to the decode."""
    from wan_i2v.sampling import resume

    second_wait = threading.Event()
    written, _ = hold_the_first_state_write(monkeypatch, until=second_wait)
    waits, real_finish = [], resume.StateWriter.finish

    def finish(writer):
        waits.append(None)
        if len(waits) == 2:
            second_wait.set()
        return real_finish(writer)

    monkeypatch.setattr(resume.StateWriter, "finish", finish)
    monkeypatch.setattr(resume, "LARGE_STATE_BYTES", 1)
    state = tmp_path / "run.state.pt"
    settings = dict(progress=False, seed=8, **{**SMALL, "steps": 5})
    result = tiny_pipeline.generate(demo_image(), "a boat", state_file=state, **settings)
    assert written == [1, 5]
    again = tiny_pipeline.generate(demo_image(), "a boat", state_file=state, **settings)
    assert again.experts_used == [] and torch.equal(again.latents, result.latents)


def test_each_state_is_copied_as_it_was_saved_into_host_buffers_kept_from_save_to_save():
    """A state is written while the next step runs and may change its tensors in place; a fresh host
    copy of each state (3.2 GB at 720P with the step cache) took seconds, so the buffers are kept: a
    tensor takes one of its shape and dtype wherever it now is in the state (the solver's history grows
    at the second step, the cache's tensors move to the other expert)."""
    from wan_i2v.sampling.resume import HostBuffers

    buffers = HostBuffers()
    latent, history, residuals = torch.randn(2, 3), torch.randn(3), [torch.randn(4, 5), torch.randn(5)]
    saved_latent, saved_residual = latent.clone(), residuals[0].clone()
    first = buffers.copy({"latent": latent, "solver": [history], "block_hooks": {"high": residuals}, "step": 1})
    latent.add_(1)
    residuals[0].mul_(2)
    assert torch.equal(first["latent"], saved_latent) and torch.equal(first["block_hooks"]["high"][0], saved_residual)
    assert first["step"] == 1 and first["latent"].data_ptr() != latent.data_ptr()

    second = buffers.copy({"latent": latent, "solver": [torch.randn(3), history], "block_hooks": {"low": [residuals[0], torch.randn(6)]}})
    assert torch.equal(second["latent"], latent) and torch.equal(second["block_hooks"]["low"][0], residuals[0])
    assert second["latent"].data_ptr() == first["latent"].data_ptr()
    assert second["block_hooks"]["low"][0].data_ptr() == first["block_hooks"]["high"][0].data_ptr()
    assert second["solver"][0].data_ptr() == first["solver"][0].data_ptr()  # the first of its shape takes the buffer
    assert second["solver"][1].data_ptr() not in (first["solver"][0].data_ptr(), first["latent"].data_ptr())
    assert second["block_hooks"]["low"][1].shape == (6,)  # another shape: a buffer of its own
    buffers.release()


def test_where_page_locking_fails_a_gpu_state_goes_to_pageable_buffers_said_once(monkeypatch):
    """A GPU's state goes to page-locked buffers; a machine that refuses to lock them (a low locked-memory
    limit) still saves its runs, each save then waiting for its copy. CI has no GPU: a stand-in with a
    GPU's device, and the arena refusing to pin as cudaHostRegister does."""
    from types import SimpleNamespace

    from wan_i2v.sampling import resume

    real_arena = resume.PinnedArena

    def arena(nbytes, pin_for=None):
        if pin_for is not None:
            raise WanError("cannot page-lock 0.0 GiB of host memory for the GPU copies (CUDA error 2)", "ulimit -l")
        return real_arena(nbytes)

    monkeypatch.setattr(resume, "PinnedArena", arena)
    on_gpu = SimpleNamespace(device=torch.device("cuda"), nbytes=24, shape=torch.Size([2, 3]), dtype=torch.float32)
    buffers = resume.HostBuffers()
    with pytest.warns(UserWarning, match=r"pageable host memory, each save waiting for its copy: cannot page-lock") as told:
        made = [buffers._buffer_for(on_gpu, on_gpu=True) for _ in range(2)]
    assert len(told) == 1
    assert all(held.tensor.shape == (2, 3) and held.tensor.dtype == torch.float32 and not held.arena.registered for held in made)


def test_an_arena_holding_a_tensor_leaves_no_stray_bytes_for_the_file(tmp_path):
    """``torch.save`` writes a view's whole allocation: the arena's bytes beside the tensor are zeroed."""
    from wan_i2v.loading.staging import PinnedArena

    arena = PinnedArena(6)
    arena.buffer.fill_(7)  # what the allocation held before
    held = arena.holding(torch.zeros(3, dtype=torch.int16))
    held.copy_(torch.tensor([1, 2, 3], dtype=torch.int16))
    start = arena.data.storage_offset()
    assert arena.buffer[:start].eq(0).all() and arena.buffer[start + 6 :].eq(0).all()
    torch.save(held, tmp_path / "held.pt")
    assert torch.equal(torch.load(tmp_path / "held.pt", weights_only=True), torch.tensor([1, 2, 3], dtype=torch.int16))


def test_an_arena_for_a_gpu_without_an_index_is_page_locked_for_the_callers_gpu(monkeypatch):
    """The page-lock runs in a thread of its own, which starts on GPU 0: a rank on GPU 1 must not lock
    its buffers for GPU 0 (a context there). CI has no GPU: the lock and the current device stood in."""
    from wan_i2v.loading import staging

    locked = []
    monkeypatch.setattr(staging, "page_lock", lambda data, device: locked.append(device) or 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    arena = staging.PinnedArena(4096, pin_for=torch.device("cuda"))
    assert locked == [torch.device("cuda", 1)] and arena.device == torch.device("cuda", 1) and arena.registered
    arena.registered = False  # nothing was locked: no unlock on a machine without CUDA


def test_an_arena_let_go_without_closing_is_closed(monkeypatch):
    """A ring or a run that fails may drop its arena unclosed: its pages must not stay locked."""
    import gc

    from wan_i2v.loading import staging

    closed = []
    monkeypatch.setattr(staging.PinnedArena, "close", lambda arena: closed.append(arena.data.data_ptr()))
    arena = staging.PinnedArena(4096)
    start = arena.data.data_ptr()
    del arena
    gc.collect()  # (other tests' arenas may go too)
    assert start in closed


def test_a_state_write_that_fails_stops_the_run_with_its_error(tiny_pipeline, tmp_path, monkeypatch):
    from wan_i2v.sampling import resume

    def disk_full(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume, "write_atomically", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        tiny_pipeline.generate(demo_image(), "a boat", state_file=tmp_path / "run.state.pt", progress=False, seed=8, **{**SMALL, "steps": 3})


def test_a_run_s_own_error_wins_over_a_failed_state_write_which_is_still_told(tiny_pipeline, tmp_path, monkeypatch):
    from wan_i2v.sampling import resume

    def disk_full(path, write):
        raise OSError(28, "No space left on device")

    class Breaks(LoopHook):
        def on_step_begin(self, step):
            if step.index == 1:  # while step 1's state is (not) being written
                raise RuntimeError("the hook broke")

    monkeypatch.setattr(resume, "write_atomically", disk_full)
    with pytest.warns(UserWarning, match=r"the last step's state was not written \(.*No space left on device\): a resume goes on from the state written before it"):
        with pytest.raises(RuntimeError, match="the hook broke"):
            tiny_pipeline.generate(demo_image(), "a boat", state_file=tmp_path / "run.state.pt", hooks=[Breaks()], progress=False, seed=8,
                                   **{**SMALL, "steps": 3})  # fmt: skip


def test_step_callback_sees_and_may_replace_the_latents(tiny_pipeline):
    seen = []

    def callback(pipe, index, timestep, kwargs):
        assert pipe is tiny_pipeline
        seen.append((index, timestep, kwargs["latents"].clone()))
        return {"latents": kwargs["latents"] * 0} if index == SMALL["steps"] - 1 else {}

    result = tiny_pipeline.generate(demo_image(), "a boat", seed=1, progress=False, callback_on_step_end=callback, **SMALL)
    assert [s[0] for s in seen] == list(range(SMALL["steps"])) and seen[0][1] > seen[-1][1]
    assert torch.count_nonzero(result.latents) == 0 and torch.count_nonzero(seen[-1][2]) > 0
    with pytest.raises(WanError, match="callback_on_step_end_tensor_inputs names noise"):
        tiny_pipeline.generate(demo_image(), "a boat", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"], **SMALL)
