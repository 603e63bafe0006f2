"""Where the files come from: the Hugging Face Hub (default) or ModelScope (optional extra).

A source lists the checkpoint's files with sizes and hashes, and fetches one file into a snapshot.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers

from wan_i2v.cache.layout import MODEL_FILES, HubFiles, blob_path, partial_path, required_paths
from wan_i2v.cache.manifest import FileEntry, Manifest, hash_stream
from wan_i2v.errors import WanError, first_line

LISTING_TIMEOUT_S = 30


def disk_full(path: str, err: OSError) -> WanError:
    return WanError(
        f"disk full while writing {path}: {err.strerror}",
        hint="free space or move the cache with `wan-i2v cache move DEST`; partial downloads are kept",
    )


class HubSource:
    """The Hugging Face Hub, through huggingface_hub: its listing, resolve URLs, auth and ranged downloads."""

    name = "hf"

    def __init__(self, endpoint: str | None = None):
        # HF_ENDPOINT is read now, not when huggingface_hub was imported, so a mirror set at run time counts.
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")

    def listing(self, files: HubFiles = MODEL_FILES) -> Manifest:
        try:
            info = HfApi(endpoint=self.endpoint).model_info(
                files.repo_id, revision=files.revision, files_metadata=True, timeout=LISTING_TIMEOUT_S
            )
        except (httpx2.HTTPError, OSError) as err:
            raise WanError(
                f"cannot list {files.repo_id} on {self.endpoint}: {first_line(err)}", hint="check the network, HF_ENDPOINT and HF_TOKEN"
            ) from err
        siblings = {s.rfilename: s for s in info.siblings or []}
        entries = [FileEntry(path, siblings[path].size, _hub_digest(siblings[path])) for path in required_paths(siblings, files)]
        return Manifest(files.repo_id, self.name, info.sha, entries)

    def prepare_checkpoint_dir(self, repo: Path, manifest: Manifest, revision: str = "main") -> Path:
        """Create the snapshot folder of this listing's commit, and point the revision's ref (refs/main) at it as huggingface_hub does."""
        if revision != manifest.revision:  # (a commit asked for by its hash needs no ref)
            ref = repo / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(manifest.revision)
        checkpoint_dir = repo / "snapshots" / manifest.revision
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return checkpoint_dir

    def bytes_on_disk(self, checkpoint_dir: Path, entry: FileEntry) -> int:
        """Bytes of a not-yet-usable file already fetched: a complete blob or a partial download."""
        blob = blob_path(checkpoint_dir, entry)
        if _blob_complete(blob, entry):
            return entry.size
        partial = partial_path(blob)
        return min(partial.stat().st_size, entry.size) if partial.is_file() else 0

    def fetch(self, checkpoint_dir: Path, entry: FileEntry, files: HubFiles, revision: str, progress) -> bool:
        """Bring one file of ``files`` at the commit ``revision`` into the snapshot; True when its hash was checked on the way."""
        blob = blob_path(checkpoint_dir, entry)
        checked = False
        if not _blob_complete(blob, entry):
            self._download(entry, blob, files, revision, progress)
            checked = True
        _link(blob, checkpoint_dir / entry.path)
        return checked

    def _download(self, entry: FileEntry, blob: Path, files: HubFiles, revision: str, progress) -> None:
        blob.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(blob)
        url = hf_hub_url(files.repo_id, entry.path, revision=revision, endpoint=self.endpoint)
        try:
            with open(partial, "a+b") as file:
                if file.tell() > entry.size:  # cannot be a prefix of this file
                    file.truncate(0)
                writer = _HashingWriter(file, entry)
                http_get(
                    url, writer, resume_size=file.tell(), expected_size=entry.size,
                    headers=build_hf_headers(library_name="wan-i2v"), tqdm_class=_adding_to(progress),
                )
        except (OSError, httpx2.HTTPError) as err:
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise disk_full(entry.path, err) from err
            raise WanError(f"download of {entry.path} stopped: {first_line(err)}", hint=_resume_hint(files)) from err
        if writer.hexdigest() != entry.hex_digest:
            partial.unlink()
            raise WanError(
                f"{entry.path}: the downloaded bytes do not match the published hash; discarded them",
                hint=f"run {files.fetched_by} again",
            )
        os.replace(partial, blob)


class ModelScopeSource:
    """ModelScope, through its own client, which resumes and checks SHA-256 itself."""

    name = "modelscope"

    def __init__(self):
        try:
            from modelscope.hub.api import HubApi
            from modelscope.hub.file_download import model_file_download
        except ImportError as err:
            raise WanError("ModelScope support is not installed", hint="pip install 'wan-i2v[modelscope]'") from err
        self._api = HubApi()
        self._download = model_file_download

    def listing(self, files: HubFiles = MODEL_FILES, revision: str = "master") -> Manifest:
        try:
            listed = self._api.get_model_files(files.repo_id, revision=revision, recursive=True)
        except Exception as err:  # its client raises requests' and its own error types, varying by version
            raise WanError(f"cannot list {files.repo_id} on ModelScope: {first_line(err)}", hint="check the network") from err
        by_path = {f["Path"]: f for f in listed if f.get("Type") != "tree"}
        entries = [
            FileEntry(path, int(by_path[path]["Size"]), f"sha256:{sha}" if (sha := by_path[path].get("Sha256")) else None)
            for path in required_paths(by_path, files)
        ]
        return Manifest(files.repo_id, self.name, revision, entries)

    def prepare_checkpoint_dir(self, repo: Path, manifest: Manifest, revision: str = "main") -> Path:
        checkpoint_dir = repo / "snapshots" / "modelscope"
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return checkpoint_dir

    def bytes_on_disk(self, checkpoint_dir: Path, entry: FileEntry) -> int:
        return 0  # its partial downloads live in its own temporary folder

    def fetch(self, checkpoint_dir: Path, entry: FileEntry, files: HubFiles, revision: str, progress) -> bool:
        try:
            self._download(files.repo_id, entry.path, revision=revision, local_dir=str(checkpoint_dir))
        except Exception as err:  # see listing()
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise disk_full(entry.path, err) from err
            raise WanError(f"download of {entry.path} stopped: {first_line(err)}", hint=_resume_hint(files)) from err
        progress.update(entry.size)
        return False


def _resume_hint(files: HubFiles) -> str:
    return f"run {files.fetched_by} again; it resumes where it stopped"


def _hub_digest(sibling) -> str:
    # What the hub names blobs by: the SHA-256 of a large (LFS) file, the git blob id of a small one.
    return f"sha256:{sibling.lfs.sha256}" if sibling.lfs else f"git-sha1:{sibling.blob_id}"


def make_source(name: str) -> HubSource | ModelScopeSource:
    return ModelScopeSource() if name == "modelscope" else HubSource()


def _link(blob: Path, pointer: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.unlink(missing_ok=True)  # a link left dangling when its blob was removed
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        # No symlinks on this filesystem (some network mounts): like huggingface_hub, keep the file in the snapshot.
        os.replace(blob, pointer)


def _blob_complete(blob: Path, entry: FileEntry) -> bool:
    return blob.is_file() and blob.stat().st_size == entry.size


class _HashingWriter:
    """The partial file as http_get sees it: every byte written also feeds the hash, so a finished
    download is verified without reading it back. Bytes from an earlier run are hashed first."""

    def __init__(self, file, entry: FileEntry):
        self._file = file
        self._entry = entry
        self._hasher = entry.new_hasher()
        file.seek(0)
        hash_stream(self._hasher, file)

    def write(self, data: bytes) -> int:
        self._hasher.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        # http_get truncates to where it started when the server ignores the Range header; we always
        # hand it the whole partial file, so the content starts over and so does the hash.
        self._hasher = self._entry.new_hasher()
        return self._file.truncate(size)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def _adding_to(progress):
    """A tqdm stand-in for http_get that adds each file's bytes to the one bar of the whole checkpoint."""

    class _AddToTotal:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            progress.update(n)

    return _AddToTotal
