"""The run session: one loaded pipeline, many jobs, on one process or on ranks it starts itself."""

import threading

import pytest
import torch

from wan_i2v.pipeline import Cancelled
from wan_i2v.session import LATENTS_FORMAT, RunOptions, RunSession
from wan_i2v.video import demo_image

JOB = dict(max_area=64 * 96, frame_num=9, steps=6, shift=3.0, progress=False)


def test_a_local_session_keeps_its_pipeline_across_jobs(tiny_checkpoint, tiny_pipeline, tmp_path):
    steps = []
    with RunSession.open(RunOptions(ckpt_dir=tiny_checkpoint, device="cpu", dtype="fp32")) as session:
        pipe = session.pipe
        first = session.generate(demo_image(), "a boat", seed=3, on_step=steps.append, latents_file=tmp_path / "l.pt", **JOB)
        second = session.generate(demo_image(), "a car", seed=4, **JOB)
        assert session.pipe is pipe
    assert [s.index for s in steps] == list(range(6)) and steps[0].expert == "high" and steps[-1].expert == "low"
    assert torch.equal(first.latents, tiny_pipeline.generate(demo_image(), "a boat", seed=3, **JOB).latents)
    assert torch.equal(second.latents, tiny_pipeline.generate(demo_image(), "a car", seed=4, **JOB).latents)
    saved = torch.load(tmp_path / "l.pt", weights_only=True)
    assert saved["format"] == LATENTS_FORMAT and torch.equal(saved["latents"], first.latents)


def test_a_session_on_two_ranks_runs_jobs_cancels_and_resumes(tiny_checkpoint, tiny_pipeline, tmp_path):
    """Started from this process: rank 0 gets each job over a queue and hands it to rank 1; the
    video comes back through shared memory, progress as events; a cancel stops both ranks at one step."""
    state = tmp_path / "run.state.pt"
    cancel = threading.Event()
    steps = []

    def cancel_at_step_2(step):
        steps.append(step.index)
        if step.index == 1:
            cancel.set()

    with RunSession.open(RunOptions(ckpt_dir=tiny_checkpoint, device="cpu", gpus=2, dtype="fp32")) as session:
        assert session.plan.dims.world == 2 and session.plan.dims.cfg == 2
        first = session.generate(demo_image(), "a boat", seed=3, **JOB)
        with pytest.raises(Cancelled) as stopped:
            session.generate(demo_image(), "a car", seed=5, state_file=state, cancel=cancel, on_step=cancel_at_step_2, **JOB)
        assert stopped.value.step == 2 and torch.load(state, weights_only=True)["step"] == stopped.value.step
        resumed = session.generate(demo_image(), "a car", seed=5, state_file=state, **JOB)
    assert steps == [0, 1] and len(resumed.experts_used) == 6 - stopped.value.step
    for result, prompt, seed in ((first, "a boat", 3), (resumed, "a car", 5)):
        alone = tiny_pipeline.generate(demo_image(), prompt, seed=seed, **JOB)
        torch.testing.assert_close(result.latents, alone.latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.video, alone.video, rtol=1e-5, atol=1e-5)


def _ranks_of_a_launched_session(ckpt):
    """Every rank opens the session as under torchrun; rank 0 runs two jobs, idle between them, and rank 1 follows."""
    session = RunSession.open(RunOptions(ckpt_dir=ckpt, device="cpu", dtype="fp32"))
    try:
        if not session.is_main:
            session.follow()
            return None
        results = []
        for prompt, seed in (("a boat", 3), ("a car", 4)):
            session.keep_alive()  # as a server does between jobs: the followers wait on, and run the next job
            results.append(session.generate(demo_image(), prompt, seed=seed, **JOB).latents)
        return results
    finally:
        session.close()


def test_under_a_launcher_rank_0_hands_its_jobs_to_the_others(tiny_checkpoint, tiny_pipeline):
    from wan_i2v.parallel.launch import launch

    results = launch(_ranks_of_a_launched_session, (tiny_checkpoint,), 2)
    assert results[1] is None
    for latents, (prompt, seed) in zip(results[0], (("a boat", 3), ("a car", 4))):
        torch.testing.assert_close(latents, tiny_pipeline.generate(demo_image(), prompt, seed=seed, **JOB).latents, rtol=1e-5, atol=1e-5)


def test_a_ranks_warning_reaches_the_caller_once(tiny_checkpoint):
    """Rank 0's warnings (here: the prompt is longer than the tiny model's text length) are the caller's."""
    import warnings

    with warnings.catch_warnings(record=True) as caught, RunSession.open(RunOptions(ckpt_dir=tiny_checkpoint, device="cpu", gpus=2, dtype="fp32")) as session:
        warnings.simplefilter("always")
        session.generate(demo_image(), "a boat " * 40, seed=1, **{**JOB, "steps": 1})
    assert len([w for w in caught if "the text encoder keeps only the first 32" in str(w.message)]) == 1, [str(w.message) for w in caught]


def _every_rank_generates(ckpt):
    """The CLI under torchrun: every rank calls generate with the same arguments, then close."""
    with RunSession.open(RunOptions(ckpt_dir=ckpt, device="cpu", dtype="fp32")) as session:
        latents = session.generate(demo_image(), "a boat", seed=3, **JOB).latents
    return latents


def test_under_a_launcher_every_rank_may_call_generate_and_close(tiny_checkpoint):
    from wan_i2v.parallel.launch import launch

    results = launch(_every_rank_generates, (tiny_checkpoint,), 2)
    assert torch.equal(results[0], results[1])


def _replanned(ckpt):
    """Rank 0 plans for its own GPU; the other ranks receive its plan and plan nothing."""
    from wan_i2v.parallel.groups import env_rank
    from wan_i2v.session import _join_ranks, plan_for

    def replan():
        assert env_rank() == 0, "a rank other than 0 planned"
        return plan_for(RunOptions(ckpt_dir=ckpt, device="cpu", dtype="fp32"), height=64, width=96, frame_num=5, device="cpu", world=2, ckpt_dir=ckpt)

    planned, groups, pipe = _join_ranks(None, ckpt, "cpu", replan)
    import torch.distributed as dist

    dist.destroy_process_group()
    return planned.plan.dims, groups.dims


def test_rank_0_plans_for_its_gpu_and_the_other_ranks_receive_its_plan(tiny_checkpoint):
    from wan_i2v.parallel.launch import launch
    from wan_i2v.parallel.plan import ParallelDims

    results = launch(_replanned, (tiny_checkpoint,), 2)
    assert results[0] == results[1] == (ParallelDims(2, 1), ParallelDims(2, 1))


def test_the_session_plans_with_its_fallbacks_as_data(tiny_checkpoint, monkeypatch, capsys):
    """No GPU visible: the plan says it goes to the CPU and drops --fp8 there, as data the front end prints (nothing printed here)."""
    import warnings

    from wan_i2v.session import plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        planned = plan(RunOptions(ckpt_dir=tiny_checkpoint, fp8=True), height=64, width=96, frame_num=5)
    assert planned.notes == ("no GPU is visible: running on the CPU (device='cpu' says so and silences this)",)
    assert planned.warnings == ("fp8 does nothing on the CPU (FP8 matmuls need an NVIDIA GPU); ignored",)
    assert planned.options.device == "cpu" and not planned.options.fp8 and not planned.planned.plan.fp8
    assert planned.world == 1 and planned.refusal() is None and planned.ckpt_dir == tiny_checkpoint
    # the latents (16 x 2 x 8 x 12 fp32 values), each of six copies, plus the frames' quarter bytes and 16 MiB
    assert planned.output_bytes == 6 * 16 * 2 * 8 * 12 * 4 + 5 * 64 * 96 // 4 + 16 * 2**20
    assert capsys.readouterr() == ("", "")
