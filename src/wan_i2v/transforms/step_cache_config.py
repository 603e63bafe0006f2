"""The step cache's settings (``--step-cache``), apart from the cache itself so that the options can
be read and checked without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wan_i2v.errors import WanError, option


@dataclass(frozen=True)
class StepCacheConfig:
    """When a forward may reuse the middle blocks' residual of an earlier step (``transforms/step_cache.py``).

    ``threshold``: the relative change of the first blocks' residual below which the middle blocks are
    skipped (0: the cache is off); ``first_blocks`` (F) and ``last_blocks`` (B): the blocks that always
    run; ``max_reuses`` (K): consecutive skips of one context at most; ``warmup_steps`` and
    ``final_steps``: the first and last steps of the video, which always run."""

    threshold: float = 0.0
    first_blocks: int = 1
    last_blocks: int = 0
    max_reuses: int = 3
    warmup_steps: int = 2
    final_steps: int = 1

    def __post_init__(self):
        # (types first: a string from Python code would otherwise fail later, as a traceback)
        if not _is_number(self.threshold) or not self.threshold >= 0:  # also refuses NaN
            raise WanError(f"{option('step_cache', self.threshold)} is not a threshold", "give 0 (off) or a relative change such as 0.1")
        if not all(_is_whole(count) for count in (self.first_blocks, self.last_blocks)):
            raise WanError(f"{option('step_cache_blocks', f'{self.first_blocks},{self.last_blocks}')} is not F,B",
                           "give the first and the last blocks that always run, such as 1,0")  # fmt: skip
        if not _is_whole(self.max_reuses):
            raise WanError(f"{option('step_cache_max', self.max_reuses)} is not a whole number", "give 1 or more, or leave the cache off")
        if self.first_blocks < 1 or self.last_blocks < 0:
            raise WanError(f"{option('step_cache_blocks', f'{self.first_blocks},{self.last_blocks}')}: the first blocks must be 1 or more and the last 0 or more",
                           "the first blocks' change decides, so at least one must run")  # fmt: skip
        if self.max_reuses < 1:
            raise WanError(f"{option('step_cache_max', self.max_reuses)}: at most 0 reuses would never skip", "give 1 or more, or leave the cache off")
        if self.warmup_steps < 0 or self.final_steps < 0:
            raise WanError(f"the step cache's warm-up and final steps must be 0 or more, not {self.warmup_steps} and {self.final_steps}")

    @property
    def on(self) -> bool:
        return self.threshold > 0

    def check_blocks(self, num_layers: int) -> None:
        """The model has blocks between the first and the last that run: else nothing could be skipped."""
        if self.first_blocks + self.last_blocks >= num_layers:
            raise WanError(f"{option('step_cache_blocks', f'{self.first_blocks},{self.last_blocks}')} leaves none of the model's {num_layers} blocks to skip",
                           f"the first and last blocks together must be fewer than {num_layers}")  # fmt: skip

    def as_dict(self) -> dict:
        """What a video's metadata records of the setting."""
        return asdict(self)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
