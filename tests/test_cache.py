"""`wan-i2v cache` against the real huggingface_hub client and a tiny hub on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest
from huggingface_hub import constants, snapshot_download

from hub_server import COMMIT, HubServer
from wan_i2v.cache import MANIFEST_NAME, SPEC, add_cache_parser, resolve_checkpoint_dir
from wan_i2v.cache import commands, sources
from wan_i2v.errors import Terminated, WanError
from wan_i2v.models.spec import spec_for

_noise = random.Random(0)


def safetensors_bytes(size: int) -> bytes:
    """A file whose safetensors header reads (one byte tensor), so that `status` counts it usable."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    return len(header).to_bytes(8, "little") + header + _noise.randbytes(size)


def torch_zip_bytes(size: int) -> bytes:
    """A zip with data.pkl, stored uncompressed, as torch.save writes it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", _noise.randbytes(size))
    return buffer.getvalue()


HIGH_SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")
LOW_SHARD = "diffusion_pytorch_model-00001-of-00001.safetensors"
FILES = {
    "high_noise_model/config.json": b'{"dim": 16, "num_layers": 2}',
    "high_noise_model/diffusion_pytorch_model.safetensors.index.json": json.dumps({"weight_map": dict(zip("ab", HIGH_SHARDS))}).encode(),
    f"high_noise_model/{HIGH_SHARDS[0]}": safetensors_bytes(40_000),
    f"high_noise_model/{HIGH_SHARDS[1]}": safetensors_bytes(30_000),
    "low_noise_model/config.json": b'{"dim": 16, "num_layers": 3}',
    "low_noise_model/diffusion_pytorch_model.safetensors.index.json": json.dumps({"weight_map": {"a": LOW_SHARD}}).encode(),
    f"low_noise_model/{LOW_SHARD}": safetensors_bytes(35_000),
    "Wan2.1_VAE.pth": torch_zip_bytes(20_000),
    "models_t5_umt5-xxl-enc-bf16.pth": torch_zip_bytes(50_000),
    "google/umt5-xxl/spiece.model": _noise.randbytes(5_000),
    "google/umt5-xxl/tokenizer.json": b'{"model": "unigram"}',
    "google/umt5-xxl/tokenizer_config.json": b'{"model_max_length": 512}',
    # Not needed for image-to-video: never downloaded.
    "assets/logo.png": _noise.randbytes(3_000),
    "examples/i2v_input.JPG": _noise.randbytes(3_000),
    "README.md": b"# Wan2.2",
    "configuration.json": b"{}",
}
SKIPPED = ("assets/logo.png", "examples/i2v_input.JPG", "README.md", "configuration.json")
REQUIRED = sorted(set(FILES) - set(SKIPPED))
SHARD = "high_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors"
T5 = "models_t5_umt5-xxl-enc-bf16.pth"


@pytest.fixture(autouse=True)
def offline_and_bounded(monkeypatch, tmp_path):
    """Loopback only, every test under 20 s, and no cache setting leaking in from the environment."""
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test tried to reach {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def too_slow(signum, frame):
        raise TimeoutError("test ran over 20 s")

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 5)
    # huggingface_hub keeps what arrived before a drop in whole chunks (10 MB): scale them to the tiny files
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 5)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "cache"))
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def hub(monkeypatch):
    with HubServer(SPEC.repo_id, FILES) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def cache(*argv) -> int:
    parser = argparse.ArgumentParser(prog="wan-i2v")
    add_cache_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cache", *map(str, argv)])
    return args.func(args)


def snapshot(root: Path) -> Path:
    return root / SPEC.repo_folder / "snapshots" / COMMIT


def assert_checkpoint(folder: Path) -> None:
    for path in REQUIRED:
        assert (folder / path).read_bytes() == FILES[path], path


def test_quick_fetches_exactly_the_checkpoint_verified(hub, tmp_path, capsys):
    assert cache("quick") == 0
    folder = snapshot(tmp_path / "cache")
    assert_checkpoint(folder)
    for skipped in SKIPPED:
        assert not (folder / skipped).exists() and not hub.content_gets(skipped)
    assert all(len(hub.content_gets(path)) == 1 for path in REQUIRED)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["source"] == "hf" and manifest["revision"] == COMMIT
    t5 = next(f for f in manifest["files"] if f["path"] == T5)
    assert t5["size"] == len(FILES[T5]) and t5["digest"] == f"sha256:{hub.sha256(T5)}"
    assert "B/s" in capsys.readouterr().err  # one bar for the whole set, with speed

    listed = len(hub.requests)
    assert cache("status") == 0
    assert len(hub.requests) == listed  # offline, from the manifest
    table = capsys.readouterr().out
    assert table.count("verified") == len(REQUIRED) + 1  # every row, and the totals line
    assert cache("path") == 0
    assert capsys.readouterr().out.strip() == str(folder) == str(resolve_checkpoint_dir())

    assert cache("quick") == 0  # nothing left to do
    assert all(len(hub.content_gets(path)) == 1 for path in REQUIRED)


def test_quick_resumes_after_the_connection_drops(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub waits 1 s before resuming
    hub.drop_once[SHARD] = 16_384  # four whole chunks
    assert cache("quick") == 0
    assert hub.content_gets(SHARD) == [None, "bytes=16384-"]
    assert_checkpoint(snapshot(tmp_path / "cache"))


def test_a_killed_download_is_partial_and_resumed(hub, tmp_path, capsys):
    assert cache("quick") == 0
    folder = snapshot(tmp_path / "cache")
    # What a killed run leaves: a third of the blob under its temporary name, no file in the snapshot.
    blob = (folder / SHARD).resolve()
    blob.with_name(blob.name + ".incomplete").write_bytes(FILES[SHARD][:12_000])
    blob.unlink()
    capsys.readouterr()
    assert cache("status") == 1
    assert any(SHARD in line and "partial" in line for line in capsys.readouterr().out.splitlines())
    assert cache("quick") == 0
    assert hub.content_gets(SHARD)[-1] == "bytes=12000-"
    assert_checkpoint(folder)
    assert cache("status") == 0


def test_status_is_complete_when_the_loader_has_every_file_it_reads(hub, tmp_path, capsys):
    """The listing has spiece.model, which the loader does not read (it reads tokenizer.json): without
    it status says complete, as generate finds it; without tokenizer.json, incomplete, as generate refuses."""
    assert cache("quick") == 0
    folder = snapshot(tmp_path / "cache")
    (folder / "google/umt5-xxl/spiece.model").unlink()
    capsys.readouterr()
    assert cache("status") == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("google/umt5-xxl/spiece.model "))
    assert "missing" in row and row.endswith("(not read by wan-i2v)")
    (folder / "google/umt5-xxl/tokenizer.json").unlink()
    assert cache("status") == 1


@pytest.mark.parametrize("stop, code, said", [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "stopped by SIGTERM")])
def test_a_stopped_download_says_quick_resumes_it(monkeypatch, capsys, stop, code, said):
    def stopped(root, source, spec):
        raise stop

    monkeypatch.setattr(commands, "quick", stopped)
    assert cache("quick") == code
    assert capsys.readouterr().err == f"\n{said}; `wan-i2v cache quick` resumes where it stopped\n"


def test_verify_full_names_a_corrupt_file_and_quick_refetches_it(hub, tmp_path, capsys):
    assert cache("quick") == 0
    folder = snapshot(tmp_path / "cache")
    with open(folder / T5, "r+b") as file:
        file.seek(25_000)
        byte = file.read(1)
        file.seek(25_000)
        file.write(bytes([byte[0] ^ 1]))
    capsys.readouterr()
    assert cache("verify") == 0  # sizes alone cannot see it
    assert cache("verify", "--full") == 1
    assert f"corrupt: {T5}" in capsys.readouterr().out
    assert cache("status") == 1
    assert cache("quick") == 0
    assert len(hub.content_gets(T5)) == 2 and len(hub.content_gets(SHARD)) == 1
    assert cache("verify", "--full") == 0
    assert_checkpoint(folder)


def test_a_damaged_file_of_the_right_size_is_named_and_fetched_again(hub, tmp_path, capsys):
    assert cache("quick") == 0
    (snapshot(tmp_path / "cache") / SHARD).resolve().write_bytes(bytes(len(FILES[SHARD])))
    capsys.readouterr()
    assert cache("status") == 1
    out = capsys.readouterr().out
    assert any(SHARD in line and "not a safetensors header" in line for line in out.splitlines())
    assert "`wan-i2v cache verify --full` marks them" in out
    assert cache("verify", "--full") == 1
    assert cache("quick") == 0
    assert len(hub.content_gets(SHARD)) == 2
    assert cache("status") == 0


def test_status_of_a_missing_cache(tmp_path, capsys):
    assert cache("status") == 1
    assert "No Wan-AI/Wan2.2-I2V-A14B checkpoint" in capsys.readouterr().out
    with pytest.raises(WanError, match="cache quick"):
        cache("path")


def test_quick_refuses_when_the_disk_is_too_small(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100_000, 100_000))
    with pytest.raises(WanError, match="not enough disk space"):
        cache("quick")
    assert not any(hub.content_gets(path) for path in REQUIRED)


def test_disk_full_during_a_download_keeps_the_partial(hub, monkeypatch):
    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sources._HashingWriter, "write", no_space)
    with pytest.raises(WanError, match="disk full"):
        cache("quick")


def test_bytes_that_do_not_match_the_published_hash_never_look_complete(hub, tmp_path, monkeypatch):
    published = sources._hub_digest
    monkeypatch.setattr(sources, "_hub_digest", lambda s: "sha256:" + "0" * 64 if s.rfilename == T5 else published(s))
    with pytest.raises(WanError, match="do not match the published hash"):
        cache("quick")
    repo = tmp_path / "cache" / SPEC.repo_folder
    assert not (snapshot(tmp_path / "cache") / T5).exists()
    assert not list((repo / "blobs").glob("0000*"))
    assert cache("status") == 1


@pytest.mark.parametrize("link", [False, True], ids=["no-link", "link"])
@pytest.mark.parametrize("across_disks", [False, True], ids=["same-disk", "across-disks"])
def test_move(hub, tmp_path, monkeypatch, link, across_disks):
    old_root, new_root = tmp_path / "cache", tmp_path / "volume"
    assert cache("quick") == 0
    if across_disks:
        rename = os.rename

        def rename_or_exdev(src, dst):
            if Path(dst).name == SPEC.repo_folder and not Path(src).name.startswith("."):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            rename(src, dst)

        monkeypatch.setattr(commands.os, "rename", rename_or_exdev)
    assert cache("move", new_root, *(["--link"] if link else [])) == 0

    assert_checkpoint(snapshot(new_root))
    assert cache("--cache-dir", new_root, "status") == 0
    assert cache("status", "--cache-dir", new_root) == 0
    assert sorted(p.name for p in new_root.iterdir()) == [SPEC.repo_folder]  # no staging copy left
    leftovers = sorted(p.name for p in old_root.iterdir() if p.name != ".locks")
    assert leftovers == ([SPEC.repo_folder] if link else [])
    if link:
        assert (old_root / SPEC.repo_folder).is_symlink()
        assert resolve_checkpoint_dir().resolve() == snapshot(new_root).resolve()
        assert cache("status") == 0
    else:
        assert cache("status") == 1
        with pytest.raises(WanError):
            resolve_checkpoint_dir()


def test_a_huggingface_cli_snapshot_is_used_as_it_is(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WAN_I2V_HOME")
    downloaded = snapshot_download(
        SPEC.repo_id, cache_dir=constants.HF_HUB_CACHE, allow_patterns=list(SPEC.hub_patterns()), endpoint=hub.url
    )
    fetched = len(hub.requests)
    assert resolve_checkpoint_dir() == Path(downloaded) == snapshot(Path(constants.HF_HUB_CACHE))
    assert cache("status") == 0  # no manifest yet: presence and headers, on the disk alone
    assert len(hub.requests) == fetched
    assert cache("quick") == 0
    assert not any(method == "GET" and not url.startswith("/api/") for method, url, _ in hub.requests[fetched:])
    capsys.readouterr()
    assert cache("path") == 0
    assert capsys.readouterr().out.strip() == downloaded


def test_status_of_a_plain_checkpoint_folder(hub, tmp_path):
    assert cache("quick") == 0
    plain = tmp_path / "plain"
    shutil.copytree(snapshot(tmp_path / "cache"), plain)  # follows the links, as `cp -rL` would
    (plain / MANIFEST_NAME).unlink()
    assert cache("status", "--ckpt-dir", plain) == 0
    (plain / "Wan2.1_VAE.pth").unlink()
    assert cache("status", "--ckpt-dir", plain) == 1
    assert cache("verify", "--ckpt-dir", plain) == 1


def test_modelscope_needs_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes `import modelscope...` fail
    with pytest.raises(WanError, match=r"pip install 'wan-i2v\[modelscope\]'"):
        cache("quick", "--source", "modelscope")


def test_modelscope_source_fills_its_own_snapshot(tmp_path, monkeypatch):
    """Our glue around ModelScope's client, with the client faked (it is an optional extra)."""
    import hashlib

    def get_model_files(self, model_id, revision, recursive):
        assert model_id == SPEC.repo_id and recursive
        folders = [{"Path": "google", "Type": "tree"}]
        return folders + [
            {"Path": p, "Type": "blob", "Size": len(d), "Sha256": hashlib.sha256(d).hexdigest()} for p, d in FILES.items()
        ]

    def model_file_download(model_id, file_path, revision, local_dir):
        target = Path(local_dir) / file_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(FILES[file_path])
        return str(target)

    api = types.ModuleType("modelscope.hub.api")
    api.HubApi = type("HubApi", (), {"get_model_files": get_model_files})
    download = types.ModuleType("modelscope.hub.file_download")
    download.model_file_download = model_file_download
    for name, module in {"modelscope": types.ModuleType("modelscope"), "modelscope.hub": types.ModuleType("modelscope.hub"),
                         "modelscope.hub.api": api, "modelscope.hub.file_download": download}.items():
        monkeypatch.setitem(sys.modules, name, module)

    assert cache("quick", "--source", "modelscope") == 0
    folder = tmp_path / "cache" / SPEC.repo_folder / "snapshots" / "modelscope"
    assert_checkpoint(folder)
    assert resolve_checkpoint_dir() == folder
    assert cache("verify", "--full") == 0


def test_errors_reach_the_user_as_one_line(tmp_path, capsys):
    from wan_i2v.cli import main

    assert main(["cache", "--cache-dir", str(tmp_path / "empty"), "path"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "wan-i2v cache quick" in error


TI2V_SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")
TI2V_FILES = {  # Wan2.2-TI2V-5B's layout: one DiT at the top, the Wan2.2 VAE
    "config.json": b'{"model_type": "ti2v", "dim": 16, "num_layers": 2}',
    "diffusion_pytorch_model.safetensors.index.json": json.dumps({"weight_map": dict(zip("ab", TI2V_SHARDS))}).encode(),
    TI2V_SHARDS[0]: safetensors_bytes(20_000),
    TI2V_SHARDS[1]: safetensors_bytes(10_000),
    "Wan2.2_VAE.pth": torch_zip_bytes(8_000),
    T5: torch_zip_bytes(9_000),
    "google/umt5-xxl/tokenizer.json": b'{"model": "unigram"}',
    "google/umt5-xxl/tokenizer_config.json": b'{"model_max_length": 512}',
    "assets/logo.png": _noise.randbytes(2_000),  # not needed: never downloaded
    "README.md": b"# Wan2.2 TI2V",
}
TI2V = spec_for("ti2v-5b")


def test_each_model_has_its_repository_in_the_cache_and_status_and_verify_check_each(hub, tmp_path, monkeypatch, capsys):
    """quick --model fetches that model's files into its own repository folder; status and verify go
    through every model the cache has (status without torch, as always), each by its own spec's files."""
    assert cache("quick") == 0  # the default model, from the A14B hub
    with HubServer(TI2V.repo_id, TI2V_FILES) as ti2v_hub:
        monkeypatch.setenv("HF_ENDPOINT", ti2v_hub.url)
        assert cache("quick", "--model", "ti2v-5b") == 0
        assert "assets/logo.png" not in [path for _, path, _ in ti2v_hub.requests] and not ti2v_hub.content_gets("README.md")
    folder = tmp_path / "cache" / TI2V.repo_folder / "snapshots" / COMMIT
    for path in set(TI2V_FILES) - {"assets/logo.png", "README.md"}:
        assert (folder / path).read_bytes() == TI2V_FILES[path], path
    capsys.readouterr()
    assert cache("path", "--model", "ti2v-5b") == 0
    assert capsys.readouterr().out.strip() == str(folder)

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails: status must not need it
    assert cache("status") == 0
    out = capsys.readouterr().out
    assert f"revision {COMMIT[:12]}): Wan2.2-I2V-A14B\n" in out and f"revision {COMMIT[:12]}): Wan2.2-TI2V-5B\n" in out
    assert all(any(line.startswith(f"{path} ") and "verified" in line for line in out.splitlines()) for path in ("Wan2.2_VAE.pth", TI2V_SHARDS[1]))
    assert cache("verify", "--full") == 0
    assert cache("status", "--ckpt-dir", folder) == 0  # its config.json names its model

    (folder / TI2V_SHARDS[1]).unlink()
    capsys.readouterr()
    assert cache("status", "--model", "i2v-a14b") == 0
    assert "TI2V" not in capsys.readouterr().out
    assert cache("status") == 1
    assert "`wan-i2v cache quick --model ti2v-5b` fetches the files missing" in capsys.readouterr().out
    assert cache("verify") == 1
    assert f"missing: {TI2V_SHARDS[1]}" in capsys.readouterr().out


def test_status_of_a_model_not_in_the_cache_says_how_to_fetch_it(hub, capsys):
    assert cache("quick") == 0
    capsys.readouterr()
    assert cache("status", "--model", "ti2v-5b") == 1
    out = capsys.readouterr().out
    assert "No Wan-AI/Wan2.2-TI2V-5B checkpoint in" in out and "`wan-i2v cache quick --model ti2v-5b` downloads it" in out
    with pytest.raises(WanError, match=r"no Wan-AI/Wan2.2-TI2V-5B checkpoint .*cache quick --model ti2v-5b"):
        cache("path", "--model", "ti2v-5b")
