"""The `wan-i2v cache` operations: quick, status, verify, move. Each returns the command's exit code."""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm import tqdm

from wan_i2v.cache.check import READS, check_checkpoint
from wan_i2v.cache.layout import (
    CORRUPT, MISSING, PRESENT, SPEC, USABLE, VERIFIED, WRONG_SIZE, HubFiles,
    cache_root_of, find_checkpoint_dir, hub_offline, inspect, model_files, model_option, repair_advice, repo_folder, resolve_checkpoint_dir,
)
from wan_i2v.cache.hub_files import LIGHTNING_COMMAND, HubFile, distilled_loras
from wan_i2v.cache.manifest import MANIFEST_NAME, FileEntry, Manifest, hash_file
from wan_i2v.disk import check_space, human_size
from wan_i2v.errors import WanError
from wan_i2v.models.spec import SPECS, ModelSpec, spec_of_checkpoint


def _bytes_bar(total: int, initial: int = 0, *, desc: str) -> tqdm:
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def quick(root: Path, source_name: str, spec: ModelSpec = SPEC) -> int:
    # Imported here so that status, verify and path never load the download stack.
    from wan_i2v.cache.sources import make_source

    checkpoint_dir = fetch(root, model_files(spec), make_source(source_name))
    print(f"{spec.repo_id} is complete in {checkpoint_dir}")
    return 0


def quick_lightning(root: Path, spec: ModelSpec = SPEC) -> int:
    """Fetch the model's 4-step LoRAs (the spec's ``distilled_loras``) into the cache, as ``quick`` fetches the model."""
    if not spec.distilled_loras:
        raise WanError(f"{spec.name} has no 4-step LoRAs", "leave out --lightning, or give --model a model that has them")
    by_repository: dict[tuple[str, str], list[str]] = {}
    for lora in distilled_loras(spec).values():
        by_repository.setdefault((lora.repo_id, lora.revision), []).append(lora.path)
    for (repo_id, revision), paths in by_repository.items():
        fetch(root, HubFiles(repo_id, tuple(paths), revision, LIGHTNING_COMMAND))
    for expert, lora in _lightning_by_label(spec).items():
        print(f"{expert}: {lora.cached(root)}")
    print("the 4-step LoRAs are complete: `wan-i2v generate --distilled` uses them")
    return 0


def _lightning_by_label(spec: ModelSpec) -> dict[str, HubFile]:
    """The spec's distilled LoRAs by how messages call their experts ("high-noise")."""
    labels = {expert.name: expert.label or expert.name for expert in spec.experts}
    return {labels[name]: lora for name, lora in distilled_loras(spec).items()}


def fetch(root: Path, files: HubFiles, source=None, *, wait: bool = False) -> Path:
    """Bring ``files`` into the cache ``root`` from ``source`` (the hub's by default): listed with
    their published hashes, partial downloads resumed, each verified as it arrives. Returns their
    snapshot folder. ``wait``: for another process fetching into the same repository folder (the
    ranks of a launcher, each planning its run), rather than refuse."""
    from wan_i2v.cache.sources import HubSource

    source = source or HubSource()
    with _exclusive(root, files, wait):
        manifest = source.listing(files)
        checkpoint_dir = source.prepare_checkpoint_dir(repo_folder(root, files), manifest, files.revision)
        previous = Manifest.load(checkpoint_dir)
        manifest.keep_checks_from(previous)
        wanted = manifest.files
        if previous is not None and source.name == "hf":
            # A hub snapshot is one commit, so the files fetched into it before (another hf:// LoRA of the
            # repository) are still its files: the manifest keeps them beside these.
            listed = {entry.path for entry in wanted}
            manifest.files = [*wanted, *(entry for entry in previous.files if entry.path not in listed)]
        manifest.save(checkpoint_dir)
        todo = _files_to_fetch(checkpoint_dir, wanted)
        remaining = sum(entry.size - source.bytes_on_disk(checkpoint_dir, entry) for entry in todo)
        _check_space(checkpoint_dir, remaining)
        if todo:
            total = sum(entry.size for entry in wanted)
            with _bytes_bar(total, initial=total - remaining, desc=files.repo_id) as bar:
                for entry in todo:
                    checked = source.fetch(checkpoint_dir, entry, files, manifest.revision, bar)
                    entry.corrupt = False
                    entry.verified_mtime_ns = (checkpoint_dir / entry.path).stat().st_mtime_ns if checked else None
                    manifest.save(checkpoint_dir)
    return checkpoint_dir


def _files_to_fetch(checkpoint_dir: Path, entries: list[FileEntry]) -> list[FileEntry]:
    """The files not usable yet. A wrong-sized or corrupt one is removed, with its blob, to be fetched anew."""
    todo = []
    for entry in entries:
        state, _ = inspect(checkpoint_dir, entry)
        if state in (WRONG_SIZE, CORRUPT):
            path = checkpoint_dir / entry.path
            if path.is_symlink():
                path.resolve().unlink(missing_ok=True)
            path.unlink()
        if state not in USABLE:
            todo.append(entry)
    return todo


def _check_space(directory: Path, needed: int) -> None:
    check_space(directory, needed, "free space, or put the cache on a larger disk with --cache-dir or WAN_I2V_HOME")


@contextmanager
def _exclusive(root: Path, files: HubFiles, wait: bool = False):
    """One writer per repository of a cache: two downloads appending to the same partial file would garble it."""
    lock_dir = root / ".locks" / files.folder  # beside huggingface_hub's own locks, outside what `move` moves
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_dir / "wan-i2v.lock")
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        raise WanError(f"another wan-i2v cache command is writing to {root}", hint="wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


def cached_models(root: Path, spec: ModelSpec | None) -> list[ModelSpec]:
    """The models whose checkpoints a command without --ckpt-dir looks at: ``spec``, else every model with
    a repository in the cache ``root`` (the default model where none has one)."""
    if spec is not None:
        return [spec]
    present = [model for model in SPECS.values() if (root / model.repo_folder).exists()]
    return present or [SPEC]


def status(root: Path, checkpoint_dir: Path | None, spec: ModelSpec | None = None) -> int:
    """The table of the files each model needs (``spec``, else each model the cache has; the checkpoint
    directory's own with ``checkpoint_dir``), from the disk alone: never the network, so it works offline.
    Exit code 0 only when every table is complete."""
    if checkpoint_dir is not None:
        return _status(root, checkpoint_dir, spec or spec_of_checkpoint(checkpoint_dir))
    codes = [_status(root, find_checkpoint_dir(root, model), model) for model in cached_models(root, spec)]
    return max(codes)


def _status(root: Path, checkpoint_dir: Path | None, spec: ModelSpec) -> int:
    """One model's table (``checkpoint_dir`` None: none in the cache)."""
    if checkpoint_dir is None:
        print(f"No {spec.repo_id} checkpoint in {root}; `wan-i2v cache quick{model_option(spec)}` downloads it.")
        _lightning_status(root, spec)
        return 1
    if not checkpoint_dir.is_dir():
        raise WanError(f"{checkpoint_dir} is not a directory", hint="pass the checkpoint folder with --ckpt-dir")
    manifest = Manifest.load(checkpoint_dir)
    checks = check_checkpoint(checkpoint_dir, manifest, spec)
    if manifest is None:
        # A plain folder, or a snapshot another tool downloaded: the published sizes are on the hub only.
        print(f"{checkpoint_dir}  (no {MANIFEST_NAME}: sizes not compared): {spec.name}")
    else:
        print(f"{checkpoint_dir}  (from {manifest.source}, revision {manifest.revision[:12]}): {spec.name}")
    width = max(len(check.path) for check in checks)
    print(f"{'FILE':<{width}}  {'ON DISK':>10}  {'EXPECTED':>10}  {'STATE':<10}  HEADER")
    for check in checks:
        expected = "-" if check.expected is None else human_size(check.expected)
        note = "" if check.needed else " (not read by wan-i2v)"
        print(f"{check.path:<{width}}  {human_size(check.on_disk):>10}  {expected:>10}  {check.state:<10}  {check.header}{note}")
    # Complete is what the loader needs (its own rule), so that status and generate agree.
    needed = [check for check in checks if check.needed]
    usable = sum(check.usable for check in needed)
    on_disk = human_size(sum(check.on_disk for check in checks))
    if manifest is None:
        print(f"total: {on_disk}; {usable} of {len(needed)} files usable")
    else:
        verified = sum(check.state == VERIFIED for check in needed)
        print(f"total: {on_disk} of {human_size(sum(e.size for e in manifest.files))}; {usable} of {len(needed)} needed files usable, {verified} verified")
    _lightning_status(root, spec)
    if usable < len(needed):
        print(f"incomplete: {repair_advice(checkpoint_dir)}")
        unreadable = [check.path for check in needed if check.state in USABLE and check.header != READS]
        if unreadable and manifest is not None and cache_root_of(checkpoint_dir) is not None:
            # `quick` goes by sizes: a damaged file of the right size is fetched again once a hash check marks it corrupt.
            print(f"{len(unreadable)} of the right size do not read: `wan-i2v cache verify --full` marks them corrupt, for `quick` to fetch again")
        return 1
    print("complete")
    return 0


def _lightning_status(root: Path, spec: ModelSpec) -> None:
    """A line per 4-step LoRA of ``spec`` (``--distilled``'s, from the cache ``root``): its state as the model's files show theirs."""
    for expert, lora in _lightning_by_label(spec).items():
        state, on_disk = _hub_file_state(root, lora)
        print(f"4-step LoRA, {expert}: {lora}  {human_size(on_disk)}  {state}")


def _hub_file_state(root: Path, lora: HubFile) -> tuple[str, int]:
    """The file's state and bytes on disk: from its snapshot's manifest where `fetch` left one, else there or not."""
    snapshot = lora.snapshot(root)
    manifest = Manifest.load(snapshot) if snapshot is not None else None
    entry = next((entry for entry in manifest.files if entry.path == lora.path), None) if manifest is not None else None
    if entry is not None:
        return inspect(snapshot, entry)
    cached = lora.cached(root)
    return (PRESENT, cached.stat().st_size) if cached is not None else (MISSING, 0)


def verify(root: Path, checkpoint_dir: Path | None, full: bool, spec: ModelSpec | None = None) -> int:
    """Check the checkpoint's files against its manifest (``spec``'s, else each model's the cache has; the
    checkpoint directory's own with ``checkpoint_dir``). Exit code 0 only when every file of every one is whole."""
    if checkpoint_dir is not None:
        return _verify(checkpoint_dir, full, spec or spec_of_checkpoint(checkpoint_dir))
    return max(_verify(resolve_checkpoint_dir(root, model), full, model) for model in cached_models(root, spec))


def _verify(checkpoint_dir: Path, full: bool, spec: ModelSpec) -> int:
    manifest = _manifest_for(checkpoint_dir, spec)
    states = {entry.path: inspect(checkpoint_dir, entry)[0] for entry in manifest.files}
    if full:
        # Files marked corrupt are hashed again: they may have been replaced by hand.
        to_hash = [e for e in manifest.files if e.digest and states[e.path] in (*USABLE, CORRUPT)]
        with _bytes_bar(sum(e.size for e in to_hash), desc="verifying") as bar:
            for entry in to_hash:
                path = checkpoint_dir / entry.path
                matches = hash_file(path, entry, bar)
                entry.record_check(path, matches)
                states[entry.path] = VERIFIED if matches else CORRUPT
                _save_if_possible(manifest, checkpoint_dir)
    problems = {path: state for path, state in states.items() if state not in USABLE}
    for path, state in problems.items():
        print(f"{state}: {path}")
    if problems:
        print(f"{len(problems)} of {len(states)} files missing or wrong: {repair_advice(checkpoint_dir)}")
        return 1
    print(f"all {len(states)} files " + ("match their published hashes" if full else "have their expected sizes"))
    return 0


def _manifest_for(checkpoint_dir: Path, spec: ModelSpec) -> Manifest:
    """The checkpoint's manifest. A directory another tool downloaded gets one from the hub's listing."""
    manifest = Manifest.load(checkpoint_dir)
    if manifest is not None:
        return manifest
    if not checkpoint_dir.is_dir():
        raise WanError(f"{checkpoint_dir} is not a directory", hint="pass the checkpoint folder with --ckpt-dir")
    offline_check = f"`wan-i2v cache status --ckpt-dir {checkpoint_dir}` checks presence and headers offline"
    if hub_offline():
        raise WanError(
            f"{checkpoint_dir} has no {MANIFEST_NAME}: the published sizes and hashes are on the hub, and HF_HUB_OFFLINE is set",
            hint=offline_check,
        )
    from wan_i2v.cache.sources import HubSource

    # A hub snapshot folder is named after its commit: list exactly that one.
    revision = checkpoint_dir.name if re.fullmatch(r"[0-9a-f]{40}", checkpoint_dir.name) else "main"
    try:
        manifest = HubSource().listing(replace(model_files(spec), revision=revision))
    except WanError as err:
        raise WanError(f"{checkpoint_dir} has no {MANIFEST_NAME}, and {err.message}", hint=f"{err.hint}; {offline_check}") from err
    _save_if_possible(manifest, checkpoint_dir)
    return manifest


def _save_if_possible(manifest: Manifest, checkpoint_dir: Path) -> None:
    try:
        manifest.save(checkpoint_dir)
    except OSError:
        pass  # a read-only checkpoint can still be checked; the result is just not remembered


def move(root: Path, dest: Path, link: bool, spec: ModelSpec = SPEC) -> int:
    files = model_files(spec)
    old = repo_folder(root, files)
    if not old.exists():
        raise WanError(f"no {spec.repo_id} cache in {root}", hint="nothing to move; pass --cache-dir if it is elsewhere")
    source = old.resolve()  # an earlier `move --link` left a link here
    target = repo_folder(dest.expanduser().resolve(), files)
    if target.exists() or target.is_symlink():
        raise WanError(f"{target} already exists", hint="choose a destination without a copy of the checkpoint")
    if source == target or source in target.parents:
        raise WanError(f"{dest} is inside the cache being moved", hint="choose a destination on another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(root, files):
        try:
            os.rename(source, target)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise WanError(f"cannot move {source} to {target}: {err.strerror}") from err
            _copy_across_disks(source, target)
        if old.is_symlink():
            old.unlink()
        if link:
            old.symlink_to(target, target_is_directory=True)
    print(f"Moved {spec.repo_id} to {target}")
    if not link:
        print(f"Set WAN_I2V_HOME={target.parent} (or pass --cache-dir {target.parent}) so later commands find it.")
    return 0


def _copy_across_disks(source: Path, target: Path) -> None:
    """Copy under a name no command recognises, rename when whole, and only then delete the original."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted move
    needed = sum(
        (Path(folder) / name).lstat().st_size for folder, _, names in os.walk(source) for name in names
    )
    _check_space(target.parent, needed)
    with _bytes_bar(needed, desc="moving") as bar:

        def copy_and_count(src, dst):
            shutil.copy2(src, dst)
            bar.update(os.path.getsize(dst))

        try:
            shutil.copytree(source, staging, symlinks=True, copy_function=copy_and_count)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise WanError(f"copy to {target.parent} failed: {err}", hint="the original is untouched") from err
    os.rename(staging, target)
    # Renamed first, so an interrupted delete leaves nothing that looks like a cache.
    doomed = source.with_name(f".{source.name}.deleting")
    os.rename(source, doomed)
    shutil.rmtree(doomed)
