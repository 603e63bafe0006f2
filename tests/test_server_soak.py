"""The server's soak test: jobs submitted while the server is attacked with the bad requests of
hardening issue 22, a kill -9 while a job runs, a restart on the same state directory; then nothing
is lost: every accepted job finishes with its video, every bad request got its 4xx (never a 5xx), and
no temporary file or half-made folder is left."""

from __future__ import annotations

import io
import threading

import httpx2
from PIL import Image

from server_process import TOKEN, Server, png_bytes, wait_until

JOBS_PER_LIFE = 6


def _bomb() -> bytes:
    """A PNG of 10000x10000 pixels (100 MP) in a few KiB: refused from its header."""
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG")
    return buffer.getvalue()


BOMB = _bomb()


def bad_requests(server: Server, known_id: str) -> list[tuple[str, int, dict]]:
    """(what, the status it must get, httpx2's request arguments) for each kind of bad request."""
    image = {"input_reference": ("in.png", png_bytes(48, 32), "image/png")}
    good = {"prompt": "a boat"}
    token = {"Authorization": f"Bearer {TOKEN}"}

    def post(data=good, files=image, headers=token, **more):
        return {"method": "POST", "url": "/v1/videos", "data": data, "files": files, "headers": headers, **more}

    return [
        ("another site's form, without the token", 403, post(headers={"Origin": "https://evil.example", "Cookie": f"wan_i2v_token={TOKEN}"})),
        ("a rebinding Host", 400, {"method": "GET", "url": "/v1/videos", "headers": {**token, "Host": "rebind.evil.example"}}),
        ("a wrong token", 401, {"method": "GET", "url": "/v1/videos", "headers": {"Authorization": "Bearer wrong"}}),
        ("no token", 401, post(headers={})),
        ("a job that does not exist", 404, {"method": "GET", "url": "/v1/videos/video_nope", "headers": token}),
        ("the content of a job that does not exist", 404, {"method": "GET", "url": "/v1/videos/video_nope/content", "headers": token}),
        ("deleting a job that does not exist", 404, {"method": "DELETE", "url": "/v1/videos/video_nope", "headers": token}),
        ("an upload over --max-upload-mb", 413, post(files={"input_reference": ("big.png", b"\0" * (2 * 2**20), "image/png")})),
        ("a chunked upload over --max-upload-mb", 413,
         {"method": "POST", "url": "/v1/videos", "content": (b"x" * 2**20 for _ in range(8)),
          "headers": {**token, "Content-Type": "multipart/form-data; boundary=b"}}),  # fmt: skip
        ("a garbage frame_num", 400, post(data={**good, "frame_num": "many"})),
        ("a frame_num with an underscore", 400, post(data={**good, "frame_num": "1_7"})),
        ("a garbage size", 400, post(data={**good, "size": "huge"})),
        ("not an image", 400, post(files={"input_reference": ("in.png", b"not an image", "image/png")})),
        ("JSON instead of a form", 400, {"method": "POST", "url": "/v1/videos", "json": {"prompt": "x"}, "headers": token}),
        ("the prompt sent as a file", 400, post(data={}, files={**image, "prompt": ("prompt.png", png_bytes(), "image/png")})),
        ("a 100 MP image", 400, post(files={"input_reference": ("bomb.png", BOMB, "image/png")})),
        ("an Idempotency-Key reused for another body", 422, post(data={"prompt": "another boat"}, headers={**token, "Idempotency-Key": "running"})),
        ("an Idempotency-Key of 256 characters", 400, post(headers={**token, "Idempotency-Key": "k" * 256})),
        ("a variant other than video", 400, {"method": "GET", "url": f"/v1/videos/{known_id}/content", "params": {"variant": "thumbnail"}, "headers": token}),
    ]


def attack(server: Server, known_id: str, answers: list) -> None:
    with httpx2.Client(base_url=server.url, timeout=30) as client:
        for what, expected, request in bad_requests(server, known_id):
            answers.append((what, expected, client.request(**request).status_code))


def submit(server: Server, first: int, ids: dict) -> None:
    """Jobs ``first`` .. ``first + JOBS_PER_LIFE - 1``, each with its Idempotency-Key (as a client that retries sends)."""
    with server.client() as client:
        for n in range(first, first + JOBS_PER_LIFE):
            answer = server.submit(client, headers={"Idempotency-Key": f"job-{n}"}, seed=n)
            assert answer.status_code == 200, answer.text
            ids[n] = answer.json()["id"]


def while_attacked(server: Server, known_id: str, first: int, ids: dict, answers: list) -> None:
    threads = [threading.Thread(target=attack, args=(server, known_id, answers)), threading.Thread(target=submit, args=(server, first, ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_jobs_submitted_under_attack_survive_a_kill_9_and_nothing_is_lost(tiny_checkpoint, tmp_path):
    state = tmp_path / "state"
    server = Server(tiny_checkpoint, state, "--max-upload-mb", "1", "--size", "32*48", "--steps", "2").start()
    ids, answers = {}, []
    with server.client() as client:
        running = server.submit(client, headers={"Idempotency-Key": "running"}, steps=60, seed=99).json()["id"]  # the job the kill strikes
        while_attacked(server, running, 0, ids, answers)
        wait_until(lambda: server.step_of(client, running) >= 3)
        assert client.get(f"/v1/videos/{running}").json()["status"] == "in_progress"
        server.kill()
        server.start()
        while_attacked(server, running, JOBS_PER_LIFE, ids, answers)
        retried = server.submit(client, headers={"Idempotency-Key": "job-1"}, seed=1)  # a client's retry after the kill: the same job
        assert retried.status_code == 200 and retried.json()["id"] == ids[1]
        accepted = [running, *ids.values()]
        for job_id in accepted:
            job = server.wait_for(client, job_id, timeout=120)
            assert job["status"] == "completed", job
            video = client.get(f"/v1/videos/{job_id}/content")
            assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        listed = client.get("/v1/videos", params={"limit": 100}).json()["data"]
    assert server.stop() == 0
    assert sorted(job["id"] for job in listed) == sorted(accepted)  # no job lost, none made by a bad request
    log = server.log.read_text()
    assert f"running {running} (resuming)" in log and "Traceback" not in log  # (an exception in a request or a job logs one)
    wrong = [(what, expected, status) for what, expected, status in answers if status != expected]
    assert not wrong and len(answers) == 2 * len(bad_requests(server, running)), wrong
    jobs = state / "jobs"
    assert sorted(path.name for path in jobs.iterdir()) == sorted(accepted)  # no folder of a refused or cut-short upload
    assert all(sorted(path.name for path in (jobs / job_id).iterdir()) == ["input", "video.mp4"] for job_id in accepted)
    assert not [path for path in state.rglob(".*")]  # no temporary file
