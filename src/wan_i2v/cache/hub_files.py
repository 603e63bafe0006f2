"""Single files of any hub repository, named as huggingface_hub's file system names them:
``hf://OWNER/REPO/PATH``, or ``hf://OWNER/REPO@REVISION/PATH`` (a branch, a tag or a commit).

They are kept in the hub cache layout beside the model: fetched once by the cache's own machinery
(listed with their hashes, resumed, verified as they arrive), then found on the disk alone, offline,
as huggingface_hub finds them (``try_to_load_from_cache``). The model's distilled LoRAs are such
files (the spec's ``distilled_loras``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from wan_i2v.cache.layout import SPEC, HubFiles, hub_offline
from wan_i2v.errors import WanError

SCHEME = "hf://"
# OWNER/REPO as the hub spells them; the revision may not hold "/" (a refs/pr/N is reached by its commit).
_FORM = re.compile(r"hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w.-]+))?/(?P<path>[^@:]+)")
FORM_HINT = "write hf://OWNER/REPO/PATH, or hf://OWNER/REPO@REVISION/PATH, as huggingface.co/OWNER/REPO/blob/REVISION/PATH names it"
LIGHTNING_COMMAND = "`wan-i2v cache quick --lightning`"


def is_hub_file(text) -> bool:
    return str(text).startswith(SCHEME)


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository at a revision."""

    repo_id: str
    path: str
    revision: str = "main"

    @classmethod
    def parse(cls, text: str) -> HubFile:
        found = _FORM.fullmatch(text)
        if found is None or any(part in ("", ".", "..") for part in found["path"].split("/")):
            raise WanError(f"{text} is not a hub file", FORM_HINT)
        return cls(found["repo"], found["path"], found["revision"] or "main")

    def __str__(self) -> str:
        revision = "" if self.revision == "main" else f"@{self.revision}"
        return f"{SCHEME}{self.repo_id}{revision}/{self.path}"

    def cached(self, root: Path) -> Path | None:
        """The file in the cache ``root``, from the disk alone (None: not there, or not whole yet)."""
        found = try_to_load_from_cache(self.repo_id, self.path, cache_dir=root, revision=self.revision)
        return Path(found) if isinstance(found, str) else None

    def snapshot(self, root: Path) -> Path | None:
        """The snapshot folder of the revision in the cache ``root`` (its ref names the commit), if there is one."""
        repo = root / HubFiles(self.repo_id, ()).folder
        ref = repo / "refs" / self.revision
        folder = repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else self.revision)
        return folder if folder.is_dir() else None

    def fetched(self, root: Path, fetched_by: str = "the same command") -> Path:
        """The file in the cache ``root``, fetched first if it is not there."""
        cached = self.cached(root)
        if cached is not None:
            return cached
        if hub_offline():
            raise WanError(f"{self} is not in the cache {root}, and HF_HUB_OFFLINE is set", "unset it to fetch the file once")
        from wan_i2v.cache.commands import fetch

        files = HubFiles(self.repo_id, (self.path,), self.revision, fetched_by, missing_hint=f"check the path: {FORM_HINT}")
        return fetch(root, files, wait=True) / self.path


def distilled_loras(spec=SPEC) -> dict[str, HubFile]:
    """The spec's distilled LoRAs, by expert name (empty for a model without them)."""
    return {expert: HubFile.parse(text) for expert, text in (spec.distilled_loras or {}).items()}
