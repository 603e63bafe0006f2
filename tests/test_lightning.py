"""The 4-step LoRAs from the cache (`cache quick --lightning`, `generate --distilled`) and hf:// LoRAs,
against the real huggingface_hub client and a tiny hub on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save

from hub_server import COMMIT, HubServer
from wan_i2v.cache.hub_files import HubFile
from wan_i2v.cli import main
from wan_i2v.errors import WanError
from wan_i2v.models.spec import WAN22_I2V_A14B

LIGHTNING = WAN22_I2V_A14B.distilled_loras
REPO = "lightx2v/Wan2.2-Lightning"
HIGH, LOW = (HubFile.parse(LIGHTNING[name]).path for name in ("high", "low"))
OTHER = "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/high_noise_model.safetensors"


def tiny_lora(seed: int) -> bytes:
    """A LoRA in lightx2v's names for the tiny checkpoint's experts (dim 64): two layers, rank 4."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o"):
        tensors[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(4, 64, generator=g) * 0.1
        tensors[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(64, 4, generator=g) * 0.1
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(4.0)
    return save(tensors)


FILES = {HIGH: tiny_lora(1), LOW: tiny_lora(2), OTHER: tiny_lora(3), "README.md": b"# Wan2.2-Lightning"}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch, tmp_path):
    """Loopback only; the caches in this test's folder."""
    real_getaddrinfo = socket.getaddrinfo

    def loopback(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test tried to reach {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 5)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 5)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # (huggingface_hub keeps what arrived in whole chunks)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("WAN_I2V_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def hub(monkeypatch):
    with HubServer(REPO, FILES) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def snapshot(tmp_path):
    return tmp_path / "cache" / "models--lightx2v--Wan2.2-Lightning" / "snapshots" / COMMIT


def test_quick_lightning_fetches_the_pair_verified_and_status_shows_it(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub waits 1 s before resuming
    assert main(["cache", "status"]) == 1  # no model; the LoRAs' lines follow the model's table
    hub.drop_once[HIGH] = 4096  # one whole chunk, then the connection drops: resumed from there
    assert main(["cache", "quick", "--lightning"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "the 4-step LoRAs are complete: `wan-i2v generate --distilled` uses them"
    assert f"high-noise: {snapshot(tmp_path) / HIGH}" in out and f"low-noise: {snapshot(tmp_path) / LOW}" in out
    assert hub.content_gets(HIGH) == [None, "bytes=4096-"] and hub.content_gets(LOW) == [None]
    assert not hub.content_gets(OTHER) and not hub.content_gets("README.md")  # the pair, nothing else
    for path in (HIGH, LOW):
        assert (snapshot(tmp_path) / path).read_bytes() == FILES[path]
    assert (tmp_path / "cache" / "models--lightx2v--Wan2.2-Lightning" / "refs" / "main").read_text() == COMMIT
    manifest = json.loads((snapshot(tmp_path) / "wan-i2v-manifest.json").read_text())
    assert sorted(entry["path"] for entry in manifest["files"]) == sorted([HIGH, LOW])

    listed = len(hub.requests)
    assert main(["cache", "status"]) == 1  # the model is still missing
    assert len(hub.requests) == listed  # offline
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("4-step LoRA")]
    assert rows == [f"4-step LoRA, high-noise: {LIGHTNING['high']}  {len(FILES[HIGH]) / 1024:.1f} KiB  verified",
                    f"4-step LoRA, low-noise: {LIGHTNING['low']}  {len(FILES[LOW]) / 1024:.1f} KiB  verified"]  # fmt: skip

    assert main(["cache", "quick", "--lightning"]) == 0  # nothing left to do
    assert hub.content_gets(LOW) == [None]


def test_status_says_a_missing_or_partial_lora(hub, tmp_path, capsys):
    assert main(["cache", "quick", "--lightning"]) == 0
    blob = (snapshot(tmp_path) / LOW).resolve()
    blob.with_name(blob.name + ".incomplete").write_bytes(FILES[LOW][:100])
    blob.unlink()  # what a killed download leaves: a partial blob, no file in the snapshot
    capsys.readouterr()
    main(["cache", "status"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("4-step LoRA")]
    assert rows[0].endswith("verified") and rows[1].endswith("100 B  partial"), rows
