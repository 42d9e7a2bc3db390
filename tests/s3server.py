"""A real S3-compatible server on loopback for the tests and the bench (moto's server mode), and a
small fault proxy in front of it that plays the store's bad days: 503 SlowDown / 500 answers,
connections cut mid-request, requests never answered, and the store's refusal of unknown access keys (403
InvalidAccessKeyId; moto itself accepts any key)."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

KEY_ID = "AKIATESTBOLMOASYNC01"
SECRET = "bolmo/async/test/secret/never+printed+0123456789"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 in a thread of this process on a free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3  # moto's own dependency: the tests' view of the bucket, never the tool's

    client(endpoint).create_bucket(Bucket=bucket)
    del boto3


def client(endpoint: str):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name=REGION
    )


@dataclass
class Fault:
    """``count`` requests matching ``method`` and ``path`` (a regex on the request target) get
    ``action``: "503" (SlowDown), "500", "cut" (the connection closed before the request reaches
    the store), "lose" (the store does it; the answer is lost) or "slow" (it reaches the store
    1.5 s late, as on a loaded machine)."""

    method: str
    path: str
    action: str
    count: int = 1


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    key_id: str | None = KEY_ID  # the access key the "store" accepts (None: any)
    seen: list[str] = field(default_factory=list)  # "METHOD target" of every request
    injected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str, target: str) -> str | None:
        with self.lock:
            self.seen.append(f"{method} {target}")
            for f in self.faults:
                if f.count > 0 and f.method in (method, "*") and re.search(f.path, target):
                    f.count -= 1
                    self.injected += 1
                    return f.action
        return None


@contextlib.contextmanager
def fault_proxy(upstream: str, proxy: FaultProxy | None = None) -> Iterator[tuple[str, FaultProxy]]:
    """An HTTP/1.1 proxy on a free loopback port forwarding to ``upstream`` (the Host header is
    kept: the request's signature stays valid)."""
    state = proxy or FaultProxy(upstream)
    up = upstream.removeprefix("http://")
    up_host, up_port = up.split(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            action = state.take(self.command, self.path)
            if action == "cut":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            auth = self.headers.get("Authorization", "")
            m = re.search(r"Credential=([^/]+)/", auth)
            if state.key_id is not None and m and m.group(1) != state.key_id:
                self._error(
                    403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
                )
                return
            if action in ("503", "500"):
                code = "SlowDown" if action == "503" else "InternalError"
                self._error(int(action), code, "Please reduce your request rate.")
                return
            if action == "slow":
                time.sleep(1.5)
            if action == "stall":  # never answered (the client gives up)
                time.sleep(3600)
                return
            conn = http.client.HTTPConnection(up_host, int(up_port), timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if action == "lose":  # done by the store, its answer lost on the way back
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    with contextlib.suppress(ConnectionError):  # the client gave up (a stop, its timeout)
                        step = max(1, len(data) // 15) if action == "trickle" else len(data) or 1
                        for i in range(0, len(data), step):
                            self.wfile.write(data[i : i + step])
                            if action == "trickle":
                                self.wfile.flush()
                                time.sleep(0.2)
            finally:
                conn.close()

        def _error(self, status: int, code: str, message: str) -> None:
            data = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent_store() -> Iterator[tuple[str, list[socket.socket]]]:
    """An endpoint that accepts connections and never answers a request (a hung store, a wrong
    port of some other service): yields its URL and the connections it has accepted so far."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(sock.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", held
    finally:
        stop.set()
        for c in held:
            c.close()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
