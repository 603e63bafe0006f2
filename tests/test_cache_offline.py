"""Checking a checkpoint with no network, and the loader's hints: a folder of the user's own is never
sent to `wan-i2v cache quick`, and offline that advice says it must wait."""

from __future__ import annotations

import errno
import shutil
import socket

import pytest
from huggingface_hub import constants
from PIL import Image

from wan_i2v.cache import MANIFEST_NAME
from wan_i2v.cli import main
from wan_i2v.loading import checkpoint as ckpt
from wan_i2v.models.spec import WAN22_I2V_A14B as A14B

HIGH_DIR, LOW_DIR = (expert.folder for expert in A14B.experts)

SHARD = f"{LOW_DIR}/diffusion_pytorch_model-00001-of-00002.safetensors"
TOKENIZER_CONFIG = f"{A14B.files.tokenizer_dir}/tokenizer_config.json"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_RUN = ["--size", "64*96", "--frame-num", "9", "--steps", "4", "--quiet", "--device", "cpu"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Every host unreachable, as on a machine without a network, and a cache of the test's own."""

    def unreachable(host, *args, **kwargs):
        raise OSError(errno.ENETUNREACH, f"test tried to reach {host}")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as read at import, from the environment the tests run in
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "cache"))


@pytest.fixture(params=[False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def hub_offline(request, monkeypatch):
    if request.param:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return request.param


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "input.png"
    Image.new("RGB", (120, 80), (200, 120, 40)).save(path)
    return path


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "shard removed": (SHARD, lambda path: path.unlink(), "missing"),
    "shard cut short": (SHARD, cut_in_half, "cut short"),
    "T5 cut short": (A14B.files.text_encoder, cut_in_half, "not a zip archive"),
    "index not JSON": (f"{LOW_DIR}/{ckpt.SAFETENSORS_INDEX}", lambda path: path.write_text("{"), "not valid JSON"),
    "tokenizer removed": (TOKENIZER_CONFIG, lambda path: shutil.rmtree(path.parent), "missing"),
    # The loader's own rule: the tokenizer's vocabulary is tokenizer.json (without it a tokenizer of an
    # empty vocabulary was made, status alone said so), and an encoder narrower than umT5-XXL needs
    # its t5_config.json (status said complete, the run failed on the weights' shapes).
    "tokenizer vocabulary removed": (f"{A14B.files.tokenizer_dir}/tokenizer.json", lambda path: path.unlink(), "missing"),
    "T5 config removed": ("t5_config.json", lambda path: path.unlink(), "missing"),
}


def damaged_copy(tiny_checkpoint, folder, damage):
    shutil.copytree(tiny_checkpoint, folder)
    path, harm, _ = DAMAGES[damage]
    harm(folder / path)
    return folder


def row(out, path):
    return next(line for line in out.splitlines() if line.startswith(f"{path} "))


def in_cache(tiny_checkpoint, tmp_path):
    """The tiny checkpoint as a snapshot another tool downloaded into the cache: no manifest of ours."""
    repo = tmp_path / "cache" / A14B.repo_folder
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return shutil.copytree(tiny_checkpoint, repo / "snapshots" / COMMIT)


def test_status_checks_a_folder_offline(tiny_checkpoint, hub_offline, capsys):
    assert main(["cache", "status", "--ckpt-dir", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "sizes not compared" in out and out.endswith("complete\n")
    for path in (SHARD, A14B.files.vae, A14B.files.text_encoder, TOKENIZER_CONFIG, f"{HIGH_DIR}/config.json"):
        assert row(out, path).split()[-2:] == ["present", "reads"]
    assert not (tiny_checkpoint / MANIFEST_NAME).exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_status_names_the_damaged_file_of_a_folder(tiny_checkpoint, tmp_path, capsys, damage):
    folder = damaged_copy(tiny_checkpoint, tmp_path / "mine", damage)
    assert main(["cache", "status", "--ckpt-dir", str(folder)]) == 1
    out = capsys.readouterr().out
    path, _, finding = DAMAGES[damage]
    assert finding in row(out, path)
    assert row(out, A14B.files.vae).endswith("reads")  # the others are still checked
    assert out.splitlines()[-1] == f"incomplete: copy complete files into {folder} again"
    assert "cache quick" not in out


def test_status_of_a_folder_with_an_unreadable_manifest(tiny_checkpoint, tmp_path, capsys):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "mine")
    (folder / MANIFEST_NAME).write_text("{")
    assert main(["cache", "status", "--ckpt-dir", str(folder)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "delete it" in error and "cache quick" not in error


def test_status_of_a_snapshot_another_tool_downloaded(tiny_checkpoint, tmp_path, hub_offline, capsys):
    snapshot = in_cache(tiny_checkpoint, tmp_path)
    assert main(["cache", "status"]) == 0
    assert capsys.readouterr().out.startswith(f"{snapshot}  (no {MANIFEST_NAME}: sizes not compared)")
    cut_in_half(snapshot / SHARD)
    assert main(["cache", "status"]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert "`wan-i2v cache quick` fetches" in last and ("HF_HUB_OFFLINE is unset" in last) == hub_offline


def test_verify_without_a_manifest_needs_the_hub_and_says_so(tiny_checkpoint, hub_offline, capsys):
    assert main(["cache", "verify", "--full", "--ckpt-dir", str(tiny_checkpoint)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"`wan-i2v cache status --ckpt-dir {tiny_checkpoint}`" in error
    assert ("HF_HUB_OFFLINE is set" if hub_offline else "cannot list") in error


@pytest.mark.parametrize("damage", ["shard removed", "shard cut short", "T5 cut short", "tokenizer vocabulary removed", "T5 config removed"])
def test_generate_on_a_damaged_folder_of_ones_own(tiny_checkpoint, image_file, tmp_path, capsys, damage):
    folder = damaged_copy(tiny_checkpoint, tmp_path / "mine", damage)
    args = ["generate", "--ckpt-dir", str(folder), "--image", str(image_file), "--prompt", "a boat"]
    assert main([*args, "--save-file", str(tmp_path / "out.mp4"), *TINY_RUN]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("wan-i2v: error: ")
    assert str(folder / DAMAGES[damage][0]) in error
    assert f"`wan-i2v cache status --ckpt-dir {folder}`" in error and "cache quick" not in error


def test_generate_on_the_caches_damaged_checkpoint(tiny_checkpoint, image_file, tmp_path, hub_offline, capsys):
    cut_in_half(in_cache(tiny_checkpoint, tmp_path) / SHARD)
    args = ["generate", "--image", str(image_file), "--prompt", "a boat", "--save-file", str(tmp_path / "out.mp4")]
    assert main([*args, *TINY_RUN]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and SHARD in error
    assert "`wan-i2v cache status` lists" in error and "`wan-i2v cache quick` fetches" in error
    assert ("HF_HUB_OFFLINE is unset" in error) == hub_offline
