"""A step cache on the DiT's block stack, in the manner of FirstBlockCache and DBCache: forwards whose
middle blocks would barely change what they add to the stream reuse what they added last time.

At each forward the first F blocks run. The residual they made (their output minus the stack's
input) is compared with the one of the last forward of the same context (expert and guidance
branch) that ran the middle blocks: when the relative L1 change, sum |r - r_ref| / sum |r_ref| over
the whole sequence, is below the threshold, the middle blocks do not run and their residual of that
forward (their output minus their input) is added instead. The last B blocks always run, and so do
the first and the last few steps of the video, each context's first forward (an expert's first
step: its state starts clean) and any forward after K skips in a row.

The decision is one number for the whole sequence: under Ulysses each rank sums its own tokens and
the sums are all-reduced (``HookRegistry.sum_over_tokens``), so every rank takes the same decision,
and the skip is then agreed over every rank whose blocks meet in collectives (FSDP's mesh). Under
CFG parallelism each rank runs its own branch, a context of its own, and decides for itself.

The cached tensors are kept in the blocks' compute dtype (bf16 on a GPU: two [L, C] tensors per
context, 0.8 GB each at 720P on one GPU), saved with the resumable state, and dropped when the loop
goes on to the other expert.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from wan_i2v.models.hooks import BlockHook, PerContext, Pending, StackCall, settle
from wan_i2v.transforms.step_cache_config import StepCacheConfig

__all__ = ["StepCache", "StepCacheConfig", "apply_step_cache", "skipped_forwards", "step_cache_threshold", "step_caches"]


@dataclass
class ContextCache:
    """One context's cache: the first blocks' residual and the middle blocks' of the last forward
    that ran them, and the skips since."""

    reference: torch.Tensor | None = None
    middle: torch.Tensor | None = None
    reuses: int = 0


def _save(cache: ContextCache) -> dict:
    return {"reference": cache.reference, "middle": cache.middle, "reuses": cache.reuses}


def _load(saved: dict) -> ContextCache:
    return ContextCache(saved["reference"], saved["middle"], saved["reuses"])


@dataclass
class Forward:
    """The forward in flight: what the middle blocks' residual and the new reference are measured from."""

    start: torch.Tensor  # the stream entering the middle blocks
    first_residual: torch.Tensor


class StepCache(BlockHook):
    """The cache on one expert's block stack of ``num_layers`` blocks (see the module's docstring)."""

    name = "step cache"

    def __init__(self, config: StepCacheConfig, num_layers: int):
        config.check_blocks(num_layers)
        self.config = config
        self.num_layers = num_layers
        self.first, self.end = config.first_blocks, num_layers - config.last_blocks
        self.skip_points = frozenset({self.first})
        self.contexts: PerContext[ContextCache] = PerContext(ContextCache, _save, _load)
        self.in_flight: Forward | None = None
        self.counts: dict[str, list[int]] = {}  # expert -> [skipped, total] forwards since the last reset
        # The relative change the last forward measured, against the threshold; None where the rules that
        # need no statistic decided (to choose a threshold: the change's scale depends on the weights).
        self.last_change: float | None = None

    def _may_reuse(self, call: StackCall, cache: ContextCache) -> bool:
        """The rules that need no statistic: a cache to reuse, not too many reuses, not a warm-up or final step."""
        context = call.context
        if cache.middle is None or cache.reuses >= self.config.max_reuses:
            return False
        if context.step is None or context.steps is None:
            return True
        return self.config.warmup_steps <= context.step < context.steps - self.config.final_steps

    def skip_blocks(self, call: StackCall, index: int, tokens: torch.Tensor, pending: Pending) -> tuple[int, torch.Tensor, Pending] | None:
        cache = self.contexts[call.context]
        stream = settle(tokens, pending)
        first_residual = (stream - call.tokens).to(call.tokens.dtype)  # kept as it will be cached: less memory while the middle runs
        self.in_flight = Forward(stream, first_residual)
        self.last_change = None
        if not self._may_reuse(call, cache):
            return None
        per_token = torch.stack([(first_residual - cache.reference).abs().sum(-1), cache.reference.abs().sum(-1)]).float()
        change, scale = call.sum_over_tokens(per_token).tolist()
        self.last_change = change / scale if scale > 0 else float("inf")
        if not change < self.config.threshold * scale:
            return None
        return self.end, stream + cache.middle, None

    def before_block(self, call: StackCall, index: int, tokens: torch.Tensor, pending: Pending) -> None:
        if index == self.end:
            self._middle_done(call, settle(tokens, pending))

    def after_stack(self, call: StackCall, output: torch.Tensor) -> None:
        if self.end == self.num_layers and not call.skipped:  # no last blocks: the middle ends the stack
            self._middle_done(call, output)
        counts = self.counts.setdefault(call.context.expert, [0, 0])
        counts[0] += bool(call.skipped_blocks)
        counts[1] += 1

    def _middle_done(self, call: StackCall, stream: torch.Tensor) -> None:
        """The stream leaving the middle blocks: cache what they added, or count a reuse."""
        cache, forward = self.contexts[call.context], self.in_flight
        self.in_flight = None
        if call.skipped_blocks:
            cache.reuses += 1
            return
        cache.reference, cache.middle, cache.reuses = forward.first_residual, (stream - forward.start).to(call.tokens.dtype), 0

    def skipped(self) -> dict[str, tuple[int, int]]:
        """Forwards skipped and forwards run in all, per expert, since the video began (after a
        resume: of the steps this run made)."""
        return {expert: (skipped, total) for expert, (skipped, total) in self.counts.items()}

    def reset(self) -> None:
        self.contexts.reset()
        self.in_flight = None
        self.counts = {}

    def switched_away(self) -> None:
        """The other expert runs now: this one's contexts are dropped (their tensors freed), its counts kept."""
        self.contexts.reset()
        self.in_flight = None

    def state_dict(self) -> dict:
        return self.contexts.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.contexts.load_state_dict(state)


def apply_step_cache(model, config: StepCacheConfig) -> StepCache:
    """Register a step cache on ``model``'s block stack; returns it (its ``skipped()`` counts)."""
    stack = model.block_stack()
    return stack.hooks.register(StepCache(config, len(stack)))


def step_caches(models: dict) -> dict[str, StepCache]:
    """The step cache on each of ``models`` (name -> DiT) that has one, by the model's name."""
    return {name: hook for name, model in models.items() for hook in model.block_stack().hooks if isinstance(hook, StepCache)}


def skipped_forwards(models: dict) -> dict[str, tuple[int, int]]:
    """Per expert, the forwards its step cache skipped and those it saw, of the last video (empty
    without a cache): for the summary and the video's metadata. ``models``: name -> DiT."""
    counts: dict[str, tuple[int, int]] = {}
    for cache in step_caches(models).values():
        counts.update(cache.skipped())
    return counts


@contextmanager
def step_cache_threshold(models: dict, threshold: float):
    """The step caches on ``models`` (name -> DiT) decide with ``threshold`` for what runs inside (a
    job of its own setting on a loaded pipeline), then with their own again."""
    caches = list(step_caches(models).values())
    configs = [cache.config for cache in caches]
    for cache in caches:
        cache.config = replace(cache.config, threshold=threshold)
    try:
        yield
    finally:
        for cache, config in zip(caches, configs):
            cache.config = config
