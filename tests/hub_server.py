"""A stand-in for the Hugging Face Hub on 127.0.0.1, so tests run the real `huggingface_hub` client offline.

It serves one repository through the endpoints the client uses: model info with file metadata
(`/api/models/{repo}/revision/{rev}`), the recursive tree listing (`/api/models/{repo}/tree/{rev}`),
and `/{repo}/resolve/{rev}/{path}` with HEAD and ranged GET. As on the real hub, large (LFS) files
answer with a redirect to a second origin (the "CDN") carrying X-Linked-Etag and X-Linked-Size.

Faults: `drop_once[path] = n` sends n bytes of that file's body, then closes the connection.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_MIN_SIZE = 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.repo_id = repo_id
        self.files = files
        self.drop_once: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        handler = type("Handler", (_Handler,), {"hub": self})
        # Two origins, so the client treats the second like a CDN (it keeps the first response's metadata).
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
        self.url, self.cdn_url = (f"http://127.0.0.1:{server.server_address[1]}" for server in self._servers)

    def __enter__(self) -> HubServer:
        for server in self._servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def is_lfs(self, path: str) -> bool:
        return len(self.files[path]) >= LFS_MIN_SIZE

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def content_gets(self, path: str) -> list[str | None]:
        """Range headers of the GETs that carried this file's content (the CDN for LFS files)."""
        url = f"/cdn/{self.sha256(path)}" if self.is_lfs(path) else f"/{self.repo_id}/resolve/{COMMIT}/{path}"
        return [rng for method, requested, rng in self.requests if method == "GET" and requested == url]

    def model_info(self) -> dict:
        siblings = []
        for path, data in self.files.items():
            sibling = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
            if self.is_lfs(path):
                sibling["lfs"] = {"sha256": self.sha256(path), "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT, "private": False, "siblings": siblings}

    def tree(self) -> list[dict]:
        entries = []
        for path, data in self.files.items():
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
            if self.is_lfs(path):
                entry["lfs"] = {"oid": self.sha256(path), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # a stalled client never holds a server thread for long
    disable_nagle_algorithm = True  # headers and body go out as separate writes: don't wait on delayed ACKs
    hub: HubServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._route(with_body=True)

    def do_HEAD(self) -> None:
        self._route(with_body=False)

    def _route(self, with_body: bool) -> None:
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        hub.requests.append((self.command, path, self.headers.get("Range")))
        api = f"/api/models/{hub.repo_id}/"
        resolve = re.fullmatch(rf"/{re.escape(hub.repo_id)}/resolve/[^/]+/(.+)", path)
        cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        if path.startswith(api + "revision/"):
            self._json(hub.model_info(), with_body)
        elif path.startswith(api + "tree/"):
            self._json(hub.tree(), with_body)
        elif resolve and resolve.group(1) in hub.files:
            self._resolve(resolve.group(1), with_body)
        elif cdn and (name := next((p for p in hub.files if hub.sha256(p) == cdn.group(1)), None)):
            self._content(name, with_body, {})
        else:
            self._reply(404, b"not found", {"X-Error-Code": "EntryNotFound"}, with_body)

    def _resolve(self, name: str, with_body: bool) -> None:
        hub = self.hub
        data = hub.files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{git_blob_id(data)}"'}
        if hub.is_lfs(name):
            headers |= {
                "X-Linked-Etag": f'"{hub.sha256(name)}"',
                "X-Linked-Size": str(len(data)),
                "Location": f"{hub.cdn_url}/cdn/{hub.sha256(name)}",
            }
            self._reply(302, b"", headers, with_body)
        else:
            self._content(name, with_body, headers)

    def _content(self, name: str, with_body: bool, headers: dict[str, str]) -> None:
        data = self.hub.files[name]
        start = 0
        status = 200
        if rng := self.headers.get("Range"):
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"}, with_body)
                return
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        cut = self.hub.drop_once.pop(name, None) if with_body else None
        self.send_response(status)
        for key, value in (headers | {"Accept-Ranges": "bytes", "Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
        if cut is not None:
            self.close_connection = True  # the client sees the body end early

    def _json(self, payload, with_body: bool) -> None:
        self._reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, with_body)

    def _reply(self, status: int, body: bytes, headers: dict[str, str], with_body: bool) -> None:
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)
