"""The server's modules as a developer meets them: each database behind the queue provides what the
store needs of it (``server.queue``), and the two never import each other."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import wan_i2v.server
from wan_i2v.server.postgres import AdvisoryLockLiveness, PostgresQueue
from wan_i2v.server.queue import Liveness, Queue
from wan_i2v.server.store import FileLiveness, SQLiteQueue

SERVER = Path(wan_i2v.server.__file__).parent


def members(protocol) -> tuple[dict[str, inspect.Signature], set[str]]:
    """A protocol's methods (with their signatures) and its data attributes, as its source declares them."""
    methods = {name: inspect.signature(value) for name, value in vars(protocol).items()
               if inspect.isfunction(value) and not name.startswith("_")}  # (typing's own hooks are not the protocol's)
    return methods, set(protocol.__annotations__)


@pytest.mark.parametrize("protocol,implementation", [(Queue, SQLiteQueue), (Queue, PostgresQueue),
                                                     (Liveness, FileLiveness), (Liveness, AdvisoryLockLiveness)])  # fmt: skip
def test_each_database_provides_every_member_of_the_protocol(protocol, implementation):
    methods, attributes = members(protocol)
    assert methods and attributes  # (the protocol was read)
    for name, signature in methods.items():
        assert callable(getattr(implementation, name, None)), f"{implementation.__name__} lacks {name}()"
        given = inspect.signature(getattr(implementation, name))
        assert [(p.name, p.kind) for p in given.parameters.values()] == [(p.name, p.kind) for p in signature.parameters.values()], name
    for name in attributes:  # a class attribute, or one its instances are declared to have
        assert hasattr(implementation, name) or name in inspect.get_annotations(implementation), f"{implementation.__name__} lacks {name}"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_postgres_does_not_import_the_store_that_chooses_it():
    assert "wan_i2v.server.store" not in imported_modules(SERVER / "postgres.py")
    assert {"wan_i2v.server.queue"} <= imported_modules(SERVER / "postgres.py") & imported_modules(SERVER / "store.py")



def test_the_api_shows_a_running_job_as_the_video_object(tmp_path):
    """The store's row becomes the API's JSON in the API layer, to the byte as clients have always read it."""
    from fastapi.testclient import TestClient

    from server_process import IdleRunner
    from wan_i2v.server.app import create_app
    from wan_i2v.server.schemas import Video
    from wan_i2v.server.store import JobStore

    store = JobStore(tmp_path / "state")
    settings = {"prompt": "a boat", "size": "96*160", "frame_num": 81, "steps": 8, "seed": 7}
    job, _ = store.submit(b"image", settings)
    store.claim()
    store.progress(job.id, 3, 2.0)
    running = store.get(job.id)
    assert Video.of(running).progress == 37 and Video.of(running).eta_seconds == 10.0 and Video.of(running).seconds == "5"
    with TestClient(create_app(store, IdleRunner()), base_url="http://127.0.0.1") as http:
        answer = http.get(f"/v1/videos/{job.id}")
    store.close()
    assert answer.content.decode() == (
        f'{{"id":"{job.id}","object":"video","model":"wan2.2-i2v-a14b","status":"in_progress","progress":37,'
        f'"created_at":{int(job.created_at)},"completed_at":null,"error":null,"prompt":"a boat","seconds":"5","size":"96*160",'
        '"seed":7,"step":3,"seconds_per_step":2.0,"eta_seconds":10.0,'
        '"settings":{"prompt":"a boat","size":"96*160","frame_num":81,"steps":8,"seed":7}}'
    )  # fmt: skip


def test_the_videos_router_serves_alone_with_the_client_as_a_dependency(tmp_path):
    """A router needs only the server's parts and the request's client, both FastAPI dependencies: here
    the client is given by an override, with no token middleware, and sees only its own jobs."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server_process import IdleRunner
    from wan_i2v.server.access import Client
    from wan_i2v.server.context import ServerContext, request_client
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server.routes import videos
    from wan_i2v.server.store import JobStore

    store = JobStore(tmp_path / "state")
    settings = {"prompt": "a boat", "size": "96*160", "frame_num": 5, "steps": 2, "seed": 1}
    mine, _ = store.submit(b"image", settings, client="alice")
    theirs, _ = store.submit(b"image", settings, client="bob")
    app = FastAPI()
    app.include_router(videos.router)
    app.state.context = ServerContext(store, IdleRunner(), events=None, defaults=SamplingDefaults(), capacity=None, max_upload_bytes=2**20,
                                      loopback=True, metrics=None)  # fmt: skip
    app.dependency_overrides[request_client] = lambda: Client("alice", admin=False)
    with TestClient(app) as http:
        listed = http.get("/v1/videos").json()
        hidden = http.get(f"/v1/videos/{theirs.id}")
    store.close()
    assert [job["id"] for job in listed["data"]] == [mine.id] and listed["first_id"] == mine.id
    assert hidden.status_code == 404


class NoJobsSession:
    """A runner's session that is given no job: it only records that it was closed."""

    closed = False

    def close(self):
        self.closed = True


def test_the_runner_runs_while_the_app_does(tmp_path):
    """The app's lifespan starts the runner (which opens its session) and stops it (which closes it)."""
    from fastapi.testclient import TestClient

    from server_process import wait_until
    from wan_i2v.server import JobStore, Runner, create_app

    session = NoJobsSession()
    store = JobStore(tmp_path / "state")
    runner = Runner(store, lambda: session)
    with TestClient(create_app(store, runner), base_url="http://127.0.0.1") as http:
        wait_until(lambda: http.get("/health").json()["status"] == "ready", timeout=10)
        assert runner.thread.is_alive() and not session.closed
    store.close()
    assert not runner.thread.is_alive() and session.closed


def test_a_runner_stopped_while_it_loads_closes_without_saying_ready(tmp_path, caplog):
    """A stop (a pod going away) that arrives while the pipeline loads: the runner closes its session as
    soon as it has one, and the log does not announce a server ready for jobs it will not take."""
    from wan_i2v.server import JobStore, Runner

    session = NoJobsSession()
    store = JobStore(tmp_path / "state")

    def open_session():
        runner.stopping.set()  # the stop arrives during the loading
        return session

    runner = Runner(store, open_session)
    with caplog.at_level("INFO", logger="wan_i2v.server"):
        runner.start()
        runner.thread.join(timeout=10)
    store.close()
    assert not runner.thread.is_alive() and session.closed
    assert "ready" not in [record.getMessage() for record in caplog.records]
