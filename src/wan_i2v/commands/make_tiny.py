"""`wan-i2v make-tiny-checkpoint`: a tiny random checkpoint in the official layout."""

from __future__ import annotations

from pathlib import Path

from wan_i2v.errors import WanError
from wan_i2v.models.spec import DEFAULT_SPEC
from wan_i2v.tiny import write_tiny_checkpoint


def run(args) -> int:
    target = Path(args.directory)
    if target.exists():
        raise WanError(f"{target} already exists", "give a new directory")
    print(write_tiny_checkpoint(target, seed=args.seed, spec=args.model or DEFAULT_SPEC))
    return 0
