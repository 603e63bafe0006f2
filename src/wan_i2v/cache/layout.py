"""Where the checkpoints live, one hub repository per model, and what a complete one is.

The cache root is found in this order: `--cache-dir`, then `WAN_I2V_HOME`, then the Hugging Face hub
cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`). Every root uses the hub's
cache layout, so a snapshot downloaded with `huggingface-cli` is found and completed, never fetched again:

    <root>/models--Wan-AI--Wan2.2-I2V-A14B/   (a model's repository: its spec's repo_id)
        blobs/<sha256 or git oid>[.incomplete]
        refs/main                        the commit of the newest listing
        snapshots/<commit>/...           files from the hub (links into blobs/)
        snapshots/modelscope/...         files from ModelScope
        snapshots/*/wan-i2v-manifest.json

The checkpoint directory (what `--ckpt-dir` takes) is one snapshot folder. The commands take the
model's spec (``models/spec.py``); the default model's where none is named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects

from wan_i2v.cache.manifest import FileEntry, Manifest
from wan_i2v.errors import WanError
from wan_i2v.models.spec import DEFAULT_SPEC, SPECS, ModelSpec, spec_for

# The model whose checkpoint the cache commands keep unless told another (--model).
SPEC = spec_for(DEFAULT_SPEC)

# File states, as `status` shows them.
MISSING, PARTIAL, WRONG_SIZE, CORRUPT, PRESENT, VERIFIED = (
    "missing", "partial", "wrong size", "corrupt", "present", "verified"
)
USABLE = (PRESENT, VERIFIED)


@dataclass(frozen=True)
class HubFiles:
    """Files of one hub repository that the cache keeps (the model's checkpoint, a LoRA pair, one
    hf:// file), fetched by the same machinery: listed with their hashes, resumed, verified."""

    repo_id: str
    patterns: tuple[str, ...]  # huggingface_hub's allow_patterns; each must match a file of the repository
    revision: str = "main"
    fetched_by: str = "`wan-i2v cache quick`"  # the command that fetches them (again)
    missing_hint: str = "the repository layout changed; update wan-i2v"  # when a pattern matches no file

    @property
    def folder(self) -> str:
        """The hub cache's folder of the repository."""
        return repo_folder_name(repo_id=self.repo_id, repo_type="model")


def model_files(spec: ModelSpec | str = SPEC) -> HubFiles:
    """The files of ``spec``'s hub repository a run of it needs (its ``hub_patterns``)."""
    spec = spec_for(spec)
    command = "`wan-i2v cache quick`" if spec is SPEC else f"`wan-i2v cache quick --model {spec.aliases[0]}`"
    return HubFiles(spec.repo_id, spec.hub_patterns(), fetched_by=command)


# The default model's checkpoint.
MODEL_FILES = model_files(SPEC)


def required_paths(repo_paths, files: HubFiles = MODEL_FILES) -> list[str]:
    """The repository paths ``files`` names (the model's: the spec's ``hub_patterns``); every pattern must match at least one."""
    paths, patterns = sorted(repo_paths), list(files.patterns)
    unmatched = [p for p in patterns if not list(filter_repo_objects(paths, allow_patterns=[p]))]
    if unmatched:
        raise WanError(f"{files.repo_id} lists no file for {', '.join(unmatched)}", hint=files.missing_hint)
    return list(filter_repo_objects(paths, allow_patterns=patterns))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("WAN_I2V_HOME") or constants.HF_HUB_CACHE).expanduser()


def repo_folder(root: Path, files: HubFiles = MODEL_FILES) -> Path:
    return root / files.folder


def blob_path(checkpoint_dir: Path, entry: FileEntry) -> Path | None:
    """Where the hub layout keeps this file's content; None outside that layout (a plain --ckpt-dir)."""
    if checkpoint_dir.parent.name != "snapshots" or entry.digest is None:
        return None
    return checkpoint_dir.parent.parent / "blobs" / entry.hex_digest


def partial_path(blob: Path) -> Path:
    # A stable name, unlike huggingface_hub's per-process one, so a later run resumes it.
    return blob.with_name(blob.name + ".incomplete")


def inspect(checkpoint_dir: Path, entry: FileEntry) -> tuple[str, int]:
    """The file's state and how many of its bytes are on disk."""
    try:
        stat = (checkpoint_dir / entry.path).stat()
    except FileNotFoundError:  # also a link whose blob is gone
        blob = blob_path(checkpoint_dir, entry)
        if blob is not None and partial_path(blob).is_file():
            return PARTIAL, partial_path(blob).stat().st_size
        return MISSING, 0
    if stat.st_size != entry.size:
        return WRONG_SIZE, stat.st_size
    if entry.corrupt:
        return CORRUPT, stat.st_size
    return (VERIFIED if entry.verified_mtime_ns == stat.st_mtime_ns else PRESENT), stat.st_size


def is_complete(checkpoint_dir: Path, manifest: Manifest) -> bool:
    return all(inspect(checkpoint_dir, entry)[0] in USABLE for entry in manifest.files)


def find_checkpoint_dir(root: Path, spec: ModelSpec | str = SPEC) -> Path | None:
    """``spec``'s snapshot to use: the newest listing's (refs/main) unless only another one is complete."""
    repo = repo_folder(root, model_files(spec))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    newest = snapshots / ref.read_text().strip() if ref.is_file() else None
    others = sorted((d for d in snapshots.iterdir() if d.is_dir() and d != newest), key=lambda d: d.stat().st_mtime, reverse=True)
    candidates = [d for d in [newest] if d is not None and d.is_dir()] + others
    for candidate in candidates:
        manifest = Manifest.load(candidate)
        if manifest and is_complete(candidate, manifest):
            return candidate
    return candidates[0] if candidates else None


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again, as HF_ENDPOINT is, so a setting made later counts.
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def cached_model(checkpoint_dir: Path) -> ModelSpec | None:
    """The model whose repository in a cache this checkpoint directory is a snapshot of; None for a folder of the user's own."""
    snapshots = checkpoint_dir.absolute().parent
    if snapshots.name != "snapshots":
        return None
    return next((spec for spec in SPECS.values() if snapshots.parent.name == spec.repo_folder), None)


def cache_root_of(checkpoint_dir: Path) -> Path | None:
    """The cache root this checkpoint directory is a snapshot of; None for a folder of the user's own."""
    return checkpoint_dir.absolute().parent.parent.parent if cached_model(checkpoint_dir) is not None else None


def model_option(spec: ModelSpec | str) -> str:
    """The cache commands' --model for ``spec`` ("" for the default model's)."""
    spec = spec_for(spec)
    return "" if spec is SPEC else f" --model {spec.aliases[0]}"


def repair_advice(checkpoint_dir: Path) -> str:
    """What mends missing or cut-short files of this checkpoint directory."""
    root, spec = cache_root_of(checkpoint_dir), cached_model(checkpoint_dir)
    if root is None:
        # wan-i2v downloads only into its cache, and a 100 GB download is no answer for one file anyway.
        return f"copy complete files into {checkpoint_dir} again"
    when = ", once HF_HUB_OFFLINE is unset" if hub_offline() else ""
    return f"`wan-i2v cache quick{model_option(spec)}{_cache_dir_option(root)}` fetches the files missing or wrong, resuming partial ones{when}"


def loading_hint(checkpoint_dir: Path) -> str:
    """The hint of a loading error about one file of this checkpoint directory: where to see them all, what mends them."""
    root = cache_root_of(checkpoint_dir)
    status = f"status{model_option(cached_model(checkpoint_dir))}{_cache_dir_option(root)}" if root is not None else f"status --ckpt-dir {checkpoint_dir}"
    return f"`wan-i2v cache {status}` lists every missing or unreadable file; {repair_advice(checkpoint_dir)}"


def _cache_dir_option(root: Path) -> str:
    return "" if root.resolve() == cache_root().resolve() else f" --cache-dir {root}"


def resolve_checkpoint_dir(cache_dir: str | os.PathLike | None = None, spec: ModelSpec | str = SPEC) -> Path:
    """``spec``'s checkpoint directory that `generate` uses by default (see the module docstring for the order)."""
    root = cache_root(cache_dir)
    if root.exists() and not root.is_dir():
        raise WanError(f"the cache {root} is a file, not a directory", hint="give the cache's directory with --cache-dir or WAN_I2V_HOME")
    found = find_checkpoint_dir(root, spec)
    if found is None:
        raise WanError(f"no {spec_for(spec).repo_id} checkpoint in {root}", hint=f"run `wan-i2v cache quick{model_option(spec)}`, or pass --ckpt-dir")
    return found
