"""The model cache: download, manifest, verify, status, relocate (`wan-i2v cache`).

Independent of the engine, but for the loader's file names: `status` checks the files it opens.
The engine uses `resolve_checkpoint_dir()` for its default checkpoint; the cache keeps each model in
its own hub repository folder, and what a complete checkpoint is comes from the model's spec
(`hub_patterns()` and `needed_files()`, `models/spec.py`); `SPEC` is the default model's.
"""

from wan_i2v.cache.cli import add_cache_parser
from wan_i2v.cache.layout import SPEC, cache_root, resolve_checkpoint_dir
from wan_i2v.cache.manifest import MANIFEST_NAME

__all__ = ["MANIFEST_NAME", "SPEC", "add_cache_parser", "cache_root", "resolve_checkpoint_dir"]
