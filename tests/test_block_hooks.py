"""Hooks on the DiT's block stack: what they see, a step cache that skips the blocks, the same under
Ulysses on 2 CPU ranks (where the ranks agree on a skip), reset, and their state across a resume."""

import os
import threading

import pytest
import torch
import torch.distributed as dist

from wan_i2v.models.dit import DiT, DiTConfig
from wan_i2v.models.hooks import BlockHook, PerContext, merge_states
from wan_i2v.models.spec import ExpertSpec
from wan_i2v.options import RunOptions
from wan_i2v.sampling.guidance import ClassifierFreeGuidance, Conditioning
from wan_i2v.sampling.loop import Experts, LoopState, denoise
from wan_i2v.sampling.schedulers import official_schedule
from wan_i2v.tiny import randomize_
from wan_i2v.transforms.step_cache_config import StepCacheConfig

CONFIG = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=3, text_len=8, text_dim=16)
# The step cache on the tiny pipeline's 2 blocks at 3 steps: the middle step may skip, and does.
PIPELINE_CACHE = StepCacheConfig(threshold=1e9, first_blocks=1, last_blocks=0, warmup_steps=1, final_steps=1)
STEPS = 3  # timesteps 999 and 856 for the high-noise expert, then 599 for the low-noise one
EXPERTS = (ExpertSpec("high", "high", 700), ExpertSpec("low", "low", 0))
GRID = (2, 4, 6)  # latent frames, height, width: 2 x 2 x 3 = 12 tokens


def make_experts() -> Experts:
    return Experts({"high": randomize_(DiT(CONFIG), seed=1).eval(), "low": randomize_(DiT(CONFIG), seed=2).eval()}, EXPERTS)


def sample(experts: Experts, *, steps: int = STEPS, grid: tuple[int, int, int] = GRID, **options) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    f, h, w = grid
    conditioning = Conditioning(torch.randn(1, 20, f, h, w, generator=g), torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g))
    noise = torch.randn(1, 16, f, h, w, generator=g)
    return denoise(noise, experts=experts, guidance=ClassifierFreeGuidance(conditioning, batched=False), schedule=official_schedule("unipc", steps, 3.0),
                   solver="unipc", guide_scale={"low": 3.0, "high": 4.0}, **options)  # fmt: skip


def count_block_runs(experts: Experts) -> list[int]:
    """A list that grows by one per block run (torch's own forward hooks, which the stack does not use)."""
    runs = []
    for model in experts.models.values():
        for block in model.block_stack():
            block.register_forward_pre_hook(lambda module, args: runs.append(1))
    return runs


class Recorder(BlockHook):
    def __init__(self):
        self.seen = []

    def before_stack(self, call):
        self.seen.append(("before_stack", call.context.expert, call.context.branch))

    def before_block(self, call, index, tokens, pending):
        self.seen.append(("before_block", index, pending is None))

    def after_block(self, call, index, tokens, pending):
        self.seen.append(("after_block", index, pending is None))

    def after_stack(self, call, output):
        self.seen.append(("after_stack", call.context.expert, call.context.branch, call.skipped))


def test_a_hook_sees_each_call_with_its_expert_and_branch_and_each_block_in_order():
    experts = make_experts()
    plain = sample(experts)
    recorders = {name: Recorder() for name in experts.models}
    for name, model in experts.models.items():
        model.block_stack().hooks.register(recorders[name])
    assert torch.equal(sample(experts), plain)  # hooks that return nothing change nothing

    one_call = lambda expert, branch: [  # noqa: E731
        ("before_stack", expert, branch),
        ("before_block", 0, True), ("after_block", 0, False),  # the first block takes the stream with nothing pending
        ("before_block", 1, False), ("after_block", 1, False),
        ("before_block", 2, False), ("after_block", 2, False),
        ("after_stack", expert, branch, False),
    ]  # fmt: skip
    assert recorders["high"].seen == 2 * (one_call("high", "cond") + one_call("high", "uncond"))
    assert recorders["low"].seen == one_call("low", "cond") + one_call("low", "uncond")


def test_a_hook_may_replace_a_blocks_output():
    model = randomize_(DiT(CONFIG), seed=1).eval()
    inputs = (torch.randn(1, 16, *GRID), torch.tensor([500.0]), torch.randn(1, 8, 16), torch.randn(1, 20, *GRID))

    class ZeroSecondBlock(BlockHook):
        def after_block(self, call, index, tokens, pending):
            return (torch.zeros_like(tokens), None) if index == 1 else None

    with torch.no_grad():
        x, (update, gate) = model.block_stack()[2](torch.zeros(1, 12, CONFIG.dim), None, *_block_inputs(model, inputs))
        expected = model.unpatchify(model.head(x + update * gate, _time_embedding(model, inputs)), (2, 2, 3))
        plain = model(*inputs)
        model.block_stack().hooks.register(ZeroSecondBlock())
        replaced = model(*inputs)
    assert not torch.equal(replaced, plain)
    assert torch.equal(replaced, expected)


def _time_embedding(model, inputs):
    from wan_i2v.models.dit import sinusoidal_embedding

    return model.time_embedding(sinusoidal_embedding(inputs[1], CONFIG.freq_dim))[:, None]  # [B, 1, C]: one per sample


def _block_inputs(model, inputs):
    """What the stack passes each block besides the stream: (modulation, context, rope, key_mask)."""
    from wan_i2v.models.dit import rope_tables

    modulation = model.time_projection(_time_embedding(model, inputs)).unflatten(2, (6, CONFIG.dim))
    return modulation, model.text_embedding(inputs[2]), rope_tables((2, 2, 3), CONFIG.head_dim, "cpu"), None


class ReuseStackOutput(BlockHook):
    """A step cache reduced to its bones: per expert and branch, the stack's output of its first call
    is offered again at the calls in ``reuse``."""

    name = "reuse"

    def __init__(self, reuse=(1,)):
        self.reuse = set(reuse)
        self.contexts = PerContext(lambda: {"calls": 0, "output": None}, dict, dict)
        self.skipped = []

    def before_stack(self, call):
        state = self.contexts[call.context]
        return state["output"] if state["calls"] in self.reuse else None

    def after_stack(self, call, output):
        state = self.contexts[call.context]
        state["calls"] += 1
        if not call.skipped:
            state["output"] = output
        self.skipped.append(call.skipped)

    def reset(self):
        self.contexts.reset()

    def state_dict(self):
        return self.contexts.state_dict()

    def load_state_dict(self, state):
        self.contexts.load_state_dict(state)


def reuse_by_hand(experts: Experts):
    """The same substitution made with torch's forward hooks on the stacks (the blocks run, their
    output is dropped): each expert's calls alternate cond, uncond, so its calls 2 and 3 (the second
    step) take the outputs of its calls 0 and 1."""
    for model in experts.models.values():
        outputs = []

        def substitute(module, args, output, outputs=outputs):
            outputs.append(output)
            return outputs[len(outputs) - 3] if len(outputs) in (3, 4) else None

        model.block_stack().register_forward_hook(substitute)


def test_a_step_cache_skips_the_blocks_and_gives_the_latents_of_the_substitution():
    experts = make_experts()
    plain = sample(experts)
    by_hand = make_experts()
    reuse_by_hand(by_hand)
    expected = sample(by_hand)
    assert not torch.equal(expected, plain)

    hooks = {name: model.block_stack().hooks.register(ReuseStackOutput()) for name, model in experts.models.items()}
    runs = count_block_runs(experts)
    assert torch.equal(sample(experts), expected)
    assert hooks["high"].skipped == [False, False, True, True] and hooks["low"].skipped == [False, False]
    assert len(runs) == 4 * CONFIG.num_layers  # 6 calls, 2 of them without a block

    runs.clear()
    assert torch.equal(sample(experts), expected)  # reset before the run: nothing of the first video is reused
    assert len(runs) == 4 * CONFIG.num_layers


def test_hook_state_goes_with_the_loop_state_and_a_resumed_run_reuses_it():
    experts = make_experts()
    for model in experts.models.values():
        model.block_stack().hooks.register(ReuseStackOutput())
    states = []
    whole = sample(experts, on_state=states.append)
    after_one = states[0]
    assert set(after_one.block_hooks) == {"high", "low"}
    saved = after_one.block_hooks["high"]["whole"]["reuse"]
    assert set(saved) == {"high/cond", "high/uncond"} and saved["high/cond"]["calls"] == 1

    fresh = make_experts()
    hooks = {name: model.block_stack().hooks.register(ReuseStackOutput()) for name, model in fresh.models.items()}
    runs = count_block_runs(fresh)
    copy = LoopState(after_one.step, after_one.latent.clone(), after_one.solver, after_one.hooks, after_one.block_hooks)
    assert torch.equal(sample(fresh, resume=copy), whole)
    assert hooks["high"].skipped == [True, True]  # the cache came from the saved state
    assert len(runs) == 2 * CONFIG.num_layers


def test_block_hook_states_survive_the_state_file(tmp_path):
    from wan_i2v.config import GenerationSettings
    from wan_i2v.sampling.resume import StateWriter, load_loop_state

    settings = GenerationSettings(prompt="a boat", negative_prompt="", max_area=64 * 64, frame_num=5, steps=3, shift=3.0, guide_scale=(3.0, 3.0), seed=1, solver="unipc")
    cached = torch.randn(1, 12, CONFIG.dim)
    state = LoopState(1, torch.randn(1, 16, 2, 4, 6), {}, {}, {"high": {"whole": {"reuse": {"high/cond": {"calls": 1, "output": cached}}}}})
    writer = StateWriter()
    writer.save(tmp_path / "state.pt", state, settings, {"run": 1})
    writer.finish()
    _, loaded = load_loop_state(tmp_path / "state.pt", settings, {"run": 1}, seed_given=True)
    assert loaded.block_hooks["high"]["whole"]["reuse"]["high/cond"]["calls"] == 1
    assert torch.equal(loaded.block_hooks["high"]["whole"]["reuse"]["high/cond"]["output"], cached)


def test_merged_states_keep_every_ranks_own_and_the_first_of_shared_keys():
    rank0 = {"high": {"ulysses 0 of 2": {"reuse": {"high/cond": 1}}, "note": "rank 0"}}
    rank1 = {"high": {"ulysses 1 of 2": {"reuse": {"high/cond": 2}}, "note": "rank 1"}, "low": {}}
    assert merge_states([rank0, rank1]) == {
        "high": {"ulysses 0 of 2": {"reuse": {"high/cond": 1}}, "ulysses 1 of 2": {"reuse": {"high/cond": 2}}, "note": "rank 0"},
        "low": {},
    }


# -- Ulysses on 2 CPU ranks -----------------------------------------------------------------------


def caches(experts: Experts, reuse=(1,)) -> dict[str, ReuseStackOutput]:
    """A new cache on each expert's stack, in place of the hooks it had; returns them by expert."""
    made = {}
    for name, model in experts.models.items():
        registry = model.block_stack().hooks
        for hook in list(registry):
            registry.remove(hook)
        made[name] = registry.register(ReuseStackOutput(reuse))
    return made


def _ulysses_cases(ckpt, state_file):
    """Each rank: the cached run, a run where only rank 0 offers its cache, the cached run resumed
    from the ranks' states merged into one (as rank 0's state file holds them), and a pipeline's run
    cancelled after its first step and resumed from its state file; then, with FSDP over the two
    ranks (each running one guidance branch), a cached run, one where only rank 0 offers, and one
    with the step cache (``transforms/step_cache.py``); last, the step cache under Ulysses."""
    from wan_i2v import I2VPipeline
    from wan_i2v.parallel import ParallelDims, ParallelGroups, init_distributed
    from wan_i2v.parallel.ulysses import UlyssesSequence, apply_ulysses
    from test_step_cache import MEASURED, with_caches
    from test_step_cache import sample as sample_odd
    from wan_i2v.pipeline import Cancelled
    from wan_i2v.transforms.step_cache import apply_step_cache, skipped_forwards
    from wan_i2v.video import demo_image

    torch.set_num_threads(1)
    os.environ["WAN_I2V_DIST_TIMEOUT"] = "60"  # ranks that did not agree would wait for each other: fail rather than hang
    init_distributed("cpu")
    rank = dist.get_rank()

    def sharded_with_caches(reuse=(1,)):
        experts = make_experts()
        for model in experts.models.values():
            apply_ulysses(model, dist.group.WORLD)
        return experts, caches(experts, reuse), count_block_runs(experts)

    results = {}
    experts, hooks, runs = sharded_with_caches()
    states = []
    results["cached"] = sample(experts, on_state=states.append)
    results["cached skips"] = {name: hook.skipped for name, hook in hooks.items()}
    results["cached runs"] = len(runs)
    results["own state"] = states[0].block_hooks["high"][f"ulysses {rank} of 2"]["reuse"]["high/cond"]["output"]
    every_rank = [None, None]
    dist.all_gather_object(every_rank, states[0].block_hooks)
    merged = LoopState(states[0].step, states[0].latent, states[0].solver, states[0].hooks, merge_states(every_rank))

    experts, hooks, runs = sharded_with_caches((1,) if rank == 0 else ())
    results["disagreeing"] = sample(experts)
    results["disagreeing skips"] = {name: hook.skipped for name, hook in hooks.items()}
    results["disagreeing runs"] = len(runs)

    experts, hooks, runs = sharded_with_caches()
    results["resumed"] = sample(experts, resume=merged)
    results["resumed skips"] = hooks["high"].skipped

    pipe = I2VPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32, parallel=ParallelGroups.build(ParallelDims(1, 2), torch.device("cpu")))
    settings = dict(progress=False, seed=3, max_area=64 * 96, frame_num=5, steps=3, shift=5.0)  # timesteps 999 and 908 for the high-noise expert

    cancel = threading.Event()
    caches(pipe.experts)
    try:
        pipe.generate(demo_image(), "a boat", state_file=state_file, cancel=cancel, callback_on_step_end=lambda *args: cancel.set() or {}, **settings)
    except Cancelled:
        pass
    high = caches(pipe.experts)["high"]
    results["pipeline resumed"] = pipe.generate(demo_image(), "a boat", state_file=state_file, **settings).latents
    results["pipeline resumed skips"] = high.skipped
    high = caches(pipe.experts)["high"]
    results["pipeline straight"] = pipe.generate(demo_image(), "a boat", **settings).latents
    results["pipeline straight skips"] = high.skipped

    # FSDP over both ranks, each running one guidance branch: every block's weights are gathered by
    # both, so a skip must be agreed over both as well.
    pipe = I2VPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32, parallel=ParallelGroups.build(ParallelDims(2, 1, True), torch.device("cpu")))
    results["fsdp plain"] = pipe.generate(demo_image(), "a boat", **settings).latents
    for name, reuse in (("fsdp cached", (1,)), ("fsdp disagreeing", (1,) if rank == 0 else ())):
        high = caches(pipe.experts, reuse)["high"]
        results[name] = pipe.generate(demo_image(), "a boat", **settings).latents
        results[name + " skips"] = high.skipped
    # The step cache on the same FSDP pipeline: each rank's branch decides, the mesh agrees.
    for model in pipe.experts.models.values():
        for hook in list(model.block_stack().hooks):
            model.block_stack().hooks.remove(hook)
        apply_step_cache(model, PIPELINE_CACHE)
    results["fsdp step cache"] = pipe.generate(demo_image(), "a boat", **settings).latents
    results["fsdp step cache counts"] = skipped_forwards(pipe.experts.models)

    # The step cache under Ulysses, on an odd number of tokens: its decisions from the all-reduced change.
    experts = make_experts()
    for model in experts.models.values():
        apply_ulysses(model, dist.group.WORLD)
    with_caches(experts, MEASURED)
    results["ulysses step cache"] = sample_odd(experts)
    results["ulysses step cache counts"] = skipped_forwards(experts.models)
    # What the cache's decision sums: 9 tokens over 2 ranks, 5 each, the last of rank 1's padding.
    sequence = UlyssesSequence(dist.group.WORLD)
    sequence.scatter(torch.zeros(1, 9, 4), (torch.zeros(9, 2), torch.zeros(9, 2)))
    results["sum of ones over 9 tokens"] = sequence.sum_over_tokens(torch.ones(2, 1, 5)).tolist()
    dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def ulysses_results(tiny_checkpoint, tmp_path_factory):
    from wan_i2v.parallel.launch import launch

    return launch(_ulysses_cases, (tiny_checkpoint, tmp_path_factory.mktemp("state") / "run.state.pt"), 2)


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_under_ulysses_a_step_cache_skips_the_blocks_on_every_rank(ulysses_results):
    by_hand = make_experts()
    reuse_by_hand(by_hand)
    expected = sample(by_hand)
    for rank, results in ulysses_results.items():
        assert relative(results["cached"], expected) <= 1e-5, rank  # fp32 rounding of the sharded sums only
        assert results["cached skips"] == {"high": [False, False, True, True], "low": [False, False]}, rank
        assert results["cached runs"] == 4 * CONFIG.num_layers, rank
    # Each rank cached its own half of the 12 tokens, under its own key.
    assert [results["own state"].shape[1] for results in ulysses_results.values()] == [6, 6]
    assert not torch.equal(ulysses_results[0]["own state"], ulysses_results[1]["own state"])


def test_under_ulysses_ranks_that_disagree_all_run_the_blocks(ulysses_results):
    plain = sample(make_experts())
    for rank, results in ulysses_results.items():
        assert results["disagreeing skips"] == {"high": [False] * 4, "low": [False] * 2}, rank
        assert results["disagreeing runs"] == 6 * CONFIG.num_layers, rank
        assert relative(results["disagreeing"], plain) <= 1e-5, rank


def test_under_ulysses_each_rank_resumes_with_its_own_hook_state_from_the_merged_states(ulysses_results):
    for rank, results in ulysses_results.items():
        assert results["resumed skips"] == [True, True], rank
        assert torch.equal(results["resumed"], results["cached"]), rank


def test_under_ulysses_a_pipeline_saves_every_ranks_hook_state_and_resumes_with_it(ulysses_results):
    for rank, results in ulysses_results.items():
        assert results["pipeline straight skips"] == [False, False, True, True], rank
        assert results["pipeline resumed skips"] == [True, True], rank  # the cache of step 1 came from the file
    main = ulysses_results[0]
    assert torch.equal(main["pipeline resumed"], main["pipeline straight"])


def test_under_fsdp_every_rank_of_the_mesh_agrees_on_a_skip(ulysses_results):
    for rank, results in ulysses_results.items():
        assert results["fsdp cached skips"] == [False, True], rank  # this rank's branch, at each high-noise step
        assert results["fsdp disagreeing skips"] == [False, False], rank
    main = ulysses_results[0]
    assert torch.equal(main["fsdp disagreeing"], main["fsdp plain"])
    assert not torch.equal(main["fsdp cached"], main["fsdp plain"])


def test_under_fsdp_the_step_cache_skips_on_both_ranks_and_gives_one_processs_latents(ulysses_results, tiny_checkpoint):
    from wan_i2v import I2VPipeline
    from wan_i2v.execution import ExecutionPlan
    from wan_i2v.transforms.step_cache import skipped_forwards
    from wan_i2v.video import demo_image

    single = I2VPipeline.load(tiny_checkpoint, ExecutionPlan.for_device("cpu", RunOptions(dtype="fp32", step_cache=PIPELINE_CACHE)))
    expected = single.generate(demo_image(), "a boat", progress=False, seed=3, max_area=64 * 96, frame_num=5, steps=3, shift=5.0).latents
    assert skipped_forwards(single.experts.models) == {"high": (2, 4), "low": (0, 2)}
    for rank, results in ulysses_results.items():
        assert results["fsdp step cache counts"] == {"high": (1, 2), "low": (0, 1)}, rank  # its own branch's forwards
    assert relative(ulysses_results[0]["fsdp step cache"], expected) <= 1e-5  # fp32 rounding of the sharded weights' sums


def test_under_ulysses_the_step_cache_skips_the_steps_one_process_skips(ulysses_results):
    from test_step_cache import MEASURED, MEASURED_SKIPS, counts_of, with_caches
    from test_step_cache import sample as sample_odd

    experts = make_experts()
    with_caches(experts, MEASURED)
    expected = sample_odd(experts)
    for rank, results in ulysses_results.items():
        assert results["sum of ones over 9 tokens"] == [9, 9], rank  # the padding token left out
        assert results["ulysses step cache counts"] == counts_of(MEASURED_SKIPS), rank
        # fp32 rounding of the sharded sums only: the decisions are the same, the closest of the
        # changes to the threshold being 0.07 from it.
        assert relative(results["ulysses step cache"], expected) <= 1e-5, rank
