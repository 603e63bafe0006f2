"""The model cache: download, manifest, verify, status, relocate (`wan-i2v cache`).

Independent of the engine, but for the loader's file names: `status` checks the files it opens.
The engine uses `resolve_checkpoint_dir()` for its default checkpoint and `CHECKPOINT_PATTERNS` for
what a complete checkpoint is.
"""

from wan_i2v.cache.cli import add_cache_parser
from wan_i2v.cache.layout import CHECKPOINT_PATTERNS, REPO_ID, cache_root, resolve_checkpoint_dir
from wan_i2v.cache.manifest import MANIFEST_NAME

__all__ = ["CHECKPOINT_PATTERNS", "MANIFEST_NAME", "REPO_ID", "add_cache_parser", "cache_root", "resolve_checkpoint_dir"]
