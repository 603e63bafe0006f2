"""`wan-i2v serve` as clients see it: a real server process on the tiny checkpoint, on the CPU."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import av
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_process import IdleRunner, Server, free_port, png_bytes, wait_until
from wan_i2v.cli import main


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    running = Server(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "state", "--max-queue", "3", "--max-upload-mb", "1").start()
    yield running
    assert running.stop() == 0


@pytest.fixture()
def client(server):
    with server.client() as http:
        yield http


def frames_of(path_or_bytes) -> np.ndarray:
    import io

    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    with av.open(source) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_a_job_runs_to_an_mp4_with_its_settings(server, client):
    answer = server.submit(client, "a red boat", seed=7, frame_num=9)
    assert answer.status_code == 200
    job = answer.json()
    assert job["object"] == "video" and job["status"] == "queued" and job["progress"] == 0 and job["completed_at"] is None
    assert job["seed"] == 7 and job["settings"]["frame_num"] == 9 and job["settings"]["steps"] == 2  # the server's default
    done = server.wait_for(client, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"] >= done["created_at"]
    video = client.get(f"/v1/videos/{job['id']}/content")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    frames = frames_of(video.content)
    assert frames.shape == (9, 96, 160, 3)
    with av.open(__import__("io").BytesIO(video.content)) as container:
        recorded = json.loads(container.metadata["comment"])
    assert recorded["seed"] == 7 and recorded["prompt"] == "a red boat"


def test_a_job_with_a_last_frame_an_exact_size_and_a_frame_rate(server, client):
    import hashlib
    import io

    from PIL import Image

    last = png_bytes(96, 160, colour=(20, 200, 90))  # upright where the first is wide: center-cropped to the video
    files = {"input_reference": ("first.png", png_bytes(), "image/png"), "last_image": ("last.png", last, "image/png")}
    answer = client.post("/v1/videos", files=files, data={"prompt": "a boat", "height": "64", "width": "64", "frame_num": "5", "fps": "8", "seed": "3"})
    assert answer.status_code == 200, answer.text
    settings = answer.json()["settings"]
    assert settings["last_image_file_sha256"] == hashlib.sha256(last).hexdigest()
    assert (settings["height"], settings["width"], settings["fps"], settings["size"]) == (64, 64, 8, "64*64")
    assert answer.json()["seconds"] == "0.5"  # 4 frames' time at 8 frames a second
    assert server.wait_for(client, answer.json()["id"])["status"] == "completed"
    video = client.get(f"/v1/videos/{answer.json()['id']}/content").content
    assert frames_of(video).shape == (5, 64, 64, 3)
    with av.open(io.BytesIO(video)) as container:
        recorded = json.loads(container.metadata["comment"])
        assert container.streams.video[0].average_rate == 8
    assert recorded["conditioning"] == "first and last frame"
    assert recorded["last_image_sha256"] == hashlib.sha256(np.asarray(Image.open(io.BytesIO(last)).convert("RGB")).tobytes()).hexdigest()

    bad = client.post("/v1/videos", files={**files, "last_image": ("last.png", b"not an image", "image/png")}, data={"prompt": "a boat"})
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("cannot read image last.png: not an image file")
    text = client.post("/v1/videos", files={"input_reference": files["input_reference"]}, data={"prompt": "a boat", "last_image": "last.png"})
    assert text.status_code == 400 and "last_image must be a file" in text.json()["error"]["message"]


def test_a_seed_not_given_is_drawn_and_shown(server, client):
    first, second = (server.submit(client, seed=-1).json() for _ in range(2))
    assert isinstance(first["seed"], int) and first["seed"] != second["seed"]
    assert 0 <= first["seed"] < 2**53  # exact in JSON clients (JavaScript's numbers)
    server.wait_for(client, second["id"])


def cli_error(capsys, *args) -> str:
    """The CLI's one-line error for the same bad input."""
    assert main(["generate", "--image", "missing.png", "--prompt", "x", *args]) == 2
    line = capsys.readouterr().err.strip()
    return line.removeprefix("wan-i2v: error: ")


@pytest.mark.parametrize(
    "fields,cli_args",
    [
        ({"frame_num": 6}, ["--frame-num", "6"]),
        ({"frame_num": 10001}, ["--frame-num", "10001"]),
        ({"size": "8192*8192"}, ["--size", "8192*8192"]),
        ({"size": "huge"}, ["--size", "huge"]),
        ({"steps": 0}, ["--steps", "0"]),
        ({"steps": 5000}, ["--steps", "5000"]),
        ({"guide_scale": "99"}, ["--guide-scale", "99"]),
    ],
)
def test_bad_settings_get_the_clis_message_naming_the_field(server, client, capsys, fields, cli_args):
    answer = server.submit(client, **fields)
    assert answer.status_code == 400
    [field] = fields  # (the request names the field where the command line names its flag)
    assert answer.json()["error"]["message"] == cli_error(capsys, *cli_args).replace(cli_args[0], field)


@pytest.mark.parametrize(
    "image,expected",
    [
        (b"not an image at all", "cannot read image input.png: not an image file"),
        (png_bytes()[:200], "cannot read image input.png"),  # cut short
        (png_bytes(2000, 20), "too narrow"),
    ],
)
def test_bad_images_are_400_with_one_line(server, client, image, expected):
    answer = server.submit(client, image=image)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert expected in message and "\n" not in message and "Traceback" not in answer.text


def test_bad_requests(server, client):
    no_image = client.post("/v1/videos", data={"prompt": "x"})
    assert no_image.status_code == 400 and "input_reference is required" in no_image.json()["error"]["message"]
    no_prompt = client.post("/v1/videos", files={"input_reference": ("a.png", png_bytes(), "image/png")})
    assert no_prompt.status_code == 400 and "prompt is required" in no_prompt.json()["error"]["message"]
    words = server.submit(client, frame_num="many")
    assert words.status_code == 400 and words.json()["error"]["message"] == "frame_num must be a whole number, not 'many'"
    assert client.post("/v1/videos", content=b"{}", headers={"content-type": "application/json"}).status_code == 400
    too_big = server.submit(client, image=b"\0" * (2 * 2**20))
    assert too_big.status_code == 413 and "over the limit of 1 MiB" in too_big.json()["error"]["message"]
    unknown = client.get("/v1/videos/video_nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "no video video_nope"
    assert client.get("/v1/videos/video_nope/content").status_code == 404
    assert client.delete("/v1/videos/video_nope").status_code == 404
    assert client.get("/v1/videos", params={"limit": 0}).status_code == 400


def test_the_token_is_required_except_for_health_and_the_page(server):
    import httpx2

    with httpx2.Client(base_url=server.url) as anonymous:
        for request in (anonymous.get("/v1/videos"), anonymous.get("/metrics"), server.submit(anonymous)):
            assert request.status_code == 401 and "token" in request.json()["error"]["message"]
        wrong = anonymous.get("/v1/videos", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    with httpx2.Client(base_url=server.url, cookies={"wan_i2v_token": server.token}) as page:
        assert page.get("/v1/videos").status_code == 200  # the page's way: a <video> cannot send a header
    with httpx2.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/health").json()["status"] == "ready"
        assert "<form" in anonymous.get("/").text


def job_count(client) -> int:
    families = {family.name: family for family in text_string_to_metric_families(client.get("/metrics").text)}
    return int(sum(sample.value for sample in families["wan_i2v_jobs"].samples))


def test_a_host_name_not_allowed_is_refused_dns_rebinding(server, client):
    rebound = client.get("/v1/videos", headers={"Host": "rebind.evil.example"})
    assert rebound.status_code == 400 and "data" not in rebound.json()
    assert rebound.json()["error"]["message"] == ("Host rebind.evil.example is not a name of this server; "
                                                  "its operator may allow it with --allowed-hosts rebind.evil.example")  # fmt: skip
    assert client.get("/health", headers={"Host": f"rebind.evil.example:{server.port}"}).status_code == 400
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST", "[::1]:80", "10.0.0.7"):
        assert client.get("/v1/videos", headers={"Host": host}).status_code == 200, host


def test_another_host_name_may_be_allowed(tmp_path):
    from fastapi.testclient import TestClient

    from wan_i2v.server.app import create_app
    from wan_i2v.server.store import JobStore

    store = JobStore(tmp_path / "state")
    app = create_app(store, runner=IdleRunner(), allowed_hosts=("videos.example.com", "*.not-a-pattern"))
    with TestClient(app) as http:
        assert http.get("/", headers={"Host": "videos.example.com:8443"}).status_code == 200
        assert http.get("/", headers={"Host": "other.example.com"}).status_code == 400
        assert http.get("/", headers={"Host": "a.not-a-pattern"}).status_code == 400
    with TestClient(create_app(store, runner=IdleRunner(), allowed_hosts=("*",))) as http:
        assert http.get("/", headers={"Host": "anything.example"}).status_code == 200


def test_a_cross_site_request_cannot_change_jobs_without_the_token(server):
    import httpx2

    own = f"http://127.0.0.1:{server.port}"
    with httpx2.Client(base_url=server.url, cookies={"wan_i2v_token": server.token}, timeout=30) as page:  # the browser's cookie
        before = job_count(page)
        forged = server.submit(page, headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403 and "another site (evil.example)" in forged.json()["error"]["message"]
        assert server.submit(page, headers={"Origin": "null"}).status_code == 403  # a sandboxed frame or a file
        assert server.submit(page, headers={"Referer": "http://127.0.0.1.evil.example/x"}).status_code == 403
        assert job_count(page) == before
        assert page.get("/v1/videos", headers={"Origin": "https://evil.example"}).status_code == 200  # reading is not changing
        mine = server.submit(page, headers={"Origin": own, "Referer": f"{own}/"})  # the server's own page
        assert mine.status_code == 200
        assert page.delete(f"/v1/videos/{mine.json()['id']}", headers={"Origin": "https://evil.example"}).status_code == 403
        assert page.get(f"/v1/videos/{mine.json()['id']}").json()["status"] != "cancelled"
    with server.client() as script:  # the token in its header: not a page's forged request
        carried = server.submit(script, headers={"Origin": "https://evil.example"})
        assert carried.status_code == 200
        assert script.delete(f"/v1/videos/{carried.json()['id']}", headers={"Origin": "https://evil.example"}).status_code == 200
        server.wait_for(script, mine.json()["id"])


def test_idempotency_key_returns_the_same_job(server, client):
    key = {"Idempotency-Key": "upload-42"}
    first = server.submit(client, headers=key).json()
    again = server.submit(client, headers=key).json()
    assert again["id"] == first["id"] and again["prompt"] == "a boat"  # (another body with the key: 422, test_server_requests.py)
    other = server.submit(client, headers={"Idempotency-Key": "upload-43"}).json()
    assert other["id"] != first["id"]
    server.wait_for(client, other["id"])


def test_cancel_a_running_and_a_queued_job_then_a_full_queue(server, client):
    running = server.submit(client, steps=1000).json()
    server.wait_for(client, running["id"], statuses=("in_progress",))
    waiting = [server.submit(client, steps=1000).json() for _ in range(3)]
    full = server.submit(client)
    assert full.status_code == 429 and "queue is full" in full.json()["error"]["message"]
    wait_until(lambda: server.step_of(client, running["id"]) >= 3)
    for job in waiting:
        assert client.delete(f"/v1/videos/{job['id']}").json()["status"] == "cancelled"
    stopped = client.delete(f"/v1/videos/{running['id']}").json()
    assert stopped["status"] == "cancelled"
    # The run stops within a step: its saved state is removed, and the next job starts at once
    # (a run that went on would hold the runner for the rest of its 1000 steps, 15 s and more).
    after = server.submit(client).json()
    server.wait_for(client, after["id"], statuses=("in_progress", "completed"), timeout=10)
    assert not (server.state_dir / "jobs" / running["id"] / "state.pt").exists()
    assert client.get(f"/v1/videos/{running['id']}").json()["step"] < 1000
    assert client.get(f"/v1/videos/{running['id']}/content").status_code == 404
    assert server.wait_for(client, after["id"])["status"] == "completed"


def test_a_job_that_fails_records_its_error_and_the_queue_goes_on(server, client):
    blocker = server.submit(client, steps=1000).json()
    server.wait_for(client, blocker["id"], statuses=("in_progress",))
    doomed = server.submit(client).json()
    (server.state_dir / "jobs" / doomed["id"] / "input").write_bytes(b"damaged on the disk after it was accepted")
    after = server.submit(client).json()
    client.delete(f"/v1/videos/{blocker['id']}")
    failed = server.wait_for(client, doomed["id"])
    assert failed["status"] == "failed" and failed["error"]["message"].startswith("cannot read image")
    assert server.wait_for(client, after["id"])["status"] == "completed"


def test_out_of_memory_in_one_job_fails_that_job_alone(tiny_checkpoint, tmp_path):
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, Runner, job_settings
    from wan_i2v.session import RunOptions, RunSession

    class OutOfMemoryError(RuntimeError):
        """Named as torch's: the runner knows CUDA's out-of-memory error by its name."""

    class FirstJobOutOfMemory:
        """The real session, but the first job runs out of GPU memory."""

        def __init__(self):
            self.session, self.jobs = RunSession.open(RunOptions(ckpt_dir=tiny_checkpoint, device="cpu")), 0
            self.alive = True

        def generate(self, *args, **kwargs):
            self.jobs += 1
            if self.jobs == 1:
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return self.session.generate(*args, **kwargs)

        def keep_alive(self):
            pass

        def close(self):
            self.session.close()

    store = JobStore(tmp_path / "state")
    settings = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())
    ids = [store.submit(png_bytes(), settings)[0].id for _ in range(2)]
    runner = Runner(store, FirstJobOutOfMemory)
    runner.start()
    wait_until(lambda: store.counts()["queued"] + store.counts()["in_progress"] == 0, timeout=60)
    runner.stop()
    first, second = (store.get(job_id) for job_id in ids)
    assert first.status == "failed" and first.error.startswith("out of GPU memory")
    assert second.status == "completed" and store.video_path(second.id).is_file()


def test_delete_a_finished_job_removes_its_files(server, client):
    job = server.submit(client).json()
    server.wait_for(client, job["id"])
    assert (server.state_dir / "jobs" / job["id"] / "video.mp4").is_file()
    assert client.delete(f"/v1/videos/{job['id']}").json() == {"id": job["id"], "object": "video", "deleted": True}
    assert not (server.state_dir / "jobs" / job["id"]).exists()
    assert client.get(f"/v1/videos/{job['id']}").status_code == 404


def test_progress_as_server_sent_events(server, client):
    job = server.submit(client, steps=200).json()  # a few seconds: many progress events, pushed as the steps are written
    events = []
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}
    steps = [body["step"] for _, body in events]
    assert steps == sorted(steps) and len(set(steps)) > 3 and events[-1][1]["status"] == "completed"


def test_list_pages_newest_first_and_metrics_agree(server, client):
    listed, after = [], None
    while True:
        page = client.get("/v1/videos", params={"limit": 2, **({"after": after} if after else {})}).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        listed += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    created = [job["created_at"] for job in listed]
    assert created == sorted(created, reverse=True) and len({job["id"] for job in listed}) == len(listed) > 3
    families = {family.name: family for family in text_string_to_metric_families(client.get("/metrics").text)}
    by_status = {sample.labels["status"]: sample.value for sample in families["wan_i2v_jobs"].samples}
    for status in ("completed", "cancelled", "queued", "in_progress", "failed"):
        assert by_status[status] == sum(job["status"] == status for job in listed), status
    assert families["wan_i2v_queue_length"].samples[0].value == by_status["queued"]
    assert families["wan_i2v_seconds_per_step"].samples[0].value > 0


def test_serve_refuses_the_network_without_a_token(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("wan-i2v: error: --host 0.0.0.0 would let anyone") and "--token" in line


def test_the_state_is_private_and_the_token_comes_from_a_file(tiny_checkpoint, tmp_path):
    import os
    import stat

    import httpx2

    state = tmp_path / "state"
    (state / "jobs").mkdir(parents=True, mode=0o755)
    older = state / "notes.txt"  # left by an older version, under a looser umask
    older.write_text("x")
    older.chmod(0o644)
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    running = Server(tiny_checkpoint, state, "--token-file", str(token_file), token=None).start()
    try:
        assert "from-a-file" not in " ".join(running.process.args)  # out of ps
        with httpx2.Client(base_url=running.url) as anonymous:
            assert anonymous.get("/v1/videos").status_code == 401
        with httpx2.Client(base_url=running.url, headers={"Authorization": "Bearer from-a-file"}, timeout=30) as client:
            running.wait_for(client, running.submit(client).json()["id"])
    finally:
        assert running.stop() == 0
    modes = {path.relative_to(state).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in (state, *state.rglob("*"))}
    assert any(name.endswith(".mp4") for name in modes) and "notes.txt" in modes
    loose = {name: oct(mode) for name, mode in modes.items() if mode != (0o700 if (state / name).is_dir() else 0o600)}
    assert loose == {}


@pytest.mark.parametrize("content,expected", [(None, "cannot read --token-file"), ("\n", "has no token on its first line")])
def test_a_token_file_missing_or_empty_is_one_line(tmp_path, capsys, content, expected):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    assert main(["serve", "--token-file", str(token_file), "--port", str(free_port())]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("wan-i2v: error: ") and expected in line and "\n" not in line


def test_serve_refuses_a_port_in_use(server, capsys):
    assert main(["serve", "--port", str(server.port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_kill_9_twice_during_200_jobs_loses_and_repeats_nothing(tiny_checkpoint, tmp_path):
    state = tmp_path / "state"
    # Jobs of a tenth of a second: the run is mostly the queue's work, and most kills land mid-job.
    server = Server(tiny_checkpoint, state, "--max-queue", "500", "--steps", "1", "--size", "32*48").start()
    with server.client() as client:
        ids = [server.submit(client, headers={"Idempotency-Key": f"job-{n}"}, seed=n).json()["id"] for n in range(200)]
        for threshold in (40, 110):
            wait_until(lambda: _completed(client) >= threshold)
            server.kill()
            server.start()
        # Submitted again after the kills (a client that retried): the same jobs, none added.
        assert server.submit(client, headers={"Idempotency-Key": "job-5"}).json()["id"] == ids[5]
        wait_until(lambda: _completed(client) == 200, timeout=300, every=0.2)
        listed = client.get("/v1/videos", params={"limit": 100}).json()
        listed = listed["data"] + client.get("/v1/videos", params={"limit": 100, "after": listed["last_id"]}).json()["data"]
        assert sorted(job["id"] for job in listed) == sorted(ids)
        assert all(job["status"] == "completed" for job in listed)
        assert _completed(client) == 200
    assert server.stop() == 0
    assert all(server.completions(job_id) == 1 for job_id in ids)  # each job's video made and recorded once, over three servers' lives
    assert sorted(path.name for path in (state / "jobs").iterdir()) == sorted(ids)
    assert all((state / "jobs" / job_id / "video.mp4").is_file() for job_id in ids)


def _completed(client) -> int:
    families = {family.name: family for family in text_string_to_metric_families(client.get("/metrics").text)}
    return int(next(s.value for s in families["wan_i2v_jobs"].samples if s.labels["status"] == "completed"))


def test_a_killed_job_resumes_from_its_saved_step_to_the_same_video(tiny_checkpoint, tmp_path):
    server = Server(tiny_checkpoint, tmp_path / "state").start()
    with server.client() as client:
        reference = server.submit(client, steps=200, seed=3).json()
        server.wait_for(client, reference["id"])
        job = server.submit(client, steps=200, seed=3).json()
        wait_until(lambda: server.step_of(client, job["id"]) >= 80)
        server.kill()
        server.start()
        killed_at = client.get(f"/v1/videos/{job['id']}").json()["step"]
        seen = []  # the steps the restarted server reports: from the saved one on, never from the start
        wait_until(lambda: (now := client.get(f"/v1/videos/{job['id']}").json())["status"] == "completed" or seen.append(now["step"]), every=0)
        assert killed_at >= 80 and seen and min(seen) >= killed_at
        videos = [client.get(f"/v1/videos/{j['id']}/content").content for j in (reference, job)]
    server.stop()
    assert f"running {job['id']} (resuming)" in server.log.read_text()
    np.testing.assert_array_equal(frames_of(videos[0]), frames_of(videos[1]))


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request) -> list[str]:
    """The serve options of a queue that several servers share: SQLite in their state directory (one
    machine), or a PostgreSQL database (several machines, the state directory a shared folder)."""
    return [] if request.param == "sqlite" else ["--queue", request.getfixturevalue("queue_url")]


def test_two_servers_share_one_queue(tiny_checkpoint, tmp_path, queue):
    state = tmp_path / "state"
    first = Server(tiny_checkpoint, state, *queue).start()
    second = Server(tiny_checkpoint, state, *queue).start()
    with first.client() as one, second.client() as two:
        ids = [first.submit(one if n % 2 else two, seed=n).json()["id"] for n in range(16)]
        # A job running on the first server when it dies is taken over by the second.
        long = first.submit(one, steps=300).json()["id"]
        wait_until(lambda: first.step_of(one, long) >= 5)  # its state saved: the take-over resumes it
        owner, survivor = (first, second) if f"running {long}" in first.log.read_text() else (second, first)
        owner.kill()
        with survivor.client() as client:
            for job_id in [*ids, long]:
                assert survivor.wait_for(client, job_id)["status"] == "completed"
                assert client.get(f"/v1/videos/{job_id}/content").content[4:8] == b"ftyp"  # whichever server made it
            listed = client.get("/v1/videos", params={"limit": 100}).json()["data"]
        assert f"running {long} (resuming)" in survivor.log.read_text()
    for running in (first, second):
        if running.process.poll() is None:
            running.stop()
    ran = {log: log.read_text().count("running video_") for log in (first.log, second.log)}
    assert all(count > 0 for count in ran.values()), ran  # both servers took jobs
    assert sorted(job["id"] for job in listed) == sorted([*ids, long]) and {job["status"] for job in listed} == {"completed"}
    assert all(first.completions(job_id) + second.completions(job_id) == 1 for job_id in [*ids, long])


def test_a_cut_connection_keeps_its_job_and_a_dead_servers_job_is_taken_after_the_grace(tmp_path, queue_url, monkeypatch):
    import psycopg

    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, job_settings, postgres

    monkeypatch.setattr(postgres, "TAKEOVER_GRACE_SECONDS", 3.0)
    settings = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())
    cut_off, other = JobStore(tmp_path / "shared", queue_url=queue_url), JobStore(tmp_path / "shared", queue_url=queue_url)
    job = cut_off.submit(png_bytes(), settings)[0].id
    assert cut_off.claim().id == job and other.claim() is None  # a live server's job is not taken
    key = postgres.AdvisoryLockLiveness.key(cut_off.owner)
    with psycopg.connect(queue_url, autocommit=True) as admin:

        def holder():
            row = admin.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted"
                                " AND classid = %s::bigint::oid AND objid = %s::bigint::oid", (key >> 32, key & 0xFFFFFFFF)).fetchone()  # fmt: skip
            return row and row[0]

        # What a network cut does, with the key taken meanwhile (by a claim elsewhere, say): the
        # server's thread takes its lock again once it can, on a new connection.
        admin.execute("SELECT pg_terminate_backend(%s)", (cut_off.liveness._held.info.backend_pid,))
        admin.execute("SELECT pg_advisory_lock(%s)", (key,))
        time.sleep(1.5)
        admin.execute("SELECT pg_advisory_unlock(%s)", (key,))
        assert other.claim() is None  # free, if at all, for less than the grace
        assert wait_until(holder, timeout=10) == cut_off.liveness._held.info.backend_pid
    time.sleep(3.5)
    assert other.claim() is None and cut_off.still_mine(job)  # never taken over
    cut_off.close()  # the server ends
    assert other.claim() is None  # its lock seen free: the grace starts
    taken = wait_until(other.claim, timeout=10)
    assert taken.id == job and taken.runs == 2


def test_a_claim_whose_answer_was_lost_is_taken_again_by_its_server(tmp_path, queue):
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, job_settings

    store = JobStore(tmp_path / "state", queue_url=queue[1] if queue else None)
    job = store.submit(png_bytes(), job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults()))[0].id
    with store._db(write=True) as db:  # a claim's commit that went through while its answer was lost
        db.execute("UPDATE jobs SET status = 'in_progress', owner = ?, runs = 1 WHERE id = ?", (store.owner, job))
    assert store.claim().id == job


def test_a_database_restart_mid_job_loses_nothing_and_the_server_goes_on(tiny_checkpoint, tmp_path, postgres):
    from postgres_process import Postgres

    database = Postgres().start()  # its own: this test restarts it
    try:
        url = database.new_database()
        server = Server(tiny_checkpoint, tmp_path / "state", "--queue", url).start()
        idle = Server(tiny_checkpoint, tmp_path / "state", "--queue", url).start()  # would take over a job it thought orphaned
        with server.client() as client:
            job = server.submit(client, steps=60).json()["id"]
            before = wait_until(lambda: server.step_of(client, job) >= 3 and server.step_of(client, job))
            database.stop()  # every lock is gone with it, the live servers' too
            answer = client.get(f"/v1/videos/{job}")
            assert answer.status_code == 503 and answer.json()["error"]["message"].startswith("the job queue is unreachable for now")
            assert "postgresql" not in answer.text and str(database.directory) not in answer.text  # where the database is: for the log only
            time.sleep(3)  # the job runs on meanwhile
            database.start()
            wait_until(lambda: client.get(f"/v1/videos/{job}").status_code == 200, timeout=60, every=0.2)  # the pool reconnects
            now = wait_until(lambda: (job_now := client.get(f"/v1/videos/{job}").json())["step"] >= before + 10 and job_now, timeout=5)
            assert now["status"] in ("in_progress", "completed")  # the run went on while the database was down
            assert server.wait_for(client, job)["status"] == "completed"
            after = server.submit(client).json()["id"]
            assert server.wait_for(client, after)["status"] == "completed"
        for running in (server, idle):
            assert running.stop() == 0
        runs = [log.read_text().count(f"running {job}") for log in (server.log, idle.log)]
        assert runs == [1, 0] or runs == [0, 1], runs  # one run: the lock was taken again before the grace ran out
        assert server.completions(job) + idle.completions(job) == 1
    finally:
        database.remove()


def test_serve_refuses_a_queue_it_cannot_use(tiny_checkpoint, tmp_path, queue_url, postgres, capsys):
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, job_settings

    JobStore(tmp_path / "shared", queue_url=queue_url).close()  # the queue's servers share this folder
    settings = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())
    JobStore(tmp_path / "sqlite").submit(png_bytes(), settings)  # one machine's queue, with a job
    serve = ["serve", "--ckpt-dir", str(tiny_checkpoint), "--device", "cpu", "--port", str(free_port())]
    cases = [
        (["--state-dir", str(tmp_path / "local"), "--queue", queue_url], "is not the folder the other servers of the queue"),
        (["--state-dir", str(tmp_path / "shared")], "is the shared folder of a PostgreSQL queue"),  # its files are not SQLite's to sweep
        (["--state-dir", str(tmp_path / "shared"), "--queue", postgres.new_database()], "is the shared folder of another PostgreSQL queue"),
        (["--state-dir", str(tmp_path / "sqlite"), "--queue", postgres.new_database()], "holds the jobs of a queue in SQLite"),
        (["--state-dir", str(tmp_path / "shared"), "--queue", queue_url.replace("/queue", "/missing")], "cannot reach the queue database"),
        (["--queue", "postgresql://wan:50%off!@127.0.0.1:1/jobs"], "the queue URL (--queue or WAN_I2V_QUEUE) does not parse"),
        (["--queue", "postgresql://wan:ab/cd#x@127.0.0.1:1/jobs"], "has a character that must be percent-encoded"),
        (["--queue", "postgresql://wan:hunter@2@127.0.0.1:1/jobs"], "has a character that must be percent-encoded"),
        (["--queue", "sqlite:///jobs.db"], "the queue URL (--queue or WAN_I2V_QUEUE) is not a PostgreSQL URL"),
    ]
    for options, message in cases:
        assert main([*serve, *options]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error
        assert not any(secret in error for secret in ("50%off", "ab/cd", "hunter", "@2")), error  # passwords are not repeated
    assert not (tmp_path / "local").exists()  # a refused folder is left as it was (here: not there)
    assert len(list((tmp_path / "sqlite" / "jobs").iterdir())) == 1  # nothing swept


def test_sigterm_stops_after_a_step_and_puts_the_job_back(tiny_checkpoint, tmp_path):
    state = tmp_path / "state"
    server = Server(tiny_checkpoint, state).start()
    with server.client() as client:
        job = server.submit(client, steps=1000).json()
        wait_until(lambda: server.step_of(client, job["id"]) >= 5)
        assert server.stop() == 0
        with sqlite3.connect(state / "queue.sqlite3") as db:
            assert db.execute("SELECT status, owner FROM jobs WHERE id = ?", (job["id"],)).fetchone() == ("queued", None)
        assert (state / "jobs" / job["id"] / "state.pt").is_file()
        server.start()
        assert client.get(f"/v1/videos/{job['id']}").json()["step"] >= 5
        client.delete(f"/v1/videos/{job['id']}")
    server.stop()
    assert "stopping (a running job stops after its current step" in server.log.read_text()


def test_a_job_whose_server_keeps_dying_fails_instead_of_starving_the_queue(tmp_path, queue, monkeypatch):
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, job_settings

    settings = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())
    queue_url = queue[1] if queue else None
    if queue_url:
        from wan_i2v.server import postgres

        monkeypatch.setattr(postgres, "TAKEOVER_GRACE_SECONDS", 0.0)
    first = JobStore(tmp_path / "state", queue_url=queue_url)
    doomed = first.submit(png_bytes(), settings)[0].id
    waiting = first.submit(png_bytes(), settings)[0].id
    servers = [first]
    for run in range(3):
        assert servers[-1].claim().id == doomed  # taken over after each death, from its saved step
        servers[-1].liveness.release()  # the server dies: the kernel (or the database) drops its lock
        servers.append(JobStore(tmp_path / "state", queue_url=queue_url))
    assert servers[-1].claim().id == waiting
    failed = servers[-1].get(doomed)
    assert failed.status == "failed" and failed.error.startswith("the server stopped 3 times while running this job")


def fake_kernel(root, *, boot="boot-1", machine_kills=0, cgroup=None, cgroup_kills=0):
    """A folder that stands for / where the server reads the kernel's counts of OOM kills
    ($WAN_I2V_SYSTEM_ROOT): the boot's id, /proc/vmstat, and the process's cgroup v2 with its memory.events."""
    (root / "proc/sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/random/boot_id").write_text(f"{boot}\n")
    (root / "proc/vmstat").write_text(f"pgfault 1000\noom_kill {machine_kills}\noom_kill_other 9\n")
    if cgroup is not None:
        (root / "proc/self").mkdir(parents=True, exist_ok=True)
        (root / "proc/self/cgroup").write_text(f"0::/{cgroup}\n")
        (root / "sys/fs/cgroup" / cgroup).mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup" / cgroup / "memory.events").write_text(f"low 0\nhigh 0\nmax 0\noom 0\noom_kill {cgroup_kills}\n")
    return root


def test_a_job_the_oom_killer_stopped_fails_at_once_and_says_why(tiny_checkpoint, tmp_path):
    kernel = fake_kernel(tmp_path / "root", machine_kills=4)
    server = Server(tiny_checkpoint, tmp_path / "state", env={"WAN_I2V_SYSTEM_ROOT": str(kernel)}).start()
    with server.client() as client:
        doomed = server.submit(client, steps=1000, frame_num=9).json()["id"]
        waiting = server.submit(client).json()["id"]
        wait_until(lambda: server.step_of(client, doomed) >= 2)
        fake_kernel(kernel, machine_kills=5)  # the OOM killer counts its kill,
        server.kill()  # and kills the server with SIGKILL
        server.start()
        failed = server.wait_for(client, doomed)
        assert failed["status"] == "failed" and failed["error"]["message"] == (
            "the server was killed for lack of memory while this job ran (size 96*160, frame_num 9); "
            "try a smaller size or fewer frames, or give the server more memory")  # fmt: skip
        assert server.wait_for(client, waiting)["status"] == "completed"
    assert server.stop() == 0
    assert server.log.read_text().count(f"running {doomed}") == 1  # not run again after the kill


@pytest.mark.parametrize("deaths", [
    # (how the kernel's counts stand at each death; True: the job fails at once, False: it runs again)
    [({"machine_kills": 0, "cgroup": "wan.scope"}, False),  # a kill -9
     ({"machine_kills": 1, "cgroup": "wan.scope"}, False),  # a process of another cgroup was killed for memory
     ({"machine_kills": 2, "cgroup": "wan.scope", "cgroup_kills": 1}, True)],  # the server's own cgroup's was
    [({"machine_kills": 3, "boot": "boot-2"}, False),  # a reboot: its counts start again, and say nothing of the job's run
     ({"machine_kills": 4, "boot": "boot-2", "cgroup": "restarted.scope"}, True)],  # a new cgroup's count says nothing: the machine's decides
], ids=["in-its-own-cgroup", "after-a-reboot-and-a-new-cgroup"])  # fmt: skip
def test_an_oom_kill_fails_a_job_at_once_only_when_the_counts_show_it(tmp_path, monkeypatch, deaths):
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, job_settings

    kernel = fake_kernel(tmp_path / "root", cgroup="wan.scope")
    monkeypatch.setenv("WAN_I2V_SYSTEM_ROOT", str(kernel))
    settings = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())
    server = JobStore(tmp_path / "state")
    job = server.submit(png_bytes(), settings)[0].id
    assert server.claim().id == job
    for counts, fails in deaths:
        fake_kernel(kernel, **counts)
        server.liveness.release()  # the server dies: the kernel drops its lock
        server = JobStore(tmp_path / "state")  # and another starts
        if not fails:
            assert server.claim().id == job
    assert server.claim() is None
    failed = server.get(job)
    assert failed.status == "failed" and failed.error.startswith("the server was killed for lack of memory while this job ran (size 32*48")


def test_a_queue_an_older_version_made_gains_the_new_columns(tmp_path, queue):
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, job_settings

    queue_url = queue[1] if queue else None
    older = JobStore(tmp_path / "state", queue_url=queue_url)
    job = older.submit(png_bytes(), job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults()))[0].id
    with older._db(write=True) as db:
        db.execute("ALTER TABLE jobs DROP COLUMN memory_kills_at_start")  # as the version before it made the table
    older.close()
    store = JobStore(tmp_path / "state", queue_url=queue_url)
    claimed = store.claim()
    assert claimed.id == job and claimed.memory_kills_at_start is not None


def test_what_a_kill_left_half_written_is_swept_at_the_next_start(tmp_path):
    import os

    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, job_settings

    store = JobStore(tmp_path / "state")
    settings = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())
    kept = store.submit(png_bytes(), settings)[0].id
    jobs = tmp_path / "state" / "jobs"
    orphan, fresh_orphan = jobs / "video_killed_before_its_row", jobs / "video_being_written_by_another_server"
    for folder in (orphan, fresh_orphan):
        folder.mkdir()
        (folder / "input").write_bytes(png_bytes())
    partial = jobs / kept / ".video.abc123.mp4"  # a write cut short
    partial.write_bytes(b"half an mp4")
    an_hour_ago = time.time() - 3600
    for path in (orphan, partial):
        os.utime(path, (an_hour_ago, an_hour_ago))
    JobStore(tmp_path / "state")  # the next start
    assert not orphan.exists() and not partial.exists()
    assert fresh_orphan.exists() and store.image_path(kept).is_file()


def test_what_a_kill_9_left_is_swept_at_once_when_no_other_server_runs(tmp_path):
    import subprocess
    import sys

    # A server killed while it wrote an upload's folder (no row yet) and a job's mp4.
    killed = subprocess.run([sys.executable, "-c", """if True:
        import os, sys
        from wan_i2v.config import SamplingDefaults
        from wan_i2v.server import JobStore, job_settings
        store = JobStore(sys.argv[1])
        settings = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())
        job = store.submit(b"png", settings)[0].id
        (store.root / "jobs" / "video_killed_before_its_row").mkdir()
        (store.job_dir(job) / ".video.abc123.mp4").write_bytes(b"half an mp4")
        print(job, flush=True)
        os.kill(os.getpid(), 9)
    """, str(tmp_path / "state")], capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    job = killed.stdout.strip()
    jobs = tmp_path / "state" / "jobs"
    assert (jobs / job / ".video.abc123.mp4").exists()
    from wan_i2v.server import JobStore

    JobStore(tmp_path / "state")  # the next start, seconds later
    assert sorted(path.relative_to(jobs).as_posix() for path in jobs.rglob("*")) == [job, f"{job}/input"]


def test_a_delete_during_a_download_leaves_the_download_whole(tmp_path):
    import asyncio

    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, create_app, job_settings

    store = JobStore(tmp_path / "state")
    settings = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())
    job = store.submit(png_bytes(), settings)[0].id
    assert store.claim().id == job
    video = bytes(range(256)) * 1000  # more than one of FileResponse's chunks
    store.video_path(job).write_bytes(video)
    assert store.finish(job, "completed")
    app = create_app(store, runner=None)
    sent: list[dict] = []

    async def download():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
                 "path": f"/v1/videos/{job}/content", "raw_path": b"", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1:8000")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}  # fmt: skip
        requested = asyncio.Event()

        async def receive():
            if not requested.is_set():
                requested.set()
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.start" and store.get(job) is not None:
                assert store.delete(job)  # the DELETE lands between the headers and the body

        await app(scope, receive, send)

    asyncio.run(download())
    assert sent[0]["status"] == 200 and store.get(job) is None and not store.video_path(job).exists()
    assert b"".join(message.get("body", b"") for message in sent[1:]) == video


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB file system of its own (tmpfs; mounting needs root, as in CI's container)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("a small file system to fill needs root (mount -t tmpfs)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # (lazy: a failed test may leave files open)


def test_a_full_disk_refuses_new_jobs_with_507_and_reads_go_on(small_disk):
    from fastapi.testclient import TestClient

    from wan_i2v.server import JobStore, create_app

    store = JobStore(small_disk / "state")
    files = {"input_reference": ("input.png", png_bytes(), "image/png")}
    with TestClient(create_app(store, IdleRunner()), base_url="http://127.0.0.1") as http:
        kept = http.post("/v1/videos", files=files, data={"prompt": "before"}).json()["id"]
        filler = small_disk / "filler"
        with open(filler, "wb") as out, pytest.raises(OSError, match="No space left"):
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        refused = http.post("/v1/videos", files={"input_reference": ("big.png", png_bytes(640, 480, (1, 2, 3)), "image/png")},
                            data={"prompt": "while full"})  # fmt: skip
        assert refused.status_code == 507 and refused.json()["error"]["message"].startswith("disk full")
        assert sorted(path.name for path in (small_disk / "state" / "jobs").iterdir()) == [kept]  # nothing half-made
        listed = http.get("/v1/videos")
        assert listed.status_code == 200, listed.text
        assert [job["id"] for job in listed.json()["data"]] == [kept]
        assert http.get(f"/v1/videos/{kept}").status_code == 200
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
        filler.unlink()
        assert http.post("/v1/videos", files=files, data={"prompt": "after"}).status_code == 200
    store.close()


def fill(path):
    """Write zeros to ``path`` until its disk is full."""
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(out, bytes(65536))
    finally:
        os.close(out)


def test_a_job_the_full_disk_stopped_waits_in_the_queue_and_resumes_once_space_returns(small_disk, tiny_checkpoint, tmp_path, monkeypatch):
    import torch

    from wan_i2v import pipeline
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, Runner, job_settings, runner
    from wan_i2v.session import RunOptions, RunSession

    monkeypatch.setattr(runner, "DISK_POLL_SECONDS", 0.1)
    filler, filled = small_disk / "filler", []
    runs = []  # (the job's prompt, the steps this run of it made)

    def fill_once(why: str) -> None:
        if why not in filled:
            filled.append(why)
            fill(filler)

    class FillsTheDisk:
        """The real session; the disk fills as the job "state" reports its second step, whose state then
        has no room. The job "mp4" fills it as its mp4 is written (below)."""

        def __init__(self):
            self.session, self.alive = RunSession.open(RunOptions(ckpt_dir=tiny_checkpoint, device="cpu")), True

        def generate(self, image, *, settings, on_step, **options):
            prompt = settings.prompt
            runs.append((prompt, []))

            def step(info):
                on_step(info)
                runs[-1][1].append(info.index)
                if prompt == "state" and info.index == 1:
                    # Step 1's state is written while this step runs: the disk fills once it is whole.
                    wait_until(lambda: store.state_path(ids["state"]).exists(), timeout=10)
                    fill_once("state")

            return self.session.generate(image, settings=settings, on_step=step, **options)

        def keep_alive(self):
            pass

        def close(self):
            self.session.close()

    real_writer = pipeline.mp4_writer  # the mp4 is written as its frames are decoded

    def writer_on_a_full_disk(path, **options):
        if os.path.basename(os.path.dirname(path)) == ids["mp4"]:
            fill_once("mp4")
        return real_writer(path, **options)

    monkeypatch.setattr(pipeline, "mp4_writer", writer_on_a_full_disk)
    (small_disk / "jobs").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "jobs").symlink_to(small_disk / "jobs")  # the jobs' files on a volume of their own, the queue beside
    store = JobStore(tmp_path / "state")
    settings = {"size": "32*48", "frame_num": "5", "steps": "6"}
    ids = {prompt: store.submit(png_bytes(), job_settings({"prompt": prompt, **settings}, SamplingDefaults()))[0].id for prompt in ("state", "mp4")}
    worker = Runner(store, FillsTheDisk)
    worker.start()

    def waiting(job_id):
        return wait_until(lambda: (job := store.get(job_id)).status == "queued" and job.error is not None and job, timeout=60)

    def files_of(job_id):
        return sorted(path.name for path in store.job_dir(job_id).iterdir())

    # The second step's state found the disk full: back in the queue, saying so; the first step's state kept whole.
    assert waiting(ids["state"]).error.startswith("waiting: the disk is full (0 MiB free); it resumes when ")
    assert files_of(ids["state"]) == ["input", "state.pt"]  # (no temporary file)
    assert torch.load(store.state_path(ids["state"]), weights_only=True)["step"] == 1
    time.sleep(1)  # ten looks at the free space, and no job tried meanwhile
    # (the state is written while the next step runs: the failed write of step 2's stops the run after step 3)
    assert runs == [("state", [0, 1, 2])] and store.get(ids["mp4"]).status == "queued"
    filler.unlink()  # space returns
    wait_until(lambda: store.get(ids["state"]).status == "completed", timeout=60)
    assert runs[1] == ("state", [1, 2, 3, 4, 5])  # resumed from its saved step
    # The mp4 found the disk full: back in the queue, its last step's state kept; once space returns it only decodes.
    assert waiting(ids["mp4"]).error.startswith("waiting: the disk is full (0 MiB free)")
    assert files_of(ids["mp4"]) == ["input", "state.pt"]  # (no half-written mp4)
    filler.unlink()
    wait_until(lambda: store.get(ids["mp4"]).status == "completed", timeout=60)
    worker.stop()
    assert runs[2:] == [("mp4", [0, 1, 2, 3, 4, 5]), ("mp4", [])]
    for job_id in ids.values():
        assert files_of(job_id) == ["input", "video.mp4"] and len(frames_of(store.video_path(job_id))) == 5
        assert store.get(job_id).error is None


def test_torchs_short_write_counts_as_a_full_disk_only_when_the_disk_lacks_room(tmp_path):
    import errno

    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import JobStore, Runner, job_settings

    runner = Runner(JobStore(tmp_path / "state"), open_session=None)
    settings = job_settings({"prompt": "a boat", "size": "32*48", "frame_num": "5", "steps": "1"}, SamplingDefaults())
    try:  # what torch.save raises on a full disk (its errno lost), as a write error of any other kind would
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError as exc:
        short_write = exc
    assert not runner._short_of_room(short_write, settings)  # this disk has room: an error, not a wait for space
    assert runner._short_of_room(OSError(errno.ENOSPC, "No space left on device"), settings)
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError:
            raise RuntimeError("writing the state failed")  # noqa: B904 (raised while handling it, as torch's writer does)
    except RuntimeError as exc:
        assert runner._short_of_room(exc, settings)  # found in the chain, whatever the error on top
