"""The manifest beside the weights (`wan-i2v-manifest.json`): the files of the checkpoint with their
sizes and published hashes, where they came from, and what the last verification found.

It is written when the file list is fetched, so `status` and `verify` work offline afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from wan_i2v.errors import WanError

MANIFEST_NAME = "wan-i2v-manifest.json"
_READ_BLOCK = 8 << 20


@dataclass
class FileEntry:
    path: str  # inside the repository, "/"-separated
    size: int
    # "sha256:<hex>" for large (LFS) files, "git-sha1:<hex>" for small files on the hub (their git
    # blob id); None where the source publishes no hash, so only the size can be checked.
    digest: str | None
    # The file's mtime when its hash last matched: touching the file afterwards un-verifies it.
    verified_mtime_ns: int | None = None
    corrupt: bool = False

    @property
    def hex_digest(self) -> str:
        return self.digest.split(":", 1)[1]

    def new_hasher(self):
        if self.digest.startswith("sha256:"):
            return hashlib.sha256()
        # git hashes a header with the size before the content
        return hashlib.sha1(b"blob %d\0" % self.size)

    def record_check(self, path: Path, matches: bool) -> None:
        self.corrupt = not matches
        self.verified_mtime_ns = path.stat().st_mtime_ns if matches else None


@dataclass
class Manifest:
    repo_id: str
    source: str  # "hf" or "modelscope"
    revision: str  # the commit the file list was taken at
    files: list[FileEntry]

    @classmethod
    def load(cls, checkpoint_dir: Path) -> Manifest | None:
        path = checkpoint_dir / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
            return cls(**{**raw, "files": [FileEntry(**entry) for entry in raw["files"]]})
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as err:
            raise WanError(f"unreadable manifest {path}: {err}", hint="delete it: `wan-i2v cache status` checks the files without it") from err

    def save(self, checkpoint_dir: Path) -> None:
        # Written aside and renamed, so a crash never leaves half a manifest.
        temporary = checkpoint_dir / f".{MANIFEST_NAME}.tmp"
        temporary.write_text(json.dumps(asdict(self), indent=1))
        os.replace(temporary, checkpoint_dir / MANIFEST_NAME)

    def keep_checks_from(self, previous: Manifest | None) -> None:
        """Carry verification results over from an earlier manifest, for files whose hash is unchanged."""
        earlier = {entry.path: entry for entry in previous.files} if previous else {}
        for entry in self.files:
            old = earlier.get(entry.path)
            if old and old.digest == entry.digest:
                entry.verified_mtime_ns, entry.corrupt = old.verified_mtime_ns, old.corrupt


def hash_stream(hasher, file, progress=None) -> None:
    """Feed the rest of an open binary file to ``hasher``; ``progress``, if given, gets the bytes read."""
    while block := file.read(_READ_BLOCK):
        hasher.update(block)
        if progress is not None:
            progress.update(len(block))


def hash_file(path: Path, entry: FileEntry, progress) -> bool:
    """Whether the file's content matches the entry's published hash; `progress` gets the bytes read."""
    hasher = entry.new_hasher()
    with open(path, "rb") as file:
        hash_stream(hasher, file, progress)
    return hasher.hexdigest() == entry.hex_digest
