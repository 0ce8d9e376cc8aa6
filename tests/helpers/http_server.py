"""A real local HTTP file server for tests, with switchable faults.

API (kept stable; other test modules rely on it)::

    pytest_plugins = ("helpers.http_server",)   # in the test module: gives the fixture
    from helpers.http_server import LocalHTTPServer  # for type hints (TYPE_CHECKING block)

    def test_something(http_server):             # function-scoped, fresh root folder
        (http_server.root / "a.bin").write_bytes(b"...")
        url = http_server.url("a.bin")           # "http://127.0.0.1:<port>/a.bin"
        http_server.base_url                     # "http://127.0.0.1:<port>"
        http_server.fail("a.bin", times=2)       # next 2 GETs of a.bin answer 503
        http_server.cut("a.bin", after=100)      # next GET sends 100 body bytes, then drops
        http_server.ignore_range("a.bin")        # answer Range requests with a full 200
        http_server.requests                     # list[RecordedRequest], in arrival order
        http_server.requests_for("a.bin")        # the same, filtered by file
        http_server.clear_requests()

Outside pytest use the class directly: ``with LocalHTTPServer(folder) as server: ...``.

The server speaks HTTP/1.1 (keep-alive), serves ``GET`` and ``HEAD``, answers
``Range: bytes=START-[END]`` with ``206`` and ``Content-Range``, and ``416`` for a range
that starts past the end of the file. A cut transfer still announces the full
``Content-Length`` and then closes the socket, which is what a dropped connection looks like
to a client.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, and how it answered."""

    method: str
    name: str  # the path relative to the served root, without the leading "/"
    headers: dict[str, str]
    status: int

    @property
    def range(self) -> str | None:
        """The ``Range`` header as sent, or None."""
        for key, value in self.headers.items():
            if key.lower() == "range":
                return value
        return None


@dataclass
class _Faults:
    fail: dict[str, list[int]] = field(default_factory=dict)  # name -> statuses still to send
    cut: dict[str, list[int]] = field(default_factory=dict)  # name -> byte counts still to cut
    ignore_range: set[str] = field(default_factory=set)


class LocalHTTPServer:
    """Serve a folder on 127.0.0.1 on a free port from a background thread.

    Args:
        root: Folder whose files are served (created if missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[RecordedRequest] = []
        self._faults = _Faults()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LocalHTTPServer:
        """Bind a free port and start serving; returns self."""
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # A short poll keeps stop() (and so every test's teardown) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-http-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str = "") -> str:
        """The URL of a file under the root."""
        return f"{self.base_url}/{urllib.parse.quote(name)}"

    # -- faults ----------------------------------------------------------------------------
    def fail(self, name: str, times: int = 1, status: int = 503) -> None:
        """Answer the next ``times`` GETs of ``name`` with ``status`` (no body)."""
        with self._lock:
            self._faults.fail.setdefault(name, []).extend([status] * times)

    def cut(self, name: str, after: int, times: int = 1) -> None:
        """For the next ``times`` GETs of ``name``, drop the connection after ``after`` bytes."""
        with self._lock:
            self._faults.cut.setdefault(name, []).extend([after] * times)

    def ignore_range(self, name: str, enabled: bool = True) -> None:
        """Make ``name`` behave like a server without Range support (always 200, full body)."""
        with self._lock:
            if enabled:
                self._faults.ignore_range.add(name)
            else:
                self._faults.ignore_range.discard(name)

    def clear_faults(self) -> None:
        """Forget every pending fault."""
        with self._lock:
            self._faults = _Faults()

    # -- request log -----------------------------------------------------------------------
    def requests_for(self, name: str, method: str | None = "GET") -> list[RecordedRequest]:
        """Requests for one file (GET only by default; ``method=None`` for all)."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.name == name and (method is None or r.method == method)
            ]

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()

    # -- used by the handler ---------------------------------------------------------------
    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_fault(self, name: str) -> tuple[int | None, int | None, bool]:
        """Pop the pending (fail status, cut size) for one GET, and the ignore-range flag."""
        with self._lock:
            statuses = self._faults.fail.get(name)
            status = statuses.pop(0) if statuses else None
            cuts = self._faults.cut.get(name)
            cut = cuts.pop(0) if (cuts and status is None) else None
            return status, cut, name in self._faults.ignore_range


def _make_handler(server: LocalHTTPServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            # Keep test output clean; the request log is the record.
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            headers = dict(self.headers.items())
            status, cut, ignore_range = (None, None, False)
            if not head:
                status, cut, ignore_range = server._take_fault(name)

            path = (server.root / name).resolve()
            root = server.root.resolve()
            if status is not None:
                self._empty(status, name, headers)
                return
            if not path.is_file() or root not in path.parents:
                self._empty(404, name, headers)
                return

            size = path.stat().st_size
            start, end = 0, size - 1
            code = 200
            match = _RANGE.match(headers.get("Range", "").strip())
            if match and not ignore_range:
                start = int(match.group(1))
                if match.group(2):
                    end = min(int(match.group(2)), size - 1)
                if start >= size or start > end:
                    server._record(RecordedRequest(self.command, name, headers, 416))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                code = 206
            length = end - start + 1 if size else 0

            server._record(RecordedRequest(self.command, name, headers, code))
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "none" if ignore_range else "bytes")
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return

            budget = length if cut is None else min(cut, length)
            with path.open("rb") as f:
                f.seek(start)
                while budget > 0:
                    chunk = f.read(min(_CHUNK, budget))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    budget -= len(chunk)
            self.wfile.flush()
            if cut is not None:
                # Closing with bytes still owed is what a dropped connection looks like.
                self.close_connection = True

        def _empty(self, status: int, name: str, headers: dict[str, str]) -> None:
            server._record(RecordedRequest(self.command, name, headers, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHTTPServer]:
    """A started :class:`LocalHTTPServer` serving a fresh, empty folder (``.root``)."""
    with LocalHTTPServer(tmp_path_factory.mktemp("www")) as server:
        yield server
