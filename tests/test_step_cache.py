"""The step cache on the block stack: off is the exact path, its rules decide which forwards skip, a
skip adds the middle blocks' residual of the context's last full forward, its counts, a resume, a
pipeline's video with it, and its settings' errors. (Under Ulysses and FSDP: tests/test_block_hooks.py.)"""

import math
from dataclasses import replace

import av
import pytest
import torch

from test_block_hooks import CONFIG, count_block_runs, make_experts
from test_block_hooks import sample as hooks_sample
from test_lora import expert_weights, lightx2v_lora
from wan_i2v.errors import WanError
from wan_i2v.execution import ExecutionPlan, Offload, apply_plan
from wan_i2v.options import RunOptions
from wan_i2v.models.dit import DiT
from wan_i2v.models.hooks import settle
from wan_i2v.sampling.loop import LoopState
from wan_i2v.tiny import randomize_
from wan_i2v.transforms.fp8 import apply_fp8
from wan_i2v.transforms.step_cache import StepCache, StepCacheConfig, apply_step_cache, skipped_forwards

STEPS = 8  # timesteps 999 954 899 832 749 for the high-noise expert (boundary 700), 642 499 299 for the low-noise one
GRID = (3, 6, 2)  # 3 x 3 x 1 = 9 tokens: odd, so that 2 Ulysses ranks pad the sequence
# Every rule but the threshold's: the first 2 steps and the last run, at most 2 skips in a row.
FORCED = StepCacheConfig(threshold=1e9, first_blocks=1, last_blocks=1, max_reuses=2, warmup_steps=2, final_steps=1)
# Each expert's forwards (cond, uncond at each of its steps) that FORCED skips: high steps 2 and 3
# (step 4 runs: 2 skips in a row), low step 6 (step 5 is its first, step 7 the last).
FORCED_SKIPS = {"high": [False] * 4 + [True] * 4 + [False] * 2, "low": [False, False, True, True, False, False]}
# Decided by the change: its first blocks' relative change at steps 3 and 4 of the high-noise expert is
# 0.39-0.43 (against step 2's), at every other step 0.53-0.69 (printed from a run of these tiny experts).
MEASURED = StepCacheConfig(threshold=0.5, first_blocks=1, last_blocks=1, max_reuses=2, warmup_steps=0, final_steps=1)
MEASURED_SKIPS = {"high": [False] * 6 + [True] * 4, "low": [False] * 6}


def sample(experts, **options) -> torch.Tensor:
    return hooks_sample(experts, steps=STEPS, grid=GRID, **options)


def with_caches(experts, config: StepCacheConfig) -> dict[str, StepCache]:
    return {name: apply_step_cache(model, config) for name, model in experts.models.items()}


def counts_of(skips: dict[str, list[bool]]) -> dict[str, tuple[int, int]]:
    return {name: (sum(pattern), len(pattern)) for name, pattern in skips.items()}


def substitute_by_hand(experts, skips: dict[str, list[bool]]) -> None:
    """The cache's arithmetic made with torch's forward hooks on the middle block (block 1 of 3): at
    a forward in ``skips`` its output is replaced by its input plus what it added at the last forward
    of the same branch (forwards alternate cond, uncond) that was not replaced."""
    for name, model in experts.models.items():
        middle = model.block_stack()[1]
        calls, inputs, added = [], {}, {}

        def remember_input(module, args, inputs=inputs, calls=calls):
            calls.append(None)
            inputs["now"] = settle(args[0], args[1])

        def substitute(module, args, output, name=name, inputs=inputs, added=added, calls=calls):
            call = len(calls) - 1
            branch = call % 2
            if skips[name][call]:
                return inputs["now"] + added[branch], None
            added[branch] = settle(*output) - inputs["now"]
            return None

        middle.register_forward_pre_hook(remember_input)
        middle.register_forward_hook(substitute)


def test_threshold_0_is_the_exact_path():
    experts = make_experts()
    exact = sample(experts)
    plan = ExecutionPlan(torch.device("cpu"), torch.float32, step_cache=StepCacheConfig(threshold=0))
    assert "step cache" not in apply_plan(experts.models["high"], plan)
    assert not experts.models["high"].block_stack().hooks
    # Registered all the same, a threshold of 0 skips nothing and changes no bit.
    with_caches(experts, StepCacheConfig(threshold=0, warmup_steps=0, final_steps=0))
    assert torch.equal(sample(experts), exact)
    assert skipped_forwards(experts.models) == {"high": (0, 10), "low": (0, 6)}


def test_the_plan_registers_the_cache_on_each_expert_and_records_it_in_the_runs_identity():
    experts = make_experts()
    plan = ExecutionPlan(torch.device("cpu"), torch.float32, step_cache=FORCED)
    for model in experts.models.values():
        assert isinstance(apply_plan(model, plan)["step cache"], StepCache)
    assert skipped_forwards(experts.models) == {}  # nothing run yet
    assert plan.identity()["step_cache"] == FORCED.as_dict()
    assert "step_cache" not in ExecutionPlan(torch.device("cpu"), torch.float32, step_cache=StepCacheConfig(0)).identity()


def test_with_a_huge_threshold_the_rules_decide_and_a_skip_adds_the_middle_blocks_last_residual():
    by_hand = make_experts()
    substitute_by_hand(by_hand, FORCED_SKIPS)
    expected = sample(by_hand)
    assert not torch.equal(expected, sample(make_experts()))

    experts = make_experts()
    caches = with_caches(experts, FORCED)
    runs = count_block_runs(experts)
    latents = sample(experts)
    assert torch.equal(latents, expected)
    # The high-noise expert's cache was dropped at the switch (its memory freed); the low-noise one's is the last step's.
    assert caches["high"].contexts.states == {} and set(caches["low"].contexts.states) == {"low/cond", "low/uncond"}
    assert skipped_forwards(experts.models) == counts_of(FORCED_SKIPS) == {"high": (4, 10), "low": (2, 6)}
    assert len(runs) == 16 * CONFIG.num_layers - 6  # the 6 skipped forwards did not run their middle block

    runs.clear()
    assert torch.equal(sample(experts), expected)  # the next video starts afresh
    assert skipped_forwards(experts.models) == {"high": (4, 10), "low": (2, 6)}


def test_below_the_threshold_a_forward_skips_above_it_runs():
    by_hand = make_experts()
    substitute_by_hand(by_hand, MEASURED_SKIPS)
    experts = make_experts()
    with_caches(experts, MEASURED)
    assert torch.equal(sample(experts), sample(by_hand))
    assert skipped_forwards(experts.models) == counts_of(MEASURED_SKIPS) == {"high": (4, 10), "low": (0, 6)}


def test_each_forward_tells_the_change_it_measured_which_decided_it():
    """``last_change`` after each forward: None where the rules that need no statistic decided (a
    context's first forward has nothing to compare with; the last step always runs), else the
    relative L1 change of block 0's residual, measured here by hand for each branch's second forward,
    and below the threshold exactly at the forwards that skipped."""
    experts = make_experts()
    caches = with_caches(experts, MEASURED)
    told, residuals = {name: [] for name in caches}, {name: [] for name in caches}
    for name, model in experts.models.items():
        model.block_stack()[0].register_forward_hook(
            lambda module, args, output, name=name: residuals[name].append(settle(*output) - settle(args[0], args[1])))  # fmt: skip
        model.register_forward_hook(lambda module, args, output, name=name: told[name].append(caches[name].last_change))
    sample(experts)
    measured = {"high": [False, False] + [True] * 8, "low": [False, False, True, True, False, False]}
    assert {name: [change is not None for change in changes] for name, changes in told.items()} == measured
    for name, changes in told.items():
        assert [change is not None and change < MEASURED.threshold for change in changes] == MEASURED_SKIPS[name]
        for branch in (0, 1):
            first, second = residuals[name][branch], residuals[name][2 + branch]
            by_hand = ((second - first).abs().sum() / first.abs().sum()).item()
            assert changes[2 + branch] == pytest.approx(by_hand, rel=1e-5)  # summed in another order


def test_fp8_blocks_skip_as_the_rules_say_with_the_same_arithmetic():
    # FP8 changes the weights, not the stack: the cache's reuse under it is the substitution by hand under it.
    by_hand, experts = make_experts(), make_experts()
    for model in [*by_hand.models.values(), *experts.models.values()]:
        apply_fp8(model)
    substitute_by_hand(by_hand, FORCED_SKIPS)
    with_caches(experts, FORCED)
    assert torch.equal(sample(experts), sample(by_hand))
    assert skipped_forwards(experts.models) == counts_of(FORCED_SKIPS)


def test_a_run_resumed_mid_run_equals_the_unbroken_one():
    experts = make_experts()
    with_caches(experts, FORCED)
    states = []
    unbroken = sample(experts, on_state=states.append)
    after_4 = states[3]  # after 2 skips in a row of the high-noise expert: its step 4 must run
    saved = after_4.block_hooks["high"]["whole"]["step cache"]
    assert set(saved) == {"high/cond", "high/uncond"} and saved["high/cond"]["reuses"] == 2

    fresh = make_experts()
    with_caches(fresh, FORCED)
    resumed = sample(fresh, resume=LoopState(after_4.step, after_4.latent.clone(), after_4.solver, after_4.hooks, after_4.block_hooks))
    assert torch.equal(resumed, unbroken)
    assert skipped_forwards(fresh.models) == {"high": (0, 2), "low": (2, 6)}  # of the steps the resumed run made
    # A state saved after the switch holds the low-noise expert's cache only (the high-noise one's was dropped).
    assert states[5].block_hooks["high"]["whole"]["step cache"] == {}
    assert set(states[5].block_hooks["low"]["whole"]["step cache"]) == {"low/cond", "low/uncond"}
    # After the last step nothing runs (a resume goes straight to the decode): no hook's state is kept.
    assert states[-1].step == STEPS and states[-1].block_hooks == {} and states[-1].hooks == {}


def test_a_pipeline_with_the_cache_skips_and_writes_a_finite_playable_video(tiny_checkpoint, tmp_path):
    from wan_i2v import I2VPipeline
    from wan_i2v.video import demo_image

    plan = ExecutionPlan.for_device("cpu", RunOptions(dtype="fp32", step_cache=StepCacheConfig(threshold=1e9, warmup_steps=1, final_steps=1)))
    pipe = I2VPipeline.load(tiny_checkpoint, plan)
    settings = dict(progress=False, seed=3, max_area=64 * 96, frame_num=5, steps=6, shift=5.0)
    state = tmp_path / "cached.state.pt"
    result = pipe.generate(demo_image(), "a boat", video_file=tmp_path / "cached.mp4", state_file=state, **settings)
    counts = skipped_forwards(pipe.experts.models)
    saved = torch.load(state, weights_only=True)  # the last step's: the latents without the cache's residuals
    assert saved["step"] == 6 and saved["block_hooks"] == {}
    again = pipe.generate(demo_image(), "a boat", state_file=state, **settings)
    assert again.experts_used == [] and torch.equal(again.latents, result.latents)
    assert sum(skipped for skipped, _ in counts.values()) > 0 and sum(total for _, total in counts.values()) == 12
    assert torch.isfinite(result.latents).all()
    assert not torch.equal(result.latents, pipe_without_cache(tiny_checkpoint).generate(demo_image(), "a boat", **settings).latents)
    with av.open(str(tmp_path / "cached.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5

    # The blocks streamed from the checkpoint (--offload blocks), the skipped ones never brought up: the same video.
    streamed = I2VPipeline.load(tiny_checkpoint, replace(plan, offload=Offload.BLOCKS, converted_dir=None))
    assert torch.equal(streamed.generate(demo_image(), "a boat", **settings).latents, result.latents)
    assert skipped_forwards(streamed.experts.models) == counts


def test_loras_switched_on_a_cached_pipeline_give_the_video_of_one_loaded_with_them(tiny_checkpoint, tmp_path):
    from wan_i2v import I2VPipeline
    from wan_i2v.video import demo_image

    lora = tmp_path / "low.safetensors"
    lightx2v_lora(lora, expert_weights(tiny_checkpoint, "low_noise_model"), seed=3)
    cache = StepCacheConfig(threshold=1e9, warmup_steps=1, final_steps=1)
    settings = dict(progress=False, seed=3, max_area=64 * 96, frame_num=5, steps=6, shift=5.0)
    pipe = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, step_cache=cache)
    without = pipe.generate(demo_image(), "a boat", **settings).latents  # the cache now holds this video's residuals
    pipe.set_loras({"low": [str(lora)]})
    switched = pipe.generate(demo_image(), "a boat", **settings).latents
    loaded = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, step_cache=cache, loras={"low": [str(lora)]})
    assert torch.equal(switched, loaded.generate(demo_image(), "a boat", **settings).latents)
    assert not torch.equal(switched, without)
    assert skipped_forwards(pipe.experts.models) == skipped_forwards(loaded.experts.models)

    # Only the active expert on the device (--offload experts): the same video, the same skips.
    swapped = I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32, step_cache=cache, loras={"low": [str(lora)]},
                                          offload="experts")  # fmt: skip
    assert torch.equal(swapped.generate(demo_image(), "a boat", **settings).latents, switched)
    assert skipped_forwards(swapped.experts.models) == skipped_forwards(pipe.experts.models)


def pipe_without_cache(checkpoint):
    from wan_i2v import I2VPipeline

    return I2VPipeline.from_pretrained(checkpoint, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threshold": -0.1}, "step_cache=-0.1 is not a threshold"),
        ({"threshold": math.nan}, "is not a threshold"),
        ({"threshold": 0.1, "first_blocks": 0}, "step_cache_blocks='0,0': the first blocks must be 1 or more"),
        ({"threshold": 0.1, "max_reuses": 0}, "step_cache_max=0"),
    ],
)
def test_bad_settings_are_one_line_errors(options, message):
    with pytest.raises(WanError, match=message.replace("(", r"\(")) as error:
        StepCacheConfig(**options)
    assert "\n" not in str(error.value)


def test_blocks_that_leave_nothing_to_skip_are_refused():
    model = randomize_(DiT(CONFIG), seed=1)
    with pytest.raises(WanError, match="leaves none of the model's 3 blocks to skip"):
        apply_step_cache(model, StepCacheConfig(threshold=0.1, first_blocks=2, last_blocks=1))


def test_with_compiled_blocks_the_cache_breaks_no_graph_and_compiles_nothing_again():
    from torch._dynamo.utils import counters

    experts = make_experts()
    with_caches(experts, FORCED)
    eager = sample(experts)
    # Block by block as transforms/compile.py compiles them; dynamo's eager backend traces as inductor's
    # does (where a graph would break) without its minute of code generation on the CPU.
    for model in experts.models.values():
        for block in model.block_stack():
            block.compile(backend="eager", dynamic=False)
    try:
        counters.clear()
        assert torch.equal(sample(experts), eager)
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
        counters.clear()
        sample(experts)
        assert counters["stats"]["unique_graphs"] == 0  # the skips of a second video need no new graph
    finally:
        torch._dynamo.reset()  # these blocks' graphs are of no use to later tests


def test_the_benchmark_measures_its_rows_on_the_tiny_checkpoint(tmp_path):
    """``bench/step_cache.py --tiny``: the exact row in its process and two threshold rows sharing one.
    A threshold below every change skips nothing and gives the exact latents to the bit; one above
    every change skips what the rules allow: at the steps after the first two, before the last, and
    not at an expert's first step, both forwards."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "step_cache.py"
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, str(script), "--tiny", "--work", str(tmp_path / "work"), "--thresholds", "1e-9", "1e9", "--json", str(report)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    exact, none, most = json.loads(report.read_text())["rows"]
    records = [json.loads(line) for line in (tmp_path / "work" / "threshold-1e+09.steps.jsonl").read_text().splitlines()]
    experts = [record["expert"] for record in records]
    allowed = ["2" if 2 <= i < len(experts) - 1 and experts[i - 1] == experts[i] else "0" for i in range(len(experts))]
    assert exact["pattern"] == none["pattern"] == "0" * len(experts) and most["pattern"] == "".join(allowed) != none["pattern"]
    assert none["latents_rel_error"] == 0 and none["psnr_db"] == math.inf
    assert 0 < most["latents_rel_error"] < 1 and math.isfinite(most["psnr_db"])
    assert most["skipped"] == sum(map(int, allowed)) and most["forwards"] == exact["forwards"] == 2 * len(experts)
    assert all(0 < change["median"] for change in most["changes_per_expert"].values())
