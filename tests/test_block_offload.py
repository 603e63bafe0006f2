"""Block offload: the same output, with at most the running block and the next one resident."""

import copy

import torch

from wan_i2v.block_offload import BlockOffload
from wan_i2v.models.dit import DiT, DiTConfig
from wan_i2v.tiny import randomize_


def test_block_offload_streams_blocks_and_changes_nothing():
    config = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=4, text_len=8, text_dim=16)
    model = randomize_(DiT(config), seed=0).eval()
    streamed = copy.deepcopy(model)
    offload = BlockOffload(streamed, "cpu")
    seen = []
    for index, block in enumerate(streamed.blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: seen.append((index, offload.resident_blocks())))
    inputs = (torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 16), torch.randn(1, 20, 2, 4, 4))
    with torch.no_grad():
        expected = model(*inputs)
        for _ in range(2):
            seen.clear()
            assert torch.equal(streamed(*inputs), expected)
            assert [index for index, _ in seen] == [0, 1, 2, 3]
            for index, resident in seen:
                assert resident == sorted({index, (index + 1) % 4}), (index, resident)
    # Between forwards only block 0 (prefetched for the next forward) holds a device copy.
    assert offload.resident_blocks() == [0]
    offload.remove()
    assert offload.resident_blocks() == []
