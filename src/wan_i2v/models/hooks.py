"""The seam inside a DiT's forward: hooks on its block stack (diffusers' ``hooks/`` is the model).

A :class:`BlockHook` sees each run of the stack (``before_stack`` may hand back the stack's output
and so skip every block), each block's input and output (and may replace them), may skip a span of
blocks from one of its declared ``skip_points`` (``skip_blocks``: a step cache that always runs the
first and last blocks) and sees the stack's output. A hook keeps state, cleared by ``reset`` at the
start of each video and saved with the resumable state (``state_dict``), kept apart per context
where it must be (:class:`PerContext`): the sampling loop sets the context (the expert, the guidance
branch and the step) around each model call, and tells the hooks when it leaves their expert.

A block's input and output are the residual stream as the blocks pass it on: ``(tokens, pending)``,
where ``pending`` is the previous block's last residual term ``(update, gate)``, not yet added (the
next block's norm adds it: see ``dit.Block``); ``settle`` adds it.

With no hook registered the stack runs its plain loop: nothing is added per block but a check of
a local. The hooks run eagerly, outside any compiled graph (the blocks are compiled one by one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.distributed as dist

# A block's input or output: the residual stream and the term not yet added to it.
Pending = tuple[torch.Tensor, torch.Tensor] | None


def settle(tokens: torch.Tensor, pending: Pending) -> torch.Tensor:
    """The residual stream with its pending term added."""
    if pending is None:
        return tokens
    update, gate = pending
    return tokens + update * gate


@dataclass(frozen=True)
class HookContext:
    """Whose model call it is: the expert's name and the guidance branch ("cond", "uncond" or "both"),
    and the loop's step (0-based) of ``steps``."""

    expert: str | None = None
    branch: str | None = None
    step: int | None = None
    steps: int | None = None

    @property
    def key(self) -> str:
        """The context as a string, to key saved states by."""
        return f"{self.expert}/{self.branch}"


@dataclass
class StackCall:
    """One run of the block stack as hooks see it. ``tokens``: the stack's input (this rank's tokens
    under sequence parallelism); ``modulation``: the timestep modulation [B, 1 or L, 6, C] the blocks take;
    ``skipped``: the blocks did not run, the hooks' output was taken instead; ``skipped_blocks``: the
    span of blocks a hook's ``skip_blocks`` took the place of (empty: none); ``sum_over_tokens``: the
    registry's (sums per-token values over the whole sequence, every rank's shard)."""

    context: HookContext
    tokens: torch.Tensor
    modulation: torch.Tensor
    sum_over_tokens: Callable[[torch.Tensor], torch.Tensor]
    skipped: bool = False
    skipped_blocks: range = range(0)


class BlockHook:
    """Override what you need. ``name`` (if set) keys the hook's ``state_dict`` in the saved loop
    state; a hook with state must set it, or a resumed run would start it afresh."""

    name: str | None = None
    # The blocks before which ``skip_blocks`` is asked. Declared, not decided per call: the ranks of a
    # parallel run agree on a skip at each of them, so all of them must ask there.
    skip_points: frozenset[int] = frozenset()

    def before_stack(self, call: StackCall) -> torch.Tensor | None:
        """A returned tensor is the stack's output: no block runs (if every rank of a sequence-parallel
        group returns one: the ranks agree, else the blocks run on all of them)."""
        return None

    def skip_blocks(self, call: StackCall, index: int, tokens: torch.Tensor, pending: Pending) -> tuple[int, torch.Tensor, Pending] | None:
        """Before block ``index`` (one of ``skip_points``), its input: a returned (end, tokens, pending)
        is the stream after blocks ``index`` to ``end`` - 1, which then do not run (if every rank of
        the group returns one, as for ``before_stack``); ``call.skipped_blocks`` says whether they ran."""
        return None

    def before_block(self, call: StackCall, index: int, tokens: torch.Tensor, pending: Pending) -> tuple[torch.Tensor, Pending] | None:
        """Block ``index``'s input; a returned (tokens, pending) replaces it."""
        return None

    def after_block(self, call: StackCall, index: int, tokens: torch.Tensor, pending: Pending) -> tuple[torch.Tensor, Pending] | None:
        """Block ``index``'s output; a returned (tokens, pending) replaces it."""
        return None

    def after_stack(self, call: StackCall, output: torch.Tensor) -> torch.Tensor | None:
        """The stack's output (the hooks' when ``call.skipped``); a returned tensor replaces it."""
        return None

    def reset(self) -> None:
        """Forget what earlier videos left: called before each video."""

    def switched_away(self) -> None:
        """The loop went on to another expert: what was kept for this stack's next call is of no more
        use (a call after a switch back starts clean), and may be dropped to free its memory."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def decide_alone(skip: bool, device: torch.device) -> bool:
    """No other process runs these blocks with this one: its hooks' wish is the decision."""
    return skip


def sum_whole_sequence(values: torch.Tensor) -> torch.Tensor:
    """[k, B, L] per-token values of the whole sequence -> their k sums over batch and tokens."""
    return values.flatten(1).sum(1)


class AgreeOver:
    """The stack is skipped only if every rank of ``group`` would skip it: ranks whose blocks meet in
    collectives (Ulysses' all-to-alls, FSDP's gathers) must all run them or none, and a rank whose
    hooks have nothing to offer must run them."""

    def __init__(self, group):
        self.group = group

    def __call__(self, skip: bool, device: torch.device) -> bool:
        flag = torch.tensor([int(skip)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


class HookRegistry:
    """The hooks of one block stack, in the order they run, and the context of the call in flight.

    Parallelism sets the three facts the hooks need of it: ``shard``, which tokens this process holds
    (its hook states are saved under that key: "whole", or a Ulysses rank's), ``agree_to_skip(skip,
    device)``, which turns this process's wish to skip blocks into the decision of every process
    whose blocks meet its own in collectives (``AgreeOver`` a group), and ``sum_over_tokens(values)``,
    which sums [k, B, L] per-token values over every real token of the sequence, the other ranks'
    shards included, so that a statistic a hook decides by is the whole sequence's on every rank."""

    def __init__(self):
        self.hooks: list[BlockHook] = []
        self.skip_points: frozenset[int] = frozenset()
        self.current = HookContext()
        self.shard = "whole"
        self.agree_to_skip: Callable[[bool, torch.device], bool] = decide_alone
        self.sum_over_tokens: Callable[[torch.Tensor], torch.Tensor] = sum_whole_sequence

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def __iter__(self) -> Iterator[BlockHook]:
        return iter(self.hooks)

    def register(self, hook: BlockHook) -> BlockHook:
        if hook.name is not None and any(other.name == hook.name for other in self.hooks):
            raise ValueError(f"a block hook named {hook.name!r} is registered already")
        self.hooks.append(hook)
        self.skip_points |= hook.skip_points
        return hook

    def remove(self, hook: BlockHook) -> None:
        self.hooks.remove(hook)
        self.skip_points = frozenset().union(*(other.skip_points for other in self.hooks))

    @contextmanager
    def context(self, *, expert: str | None = None, branch: str | None = None, step: int | None = None, steps: int | None = None):
        """The model calls made inside are ``expert``'s, for guidance branch ``branch``, at step ``step`` of ``steps``."""
        outer, self.current = self.current, HookContext(expert, branch, step, steps)
        try:
            yield self.current
        finally:
            self.current = outer

    def reset(self) -> None:
        for hook in self.hooks:
            hook.reset()

    def switched_away(self) -> None:
        for hook in self.hooks:
            hook.switched_away()

    def state_dict(self) -> dict:
        """The named hooks' states under this process's shard key (empty without named hooks), so that
        the states of all the ranks of a run can be merged into one (``merge_states``)."""
        states = {hook.name: hook.state_dict() for hook in self.hooks if hook.name is not None}
        return {self.shard: states} if states else {}

    def load_state_dict(self, saved: dict) -> None:
        """Each named hook takes its state saved for this process's shard; one with none starts afresh."""
        states = saved.get(self.shard, {})
        for hook in self.hooks:
            if hook.name is None:
                continue
            if hook.name in states:
                hook.load_state_dict(states[hook.name])
            else:
                hook.reset()

    # What the stack calls. Kept out of any graph torch.compile traces: hooks are Python with state.

    @torch.compiler.disable
    def begin(self, tokens: torch.Tensor, modulation: torch.Tensor) -> tuple[StackCall, torch.Tensor | None]:
        """Every hook's ``before_stack``; returns the call and the output to take instead of the blocks, if
        the ranks agreed to skip them (the first hook's that offered one)."""
        call = StackCall(self.current, tokens, modulation, self.sum_over_tokens)
        offered = None
        for hook in self.hooks:
            output = hook.before_stack(call)
            if offered is None:
                offered = output
        call.skipped = self.agree_to_skip(offered is not None, tokens.device)
        return call, offered if call.skipped else None

    @torch.compiler.disable
    def skip_blocks(self, call: StackCall, index: int, tokens: torch.Tensor, pending: Pending) -> tuple[int, torch.Tensor, Pending] | None:
        """At a skip point, every hook's ``skip_blocks`` that declared it; returns the first offer,
        if the ranks agreed to take it (and notes its span in ``call.skipped_blocks``), else None."""
        if index not in self.skip_points:
            return None
        offered = None
        for hook in self.hooks:
            if index in hook.skip_points:
                offer = hook.skip_blocks(call, index, tokens, pending)
                if offered is None:
                    offered = offer
        if not self.agree_to_skip(offered is not None, tokens.device):
            return None
        end = offered[0]
        if end <= index:
            raise ValueError(f"a block hook offered to skip from block {index} to block {end}")
        call.skipped_blocks = range(index, end)
        return offered

    @torch.compiler.disable
    def before_block(self, call: StackCall, index: int, tokens: torch.Tensor, pending: Pending) -> tuple[torch.Tensor, Pending]:
        return self._around_block("before_block", call, index, tokens, pending)

    @torch.compiler.disable
    def after_block(self, call: StackCall, index: int, tokens: torch.Tensor, pending: Pending) -> tuple[torch.Tensor, Pending]:
        return self._around_block("after_block", call, index, tokens, pending)

    def _around_block(self, method: str, call: StackCall, index: int, tokens: torch.Tensor, pending: Pending) -> tuple[torch.Tensor, Pending]:
        """Each hook's ``method`` in turn, each seeing what the one before it may have replaced."""
        for hook in self.hooks:
            replaced = getattr(hook, method)(call, index, tokens, pending)
            if replaced is not None:
                tokens, pending = replaced
        return tokens, pending

    @torch.compiler.disable
    def end(self, call: StackCall, output: torch.Tensor) -> torch.Tensor:
        for hook in self.hooks:
            replaced = hook.after_stack(call, output)
            if replaced is not None:
                output = replaced
        return output


def merge_states(states: list[dict]) -> dict:
    """Several processes' saved hook states as one: dicts merged key by key (each rank's states are
    under its own shard key and context), the first process's value kept where two hold the same key."""
    merged: dict = {}
    for state in states:
        for key, value in state.items():
            if key not in merged:
                merged[key] = value
            elif isinstance(merged[key], dict) and isinstance(value, dict):
                merged[key] = merge_states([merged[key], value])
    return merged


State = TypeVar("State")


class PerContext(Generic[State]):
    """A hook's state kept apart per context (expert and guidance branch), made by ``new()`` on first
    use: a step cache must not give the unconditional branch the conditional one's output.
    ``save(state)`` and ``load(saved)`` turn one context's state into what ``torch.save`` keeps
    (tensors, numbers, strings, lists and dicts) and back."""

    def __init__(self, new: Callable[[], State], save: Callable[[State], dict], load: Callable[[dict], State]):
        self.new, self.save, self.load = new, save, load
        self.states: dict[str, State] = {}

    def __getitem__(self, context: HookContext) -> State:
        if context.key not in self.states:
            self.states[context.key] = self.new()
        return self.states[context.key]

    def reset(self) -> None:
        self.states.clear()

    def state_dict(self) -> dict:
        return {key: self.save(state) for key, state in self.states.items()}

    def load_state_dict(self, saved: dict) -> None:
        self.states = {key: self.load(state) for key, state in saved.items()}
