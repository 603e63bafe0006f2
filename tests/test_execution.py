"""The execution plan: options resolved in one place, refusals from one table, transforms in one checked order."""

import re

import pytest
import torch

from wan_i2v.errors import WanError
from wan_i2v.execution import EXPERT_TRANSFORMS, ExecutionPlan, Offload, Transform, apply_plan, check_order
from wan_i2v.models.dit import DiT
from wan_i2v.parallel.plan import ParallelDims
from wan_i2v.tiny import TINY_DIT, randomize_


def test_offload_is_one_enum_whatever_users_write():
    assert [Offload.parse(v) for v in (None, False, True, "experts", "blocks", Offload.BLOCKS)] == [
        Offload.NONE, Offload.NONE, Offload.EXPERTS, Offload.EXPERTS, Offload.BLOCKS, Offload.BLOCKS,
    ]  # fmt: skip
    with pytest.raises(WanError, match="unknown offload mode 'disk'.*experts, blocks"):
        Offload.parse("disk")


def test_where_things_live_follows_the_placement():
    gpu = torch.device("cuda")
    swap = ExecutionPlan(gpu, torch.bfloat16, offload=Offload.EXPERTS)
    assert swap.streams_experts and swap.text_encoder_visits and not swap.fsdp_offload
    sharded = ExecutionPlan(gpu, torch.bfloat16, dims=ParallelDims(2, 1, fsdp=True), offload=Offload.EXPERTS)
    # FSDP's own host offload replaces the expert swap; the text encoder is sharded, not visiting.
    assert sharded.fsdp_offload and not sharded.streams_experts
    assert sharded.shards_text_encoder and not sharded.text_encoder_visits
    kept = ExecutionPlan(gpu, torch.bfloat16, keep_text_encoder=True)
    assert not kept.text_encoder_visits and kept.text_encoder_device == gpu
    cpu = ExecutionPlan(torch.device("cpu"), torch.float32, offload=Offload.EXPERTS)
    assert not cpu.text_encoder_visits and cpu.text_encoder_device == torch.device("cpu") and not cpu.fsdp_offload


@pytest.mark.parametrize(
    "plan, on_the_command_line, in_python",
    [
        (dict(dims=ParallelDims(2, 1, fsdp=True), offload=Offload.BLOCKS), "--offload blocks does not combine with --fsdp", "offload='blocks' does not combine with fsdp"),
        (dict(dims=ParallelDims(1, 2, fsdp=True), fp8=True), "--fp8 does not combine with --fsdp", "fp8 does not combine with fsdp"),
        (dict(dims=ParallelDims(1, 1, fsdp=True)), "--fsdp shards over several GPUs (give --gpus 2 or more", "fsdp shards over several GPUs (give gpus=2 or more"),
    ],
)
def test_refused_combinations_come_from_one_table_spelled_for_the_reader(plan, on_the_command_line, in_python):
    from wan_i2v.errors import on_the_command_line as command_line

    plan = ExecutionPlan(torch.device("cuda"), torch.bfloat16, **plan)
    assert [str(e) for e in plan.refusals()][0].startswith(in_python)
    with pytest.raises(WanError, match=re.escape(in_python)):
        plan.check()
    with command_line():
        assert [str(e) for e in plan.refusals()][0].startswith(on_the_command_line)
    assert ExecutionPlan(torch.device("cuda"), torch.bfloat16, dims=ParallelDims(2, 1, fsdp=True), offload=Offload.EXPERTS).refusals() == []


def test_transforms_apply_in_the_checked_order():
    expert = randomize_(DiT(TINY_DIT), seed=0).eval()
    cpu = ExecutionPlan(torch.device("cpu"), torch.float32, compile=True)
    assert list(apply_plan(expert, cpu)) == ["fused GELU", "attention kernel", "compile"]
    names = [t.name for t in EXPERT_TRANSFORMS]
    assert names.index("ulysses") < names.index("compile") < names.index("fsdp") and names.index("fp8") < names.index("fused GELU")


def test_a_misordered_table_is_refused():
    first, second = (Transform(name, lambda p, g: True, lambda e, p, g: None) for name in ("a", "b"))
    later = Transform("c", lambda p, g: True, lambda e, p, g: None, after=("a",))
    check_order((first, later, second))
    with pytest.raises(ValueError, match="'c' must come after a"):
        check_order((later, first, second))


def test_a_transform_that_needs_the_weights_cannot_run_on_the_meta_device():
    with torch.device("meta"):
        expert = DiT(TINY_DIT)
    with pytest.raises(ValueError, match="fp8 needs the weights"):
        apply_plan(expert, ExecutionPlan(torch.device("cuda"), torch.bfloat16, fp8=True), meta=True)
