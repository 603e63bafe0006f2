"""What the loaded plan can run. A request whose memory estimate, on the plan the server loaded, does
not fit the memory that plan was made for is refused at submission: run, it would kill the server, and
again at every restart."""

from __future__ import annotations

from dataclasses import dataclass

from wan_i2v.execution import PlannedRun
from wan_i2v.parallel.plan import ModelSizes


@dataclass(frozen=True)
class Capacity:
    planned: PlannedRun  # the plan the server loaded, and the GPU and host memory it was made for
    sizes: ModelSizes
    spawned: bool = False  # this process started the ranks (it holds the video too)

    def fits(self, frame_num: int, height: int, width: int) -> bool:
        from wan_i2v.models.spec import spec_for
        from wan_i2v.parallel.plan import estimate_host_memory

        plan, pixels = self.planned.plan, height * width
        tokens = spec_for(plan.model).dit_tokens(frame_num, height, width)
        gpu = plan.estimate(self.sizes, tokens=tokens, pixels=pixels)
        host = estimate_host_memory(plan.dims, self.sizes, gpu, pixels=pixels, frames=frame_num, offload=plan.offload.flag,
                                    on_gpu=plan.on_gpu, spawned=self.spawned, tokens=tokens, step_cache_bytes=plan.step_cache_bytes)  # fmt: skip
        return gpu.fits(self.planned.gpu_bytes if plan.on_gpu else self.planned.host_bytes) and host.fits(self.planned.host_bytes)

    def largest_frame_num(self, height: int, width: int) -> int | None:
        """The most frames (4n+1) a video of this size fits in (None: not even the fewest)."""
        from wan_i2v.config import MAX_FRAMES

        counts = range(5, MAX_FRAMES + 1, 4)
        low, high = 0, len(counts)  # the estimate grows with the frame count: the first that does not fit, by bisection
        while low < high:
            middle = (low + high) // 2
            if self.fits(counts[middle], height, width):
                low = middle + 1
            else:
                high = middle
        return counts[low - 1] if low else None

    def refusal(self, frame_num: int, height: int, width: int) -> str | None:
        """Why a video of this shape cannot run on this server, in one line (None: it fits)."""
        if self.fits(frame_num, height, width):
            return None
        largest = self.largest_frame_num(height, width)
        room = f"at most {largest} frames at this size" if largest else "no frame count fits at this size"
        return (f"a video of {width}x{height} with {frame_num} frames does not fit the memory this server was planned for "
                f"({room}); use a smaller size or a smaller frame_num (GET /v1/models says what fits)")  # fmt: skip
