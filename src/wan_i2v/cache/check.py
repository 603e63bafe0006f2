"""The checkpoint as `status` sees it, from the disk alone: each file the loader opens, whether it is
there, its size (against the manifest's, when there is one) and whether its header reads.

The header checks are the loader's own first steps (loading/checkpoint.py), done without torch and
in milliseconds, so a truncated shard shows here rather than minutes into a run.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from wan_i2v.cache.layout import MISSING, PARTIAL, PRESENT, SPEC, USABLE, inspect
from wan_i2v.cache.manifest import Manifest
from wan_i2v.models.spec import ModelSpec

READS = "reads"
NOT_ON_DISK = "-"
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library refuses larger headers


@dataclass
class FileCheck:
    path: str  # inside the checkpoint directory, "/"-separated
    state: str  # one of layout's file states
    on_disk: int
    expected: int | None  # the manifest's size; None without one: sizes not compared
    header: str  # READS, NOT_ON_DISK, or why the loader could not open it
    needed: bool = True  # the loader opens it (a manifest lists files it does not, such as spiece.model)

    @property
    def usable(self) -> bool:
        return self.state in USABLE and self.header == READS


def check_checkpoint(folder: Path, manifest: Manifest | None, spec: ModelSpec = SPEC) -> list[FileCheck]:
    """Every file the loader opens (``spec``'s ``needed_files``, the loader's own rule), and the manifest's
    other files; a file the manifest lists is compared with its size there."""
    needed = spec.needed_files(folder)
    listed = {entry.path: entry for entry in manifest.files} if manifest is not None else {}
    found = [(e.path, e.size, *inspect(folder, e)) for e in listed.values()]
    found += [(p, None, *_presence(folder / p)) for p in needed if p not in listed]
    checks = []
    for path, expected, state, on_disk in found:
        whole = state not in (MISSING, PARTIAL)
        header = (header_problem(folder / path) or READS) if whole else NOT_ON_DISK
        checks.append(FileCheck(path, state, on_disk, expected, header, needed=path in needed))
    return checks


def _presence(path: Path) -> tuple[str, int]:
    try:
        return PRESENT, path.stat().st_size
    except FileNotFoundError:  # also a link whose blob is gone
        return MISSING, 0


def header_problem(path: Path) -> str | None:
    """Why the loader could not open this file, judged from its header; None when it reads."""
    try:
        if path.name.endswith(".safetensors"):
            return _safetensors_problem(path)
        if path.suffix == ".pth":
            return _torch_file_problem(path)
        if path.suffix == ".json":
            return _json_problem(path)
    except OSError as err:
        return f"cannot read it: {err.strerror}"
    return None  # another kind of file: being there is all that can be told without loading it


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        header_size = int.from_bytes(prefix, "little")
        if len(prefix) < 8:
            return "cut short before its header"
        if header_size > _MAX_SAFETENSORS_HEADER:
            return "not a safetensors file"
        if header_size > size - 8:
            return "cut short inside its header"
        try:
            header = json.loads(file.read(header_size))
            tensors = [entry for key, entry in header.items() if key != "__metadata__"]
            data_size = max((entry["data_offsets"][1] for entry in tensors), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a safetensors header"
    if not isinstance(data_size, int):
        return "its header is not a safetensors header"
    expected = 8 + header_size + data_size
    # The safetensors library refuses both; a shorter file is a copy cut short.
    if expected != size:
        return f"{'cut short: ' if size < expected else ''}{size} bytes, its header describes {expected}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    # The loader memory-maps the file, which torch does only for its zip format; the zip's index is at its end.
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return "not a zip archive: cut short, or not written by torch.save"
    if not any(name.endswith("/data.pkl") for name in names):
        return "a zip archive without data.pkl: not written by torch.save"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:  # UnicodeDecodeError included
        return f"not valid JSON ({err})"
    return None if isinstance(data, dict) else "not a JSON object"
