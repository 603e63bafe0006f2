"""Weight streaming: the same output, with exactly the running block and the ``ahead`` after it resident."""

import copy

import pytest
import torch

from wan_i2v.models.dit import DiT, DiTConfig
from wan_i2v.tiny import randomize_
from wan_i2v.transforms.streaming import BlockOffload, ExpertSwap

CONFIG = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=4, text_len=8, text_dim=16)


def tiny_dit(seed: int) -> DiT:
    return randomize_(DiT(CONFIG), seed=seed).eval()


def dit_inputs():
    return (torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 16), torch.randn(1, 20, 2, 4, 4))


@pytest.mark.parametrize("ahead", [1, 2])
def test_block_offload_streams_blocks_and_changes_nothing(ahead):
    model = tiny_dit(seed=0)
    streamed = copy.deepcopy(model)
    offload = BlockOffload(streamed, "cpu", ahead=ahead)
    seen = []
    for index, block in enumerate(streamed.blocks):
        # On a module inside the block: what is resident while the block computes.
        block.ffn.register_forward_hook(lambda module, args, output, index=index: seen.append((index, offload.resident_blocks())))
    inputs = dit_inputs()
    with torch.no_grad():
        expected = model(*inputs)
        for _ in range(2):
            seen.clear()
            assert torch.equal(streamed(*inputs), expected)
            assert [index for index, _ in seen] == [0, 1, 2, 3]
            for index, resident in seen:
                assert resident == sorted({(index + step) % 4 for step in range(ahead + 1)}), (index, resident)
    # Between forwards the blocks prefetched for the next forward hold device copies.
    assert offload.resident_blocks() == list(range(ahead))
    offload.remove()
    assert offload.resident_blocks() == []
    assert all(not block._forward_pre_hooks and not block._forward_hooks for block in streamed.blocks)


def test_expert_swap_and_block_offload_give_the_plain_models_output():
    high, low = tiny_dit(seed=0), tiny_dit(seed=1)
    swap = ExpertSwap(copy.deepcopy(high), copy.deepcopy(low), boundary=875, device="cpu")
    offloaded = copy.deepcopy(high)
    BlockOffload(offloaded, "cpu")
    inputs = dit_inputs()
    with torch.no_grad():
        for name, plain in (("high", high), ("low", low), ("high", high)):
            expert = swap.activate(name)
            assert swap.streams[name].resident_blocks() == [0, 1, 2, 3]  # the whole expert, streamed ahead
            assert torch.equal(expert(*inputs), plain(*inputs))
        assert torch.equal(offloaded(*inputs), high(*inputs))
    swap.release()
    assert swap.active is None and all(stream.resident_blocks() == [] for stream in swap.streams.values())
    swap.remove()
