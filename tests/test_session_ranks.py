"""Under a launcher (torchrun) rank 0 plans the session and the other ranks receive its plan, or its
refusal, instead of planning on their own. The ranks are started as torchrun starts them
(``parallel.launch``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set)."""

import contextlib
import io
import re

import pytest
import torch

from wan_i2v import session
from wan_i2v.parallel.launch import launch
from wan_i2v.session import RunOptions, RunSession
from wan_i2v.video import demo_image

JOB = dict(max_area=64 * 96, frame_num=5, steps=2, shift=3.0, progress=False)

# A host memory probe that says a rank has next to nothing free: a rank that planned with it would refuse every video.
NO_HOST_MEMORY = 1


@pytest.fixture(autouse=True)
def short_collective_timeout(monkeypatch):
    """A rank left waiting for the others (as each planned on its own before) fails in seconds, not in the default 10 minutes."""
    monkeypatch.setenv("WAN_I2V_DIST_TIMEOUT", "30")


def _rank_1_short_of_memory(ckpt):
    """Every rank plans and opens the session as the CLI does; rank 1's own probe would refuse the video."""
    from wan_i2v.parallel.env import env_rank

    if env_rank() == 1:
        session.available_host_bytes = lambda: NO_HOST_MEMORY
    session_plan = session.plan(RunOptions(ckpt_dir=ckpt, device="cpu", dtype="fp32"), height=64, width=96, frame_num=JOB["frame_num"])
    with RunSession.open(session_plan) as opened:
        latents = opened.generate(demo_image(), "a boat", seed=3, **JOB).latents
    return session_plan, latents


def test_the_other_ranks_follow_rank_0s_plan(tiny_checkpoint, tiny_pipeline):
    results = launch(_rank_1_short_of_memory, (tiny_checkpoint,), 2)
    (plan_0, latents_0), (plan_1, latents_1) = results[0], results[1]
    assert plan_1 == plan_0 and plan_0.refusal() is None
    assert plan_1.planned.host_bytes not in (None, NO_HOST_MEMORY)  # rank 0's probe, not rank 1's
    assert torch.equal(latents_0, latents_1)
    # (CFG parallel: the two branches run as batches of one on two ranks, not as a batch of two: float rounding apart)
    torch.testing.assert_close(latents_0, tiny_pipeline.generate(demo_image(), "a boat", seed=3, **JOB).latents, rtol=1e-5, atol=1e-5)


def _generate_with_rank_0_short_of_memory(ckpt, image, out):
    """`wan-i2v generate` on every rank, as under torchrun; rank 0's probe refuses the video."""
    from wan_i2v.cli import main
    from wan_i2v.parallel.env import env_rank

    if env_rank() == 0:
        session.available_host_bytes = lambda: NO_HOST_MEMORY
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["generate", "--ckpt-dir", str(ckpt), "--image", str(image), "--prompt", "a boat", "--save-file", str(out),
                     "--size", "64*96", "--frame-num", "5", "--steps", "2", "--quiet", "--device", "cpu"])  # fmt: skip
    return code, stderr.getvalue().splitlines()


def test_a_refusal_planned_on_rank_0_ends_every_rank_with_its_line(tiny_checkpoint, tmp_path):
    image, out = tmp_path / "image.png", tmp_path / "out.mp4"
    demo_image().save(image)
    results = launch(_generate_with_rank_0_short_of_memory, (tiny_checkpoint, image, out), 2)
    (code_0, lines_0), (code_1, lines_1) = results[0], results[1]
    assert code_0 == code_1 == 2
    assert len(lines_0) == 1 and re.fullmatch(r"wan-i2v: error: this video needs a machine with at least \d+ GiB of host memory; "
                                              r"planned for 0 GiB of host memory \(use a smaller --size, .*\)", lines_0[0]), lines_0  # fmt: skip
    assert lines_1 == [lines_0[0].replace("wan-i2v: error: ", "wan-i2v: error: (rank 1) ")]
    assert not out.exists()
