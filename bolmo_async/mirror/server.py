"""A Hub-compatible HTTP server for a local folder (loopback by default).

It implements what huggingface_hub and our fetcher call:

- ``GET  /api/{datasets,models}/{ns}/{name}/revision/{rev}``  -> ``{"id", "sha", "siblings"}``
- ``GET  /api/{datasets,models}/{ns}/{name}/tree/{rev}[/{path}]?recursive=true`` paginated with
  a ``Link: <...>; rel="next"`` header
- ``GET|HEAD /datasets/{ns}/{name}/resolve/{rev}/{path}`` (and ``/{ns}/{name}/resolve/...`` for
  model repos) with ``ETag``, ``X-Repo-Commit``, ``X-Linked-Size``, ``X-Linked-Etag``, ``Range``;
  LFS files answer 302 to a second listener standing in for the CDN, with a signed URL that
  expires like the Hub's.
- Optionally a wide-area link (``WanConfig``): a round trip before every answer, a per-response
  rate cap (a CDN's per-connection cap) and a total link rate; still on loopback only.

Paths are looked up in the index built at start-up, never joined to the folder, and symbolic
links are neither indexed nor followed (files are opened with ``O_NOFOLLOW`` and checked to
be inside the folder again when served), so nothing outside the folder can be served. The
commit sha is derived from the folder's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import signal
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .faults import FaultConfig

#: Extensions the Hub stores in LFS whatever their size (as bolmo_mix's .gitattributes does).
LFS_SUFFIXES = (".zst", ".gz", ".parquet", ".arrow", ".bin", ".npy", ".safetensors")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 256 * 1024
WAN_CHUNK = 64 * 1024  # finer steps when pacing to a rate


@dataclass(frozen=True)
class WanConfig:
    """A wide-area link, emulated on loopback: ``rtt`` seconds before every answer (the Hub's
    and the CDN's: a request's round trip), at most ``response_rate`` bytes/s per response (a
    CDN's per-connection cap) and ``link_rate`` bytes/s over all responses together (the
    link). 0 turns a part off. Connection set-up is not delayed (kept-alive connections
    dominate a long run)."""

    rtt: float = 0.0
    response_rate: float = 0.0
    link_rate: float = 0.0

    @property
    def active(self) -> bool:
        return self.rtt > 0 or self.response_rate > 0 or self.link_rate > 0

    def ceiling(self, connections: int) -> float:
        """The most bytes/s ``connections`` parallel responses can get through this link."""
        per = self.response_rate * connections if self.response_rate > 0 else float("inf")
        return min(per, self.link_rate) if self.link_rate > 0 else per


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    abspath: str
    size: int
    oid: str  # git blob sha1
    sha256: str
    lfs: bool


def _port(request: web.Request) -> int:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return int(peer[1]) if peer else 0


def _inside(root: Path, path: str) -> bool:
    """``path`` resolves to a regular file inside ``root`` (no link leads out)."""
    real = os.path.realpath(path)
    return real.startswith(str(root) + os.sep) and os.path.isfile(real)


def _open_inside(root: Path, path: str) -> Any:
    """Open a served file, refusing a symbolic link (also one put there after start-up)."""
    if not _inside(root, path):
        raise FileNotFoundError(path)
    return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")


def _hash_file(path: str) -> tuple[str, str, int]:
    size = os.path.getsize(path)
    git = hashlib.sha1(f"blob {size}\0".encode())
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            git.update(block)
            sha.update(block)
    return git.hexdigest(), sha.hexdigest(), size


class MirrorRepo:
    """A folder served as one repo at one commit."""

    def __init__(self, repo_id: str, root: str | os.PathLike[str], repo_type: str = "dataset"):
        if repo_id.count("/") != 1:
            raise ValueError(f"repo id must look like 'namespace/name', got {repo_id!r}")
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a folder")
        self.files: dict[str, Entry] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in sorted(filenames):
                abspath = os.path.join(dirpath, name)
                if name.startswith(".") or os.path.islink(abspath) or not _inside(self.root, abspath):
                    continue
                rel = os.path.relpath(abspath, self.root).replace(os.sep, "/")
                oid, sha, size = _hash_file(abspath)
                lfs = rel.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
                self.files[rel] = Entry(rel, abspath, size, oid, sha, lfs)
        dirs: set[str] = set()
        for rel in self.files:
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        self.dirs = dirs
        h = hashlib.sha1()
        for rel in sorted(self.files):
            h.update(f"{rel}\0{self.files[rel].sha256}\n".encode())
        self.commit = h.hexdigest()

    def knows_revision(self, rev: str) -> bool:
        return rev in ("main", self.commit)

    def tree(self, under: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{under}/" if under else ""
        out: list[dict[str, Any]] = []
        for d in sorted(self.dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
        for rel in sorted(self.files):
            if rel.startswith(prefix) and (recursive or "/" not in rel[len(prefix) :]):
                e = self.files[rel]
                item: dict[str, Any] = {"type": "file", "oid": e.oid, "size": e.size, "path": rel}
                if e.lfs:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
                out.append(item)
        out.sort(key=lambda x: x["path"])
        return out


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (start, end); None if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    a, _, b = spec.strip().partition("-")
    try:
        if a == "":
            n = int(b)
            if n <= 0:
                return None
            return max(0, size - n), size - 1
        start = int(a)
        end = int(b) if b else size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        return None
    return start, min(end, size - 1)


class Mirror:
    """The two listeners (Hub API + CDN) and their state. Use as ``async with Mirror(...)``."""

    def __init__(
        self,
        repos: list[MirrorRepo],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
        page_size: int = 1000,
        faults: FaultConfig | None = None,
        token: str | None = None,
        url_ttl: float = 3600.0,
        wan: WanConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.repos = {(r.repo_type, r.repo_id): r for r in repos}
        #: Both listeners speak TLS with this server context (tests of what a run does over
        #: https, as against the Hub); None: plain http.
        self.ssl_context = ssl_context
        #: Wide-area emulation (round trip, per-response and total rates); None: loopback speed.
        self.wan = wan if wan is not None and wan.active else None
        self._link_free_at = 0.0  # the shared link's next free instant (loop time)
        #: LFS objects by sha256, for the CDN listener.
        self._by_sha = {e.sha256: e for r in repos for e in r.files.values()}
        self.host, self.port, self.cdn_port = host, port, cdn_port
        self.page_size = page_size
        self.faults = faults
        self.token = token
        self.url_ttl = url_ttl
        self._secret = secrets.token_bytes(16)
        #: One record per CDN request: {"path", "authorization": bool, "range"}.
        self.cdn_requests: list[dict[str, Any]] = []
        #: One record per Hub request: (method, path).
        self.hub_requests: list[tuple[str, str]] = []
        #: When each resolve and each CDN request was answered: (time.monotonic(), "resolve" or
        #: "cdn", repo path, the client's port: one per connection), after the emulated round trip.
        self.timeline: list[tuple[float, str, str, int]] = []
        #: How many Hub requests carried an Authorization header.
        self.hub_authorized = 0
        self._runners: list[web.AppRunner] = []
        self.endpoint = ""
        self.cdn_endpoint = ""

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> str:
        middlewares = [self._round_trip] if self.wan is not None and self.wan.rtt > 0 else []
        hub = web.Application(middlewares=middlewares)
        for rtype, prefix in (("dataset", "/api/datasets"), ("model", "/api/models")):
            hub.router.add_get(prefix + "/{ns}/{name}/revision/{rev}", self._revision(rtype))
            hub.router.add_get(prefix + "/{ns}/{name}/tree/{rev}", self._tree(rtype))
            hub.router.add_get(prefix + "/{ns}/{name}/tree/{rev}/{path:.+}", self._tree(rtype))
        hub.router.add_route("*", "/datasets/{ns}/{name}/resolve/{rev}/{path:.+}", self._resolve("dataset"))
        hub.router.add_route("*", "/{ns}/{name}/resolve/{rev}/{path:.+}", self._resolve("model"))
        cdn = web.Application(middlewares=middlewares)
        cdn.router.add_route("*", "/lfs/{sha256}", self._cdn)
        self._runners = [web.AppRunner(hub, access_log=None), web.AppRunner(cdn, access_log=None)]
        ports = [self.port, self.cdn_port]
        urls = []
        for runner, port in zip(self._runners, ports, strict=True):
            await runner.setup()
            site = web.TCPSite(runner, self.host, port, ssl_context=self.ssl_context)
            await site.start()
            server = site._server
            assert server is not None and server.sockets  # type: ignore[attr-defined]
            real_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            host = f"[{self.host}]" if ":" in self.host else self.host
            urls.append(f"{'https' if self.ssl_context else 'http'}://{host}:{real_port}")
        self.endpoint, self.cdn_endpoint = urls
        return self.endpoint

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []

    async def __aenter__(self) -> Mirror:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- WAN emulation ------------------------------------------------------------------
    @web.middleware
    async def _round_trip(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every answer waits one round trip first (request there, first byte back)."""
        assert self.wan is not None
        await asyncio.sleep(self.wan.rtt)
        return await handler(request)

    async def _pace(self, started: float, sent: int, n: int) -> None:
        """Wait until ``n`` more bytes may go out: at most ``response_rate`` for this response
        (``sent`` of it so far since ``started``) and ``link_rate`` over all responses."""
        wan = self.wan
        assert wan is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = now
        if wan.response_rate > 0:
            at = max(at, started + (sent + n) / wan.response_rate)
        if wan.link_rate > 0:
            slot = max(now, self._link_free_at)
            self._link_free_at = slot + n / wan.link_rate
            at = max(at, self._link_free_at)
        if at > now:
            await asyncio.sleep(at - now)

    # -- helpers ------------------------------------------------------------------------
    def _repo(self, rtype: str, request: web.Request) -> MirrorRepo:
        repo_id = f"{request.match_info['ns']}/{request.match_info['name']}"
        repo = self.repos.get((rtype, repo_id))
        if repo is None:
            raise web.HTTPNotFound(
                text=f'{{"error": "Repository not found: {repo_id}"}}',
                content_type="application/json",
                headers={"X-Error-Code": "RepoNotFound"},
            )
        return repo

    def _check_auth(self, request: web.Request) -> None:
        if "Authorization" in request.headers:
            self.hub_authorized += 1
        if self.token is None:
            return
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(
                text='{"error": "Invalid credentials in Authorization header"}',
                content_type="application/json",
                headers={"X-Error-Code": "GatedRepo"},
            )

    def _check_rev(self, repo: MirrorRepo, rev: str) -> None:
        if not repo.knows_revision(rev):
            raise web.HTTPNotFound(
                text=f'{{"error": "Invalid rev id: {rev}"}}',
                content_type="application/json",
                headers={"X-Error-Code": "RevisionNotFound"},
            )

    def _status_fault(self, fault: str | None) -> web.Response | None:
        """The error answer of a status fault (5xx, 429, CDN 503/403), or None."""
        if fault in ("http500", "http502", "http503", "cdn_fail"):
            status = {"http500": 500, "http502": 502}.get(fault, 503)
            return web.Response(status=status, text="injected failure")
        if fault == "http429":
            assert self.faults is not None
            ra = self.faults.retry_after
            headers = {"RateLimit": f'"resolvers";r=0;t={ra:g}'}
            if self.faults.retry_after_header:
                headers["Retry-After"] = f"{ra:g}"
            return web.Response(status=429, text="rate limited", headers=headers)
        if fault == "cdn_expired":
            return web.Response(
                status=403, text="<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            )
        return None

    def _sign(self, sha256: str, expires: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()

    # -- handlers -----------------------------------------------------------------------
    def _revision(self, rtype: str):
        async def handler(request: web.Request) -> web.Response:
            self.hub_requests.append((request.method, request.path))
            self._check_auth(request)
            repo = self._repo(rtype, request)
            self._check_rev(repo, request.match_info["rev"])
            return web.json_response(
                {
                    "id": repo.repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                }
            )

        return handler

    def _tree(self, rtype: str):
        async def handler(request: web.Request) -> web.Response:
            self.hub_requests.append((request.method, request.path))
            self._check_auth(request)
            repo = self._repo(rtype, request)
            self._check_rev(repo, request.match_info["rev"])
            under = request.match_info.get("path", "").strip("/")
            if under and under not in repo.dirs:
                raise web.HTTPNotFound(text='{"error": "path not found"}', content_type="application/json")
            recursive = request.query.get("recursive", "false").lower() in ("1", "true")
            items = repo.tree(under, recursive)
            try:
                cursor = int(request.query.get("cursor", "0"))
            except ValueError as exc:
                raise web.HTTPBadRequest(text="bad cursor") from exc
            page = items[cursor : cursor + self.page_size]
            headers = {}
            if cursor + self.page_size < len(items):
                query = dict(request.query)
                query["cursor"] = str(cursor + self.page_size)
                nxt = request.url.with_query(query)
                base = self.endpoint or f"{request.scheme}://{request.host}"
                headers["Link"] = f'<{base}{nxt.raw_path_qs}>; rel="next"'
            return web.json_response(page, headers=headers)

        return handler

    def _resolve(self, rtype: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            self.hub_requests.append((request.method, request.path))
            self.timeline.append((time.monotonic(), "resolve", request.match_info["path"], _port(request)))
            if request.method not in ("GET", "HEAD"):
                raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
            self._check_auth(request)
            repo = self._repo(rtype, request)
            rev = request.match_info["rev"]
            self._check_rev(repo, rev)
            path = request.match_info["path"]
            entry = repo.files.get(path)
            if entry is None:
                raise web.HTTPNotFound(
                    text='{"error": "Entry not found"}',
                    content_type="application/json",
                    headers={"X-Error-Code": "EntryNotFound"},
                )
            headers = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
            if entry.lfs:
                if self.faults is not None and request.method == "GET":
                    failed = self._status_fault(self.faults.draw(entry.path, cdn=False, body=False))
                    if failed is not None:
                        return failed
                expires = int(time.time() + self.url_ttl)
                location = (
                    f"{self.cdn_endpoint}/lfs/{entry.sha256}?Expires={expires}"
                    f"&Signature={self._sign(entry.sha256, expires)}&name={quote(path, safe='')}"
                )
                headers.update(
                    {
                        "Location": location,
                        "ETag": f'"{entry.sha256}"',
                        "X-Linked-Etag": f'"{entry.sha256}"',
                        "X-Linked-Size": str(entry.size),
                        "Content-Length": "0",
                    }
                )
                return web.Response(status=302, headers=headers)
            headers["ETag"] = f'"{entry.oid}"'
            return await self._serve(request, entry, headers, cdn=False)

        return handler

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        self.timeline.append((time.monotonic(), "cdn", request.query.get("name", sha256), _port(request)))
        self.cdn_requests.append(
            {
                "path": request.query.get("name", sha256),
                "authorization": "Authorization" in request.headers,
                "range": request.headers.get("Range"),
            }
        )
        try:
            expires = int(request.query.get("Expires", "0"))
        except ValueError:
            expires = 0
        good = hmac.compare_digest(self._sign(sha256, expires), request.query.get("Signature", ""))
        if not good or expires < time.time():
            return web.Response(
                status=403, text="<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            )
        entry = self._by_sha.get(sha256)
        if entry is None:
            raise web.HTTPNotFound()
        headers = {"ETag": f'"{entry.sha256}"', "Accept-Ranges": "bytes"}
        return await self._serve(request, entry, headers, cdn=True)

    async def _serve(
        self, request: web.Request, entry: Entry, headers: dict[str, str], *, cdn: bool
    ) -> web.StreamResponse:
        fault = None
        if self.faults is not None and request.method == "GET":
            fault = self.faults.draw(entry.path, cdn=cdn)
        failed = self._status_fault(fault)
        if failed is not None:
            return failed

        size = entry.size
        start, end, status = 0, size - 1, 200
        range_header = request.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        if request.method == "HEAD":
            headers["Content-Length"] = str(length)
            return web.Response(status=status, headers=headers)
        try:
            f = _open_inside(self._root_of(entry), entry.abspath)
        except OSError:
            return web.Response(status=404, text="not found")
        try:
            return await self._send(request, f, entry, headers, status, start, length, fault)
        except (ConnectionResetError, ConnectionError):  # the client went away: nothing to report
            return web.Response(status=499)
        finally:
            f.close()

    def _root_of(self, entry: Entry) -> Path:
        for repo in self.repos.values():
            if repo.files.get(entry.path) is entry:
                return repo.root
        return Path(os.path.dirname(entry.abspath))

    async def _send(
        self,
        request: web.Request,
        f: Any,
        entry: Entry,
        headers: dict[str, str],
        status: int,
        start: int,
        length: int,
        fault: str | None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        sent = 0
        started = loop.time()
        chunk = CHUNK if self.wan is None else WAN_CHUNK
        stop_at = length // 2 if fault in ("reset", "cut") else None
        stall_at = length // 2 if fault == "stall" else None
        f.seek(start)
        while sent < length:
            n = min(chunk, length - sent)
            for cut in (stop_at, stall_at):
                if cut is not None:
                    n = min(n, max(1, cut - sent))
            block = await loop.run_in_executor(None, f.read, n)
            if not block:
                break
            if fault == "corrupt" and sent <= length // 2 < sent + len(block):
                i = length // 2 - sent
                block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1 :]
            if self.wan is not None:
                await self._pace(started, sent, len(block))
            if fault == "trickle" and sent < 64 * 1024:
                assert self.faults is not None
                for j in range(0, len(block), 4096):
                    await resp.write(block[j : j + 4096])
                    await asyncio.sleep(self.faults.trickle_delay)
            else:
                await resp.write(block)
            sent += len(block)
            if stall_at is not None and sent >= stall_at:
                assert self.faults is not None
                stall_at = None
                await asyncio.sleep(self.faults.stall_seconds)
            if stop_at is not None and sent >= stop_at:
                transport = request.transport
                if transport is not None:
                    if fault == "reset":
                        transport.abort()
                    else:
                        transport.close()
                return resp
        await resp.write_eof()
        return resp


def iter_model_specs(specs: list[str]) -> Iterator[tuple[str, str]]:
    for spec in specs:
        repo_id, sep, folder = spec.partition("=")
        if not sep:
            raise ValueError(f"--model-repo takes REPO_ID=FOLDER, got {spec!r}")
        yield repo_id, folder


def run_mirror(
    folder: str,
    *,
    repo_id: str,
    host: str = "127.0.0.1",
    port: int = 0,
    cdn_port: int = 0,
    model_repos: list[str] | None = None,
    page_size: int = 1000,
    faults: FaultConfig | None = None,
    token: str | None = None,
    url_ttl: float = 3600.0,
    ready_file: str | None = None,
    wan: WanConfig | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. Prints the endpoint; writes it to ``ready_file`` too.
    ``wan``: emulate a wide-area link (round trip, per-response and total rates)."""
    repos = [MirrorRepo(repo_id, folder, "dataset")]
    repos += [MirrorRepo(rid, f, "model") for rid, f in iter_model_specs(model_repos or [])]
    mirror = Mirror(
        repos,
        host=host,
        port=port,
        cdn_port=cdn_port,
        page_size=page_size,
        faults=faults,
        token=token,
        url_ttl=url_ttl,
        wan=wan,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        endpoint = await mirror.start()
        print(f"Serving {folder} as dataset {repo_id} at commit {repos[0].commit}", flush=True)
        print(f"  endpoint: {endpoint}   (CDN stand-in: {mirror.cdn_endpoint})", flush=True)
        if mirror.wan is not None:
            w = mirror.wan
            print(
                f"  emulating a wide-area link: round trip {w.rtt * 1000:g} ms, "
                f"{w.response_rate / 1e6:g} MB/s per response, {w.link_rate / 1e6:g} MB/s in all (0: no cap)",
                flush=True,
            )
        print(f"  use it with: HF_ENDPOINT={endpoint} bolmo-async prepare ...   or --endpoint {endpoint}", flush=True)
        if token:  # (never said back: it is the clients' secret too)
            print("  it answers 401 unless the required token is sent: set HF_TOKEN to it", flush=True)
        if ready_file:
            tmp = f"{ready_file}.tmp"
            Path(tmp).write_text(endpoint + "\n")
            os.replace(tmp, ready_file)
        try:
            await stop.wait()
        finally:
            await mirror.stop()

    asyncio.run(main())


class MirrorThread:
    """A ``Mirror`` running on its own event loop in a background thread (for sync callers:
    tests, the benchmark). ``with MirrorThread([...]) as m: m.endpoint``."""

    def __init__(self, repos: list[MirrorRepo], **kwargs: Any):
        import threading

        self.mirror = Mirror(repos, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mirror", daemon=True)

    @property
    def endpoint(self) -> str:
        return self.mirror.endpoint

    def __enter__(self) -> Mirror:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.mirror.start(), self._loop).result(timeout=30)
        return self.mirror

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.mirror.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
