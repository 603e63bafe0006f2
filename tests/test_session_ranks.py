"""Under a launcher (torchrun) rank 0 plans the session and the other ranks receive its plan, or its
error, instead of planning on their own. The ranks are started as torchrun starts them
(``parallel.launch``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set), once for every
case below: the ranks run them in turn, in the group the first planning joined."""

import contextlib
import io
import os
import re
from unittest import mock

import pytest
import torch

from wan_i2v import session
from wan_i2v.errors import WanError
from wan_i2v.parallel.env import env_rank
from wan_i2v.parallel.launch import launch
from wan_i2v.session import RunOptions, RunSession
from wan_i2v.video import demo_image

JOB = dict(max_area=64 * 96, frame_num=5, steps=2, shift=3.0, progress=False)

# A host memory probe that says a rank has next to nothing free: a rank that planned with it would refuse every video.
NO_HOST_MEMORY = 1


@contextlib.contextmanager
def _short_of_memory_on(rank: int):
    with mock.patch.object(session, "available_host_bytes", lambda: NO_HOST_MEMORY) if env_rank() == rank else contextlib.nullcontext():
        yield


def _rank_0_lacks_the_checkpoint(homes):
    """Each rank looks for the checkpoint in its own cache ($WAN_I2V_HOME), and neither has one."""
    with mock.patch.dict(os.environ, {"WAN_I2V_HOME": homes[env_rank()]}):
        try:
            session.plan(RunOptions(device="cpu", dtype="fp32"), height=64, width=96, frame_num=JOB["frame_num"])
        except WanError as error:
            return str(error)


def _generate_with_rank_0_short_of_memory(ckpt, image, out):
    """`wan-i2v generate` on every rank, as under torchrun; rank 0's probe refuses the video."""
    from wan_i2v.cli import main

    stderr = io.StringIO()
    with _short_of_memory_on(0), contextlib.redirect_stderr(stderr):
        code = main(["generate", "--ckpt-dir", str(ckpt), "--image", str(image), "--prompt", "a boat", "--save-file", str(out),
                     "--size", "64*96", "--frame-num", str(JOB["frame_num"]), "--steps", "2", "--quiet", "--device", "cpu"])  # fmt: skip
    return code, stderr.getvalue().splitlines()


def _run_with_rank_1_short_of_memory(ckpt):
    """Every rank plans and opens the session as the CLI does; rank 1's own probe would refuse the video."""
    with _short_of_memory_on(1):
        session_plan = session.plan(RunOptions(ckpt_dir=ckpt, device="cpu", dtype="fp32"), height=64, width=96, frame_num=JOB["frame_num"])
        with RunSession.open(session_plan) as opened:
            latents = opened.generate(demo_image(), "a boat", seed=3, **JOB).latents
    return session_plan, latents


def _cases(ckpt, image, out, homes):
    return _rank_0_lacks_the_checkpoint(homes), _generate_with_rank_0_short_of_memory(ckpt, image, out), _run_with_rank_1_short_of_memory(ckpt)


@pytest.fixture(scope="module")
def ranks(tiny_checkpoint, tmp_path_factory):
    """What each of two ranks got in each case: {rank: (error, (exit code, stderr lines), (plan, latents))}."""
    folder = tmp_path_factory.mktemp("ranks")
    image, out = folder / "image.png", folder / "out.mp4"
    demo_image().save(image)
    homes = [str(folder / f"home-{rank}") for rank in (0, 1)]
    # A rank left waiting for the others (as when each planned on its own) fails in seconds, not in the default 10 minutes.
    with mock.patch.dict(os.environ, {"WAN_I2V_DIST_TIMEOUT": "30"}):
        return launch(_cases, (tiny_checkpoint, image, out, homes), 2), out


def test_an_error_of_rank_0s_planning_is_every_ranks(ranks):
    results, _ = ranks
    assert re.fullmatch(r"no .* checkpoint in .*home-0 \(run `wan-i2v cache quick`, or pass --ckpt-dir\)", results[0][0]), results[0][0]
    assert results[1][0] == results[0][0]


def test_a_refusal_planned_on_rank_0_ends_every_rank_with_its_line(ranks):
    results, out = ranks
    (code_0, lines_0), (code_1, lines_1) = results[0][1], results[1][1]
    assert code_0 == code_1 == 2
    assert len(lines_0) == 1 and re.fullmatch(r"wan-i2v: error: this video needs a machine with at least \d+ GiB of host memory; "
                                              r"planned for 0 GiB of host memory \(use a smaller --size, .*\)", lines_0[0]), lines_0  # fmt: skip
    assert lines_1 == [lines_0[0].replace("wan-i2v: error: ", "wan-i2v: error: (rank 1) ")]
    assert not out.exists()


def test_the_other_ranks_run_rank_0s_plan(ranks, tiny_pipeline):
    results, _ = ranks
    (plan_0, latents_0), (plan_1, latents_1) = results[0][2], results[1][2]
    assert plan_1 == plan_0 and plan_0.refusal() is None
    assert plan_1.planned.host_bytes not in (None, NO_HOST_MEMORY)  # rank 0's probe, not rank 1's
    assert torch.equal(latents_0, latents_1)
    # (CFG parallel: the two branches run as batches of one on two ranks, not as a batch of two: float rounding apart)
    torch.testing.assert_close(latents_0, tiny_pipeline.generate(demo_image(), "a boat", seed=3, **JOB).latents, rtol=1e-5, atol=1e-5)
