"""The 4-step LoRAs from the cache (`cache quick --lightning`, `generate --distilled`) and hf:// LoRAs,
against the real huggingface_hub client and a tiny hub on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
from dataclasses import replace

import av
import pytest
import torch
from filelock import FileLock
from huggingface_hub import constants
from safetensors.torch import save

from hub_server import COMMIT, HubServer
from wan_i2v.cache.hub_files import HubFile
from wan_i2v.cli import main
from wan_i2v.loading.lora import Loras
from wan_i2v.models.spec import WAN22_I2V_A14B
from wan_i2v.options import RunOptions
from wan_i2v.session import RunSession, plan
from wan_i2v.video import demo_image

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


# -- generate --distilled, and hf:// LoRAs, on the tiny checkpoint --------------------------------

RUN = ["--size", "96*64", "--frame-num", "5", "--device", "cpu", "--seed", "1"]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    demo_image(96, 64).save(path)
    return path


def generate(tiny_checkpoint, image, out, *flags) -> int:
    return main(["generate", "--ckpt-dir", str(tiny_checkpoint), "--image", str(image), "--prompt", "a", "--save-file", str(out), *RUN, *flags])


def lora_records(video) -> list[dict]:
    with av.open(str(video)) as container:
        return json.loads(container.metadata["comment"]).get("loras", [])


def test_distilled_merges_the_pair_from_the_cache(hub, tiny_checkpoint, image, tmp_path, capsys, monkeypatch):
    assert main(["cache", "quick", "--lightning"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # found on the disk alone
    listed = len(hub.requests)
    assert generate(tiny_checkpoint, image, tmp_path / "out.mp4", "--distilled") == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "4-step LoRAs" in line]
    assert said == [f"wan-i2v: --distilled: the 4-step LoRAs from the cache ({snapshot(tmp_path) / HIGH}, {snapshot(tmp_path) / LOW})"]
    assert lora_records(tmp_path / "out.mp4") == [
        {"expert": "high", "file": "high_noise_model.safetensors", "sha256": hashlib.sha256(FILES[HIGH]).hexdigest(), "strength": 1.0},
        {"expert": "low", "file": "low_noise_model.safetensors", "sha256": hashlib.sha256(FILES[LOW]).hexdigest(), "strength": 1.0},
    ]
    assert len(hub.requests) == listed
    # In Python: a session opened distilled merges them, and its jobs default to the recipe.
    options = RunOptions(ckpt_dir=tiny_checkpoint, device="cpu", dtype="fp32", distilled=True)
    with RunSession.open(options, height=64, width=96, frame_num=5, guided=False) as session:
        result = session.generate(image, "a", max_area=96 * 64, frame_num=5, seed=1, progress=False)
    assert (result.settings.solver, result.settings.steps, result.settings.guide_scale) == ("euler", 4, (1.0, 1.0))
    assert result.loras == lora_records(tmp_path / "out.mp4")
    # LoRAs given replace the pair; lightning=False (--no-lightning) leaves it out
    given = plan(replace(options, loras={"low": [tmp_path / "mine.safetensors"]}), height=64, width=96, frame_num=5)
    assert given.options.loras == Loras.of({"low": [tmp_path / "mine.safetensors"]})
    assert plan(replace(options, lightning=False), height=64, width=96, frame_num=5).options.loras == Loras()


def official_shapes_copy(tiny_checkpoint, tmp_path):
    """The tiny checkpoint whose configs claim the A14B's shapes: what the refusal reads, before any weight."""
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "a14b")
    for expert in WAN22_I2V_A14B.experts:
        config = folder / expert.folder / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}))
    return folder


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_distilled_without_the_pair_says_how_to_get_it(tiny_checkpoint, image, tmp_path, capsys, dry_run):
    out = tmp_path / "out.mp4"
    flags = ["--distilled", *(["--dry-run"] if dry_run else [])]
    assert generate(official_shapes_copy(tiny_checkpoint, tmp_path), image, out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`wan-i2v cache quick --lightning` fetches them" in err[0], err
    assert err[0].startswith("wan-i2v: error: --distilled needs Wan2.2-I2V-A14B's 4-step LoRAs, which are not in the cache")
    assert not out.exists()
    # a checkpoint of other shapes has no pair to miss (the existing tiny-checkpoint runs)
    assert generate(tiny_checkpoint, image, out, "--distilled", "--dry-run") == 0
    assert "is not of Wan2.2-I2V-A14B's shapes, which they are for: it runs without" in capsys.readouterr().err


def test_an_hf_lora_is_fetched_once_then_found_offline(hub, tiny_checkpoint, image, tmp_path, capsys, monkeypatch):
    lora = f"hf://{REPO}/{OTHER}"
    assert generate(tiny_checkpoint, image, tmp_path / "out.mp4", "--lora-low", f"{lora}:0.5", "--dry-run") == 0
    assert f"wan-i2v: {lora} is not in the cache {tmp_path / 'cache'} yet: the run fetches it" in capsys.readouterr().err
    assert not hub.content_gets(OTHER)  # a dry run fetches nothing
    assert generate(tiny_checkpoint, image, tmp_path / "out.mp4", "--steps", "1", "--guide-scale", "1", "--lora-low", f"{lora}:0.5") == 0
    assert lora_records(tmp_path / "out.mp4") == [
        {"expert": "low", "file": "high_noise_model.safetensors", "sha256": hashlib.sha256(FILES[OTHER]).hexdigest(), "strength": 0.5}
    ]
    assert hub.content_gets(OTHER) == [None]
    assert (snapshot(tmp_path) / OTHER).read_bytes() == FILES[OTHER]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    listed = len(hub.requests)
    capsys.readouterr()
    assert generate(tiny_checkpoint, image, tmp_path / "again.mp4", "--lora", f"hf://{REPO}@main/{OTHER}", "--dry-run") == 0
    assert len(hub.requests) == listed
    # with the pair fetched afterwards, the snapshot's manifest keeps both
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["cache", "quick", "--lightning"]) == 0
    manifest = json.loads((snapshot(tmp_path) / "wan-i2v-manifest.json").read_text())
    assert sorted(entry["path"] for entry in manifest["files"]) == sorted([HIGH, LOW, OTHER])


@pytest.mark.parametrize(
    "lora, message",
    [
        (f"hf://{REPO}", "is not a hub file (write hf://OWNER/REPO/PATH"),
        ("hf://lightx2v/", "is not a hub file"),
        (f"hf://{REPO}@/{OTHER}", "is not a hub file"),
        (f"hf://{REPO}/a/../{OTHER}", "is not a hub file"),
        (f"hf://{REPO}/{OTHER}:strong", "the LoRA strength 'strong'"),
        (f"hf://{REPO}/nothing/here.safetensors", f"{REPO} lists no file for nothing/here.safetensors (check the path"),
    ],
)  # fmt: skip
def test_a_bad_hf_lora_is_one_line(hub, tiny_checkpoint, image, tmp_path, capsys, lora, message):
    out = tmp_path / "out.mp4"
    assert generate(tiny_checkpoint, image, out, "--lora", lora) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_an_unreachable_hub_is_one_line(tiny_checkpoint, image, tmp_path, capsys, monkeypatch):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    assert generate(tiny_checkpoint, image, tmp_path / "out.mp4", "--lora", f"hf://{REPO}/{OTHER}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wan-i2v: error: cannot list {REPO} on http://127.0.0.1:"), err
    assert "check the network, HF_ENDPOINT and HF_TOKEN" in err[0]


def test_ranks_fetching_one_hf_lora_wait_for_each_other(hub, tmp_path):
    """Every rank of a launcher plans its run: one fetches, the others wait for it (a cache command refuses instead)."""
    locks = tmp_path / "cache" / ".locks" / "models--lightx2v--Wan2.2-Lightning"
    locks.mkdir(parents=True)
    taken, released = threading.Event(), threading.Event()

    def another_rank():
        with FileLock(locks / "wan-i2v.lock"):
            taken.set()
            time.sleep(0.3)
        released.set()

    threading.Thread(target=another_rank).start()
    taken.wait()
    assert HubFile.parse(f"hf://{REPO}/{OTHER}").fetched(tmp_path / "cache").read_bytes() == FILES[OTHER]
    assert released.is_set()
