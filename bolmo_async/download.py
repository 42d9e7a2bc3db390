"""Streaming one file (or a byte range of it) from the Hub into a sink, with retries.

- Redirects are followed by hand: the Hub answers 302 to a signed CDN URL on another host;
  the token goes to the Hub only, never to the CDN. A CDN 403 (expired signature) resolves
  the file again.
- A broken body resumes with ``Range: bytes=<next>-``; a 200 to a Range request means the
  server ignored it, so the sink is reset and the file starts over.
- 429 and 5xx are retried by the one retry helper (``retry.py``: capped exponential backoff
  and jitter, honouring ``Retry-After`` and the Hub's ``RateLimit: ...;t=<s>``); stalled
  reads time out, and a body must keep a minimum rate (``retry.Progress``: a trickle fails the
  attempt, which is retried within the budget, so one file's time is bounded).
- The sink verifies the whole file (sha256 / git oid) at the end; a mismatch starts over.
- A bounded number of attempts per file, then ``DownloadError`` with the reason.
- A body is never longer than the listing says: more bytes than that is a broken download
  (retried from the start, then failed), so a server that never ends a body cannot fill the
  disk. A copy whose every attempt is longer or shorter than listed fails as
  ``ListingMismatch``, saying what helps (a rerun meets the same bytes). Only http(s) redirects are followed, at most ``MAX_REDIRECTS`` per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Protocol

import aiohttp
from yarl import URL

from .errors import AuthError, DownloadError, IntegrityError, ListingMismatch, NotFoundError, RangeIgnored, Retry
from .hub import HubClient, status_error
from .retry import RETRY_EXCEPTIONS, RETRY_STATUSES, Progress, RateWait, RetryPolicy, attempt_count, host_of, retrying
from .util import DecodingSlot

log = logging.getLogger("bolmo_async")

FEED_BYTES = 1 << 20  # hand the sink about this much at a time (worker thread)
READ_CHUNK = 256 * 1024
#: A prefix's read past its limit hands over this much at a time: it stops as soon as the first
#: document has ended, which the sink can tell only once it has the bytes.
READ_ON_FEED = 64 * 1024
_RESUMABLE: tuple[type[BaseException], ...] = (Retry, *RETRY_EXCEPTIONS)
MAX_REDIRECTS = 10


class Sink(Protocol):
    def feed(self, data: bytes) -> None: ...

    def reset(self) -> None: ...


class BytesSink:
    """Collects bytes in memory (small ranges: parquet footers and row groups)."""

    inline = True  # ``stream`` feeds it on the event loop: an append, no thread hop

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def reset(self) -> None:
        self.buf.clear()


async def stream(
    client: HubClient,
    url: str,
    sink: Sink,
    *,
    what: str,
    start: int = 0,
    end: int | None = None,
    executor: Executor | None = None,
    on_bytes: Callable[[int], None] | None = None,
    verify: Callable[[], None] | None = None,
    size: int | None = None,
    max_bytes: int | None = None,
    cdn: str | None = None,
    resolved: Callable[[str], None] | None = None,
    cut: Callable[[], int] | None = None,
    reresolve: Callable[[str], Awaitable[str | None]] | None = None,
    rate_wait: RateWait | None = None,
    totals: list[int] | None = None,
) -> int:
    """Stream bytes ``[start, end)`` of ``url`` (``end=None``: to EOF) into ``sink``.

    ``cut()``: the current end, which may move down from ``end`` while the body comes (a
    segment split: another request fetches the rest); the body stops there (its connection is
    closed, not reused) and a retry asks only up to it.

    ``cdn``: a URL ``url`` resolved to before (a signed CDN URL): asked directly, no resolve,
    and ``url`` is resolved again only if it is refused. ``resolved(u)``: called with the URL
    that answered with the body, and with each URL redirected to. ``reresolve(refused)``: the
    URL to ask once ``refused`` (a signed URL) was refused, shared by the segments of one file
    (one resolve for them all; None: ``url``, resolved by this request as before).
    ``rate_wait``: the rate-limit waits left to the file, shared by its segments. ``totals``:
    where a 206's total (``Content-Range: .../N``) other than ``size`` is noted: its bytes are
    taken (a wrong total on the right bytes passes the hash), and bytes its caller then refuses
    (a hash, a parquet footer) are the listing's mismatch (``listing_mismatch``).

    ``size``: the file's size as listed; no more than that is ever read (nor more than
    ``max_bytes`` when the size is not known). ``verify`` runs (in the
    worker) after the last byte; IntegrityError from it restarts the file. Returns the number
    of bytes fed. Every attempt goes through the one retry helper (``retry.retrying``).
    """
    loop = asyncio.get_running_loop()
    policy = client.retry
    pos = start
    cdn_url: str | None = cdn
    total: int | None = end if end is not None else size
    #: What the last attempt found of the file's size against the listing's (the server's copy
    #: ends elsewhere): a rerun meets it again, so the failure says so (``ListingMismatch``).
    mismatch: list[str] = []
    refused_url: str | None = None  # a signed URL refused: asked again through ``reresolve``
    #: A CDN host refusing connections is resolved again once (the Hub may send elsewhere), then
    #: retried as any broken connection: retried on the same URL, it spent --retries, never resolved.
    cdn_down = [False]

    inline = getattr(sink, "inline", False)
    feed_bytes = getattr(sink, "feed_bytes", FEED_BYTES)

    async def feed(data: bytes) -> None:
        nonlocal pos
        if inline:
            sink.feed(data)
        else:
            await loop.run_in_executor(executor, sink.feed, data)
        pos += len(data)
        if on_bytes:
            on_bytes(len(data))

    async def restart() -> None:
        nonlocal pos
        if inline:
            sink.reset()
        else:
            await loop.run_in_executor(executor, sink.reset)
        if on_bytes and pos > start:
            on_bytes(-(pos - start))
        pos = start

    async def verified() -> int:
        try:
            await _verified(loop, executor, verify)
        except IntegrityError as exc:
            await restart()
            raise Retry(str(exc)) from exc
        return pos - start

    async def attempt() -> int:
        nonlocal cdn_url, total, refused_url
        mismatch.clear()
        if refused_url is not None and reresolve is not None:
            cdn_url, refused_url = await reresolve(refused_url), None
        redirects = 0  # the redirect budget is per attempt
        while True:
            if cut is not None:
                total = cut()
            if total is not None and pos >= total and pos > start:
                # Every byte arrived before the connection broke: nothing to ask for, verify it.
                return await verified()
            target = cdn_url or url
            headers = client.headers_for(target)
            stop = cut() if cut is not None else end
            if pos > 0 or stop is not None:
                headers["Range"] = f"bytes={pos}-" + (str(stop - 1) if stop is not None else "")
            buf = bytearray()
            try:
                async with client.get(target, headers=headers, allow_redirects=False, timeout=policy.timeout()) as r:
                    if r.status in (301, 302, 303, 307, 308):
                        loc = r.headers.get("Location")
                        redirects += 1
                        if not loc or redirects > MAX_REDIRECTS:
                            raise DownloadError(f"{what}: too many or empty redirects from {URL(target).host}")
                        nxt = _redirect_target(target, loc)
                        if nxt is None:
                            raise DownloadError(
                                f"{what}: {URL(target).host} redirects to {loc[:120]!r}, which is not a valid URL"
                            )
                        if nxt.scheme not in ("http", "https") or not nxt.host:
                            raise DownloadError(
                                f"{what}: {URL(target).host} redirects to {nxt.scheme}:, which is not http(s)"
                            )
                        cdn_url = str(nxt)
                        if resolved is not None:
                            resolved(cdn_url)
                        continue
                    if cdn_url is not None and (
                        r.status == 403 or (r.status in (401, 404, 410) and not client.on_hub(cdn_url))
                    ):
                        # The URL the Hub redirected to refused it (a signed URL expired, a CDN that
                        # has not the object yet): resolved again. Never the token's fault (the
                        # token goes to the Hub only), nor the repo id's: the Hub resolved it.
                        refused, refused_url, cdn_url = URL(cdn_url).host, cdn_url, None
                        raise Retry(f"HTTP {r.status} from {refused}, where the Hub sent it (an expired signed URL?)")
                    if r.status in RETRY_STATUSES:
                        raise Retry(f"HTTP {r.status}", r.headers, r.status)
                    if r.status == 416:
                        if size is not None and pos < size:
                            said = r.headers.get("Content-Range", "").rpartition("/")[2]
                            ends = f"has {said} bytes" if said.isdigit() else f"has no byte {pos}"
                            raise ListingMismatch(f"{what}: {_mismatch(f'the server says its copy {ends}', size)}")
                        raise DownloadError(f"{what}: the server says bytes {pos}- are out of range; the file changed?")
                    if r.status not in (200, 206):
                        said = await _short_text(r, client.redact)
                        err = status_error(r.status, what, said, r.headers, "Authorization" in headers)
                        if isinstance(err, AuthError | NotFoundError):
                            raise err
                        raise DownloadError(str(err))
                    if resolved is not None:
                        resolved(target)
                    if r.status == 200 and "Range" in headers:
                        if start != 0 or end is not None:
                            raise RangeIgnored(f"{what}: the server ignores HTTP Range requests")
                        log.info("%s: server ignored Range, starting over", what)
                        await restart()
                    # The whole file, said longer than listed (no encoding: the session asks identity).
                    # Not refused on the header alone (the listed bytes then a broken connection pass
                    # their hash); once a byte past the size arrives too, the copy is longer: said at
                    # once (it was fetched again on each of --retries attempts, 8x its bytes).
                    longer = r.status == 200 and size is not None and (r.content_length or 0) > size
                    if r.status == 206:
                        cr = r.headers.get("Content-Range", "")
                        if not cr.startswith(f"bytes {pos}-"):
                            # (one edge's wrong answer: asked again, within the attempt budget)
                            raise Retry(f"the server answered Range {pos}- with Content-Range {cr[:80]!r}")
                        size_s = cr.rpartition("/")[2]
                        if totals is not None and size is not None and size_s.isdigit() and int(size_s) != size:
                            totals.append(int(size_s))  # (the bytes are taken: the caller's check tells)
                        if end is None and size is None and size_s.isdigit():  # (a listed size is what is checked)
                            total = int(size_s)
                    elif end is None and r.content_length is not None and size is None:
                        total = r.content_length
                    limit = end if end is not None else size if size is not None else max_bytes
                    async with Progress(policy, what) as progress:
                        async for chunk in r.content.iter_chunked(READ_CHUNK):
                            progress.got(len(chunk))
                            buf += chunk
                            if cut is not None and pos + len(buf) >= (cut_at := cut()):
                                del buf[max(0, cut_at - pos) :]  # split: the rest is another request's
                                total = cut_at
                                break
                            if limit is not None and pos + len(buf) > limit:
                                buf.clear()
                                await restart()
                                if size is not None and limit == size:
                                    if longer:
                                        found = f"the server says its copy has {r.content_length} bytes"
                                        raise ListingMismatch(f"{what}: {_mismatch(found, size)}")
                                    mismatch.append("the server's copy is longer")
                                raise Retry(f"the body is longer than the {limit - start} bytes listed")
                            if len(buf) >= feed_bytes:
                                data, buf = bytes(buf), bytearray()
                                if inline:  # an append on the loop: no wait to leave out of the deadline
                                    await feed(data)
                                else:  # (a resume restarts the deadline: never per chunk, or a drip would pass)
                                    progress.pause()  # the sink's time is not the server's
                                    await feed(data)
                                    progress.resume()
                    if buf:
                        data, buf = bytes(buf), bytearray()
                        await feed(data)
                    if total is not None and pos < total:
                        if size is not None and _ends_short(r, size):
                            # (the body ended where the server's own length says: not a broken connection)
                            mismatch.append(f"the server's copy ends at byte {pos}")
                        raise Retry(f"body cut short at byte {pos} of {total}")
            except _RESUMABLE as exc:
                if buf:  # keep what arrived: the next attempt resumes after it
                    await feed(bytes(buf))
                if (
                    not cdn_down[0]
                    and cdn_url is not None
                    and target == cdn_url
                    and not client.on_hub(cdn_url)
                    and isinstance(exc, aiohttp.ClientConnectorError)
                    and isinstance(exc.os_error, ConnectionRefusedError)
                ):
                    cdn_down[0] = True
                    refused_url, cdn_url = cdn_url, None
                raise
            return await verified()

    def fail(reason: str, n: int) -> DownloadError:
        if mismatch and size is not None:
            return ListingMismatch(
                f"{what}: {_mismatch(mismatch[0], size)} ({'each of ' if n > 1 else ''}{attempt_count(n)})"
            )
        return DownloadError(f"{what}: gave up after {attempt_count(n)}; last error: {reason}")

    return await retrying(
        policy,
        what,
        attempt,
        fail=fail,
        note=lambda: f", resuming at byte {pos}",
        where=lambda: host_of(cdn_url or url),
        rate_wait=rate_wait,
    )


class Link:
    """One worker's connections for file bodies: at most ``connections`` at once. Each file in
    flight holds one; a large file borrows more, for parallel Range segments, only while some
    are free (so few files in flight get the whole link, many get one each)."""

    def __init__(self, connections: int):
        self.connections = max(1, connections)
        self.busy = 0

    def hold(self) -> None:
        self.busy += 1

    def take(self) -> bool:
        if self.busy >= self.connections:
            return False
        self.busy += 1
        return True

    def give(self) -> None:
        self.busy -= 1


#: A file up to this size is fetched whole (one request, no Range) as soon as it is handed
#: out, ahead of its decoding; a larger one as Range segments of ``BLOCK`` bytes once it may
#: decode (each segment one request on a kept-alive connection to the same signed CDN URL),
#: reassembled in order for the decoder.
WHOLE = 8 << 20
BLOCK = 2 << 20
#: The blocks of a file fetched in parallel segments (the link, not the decoder, is the limit),
#: and its first block (before that is known), are ``SEGMENT_BLOCK`` bytes (at most ``BLOCK``).
#: Its decoder takes them in order: with n segments sharing a link each comes at a n-th of it,
#: so the first block, hence the decoder's start, comes sooner the smaller they are, and the
#: decoder, when it is the slower, never waits again. Smaller still costs the link: each block
#: is a request, a round trip its segment sits idle. Measured against 2 MB blocks, a decoder of
#: 33 MB/s: the decoder starts at 0.11 s instead of 0.28 (30 ms round trip, 12 MB/s per
#: connection) and 0.23 instead of 0.49 (80 ms, 6 MB/s); the transfer ends 0.06 s later with no
#: decoder at all (80 ms).
SEGMENT_BLOCK = 768 << 10
#: Parallel segments of one file at most (``--connections`` caps them first); its read-ahead is
#: at most (2 x segments + 1) blocks.
MAX_LANES = 64
#: A decoder waiting this long for the next segment means the network is the limit: the file
#: opens ``FIRST_LANES`` segments (within the free connections of its worker's ``Link``), then
#: doubles them while the aggregate rate still grows (``_Growth``).
STARVED = 0.1
FIRST_LANES = 8
#: No first byte after this long: a round trip no loopback has, so the link is a wide-area one
#: and the first segments open at once.
FAR = 0.03
#: The end phase: a lane with no block left takes the second part of the piece that would end
#: last, when that ends the file at least this much sooner (and half a round trip), leaving
#: either part at least ``SPLIT_MIN`` bytes.
SPLIT_GAIN = 0.02
SPLIT_MIN = 64 * 1024


async def fetch_file(
    client: HubClient,
    url: str,
    sink: Sink,
    *,
    what: str,
    size: int,
    executor: Executor | None = None,
    on_bytes: Callable[[int], None] | None = None,
    verify: Callable[[], None] | None = None,
    link: Link | None = None,
    decoding: DecodingSlot | None = None,
    cdn: str | None = None,
    stats: dict[str, Any] | None = None,
    span: int | None = None,
    more: Callable[[], bool] | None = None,
) -> int:
    """A whole file into ``sink``, in order, verified (``verify`` after the last byte; an
    ``IntegrityError`` fetches it again within the attempt budget). Returns the bytes fed.

    ``span`` (less than ``size``): only the file's first ``span`` bytes (a JSON-lines prefix),
    by Range requests, in segments like a whole file's; then, while ``more()`` (its decoder has
    no whole document yet), the rest as one stream that stops once ``more()`` is false. A prefix
    cannot be checked against the whole file's hash: ``verify`` runs after it all the same (the
    sink knows what it got). A server that ignores Range sends the whole file: verified.

    The transfer runs ahead of the sink, bounded: a file of ``WHOLE`` bytes or less is fetched
    whole while it waits for a ``decoding`` slot; a larger one waits for its slot first, then
    keeps up to (segments + 1) blocks of ``BLOCK`` bytes ahead of its decoder, so the
    connection does not wait for decoding. When the decoder is starved for bytes (the link, not
    the CPU, is the limit), the file is fetched as several Range segments in parallel over free
    connections of ``link``, as many as still raise its rate (``_Growth``), all from the URL
    the first request resolved to (no extra resolve per segment). A
    server that ignores Range gets one plain stream. ``cdn``: the signed URL ``url`` was
    resolved to ahead (``ResolveAhead``): asked directly, ``url`` only if it is refused."""
    loop = asyncio.get_running_loop()
    counted = [0]

    def count(n: int) -> None:
        counted[0] += n
        if on_bytes is not None:
            on_bytes(n)

    part = span is not None and span < size
    totals: list[int] = []  # a total other than the listed size, said by the server (``stream``)

    async def once() -> int:
        n = await _fetch_blocks(
            client,
            url,
            sink,
            what,
            size,
            executor,
            count,
            link,
            decoding,
            cdn,
            stats,
            span,
            more if part else None,
            totals,
        )
        try:
            await _verified(loop, executor, verify)
        except IntegrityError as exc:
            if totals:  # the server said its copy is another size: fetching again gets the same
                raise listing_mismatch(what, totals, size) from exc
            await loop.run_in_executor(executor, sink.reset)
            count(-counted[0])
            raise Retry(str(exc)) from exc
        return n

    def fail(reason: str, n: int) -> DownloadError:
        return DownloadError(f"{what}: gave up after {attempt_count(n)}; last error: {reason}")

    try:
        return await retrying(client.retry, what, once, fail=fail, retry_on=())
    except RangeIgnored:
        log.info("%s: the server ignores Range requests; one plain stream", what)
        await loop.run_in_executor(executor, sink.reset)
        count(-counted[0])
        return await stream(
            client, url, sink, what=what, executor=executor, on_bytes=on_bytes, verify=verify, size=size, cdn=cdn
        )


class _Handover:
    """``sink`` fed ``feed_bytes`` at a time by ``stream`` (instead of ``FEED_BYTES``)."""

    def __init__(self, sink: Sink, feed_bytes: int):
        self.sink, self.feed_bytes = sink, feed_bytes

    def feed(self, data: bytes) -> None:
        self.sink.feed(data)

    def reset(self) -> None:
        self.sink.reset()


class _Parts:
    """A block's bytes as the pieces ``stream`` handed over (no copy); fed in place."""

    inline = True  # ``stream`` calls feed on the event loop: an append
    feed_bytes = 0  # every chunk as it comes: the file's rate is measured from these

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self.parts.append(data)

    def reset(self) -> None:
        self.parts.clear()


class _Piece:
    """Bytes ``[lo, hi)`` of block ``block``, fetched by one lane; ``hi`` moves down when the
    piece is split (the rest becomes a piece of its own, on another lane)."""

    __slots__ = ("block", "done", "first", "hi", "lo", "part", "pos")

    def __init__(self, block: int, lo: int, hi: int):
        self.block, self.lo, self.hi, self.pos = block, lo, hi, lo
        self.part = _Parts()
        self.first: float | None = None  # when its first byte came
        self.done = False

    def rate(self, now: float) -> float | None:
        """Bytes/s since its first byte (None: too early to tell)."""
        if self.first is None or now - self.first < 0.02:
            return None
        return (self.pos - self.lo) / (now - self.first)


class _Growth:
    """How many parallel segments a file gets: as many as still raise its rate.

    Once its decoder starves (the link, not the CPU, is the limit) the file opens up to
    ``FIRST_LANES`` segments. Each step is then judged by the aggregate rate measured over a
    window that starts 1.5 round trips after it (the new requests' first bytes have come) and
    lasts two round trips and at least 0.1 s: when the rate grew by at least half of what the
    added segments would bring at the rate per segment before the step, the link has room and
    the count doubles; otherwise growth stops for this file (the link, or the server's cap,
    is full). The round trip is measured from the file's first request to its first byte."""

    def __init__(self, now: float):
        self.started = now
        self.total = 0  # bytes arrived for this file
        self.first_byte: float | None = None
        self.steps = 0
        self.growing = True
        self.lanes_before = 1
        self.rate_before: float | None = None  # the aggregate rate before the last step
        self.stepped_at = now
        self.measuring = False
        self.window: tuple[float, float] | None = None  # (start, end) of the current measurement
        self.mark = 0  # ``total`` at the window's start
        self.history: list[tuple[int, float]] = []  # (segments, measured rate) per judged step

    def got(self, n: int, now: float) -> None:
        self.total += n
        if self.first_byte is None and n > 0:
            self.first_byte = now

    @property
    def rtt(self) -> float:
        return (self.first_byte - self.started) if self.first_byte is not None else 0.1

    def first(self, now: float) -> None:
        """The first step (1 segment -> FIRST_LANES): the rate of the one segment so far."""
        if self.first_byte is not None and now - self.first_byte >= 0.02:
            self.rate_before = self.total / (now - self.first_byte)
        self._stepped(now, 1)

    def _stepped(self, now: float, lanes_before: int) -> None:
        self.steps += 1
        self.lanes_before = lanes_before
        self.stepped_at = now
        self.window = None
        self.measuring = True

    def judge(self, now: float, lanes: int) -> bool | None:
        """Whether to double ``lanes`` now (None: not measured yet)."""
        if not self.measuring or not self.growing or self.first_byte is None:
            return None
        rtt = self.rtt
        if self.window is None:  # the new segments' first bytes come 1.5 round trips after the step
            if now < self.stepped_at + 1.5 * rtt:
                return None
            self.mark, self.window = self.total, (now, now + max(0.1, 2 * rtt))
            return None
        start, end = self.window
        if now < end:
            return None
        rate = (self.total - self.mark) / (now - start)
        self.history.append((lanes, rate))
        before, self.rate_before = self.rate_before, rate
        added = lanes - self.lanes_before
        if before is not None and added > 0 and rate - before < 0.5 * added * before / self.lanes_before:
            self.growing = False  # the link is full: more segments would not bring more
            return False
        self._stepped(now, lanes)
        return True


async def _fetch_blocks(
    client: HubClient,
    url: str,
    sink: Sink,
    what: str,
    size: int,
    executor: Executor | None,
    count: Callable[[int], None],
    link: Link | None,
    decoding: DecodingSlot | None,
    signed: str | None = None,
    stats: dict[str, Any] | None = None,
    span: int | None = None,
    more: Callable[[], bool] | None = None,
    totals: list[int] | None = None,
) -> int:
    """One pass over the file, or over its first ``span`` bytes: lanes fetch blocks (each lane
    takes the next block not taken, within the read-ahead window), this task feeds them to the
    sink in order; then, while ``more()``, the rest past ``span`` (``fetch_file``), still within
    the file's decoding slot and a connection of ``link``, from the URL the blocks came from.
    ``stats`` (if given) receives the most segments at once and the growth steps
    (``_Growth.history``)."""
    loop = asyncio.get_running_loop()
    ranged = span is not None and span < size  # a prefix: asked by Range even when small
    if span is None or span > size:
        span = size
    whole = span <= WHOLE  # one block, one request (without Range unless a prefix)
    bounds = [0]  # where each block taken so far starts, then where the last one ends
    done: dict[int, list[bytes]] = {}
    st = {"taken": 0, "fed": 0, "window": 1, "splits": 0}
    pieces: dict[int, list[_Piece]] = {}  # block -> its pieces (more than one once split)
    flying: set[_Piece] = set()
    changed = asyncio.Event()
    cdn: list[str] = [signed] if signed else []
    lanes: set[asyncio.Task[None]] = set()
    max_lanes = [0]
    errors: list[BaseException] = []
    growth = _Growth(loop.time())
    rate_wait = RateWait(client.retry)  # (one file's waits for rate limits, all its segments')

    def got(n: int) -> None:
        growth.got(n, loop.time())
        count(n)

    def note_url(u: str) -> None:
        if not cdn or (u != cdn[0] and u != url):
            cdn[:] = [u]
            changed.set()

    resolving = asyncio.Lock()

    async def reresolve(refused: str) -> str | None:
        """The signed URL that replaces ``refused`` (expired: a CDN's 403/410), resolved once for
        every segment of the file: each segment resolving on its own made 16 resolves of one file
        with 16 segments in flight, against the Hub's resolver budget (3,000 per 5 minutes)."""
        async with resolving:
            if cdn and cdn[0] not in (refused, url):
                return cdn[0]  # another segment resolved it again already
            fresh = await resolve(client, url, f"{what} (resolving again)")
            if fresh is not None:
                note_url(fresh)
            return fresh

    def split(now: float) -> _Piece | None:
        """The end phase (no block left to take): the piece in flight that would end last is cut
        in two when that ends the file sooner, its second part for the idle lane asking."""
        rtt = growth.rtt
        rates = [r for p in flying if (r := p.rate(now))]
        if rates:
            mean = sum(rates) / len(rates)
        else:  # every piece just asked (no rate of its own yet): the file's rate per piece so far
            since = now - growth.first_byte if growth.first_byte is not None else 0.0
            mean = growth.total / since / max(1, len(flying)) if since >= 0.02 else 0.0
        best: _Piece | None = None
        best_left = best_rate = 0.0
        for p in flying:
            r = p.rate(now) or mean
            if r > 0 and (p.hi - p.pos) / r > best_left:
                best, best_left, best_rate = p, (p.hi - p.pos) / r, r
        # Cut so that both parts end together: the new request's first byte comes a round trip
        # later. It ends the piece (left - rtt) / 2 sooner; worth a request (and the old one's
        # connection, closed) only when that is at least half a round trip.
        if best is None or best_left < max(2 * rtt, rtt + 2 * SPLIT_GAIN):
            return None
        mid = best.pos + (best.hi - best.pos + int(best_rate * rtt)) // 2
        if best.hi - mid < SPLIT_MIN or mid <= best.pos:
            return None
        piece = _Piece(best.block, mid, best.hi)
        best.hi = mid
        pieces[best.block].append(piece)
        st["splits"] += 1
        return piece

    async def fetch(piece: _Piece) -> None:
        def got_piece(n: int) -> None:
            if piece.first is None and n > 0:
                piece.first = loop.time()
            piece.pos += n
            got(n)

        if whole and not ranged:  # the whole file: no Range, as any client asks for it
            await stream(
                client,
                url,
                piece.part,
                what=what,
                size=size,
                on_bytes=got_piece,
                cdn=cdn[0] if cdn else None,
                resolved=note_url,
                reresolve=reresolve,
                rate_wait=rate_wait,
                totals=totals,
            )
        else:
            await stream(
                client,
                url,
                piece.part,
                what=f"{what} (bytes {piece.lo}-{piece.hi - 1})",
                start=piece.lo,
                end=piece.hi,
                size=size,  # (its end is the piece's: the size is what a short copy is told by)
                on_bytes=got_piece,
                cdn=cdn[0] if cdn else None,
                resolved=note_url,
                cut=lambda: piece.hi,
                reresolve=reresolve,
                rate_wait=rate_wait,
                totals=totals,
            )

    def left() -> bool:
        """Blocks are left to take."""
        return st["taken"] == 0 if whole else bounds[-1] < span

    def segment() -> int:
        """The size of the next block: ``SEGMENT_BLOCK`` for the first and once segments were
        opened, else ``BLOCK`` (one connection, fewer requests)."""
        return min(SEGMENT_BLOCK, BLOCK) if bounds[-1] == 0 or growth.steps else BLOCK

    async def lane(borrowed: bool) -> None:
        try:
            while True:
                if left():
                    if st["taken"] >= st["fed"] + st["window"]:
                        if borrowed:
                            return  # the decoder is behind: give the connection back
                        await _wait(changed)
                        continue
                    i = st["taken"]
                    st["taken"] = i + 1
                    bounds.append(span if whole else min(span, bounds[-1] + segment()))
                    piece = _Piece(i, bounds[i], bounds[i + 1])
                    pieces[i] = [piece]
                elif whole or (stolen := split(loop.time())) is None:
                    return
                else:
                    piece = stolen
                flying.add(piece)
                try:
                    await fetch(piece)
                finally:
                    flying.discard(piece)
                piece.done = True
                block = pieces[piece.block]
                if all(p.done for p in block):
                    done[piece.block] = [d for p in sorted(block, key=lambda p: p.lo) for d in p.part.parts]
                    del pieces[piece.block]
                changed.set()
        except BaseException as exc:
            errors.append(exc)
            changed.set()
            raise

    def start_lane(borrowed: bool) -> None:
        t = asyncio.create_task(lane(borrowed))
        lanes.add(t)
        max_lanes[0] = max(max_lanes[0], len(lanes))
        t.add_done_callback(lanes.discard)
        if link is not None:  # also when it is cancelled before it ever ran
            t.add_done_callback(lambda _: link.give())

    slot = False

    async def decode_slot() -> None:
        nonlocal slot
        if decoding is not None:
            await decoding.acquire()
        slot = True
        st["window"] = 2
        changed.set()

    def grow(want: int) -> None:
        """Up to ``want`` more segments, within the free connections of the worker's link."""
        assert link is not None
        want = min(want, MAX_LANES - len(lanes), -(-(span - bounds[-1]) // segment()))
        grew = 0
        while grew < want and link.take():
            start_lane(True)
            grew += 1
        if grew:
            # Twice the segments in flight: a slow block at the head does not stop the others.
            st["window"] = max(st["window"], 2 * len(lanes) + 1)
            changed.set()

    fed = 0
    try:
        if not whole:
            await decode_slot()  # a large file does not hold blocks while it waits to decode
        if link is not None:
            link.hold()
        growth.started = loop.time()
        target = 1  # the segments this file is to have (while blocks are left)
        start_lane(False)
        i = -1
        while left() or i + 1 < st["taken"]:  # blocks left to take, or to feed
            i += 1
            waited = loop.time()
            while i not in done:
                if errors:
                    raise errors[0]
                now = loop.time()
                if link is not None and cdn and slot and not whole:
                    if growth.steps == 0:
                        # The link, not the decoder, is the limit: the decoder has waited, or the
                        # first block has not come after a round trip no loopback has.
                        if now - waited >= STARVED or (i == 0 and now - growth.started >= FAR):
                            growth.first(now)
                            grow(FIRST_LANES - len(lanes))
                            target = len(lanes)
                    elif growth.judge(now, len(lanes)):
                        grow(len(lanes))
                        target = len(lanes)
                    elif len(lanes) < target and now - waited >= STARVED:
                        grow(target - len(lanes))  # segments that gave their connection back
                # While the first block is awaited, looked at as soon as a far link would show (FAR).
                await _wait(changed, FAR if i == 0 and not whole and growth.steps == 0 else STARVED / 2)
            if not slot:
                await decode_slot()
            parts = done.pop(i)
            st["fed"] = i + 1
            changed.set()
            # The pieces as they came (small: the rate is measured from them), fed in slices
            # of about FEED_BYTES (one thread hop each).
            k = 0
            while k < len(parts):
                j, n = k, 0
                while j < len(parts) and (n == 0 or n + len(parts[j]) <= FEED_BYTES):
                    n += len(parts[j])
                    j += 1
                data = parts[k] if j == k + 1 else b"".join(parts[k:j])
                k = j
                await loop.run_in_executor(executor, sink.feed, data)
                fed += len(data)
        if ranged and more is not None and more():
            # No whole document within the prefix: on from its end, up to the first that ends.
            if link is not None:
                link.hold()
            try:
                fed += await stream(
                    client,
                    url,
                    _Handover(sink, READ_ON_FEED),
                    what=f"{what} (bytes {span}-)",
                    start=span,
                    size=size,
                    executor=executor,
                    on_bytes=count,
                    cdn=cdn[0] if cdn else None,
                    cut=lambda: size if more() else 0,
                    rate_wait=rate_wait,
                    totals=totals,
                )
            finally:
                if link is not None:
                    link.give()
        if stats is not None:
            stats.update(
                lanes_max=max_lanes[0], splits=st["splits"], steps=growth.steps, history=growth.history, rtt=growth.rtt
            )
        return fed
    finally:
        for t in list(lanes):
            t.cancel()
        if lanes:
            await asyncio.gather(*lanes, return_exceptions=True)
        if slot and decoding is not None:
            decoding.release()


async def _wait(event: asyncio.Event, timeout: float | None = None) -> None:
    """Wait for ``event`` (at most ``timeout`` seconds), then clear it for the next wait."""
    if timeout is None:
        await event.wait()
    else:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
    event.clear()


def _one_attempt(policy: RetryPolicy) -> RetryPolicy:
    return dataclasses.replace(policy, max_attempts=1)


async def resolve(client: HubClient, url: str, what: str) -> str | None:
    """One resolve of ``url``: the signed URL the Hub redirects it to (a CDN's), or None when it
    does not redirect (the Hub serves the file itself) or fails; the transfer then resolves it
    itself, and meets and reports the same error. One attempt: a 429, a 5xx or a broken
    connection is the transfer's to retry (with its own budget, waiting out a rate limit), not
    retried here too: a resolve-ahead that spent the whole budget and then the transfer's own
    resolves asked the Hub twice per file while it was down or rate-limited (outage18)."""

    async def attempt() -> str | None:
        async with client.get(
            url, headers=client.headers_for(url), allow_redirects=False, timeout=client.retry.timeout()
        ) as r:
            if r.status in (301, 302, 303, 307, 308):
                loc = r.headers.get("Location")
                nxt = _redirect_target(url, loc) if loc else None
                if nxt is None or nxt.scheme not in ("http", "https") or not nxt.host:
                    return None
                return str(nxt)
            if r.status in RETRY_STATUSES:
                raise Retry(f"HTTP {r.status}", r.headers, r.status)
            return None

    try:
        return await retrying(_one_attempt(client.retry), what, attempt, where=lambda: host_of(url))
    except Exception as exc:  # the transfer resolves it again and reports what is wrong
        log.debug("%s: resolving ahead failed (%s); its transfer resolves it", what, exc)
        return None


class ResolveAhead:
    """Resolves the files of a run ahead of their hand-out, on a thread of its own (for the
    synchronous coordinator): the next ``window`` files in hand-out ``order`` are resolved while
    the ones handed out transfer, so a file's transfer starts at the CDN (one round trip) instead
    of at the Hub (two). ``take(unit)`` gives the signed URL to fetch it from; each file is
    resolved once, here or (when this failed or has no answer for it) by its transfer.

    ``paths``: unit -> its path in the repo, only for files the Hub redirects (LFS files); the
    others are never asked here. One kept-alive connection pool of its own, to the Hub only."""

    #: Longest a hand-out waits for its file's resolve (then the transfer resolves it).
    WAIT = 10.0

    def __init__(
        self,
        *,
        endpoint: str,
        repo_id: str,
        repo_type: str,
        token: str | None,
        retry: RetryPolicy,
        commit: str,
        paths: dict[int, str],
        order: list[int],
        window: int,
    ):
        import concurrent.futures
        import threading

        self._commit = commit
        self._paths = paths
        self._order = [u for u in order if u in paths]
        self._window = max(1, window)
        self._next = 0  # the next position of ``_order`` to resolve
        self._pos = {u: i for i, u in enumerate(self._order)}
        self._futures: dict[int, concurrent.futures.Future[str | None]] = {}
        self._waiting: dict[int, float] = {}  # unit -> when its hand-out began to wait (``ready``)
        self.resolved = 0  # how many answered with a signed URL
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bolmo-resolve", daemon=True)
        self._thread.start()
        self._client: HubClient | None = None

        async def open_client() -> HubClient:
            from .hub import make_session

            self._client = HubClient(
                make_session(self._window, retry),
                endpoint=endpoint,
                repo_id=repo_id,
                repo_type=repo_type,
                token=token,
                retry=retry,
            )
            return self._client

        self._ready = asyncio.run_coroutine_threadsafe(open_client(), self._loop)
        self._fill(0)

    async def _resolve(self, unit: int) -> str | None:
        client = await asyncio.wrap_future(self._ready)
        path = self._paths[unit]
        try:
            url = client.resolve_url(self._commit, path)
        except Exception:  # a path the transfer refuses, with its own message
            return None
        signed = await resolve(client, url, f"{client.repo_id}/{path} (resolving ahead)")
        self.resolved += signed is not None
        return signed

    def _fill(self, upto: int) -> None:
        while self._next < min(len(self._order), upto + self._window):
            u = self._order[self._next]
            self._next += 1
            self._futures[u] = asyncio.run_coroutine_threadsafe(self._resolve(u), self._loop)

    def ready(self, unit: int, timeout: float) -> bool:
        """Whether ``take(unit)`` answers at once: its resolve is done, not asked here, or waited
        for ``WAIT`` already; else False after waiting up to ``timeout`` for it. A coordinator
        waits in such slices, reading its workers' messages in between (a fatal error, a lost
        worker, progress), instead of blocked for up to ``WAIT``."""
        import concurrent.futures
        import time

        pos = self._pos.get(unit)
        if pos is None:
            return True
        self._fill(pos + 1)
        fut = self._futures.get(unit)
        if fut is None or fut.done():
            return True
        now = time.monotonic()
        since = self._waiting.setdefault(unit, now)
        left = self.WAIT - (now - since)
        if left > 0:
            concurrent.futures.wait([fut], timeout=min(timeout, left))
        return fut.done() or time.monotonic() - since >= self.WAIT

    def take(self, unit: int) -> str | None:
        """The signed URL of ``unit`` (waiting for its resolve if it is under way, up to ``WAIT``
        in all with ``ready``'s waits), or None: its transfer resolves it. Starts the resolves of
        the files after it."""
        import time

        pos = self._pos.get(unit)
        if pos is None:
            return None
        self._fill(pos + 1)
        fut = self._futures.pop(unit, None)
        since = self._waiting.pop(unit, None)
        if fut is None:
            return None
        left = self.WAIT if since is None else self.WAIT - (time.monotonic() - since)
        try:
            return fut.result(timeout=max(0.0, left))
        except Exception:  # a slow or failed resolve: the transfer resolves it
            fut.cancel()
            return None

    def close(self) -> None:
        for fut in self._futures.values():
            fut.cancel()
        self._futures.clear()

        async def shut() -> None:
            if self._client is not None:
                await self._client.session.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> ResolveAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def fetch_small(client: HubClient, revision: str, path: str, cap: int) -> bytes | None:
    """A small file of the repo (a tokenizer's JSON), at most ``cap`` bytes; None when the repo
    has no such file (a repo that does not exist raises its ``NotFoundError``: the fix is another
    repo id, not another file). Same client, headers, token rules and retries as the data files."""
    sink = BytesSink()
    try:
        await stream(client, client.resolve_url(revision, path), sink, what=f"{client.repo_id}/{path}", max_bytes=cap)
    except NotFoundError as exc:
        if exc.code == "RepoNotFound":
            raise
        return None
    return bytes(sink.buf)


async def _verified(
    loop: asyncio.AbstractEventLoop, executor: Executor | None, verify: Callable[[], None] | None
) -> None:
    if verify is not None:
        await loop.run_in_executor(executor, verify)


def listing_mismatch(what: str, totals: list[int], size: int) -> ListingMismatch:
    """The error of a file whose server said (``stream``'s ``totals``) its copy is not ``size``
    bytes, and whose bytes were then refused: a rerun meets the same copy."""
    return ListingMismatch(f"{what}: {_mismatch(f'the server says its copy has {totals[0]} bytes', size)}")


def _mismatch(found: str, size: int) -> str:
    """The line of a file whose bytes are not the size the listing gives: what is wrong, and what
    helps (a rerun gets the same bytes)."""
    return (
        f"{found}; the listing says {size} bytes: the listing and the file disagree (the repo "
        "changed at that revision, or a mirror serves a stale listing), so a rerun fails it again. "
        "Report it to whoever serves --endpoint, or leave the file out (`--exclude PATH` with --force "
        "plans again; `finalize --allow-incomplete` writes the shards without it)"
    )


def _ends_short(r: aiohttp.ClientResponse, size: int) -> bool:
    """Whether the server's own answer says the file is not ``size`` bytes: a whole file's
    ``Content-Length``, or the total of a ``Content-Range``, other than the listing's."""
    if r.status == 206:
        total = r.headers.get("Content-Range", "").rpartition("/")[2]
        return total.isdigit() and int(total) != size
    return r.status == 200 and r.content_length is not None and r.content_length != size


def _redirect_target(url: str, location: str) -> URL | None:
    """Where a redirect's ``Location`` points (relative to ``url``), or None when it is not a URL
    (a port out of range, a broken IPv6 host: yarl refuses them, some only when the port is read)."""
    try:
        nxt = URL(url).join(URL(location))
        nxt.port  # noqa: B018 (parsed on first read)
    except ValueError:
        return None
    return nxt


async def _short_text(r: aiohttp.ClientResponse, redact: Callable[[str], str]) -> str:
    """The start of an error body, as one line (an HTML page must not flood the terminal), without
    the token (``redact``: before it is cut, which could leave the token's start)."""
    try:
        data = await r.content.read(2000)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return ""
    return " ".join(redact(data.decode("utf-8", "replace")).split())[:200]


__all__ = [
    "BytesSink",
    "Link",
    "ResolveAhead",
    "Sink",
    "fetch_file",
    "fetch_small",
    "listing_mismatch",
    "resolve",
    "stream",
]
