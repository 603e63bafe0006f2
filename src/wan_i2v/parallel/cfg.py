"""CFG parallelism: the conditional and unconditional passes on two halves of the ranks at once."""

from __future__ import annotations

from wan_i2v.parallel.ulysses import all_gather_into
from wan_i2v.sampling.guidance import ClassifierFreeGuidance, Conditioning, combine


class ParallelGuidance(ClassifierFreeGuidance):
    """Half ``index`` (0: conditional, 1: unconditional) runs its pass; the two flows are exchanged
    over ``group`` (this rank and its peer in the other half) and combined as on one GPU. (The
    planner leaves CFG parallel out when guidance is off; a step at scale 1 here still runs both.)"""

    def __init__(self, conditioning: Conditioning, group, index: int):
        super().__init__(conditioning, batched=False)
        self.group, self.index = group, index

    def __call__(self, call, latent, timestep, scale):
        branch = ("cond", "uncond")[self.index]
        mine = call(branch, latent, timestep, self.contexts[self.index], self.condition).contiguous()
        both = mine.new_empty(2 * mine.shape[0], *mine.shape[1:])
        all_gather_into(both, mine, self.group)
        cond, uncond = both.chunk(2)
        return cond if scale == 1 else combine(cond, uncond, scale)  # as on one GPU, which runs only cond then
