"""Ulysses sequence parallelism, applied to a DiT from outside by replacing its two seam modules.

Each of the u ranks of a group holds 1/u of the video tokens through the blocks. Around
self-attention an all-to-all turns the sequence shards into head shards (every rank sees all
tokens for H/u heads), the unchanged attention kernel runs, and a second all-to-all turns the
result back. A sequence length that u does not divide is padded with zero tokens at the end;
the padding is masked out of the attention keys, so it changes no real token, and it is cut off
when the shards are gathered for the output head. Hooks on the block stack that would skip it
(a step cache) skip it on every rank of the group or on none: the ranks agree first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from wan_i2v.models.dit import DiT, SelfAttention, SequenceLayout
from wan_i2v.models.hooks import AgreeOver


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """Every rank's ``x``, concatenated on dim 0 in rank order, into ``out``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
    gather(out, x.contiguous(), group=group)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """[u, ...] chunks, chunk j to rank j -> [u, ...], chunk j from rank j. The functional
    collective, which torch.compile traces into the block's graph on every supported torch."""
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), None, None, group))


def sequence_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[..., L/u, H, D] sequence shard -> [..., L, H/u, D] head shard (leading dims kept)."""
    *lead, local, heads, dim = x.shape
    chunks = x.unflatten(-2, (size, heads // size)).movedim(-3, 0)  # [u, ..., L/u, H/u, D]
    return _all_to_all(chunks, group).movedim(0, -4).flatten(-4, -3)


def heads_to_sequence(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, L, H/u, D] head shard -> [B, L/u, H, D] sequence shard."""
    chunks = x.unflatten(1, (size, -1)).movedim(1, 0)  # [u, B, L/u, H/u, D]
    return _all_to_all(chunks, group).movedim(0, 2).flatten(2, 3)


class UlyssesSequence(SequenceLayout):
    """Pads the tokens to a multiple of u and keeps this rank's contiguous 1/u of them."""

    def __init__(self, group):
        super().__init__()
        self.group = group
        self.size = dist.get_world_size(group)
        self.index = dist.get_rank(group)
        self.length = None  # the real length of the sequence in flight, set by scatter

    def scatter(self, tokens, rope):
        batch, length = tokens.shape[:2]
        padded = -(-length // self.size) * self.size
        self.length = length
        local = slice(self.index * padded // self.size, (self.index + 1) * padded // self.size)
        key_mask = None
        if padded != length:
            tokens = F.pad(tokens, (0, 0, 0, padded - length))
            rope = tuple(F.pad(table, (0, 0, 0, padded - length)) for table in rope)
            key_mask = torch.arange(padded, device=tokens.device).lt(length).expand(batch, padded)
        return tokens[:, local], tuple(table[local] for table in rope), key_mask

    def per_token(self, per_frame: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """[B, F, ...] values of each latent frame -> [B, L/u, ...] for this rank's tokens alone: the
        whole sequence's would be u times the memory (TI2V-5B's modulation: 72 KB a token in fp32). The
        padding takes the last frame's: its tokens are masked out and cut off."""
        local = -(-self.length // self.size)
        position = self.index * local + torch.arange(local, device=per_frame.device)
        frames = (position // tokens_per_frame).clamp_(max=per_frame.shape[1] - 1)
        return per_frame.index_select(1, frames)

    def sum_over_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """[k, B, L/u] per-token values of this rank's shard -> their k sums over the batch and every
        real token of the group's sequence (the padding left out): the same numbers on every rank."""
        local = values.shape[-1]
        position = self.index * local + torch.arange(local, device=values.device)
        sums = values.masked_fill(position >= self.length, 0).flatten(1).sum(1)
        dist.all_reduce(sums, group=self.group)
        return sums

    def gather(self, tokens):
        shards = tokens.new_empty(self.size * tokens.shape[0], *tokens.shape[1:])
        all_gather_into(shards, tokens, self.group)
        return shards.unflatten(0, (self.size, -1)).movedim(0, 1).flatten(1, 2)[:, : self.length]


class UlyssesAttention(nn.Module):
    """All-to-all to head shards, the wrapped attention over the whole sequence, and back."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group
        self.size = dist.get_world_size(group)

    def forward(self, q, k, v, key_mask=None):
        q, k, v = sequence_to_heads(torch.stack([q, k, v]), self.group, self.size).unbind(0)
        return heads_to_sequence(self.inner(q, k, v, key_mask), self.group, self.size)


def apply_ulysses(model: DiT, group) -> DiT:
    """Shard ``model``'s token sequence over ``group`` (whose size must divide the heads)."""
    size = dist.get_world_size(group)
    if model.config.num_heads % size:
        raise ValueError(f"Ulysses degree {size} does not divide {model.config.num_heads} heads")
    model.sequence = UlyssesSequence(group)
    stack = model.block_stack()
    for attention in [module for module in stack.modules() if isinstance(module, SelfAttention)]:
        attention.attention = UlyssesAttention(attention.attention, group)
    # The block stack's hooks hold this rank's tokens, and skip the blocks on every rank or none.
    stack.hooks.shard = f"ulysses {dist.get_rank(group)} of {size}"
    stack.hooks.agree_to_skip = AgreeOver(group)
    stack.hooks.sum_over_tokens = model.sequence.sum_over_tokens
    return model
