"""Several clients, each with its own token (``serve --tokens FILE``): the file's format, each client
seeing only its own jobs (another client's answers 404, as a job that does not exist), an admin
seeing all, the client kept with its jobs through restarts, and /health's counts kept from strangers
once the server is on a network."""

from __future__ import annotations

import re
import warnings
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from server_process import IdleRunner, Server, free_port, png_bytes
from wan_i2v.cli import main
from wan_i2v.config import SamplingDefaults
from wan_i2v.server import JobStore, create_app, job_settings
from wan_i2v.server.access import Client, Tokens, read_tokens

TOKENS_FILE = """# the studio's clients
alice s3cret-of-alice

   bob   s3cret-of-bob
root s3cret-of-root admin
"""
ALICE, BOB, ROOT = ({"Authorization": f"Bearer s3cret-of-{name}"} for name in ("alice", "bob", "root"))
SETTINGS = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())


@pytest.fixture()
def tokens(tmp_path) -> Tokens:
    path = tmp_path / "tokens"
    path.write_text(TOKENS_FILE, encoding="utf-8-sig")  # with a byte-order mark, as Notepad saves it
    path.chmod(0o600)
    return read_tokens(path)


def app_over(store, tokens, *, loopback: bool = True):
    return create_app(store, IdleRunner(), tokens=tokens, loopback=loopback)


def submit(http, headers, key: str | None = None):
    files = {"input_reference": ("input.png", png_bytes(), "image/png")}
    return http.post("/v1/videos", files=files, data={"prompt": "a boat"}, headers={**headers, **({"Idempotency-Key": key} if key else {})})


def listed(http, headers) -> list[str]:
    answer = http.get("/v1/videos", headers=headers)
    assert answer.status_code == 200, answer.text
    return [job["id"] for job in answer.json()["data"]]


def complete(store, job_id: str, video: bytes) -> None:
    """Run the job as a server of the queue would (the app's runner is a stand-in)."""
    while (claimed := store.claim()).id != job_id:
        store.finish(claimed.id, "failed", error="not this test's")
    store.video_path(job_id).write_bytes(video)
    assert store.finish(job_id, "completed")


# The file's format
def test_a_tokens_file_names_each_client_and_marks_admins(tokens):
    assert tokens.client("s3cret-of-alice") == Client("alice", admin=False)
    assert tokens.client("s3cret-of-bob") == Client("bob", admin=False)
    assert tokens.client("s3cret-of-root") == Client("root", admin=True)
    for wrong in ("", "alice", "s3cret-of-ali", "s3cret-of-alice ", "# the studio's clients"):
        assert tokens.client(wrong) is None, wrong


def test_a_tokens_file_that_other_users_may_read_is_warned_of(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKENS_FILE)
    path.chmod(0o644)
    with pytest.warns(UserWarning, match=re.escape(f"--tokens {path} can be read by other users of this machine (mode 644); chmod 600 {path}")):
        read_tokens(path)
    path.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_tokens(path)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("alice s3cret-a\nbob:s3cret-b\n", "line 2: 1 word where NAME TOKEN or NAME TOKEN admin was expected"),
        ("alice s3cret-a # mine\n", "line 1: 4 words where"),
        ("alice s3cret-a root\n", "line 1: the only word allowed after the token is admin"),
        ("# ok\nal/ice s3cret-a\n", "line 2: the name must be"),
        ("alice s3cret-a\nalice s3cret-b\n", "line 2: the name alice is on line 1 already"),
        ("alice s3cret-a\nbob s3cret-a admin\n", "line 2: the token is on line 1 already"),
        ("# nobody yet\n\n", "names no client"),
    ],
)
def test_a_malformed_tokens_file_is_one_line_naming_the_line_not_the_token(tmp_path, capsys, text, problem):
    path = tmp_path / "tokens"
    path.write_text(text)
    assert main(["serve", "--tokens", str(path), "--port", str(free_port())]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"wan-i2v: error: --tokens {path} {problem}"), error
    assert "s3cret" not in error[0]


def test_tokens_do_not_combine_with_a_single_token(tmp_path, capsys, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text(TOKENS_FILE)
    assert main(["serve", "--tokens", str(tmp_path / "missing"), "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.startswith(f"wan-i2v: error: cannot read --tokens {tmp_path / 'missing'}")
    assert main(["serve", "--tokens", str(path), "--token", "x", "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.startswith("wan-i2v: error: --tokens does not combine with --token, --token-file or WAN_I2V_TOKEN")
    monkeypatch.setenv("WAN_I2V_TOKEN", "x")
    assert main(["serve", "--tokens", str(path), "--port", str(free_port())]) == 2
    assert "does not combine" in capsys.readouterr().err


# Each client's jobs
@pytest.fixture(params=["sqlite", "postgresql"])
def queue_url(request) -> str | None:
    return None if request.param == "sqlite" else request.getfixturevalue("queue_url")


def test_each_client_lists_reads_and_deletes_only_its_own_jobs_and_an_admin_all(tmp_path, queue_url, tokens):
    store = JobStore(tmp_path / "state", queue_url=queue_url)
    with TestClient(app_over(store, tokens), base_url="http://127.0.0.1") as http:
        mine = submit(http, ALICE, key="same").json()["id"]
        theirs = submit(http, BOB, key="same")  # the same key and body from another client: a job of its own
        assert theirs.status_code == 200 and theirs.json()["id"] != mine
        theirs = theirs.json()["id"]
        assert submit(http, ALICE, key="same").json()["id"] == mine
    store.close()

    store = JobStore(tmp_path / "state", queue_url=queue_url)  # a restart: each job keeps its client
    complete(store, mine, b"alice's video")
    complete(store, theirs, b"bob's video")
    app = app_over(store, tokens)
    with TestClient(app, base_url="http://127.0.0.1") as http:
        assert listed(http, ALICE) == [mine] and listed(http, BOB) == [theirs] and listed(http, ROOT) == [theirs, mine]
        for path in (f"/v1/videos/{mine}", f"/v1/videos/{mine}/content", f"/v1/videos/{mine}/events"):
            answer = http.get(path, headers=BOB)  # as if it did not exist
            assert answer.status_code == 404 and answer.json()["error"]["message"] == f"no video {mine}", path
        assert http.head(f"/v1/videos/{mine}/content", headers=BOB).status_code == 404
        assert http.get("/v1/videos", params={"after": mine}, headers=BOB).status_code == 404
        assert http.delete(f"/v1/videos/{mine}", headers=BOB).status_code == 404
        assert http.get(f"/v1/videos/{mine}/content", headers=ALICE).content == b"alice's video"
        assert http.get(f"/v1/videos/{mine}/content", headers=ROOT).content == b"alice's video"
        assert http.get(f"/v1/videos/{mine}/events", headers=ALICE).text.startswith("event: done")
        assert http.get("/metrics", headers=ALICE).status_code == 403 and http.get("/metrics", headers=ROOT).status_code == 200
        assert http.delete(f"/v1/videos/{theirs}", headers=ROOT).json()["deleted"] is True
        assert listed(http, BOB) == [] and listed(http, ALICE) == [mine]
    with TestClient(app, base_url="http://127.0.0.1", cookies={"wan_i2v_token": quote("s3cret-of-alice", safe="")}) as page:
        assert listed(page, {}) == [mine]  # the page sends the token it was given, as a cookie
        assert page.get(f"/v1/videos/{mine}/content").content == b"alice's video"
    store.close()


def test_jobs_from_before_clients_are_an_admins_and_everyones_without_tokens(tmp_path, queue_url, tokens):
    store = JobStore(tmp_path / "state", queue_url=queue_url)
    old = store.submit(png_bytes(), SETTINGS)[0].id
    with store._db(write=True) as db:  # the queue as a server before clients left it
        db.execute("DROP INDEX jobs_by_client")
        db.execute("ALTER TABLE jobs DROP COLUMN client")
    store.close()
    store = JobStore(tmp_path / "state", queue_url=queue_url)
    with TestClient(app_over(store, tokens), base_url="http://127.0.0.1") as http:
        assert listed(http, ALICE) == [] and http.get(f"/v1/videos/{old}", headers=ALICE).status_code == 404
        assert listed(http, ROOT) == [old]
        new = submit(http, ALICE).json()["id"]
    for single in (None, Tokens.single("one")):  # one token, or none: every job is its one client's, as before
        with TestClient(app_over(store, single), base_url="http://127.0.0.1") as http:
            assert listed(http, {"Authorization": "Bearer one"}) == [new, old]
            assert http.get("/metrics", headers={"Authorization": "Bearer one"}).status_code == 200
    store.close()


# /health
def test_health_shows_its_counts_only_to_clients_once_on_a_network(tmp_path, tokens):
    store = JobStore(tmp_path / "state")
    store.submit(png_bytes(), SETTINGS)
    with TestClient(app_over(store, tokens, loopback=False), base_url="http://127.0.0.1") as http:
        for stranger in ({}, {"Authorization": "Bearer wrong"}):
            health = http.get("/health", headers=stranger)
            assert health.status_code == 200 and health.json()["status"] == "ready"
            assert not {"queued", "in_progress"} & set(health.json()), health.json()
        assert http.get("/health", headers=BOB).json()["queued"] == 1
    with TestClient(app_over(store, tokens, loopback=True), base_url="http://127.0.0.1") as http:
        assert http.get("/health").json()["queued"] == 1  # on this machine only: as before
    store.close()


# The real server
def test_serve_with_tokens_on_the_network_keeps_each_clients_jobs_through_a_kill(tiny_checkpoint, tmp_path):
    import httpx2

    path = tmp_path / "tokens"
    path.write_text(TOKENS_FILE)
    path.chmod(0o600)
    server = Server(tiny_checkpoint, tmp_path / "state", "--tokens", str(path), "--host", "0.0.0.0", token=None).start()
    try:
        with httpx2.Client(base_url=server.url, timeout=30) as http:
            assert "queued" not in http.get("/health").json() and "queued" in http.get("/health", headers=ALICE).json()
            assert http.get("/v1/videos").status_code == 401
            mine = server.submit(http, headers=ALICE).json()["id"]
            theirs = server.submit(http, headers=BOB).json()["id"]
            assert listed(http, ALICE) == [mine] and listed(http, BOB) == [theirs] and listed(http, ROOT) == [theirs, mine]
            assert http.get(f"/v1/videos/{mine}", headers=BOB).status_code == 404
    finally:
        server.kill()
    store = JobStore(tmp_path / "state")  # what the next start reads
    assert [job.id for job in store.list(client="alice")[0]] == [mine] and [job.id for job in store.list(client="bob")[0]] == [theirs]
    assert store.get(mine, client="bob") is None and store.get(mine, client="alice").id == mine
    store.close()
