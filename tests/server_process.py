"""A real `wan-i2v serve` process on the tiny checkpoint, for the server's tests."""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
from PIL import Image

TOKEN = "test+token/="  # characters a cookie carries percent-encoded
# Small videos with few steps: a job takes about a second on two CPU cores.
JOB_OPTIONS = ["--size", "96*160", "--frame-num", "5", "--steps", "2"]


def wait_until(condition, timeout: float = 120, every: float = 0.05):
    """Poll ``condition()`` until it is true (returned); fail after ``timeout`` seconds rather than hang."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {condition}")
        time.sleep(every)
    return value


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port from inside it (what binding port 0
    gives) can be taken, before the server binds it, by any outgoing connection of the tests beside."""
    try:
        lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lowest_ephemeral = 32768
    below = range(10000, lowest_ephemeral)
    for port in random.sample(below, min(len(below), 100)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # (a machine with no room below its ephemeral range)
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_bytes(width: int = 160, height: int = 96, colour=(200, 120, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """``wan-i2v serve`` in a subprocess; ``start`` waits until it is ready, ``kill`` is a kill -9."""

    def __init__(self, ckpt: Path, state_dir: Path, *extra: str, token: str | None = TOKEN, port: int | None = None, env: dict | None = None):
        self.ckpt, self.state_dir, self.extra, self.token = ckpt, state_dir, extra, token
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.moves_port = port is None  # until it first starts: then clients know its port
        self._listen_on(port or free_port())
        self.process: subprocess.Popen | None = None

    def _listen_on(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.state_dir.parent / f"server-{self.port}.log"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, headers=self.headers, timeout=30)

    def start(self, timeout: float = 120) -> "Server":
        command = [sys.executable, "-m", "wan_i2v", "serve", "--ckpt-dir", str(self.ckpt), "--device", "cpu",
                   "--state-dir", str(self.state_dir), "--port", str(self.port), *JOB_OPTIONS, *self.extra]  # fmt: skip
        if self.token:
            command += ["--token", self.token]
        with open(self.log, "a") as log:
            # (a umask as most shells have: the server must make its files private itself)
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, umask=0o022)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self.moves_port and "Address already in use" in self.log.read_text():  # taken since it was found free
                    self._listen_on(free_port())
                    return self.start(max(1.0, deadline - time.monotonic()))
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx2.get(f"{self.url}/health", timeout=2).json()["status"] == "ready":
                    self.moves_port = False
                    return self
            except (httpx2.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready in {timeout} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def submit(self, client: httpx2.Client, prompt: str = "a boat", image: bytes | None = None, headers: dict | None = None, **fields):
        files = {"input_reference": ("input.png", image if image is not None else png_bytes(), "image/png")}
        data = {"prompt": prompt, **{key: str(value) for key, value in fields.items()}}
        return client.post("/v1/videos", files=files, data=data, headers=headers or {})

    def wait_for(self, client: httpx2.Client, job_id: str, statuses=("completed", "failed", "cancelled"), timeout: float = 120) -> dict:
        return wait_until(lambda: (job := client.get(f"/v1/videos/{job_id}").json())["status"] in statuses and job, timeout)

    def step_of(self, client: httpx2.Client, job_id: str) -> int:
        return client.get(f"/v1/videos/{job_id}").json()["step"]

    def completions(self, job_id: str) -> int:
        """How many times a server of this log recorded the job's completion."""
        return self.log.read_text().count(f"completed {job_id}\n")


class IdleRunner:
    """A stand-in for the server's runner that runs nothing (another server of the queue, or the test, runs the jobs)."""

    status = "ready"

    def start(self):
        pass

    def notify(self):
        pass

    def stop(self):
        pass
