"""``wan-i2v serve``: the pipeline loaded once on 1..N GPUs behind an HTTP API and a web page, with a
job queue that survives a kill (``store``), one worker thread (``runner``) and the app (``app``)."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from wan_i2v.errors import WanError, counted, first_line
from wan_i2v.server.access import Tokens, server_tokens
from wan_i2v.server.app import create_app
from wan_i2v.config import SamplingDefaults
from wan_i2v.server.job_form import job_settings
from wan_i2v.server.requests import model_name
from wan_i2v.server.runner import Runner
from wan_i2v.server.store import JobStore

__all__ = ["JobStore", "Runner", "check_binding", "create_app", "job_settings", "serve", "server_tokens"]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, port: int, tokens: Tokens | None) -> None:
    """Refuse, before anything loads, a server open to the network without a token, and a port taken."""
    if not 0 < port < 65536:
        raise WanError(f"--port {port} is not a port", "give a number from 1 to 65535")
    if not _loopback(host) and tokens is None:
        raise WanError(f"--host {host} would let anyone who reaches this machine run jobs",
                       "give --token TOKEN (or set WAN_I2V_TOKEN) or --tokens FILE, or leave --host at 127.0.0.1")  # fmt: skip
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise WanError(f"cannot listen on {host}:{port}: {exc.strerror}", "give another --port, or stop what uses it") from None


def serve(open_session, *, state_dir: Path, host: str, port: int, tokens: Tokens | None, defaults: SamplingDefaults,
          max_queued: int = 1000, max_upload_mb: float = 50, queue_url: str | None = None, capacity=None,
          allowed_hosts: tuple[str, ...] = (), step_cache=None) -> int:  # fmt: skip
    """Run the server until interrupted; ``open_session()`` loads the pipeline (in the runner's
    thread: the API answers, and takes jobs, while it loads). ``queue_url``: a PostgreSQL database
    that servers on several machines share (``state_dir`` is then their shared folder); ``capacity``:
    the loaded plan's, which refuses the videos that would not fit; ``tokens``: the clients served
    (None: anyone, on loopback only).
    ``allowed_hosts``: the names clients reach it by, besides IP addresses and localhost; ``step_cache``:
    the pipeline's (a ``StepCacheConfig``), whose threshold each job may set for itself. Returns the
    exit code."""
    os.umask(0o077)  # the queue, images and videos are private whatever the shell's umask (the store fixes older files)
    store = JobStore(state_dir, max_queued=max_queued, queue_url=queue_url)
    logging.basicConfig(level=logging.INFO, format="wan-i2v: %(message)s", stream=sys.stderr)
    failure: list[BaseException] = []
    # Open event streams are cut after a few seconds of a stop, which would otherwise wait for them.
    config = uvicorn.Config(None, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=3)
    server = _Server(config)

    def failed(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    runner = Runner(store, open_session, on_failure=failed, model=model_name(defaults.model))
    config.app = create_app(store, runner, tokens=tokens, max_upload_bytes=int(max_upload_mb * 2**20), defaults=defaults,
                            capacity=capacity, allowed_hosts=allowed_hosts, loopback=_loopback(host), step_cache=step_cache)  # fmt: skip
    counts = store.counts()
    print(f"wan-i2v: serving on http://{host}:{port}/ (queue {store.database.describe()}, files in {state_dir}: "
          f"{counted(counts['queued'] + counts['in_progress'], 'job')} to run); "
          "loading the pipeline", file=sys.stderr)  # fmt: skip
    try:
        server.run()  # (the app's lifespan starts the runner, and stops it)
    finally:
        if server.force_exit:  # a second Ctrl-C: uvicorn skips the app's shutdown, and the running job must still go back to the queue
            runner.stop()
        store.close()
    if failure:
        if isinstance(failure[0], WanError) or not isinstance(failure[0], Exception):
            raise failure[0]  # a one-line error already, or an interrupt
        raise WanError(f"the server stopped: {type(failure[0]).__name__}: {first_line(failure[0])}", "its log is above; the same command resumes every job")
    return 0


class _Server(uvicorn.Server):
    @contextmanager
    def capture_signals(self):
        """SIGINT and SIGTERM stop the server and ``serve`` returns (uvicorn's own would raise the
        signal again on the way out, ending the process before the running job is put back)."""
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
