"""A tiny fake Hugging Face hub over HTTP: just what `snapshot_download` (huggingface_hub 2.x) calls.

- GET  /api/models/{org}/{name}/revision/{rev}  → {"id", "sha", "siblings"}
- GET  /api/models/{org}/{name}/tree/{rev}      → [{"type": "file", "path", "size", "oid", "lfs"?}]
- HEAD/GET /{org}/{name}/resolve/{rev}/{file}   → X-Repo-Commit, ETag (sha256 for LFS files, git sha1
  otherwise), Content-Length; GET honours `Range: bytes=N-`.

Faults for tests: `drop_once` (file names whose first GET sends half the bytes then closes the socket),
`drop_always` (every GET closes before any byte), `corrupt` (served with one byte flipped, same size and
ETag), `stall` (file names whose GET sends half the bytes, sets `stalled`, then hangs until `close`: a pull
caught mid-file, to be killed). `requests` logs every call.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors",)


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {r: {f.name: f.read_bytes() for f in sorted(p.iterdir()) if f.is_file()}
                      for r, p in repos.items()}
        self.drop_once: set[str] = set()
        self.drop_always: set[str] = set()
        self.corrupt: set[str] = set()
        self.stall: set[str] = set()
        self.stalled = threading.Event()
        self._release = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def etag(name: str, data: bytes) -> str:
        if name.endswith(LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of file `name`."""
        return [rng for m, p, rng in self.requests if m == "GET" and p.endswith("/" + name)]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _not_found(self):
                body = b'{"error":"Repository not found"}'
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _route(self):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo = "/".join(parts[2:4])
                    files = hub.repos.get(repo)
                    if files is None:
                        return self._not_found()
                    if parts[4] == "revision":
                        return self._json({"id": repo, "sha": COMMIT,
                                           "siblings": [{"rfilename": n} for n in files]})
                    if parts[4] == "tree":
                        entries = []
                        for n, data in files.items():
                            e = {"type": "file", "path": n, "size": len(data), "oid": hub.etag("x", data)}
                            if n.endswith(LFS_SUFFIXES):
                                e["lfs"] = {"oid": hub.etag(n, data), "size": len(data), "pointerSize": 130}
                            entries.append(e)
                        return self._json(entries)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    data = hub.repos.get(repo, {}).get(name)
                    if data is None:
                        return self._not_found()
                    return self._file(name, data)
                return self._not_found()

            def _file(self, name: str, data: bytes):
                etag = hub.etag(name, data)
                if self.command == "GET" and name in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                rng = self.headers.get("Range")
                if self.command == "GET" and rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')
                if name.endswith(LFS_SUFFIXES):
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if self.command == "HEAD":
                    return
                body = data[start:]
                if name in hub.stall:
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    hub.stalled.set()
                    hub._release.wait(60)
                    self.close_connection = True
                    return
                if name in hub.drop_always or (name in hub.drop_once and not start):
                    hub.drop_once.discard(name)
                    self.wfile.write(b"" if name in hub.drop_always else body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            do_GET = do_HEAD = _route

        return Handler
