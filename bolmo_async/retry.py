"""The one retry helper: every request the tool makes (Hub API calls, file bodies, ranged reads,
and blocking callers such as an object-store backend) retries through here.

The policy is data (``RetryPolicy``): an attempt budget, capped exponential backoff with
jitter, ``Retry-After`` and the Hub's ``RateLimit: "..." ;r=0;t=<seconds>`` honoured (up to
``max_hint``), and a progress deadline for bodies (``Progress``). An attempt signals "failed, try again" by raising
``Retry`` (with the response's headers when it has them) or one of the policy's transient
exceptions; anything else propagates at once. Each retry is logged as
``<what>: <reason> [retry n/max in Xs<note>]``; when the budget is spent, the caller's
``fail(reason, attempts)`` error is raised.

This module imports nothing of the project but ``errors``: every other module may use it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from .errors import BolmoError, HubError, Retry, UsageError, exhausted, refused_kind

log = logging.getLogger("bolmo_async")
T = TypeVar("T")

#: Statuses worth retrying, and exceptions meaning "the connection broke, try again".
RETRY_STATUSES: frozenset[int] = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRY_EXCEPTIONS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientResponseError,  # only as aiohttp's parser raises it: an answer that is not HTTP (``not_http``)
    asyncio.TimeoutError,
    ConnectionError,
)
#: What a blocking caller's attempt may raise to be retried (besides ``Retry``).
SYNC_RETRY_EXCEPTIONS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter; ``Retry-After`` and ``RateLimit`` honoured.

    ``min_rate`` / ``progress_window``: a body must bring at least ``min_rate`` bytes a second,
    counted over each ``progress_window`` seconds, or the attempt fails (and is retried within
    ``max_attempts``); a trickle can therefore hold one transfer for at most
    ``max_attempts * progress_window`` seconds plus the backoff sleeps (``worst_case``): with
    the defaults 8 x 10 s + 32 s, under two minutes.
    """

    max_attempts: int = 8
    base_delay: float = 0.25
    max_delay: float = 30.0
    #: A server's ``Retry-After`` / ``RateLimit: ...;t=N`` is waited out whole up to this: the Hub's
    #: rate-limit window is 5 minutes and its ``t`` the seconds until it resets (huggingface_hub
    #: waits ``t`` + 1). A hint beyond it (no Hub's: 1e9 s) fails the request at once, saying so.
    max_hint: float = 300.0
    #: The most one file (or one API call) waits in all for a server's rate-limit hints: each
    #: wait up to ``max_hint``, then the file fails saying so. Two of the Hub's 5-minute windows:
    #: a server answering ``t=300`` forever held a file 7 x 300 s (35 minutes) before it failed.
    max_rate_wait: float = 600.0
    connect_timeout: float = 30.0
    read_timeout: float = 60.0  # a read that stalls this long counts as a broken connection
    min_rate: float = 1024.0  # bytes/s a body must sustain over each progress window
    progress_window: float = 10.0
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise UsageError("--retries must be at least 1")

    def delay(self, attempt: int, response_headers: Any = None) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        hinted = retry_hint(response_headers) if response_headers is not None else None
        if hinted is not None:
            return min(self.max_hint, hinted) + self._rng.uniform(0, 0.1)
        d = min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1)))
        return d * (0.5 + self._rng.random() / 2)

    def timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout)

    def worst_case(self) -> float:
        """An upper bound on the seconds a body that trickles (once its headers arrived) can hold
        one transfer: every attempt ends within one progress window, plus every backoff sleep."""
        sleeps = sum(min(self.max_delay, self.base_delay * 2**i) for i in range(self.max_attempts - 1))
        return self.max_attempts * self.progress_window + sleeps


_RATELIMIT_T = re.compile(r";\s*t=(\d+(?:\.\d+)?)")


def retry_hint(headers: Any) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds form) or the Hub's ``RateLimit: ...;t=N``."""
    if not headers:
        return None
    ra = headers.get("Retry-After")
    if ra:
        try:
            return max(0.0, float(ra))
        except ValueError:
            pass
    rl = headers.get("RateLimit")
    if rl:
        m = _RATELIMIT_T.search(rl)
        if m:
            return float(m.group(1))
    return None


def not_http(exc: BaseException) -> str | None:
    """What is wrong, in one line, when ``exc`` is aiohttp's parser refusing an answer (a bad status
    line: another protocol on that port, TLS spoken to http://; headers too long or too many; a
    broken Content-Length or chunk size), else None. aiohttp raises exactly ``ClientResponseError``
    for those (its subclasses are other matters: redirects, content types)."""
    if type(exc) is not aiohttp.ClientResponseError:
        return None
    info = getattr(exc, "request_info", None)
    host = info.url.host if info is not None else None
    said = " ".join(str(exc.message).split())[:160]
    return f"the answer{f' of {host}' if host else ''} is not valid HTTP ({said})"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Retry):
        return str(exc)
    if (bad := not_http(exc)) is not None:
        return bad
    if isinstance(exc, asyncio.TimeoutError | TimeoutError) and not str(exc):
        return "TimeoutError (no data for the read timeout)"
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


def outage_cause(exc: BaseException) -> str | None:
    """The cause, in a few words, when ``exc`` is what a server (or the way to it) that is down
    answers every request alike: a 5xx or 408, a refused or reset connection, no answer within
    the timeout. None for a file's own trouble (a cut body, a bad hash, a CDN refusing a signed
    URL) and for a rate limit (429: honoured, not an outage)."""
    if isinstance(exc, Retry):
        s = exc.status
        return f"HTTP {s}" if s is not None and (s >= 500 or s == 408) else None
    if isinstance(exc, OSError) and refused_kind(exc) is not None:
        return None  # no socket for the connection (`ulimit -n`): this machine's limit, not the server's
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused" if isinstance(exc.os_error, ConnectionRefusedError) else "no connection"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError | aiohttp.ClientOSError):
        return "connection reset"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "no answer (timeout)"
    return None


def host_of(url: str) -> str:
    """``host`` or ``host:port`` (a port that is not the scheme's), to name a server in a line."""
    from yarl import URL

    try:
        u = URL(url)
        return f"{u.host}:{u.port}" if u.explicit_port is not None else u.host or url
    except ValueError:
        return url


#: Retry lines for the same host and cause are said once per this many seconds (per event loop:
#: a worker's every file), the others counted into the next one; a down server made one line
#: per attempt per file (a 18-file plan against a Hub answering 503: 244 lines in 67 s).
LOG_INTERVAL = 10.0
_said: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], list[float]]] = weakref.WeakKeyDictionary()
_said_sync: dict[tuple[str, str], list[float]] = {}


def _throttled(host: str, cause: str) -> tuple[bool, int]:
    """Whether a retry line for ``(host, cause)`` is to be said now, and how many were not said
    since the last one."""
    try:
        table = _said.setdefault(asyncio.get_running_loop(), {})
    except RuntimeError:
        table = _said_sync
    now = time.monotonic()
    seen = table.get((host, cause))
    if seen is None or now - seen[0] >= LOG_INTERVAL:
        n = int(seen[1]) if seen is not None else 0
        table[(host, cause)] = [now, 0]
        return True, n
    seen[1] += 1
    return False, 0


class RateWait:
    """The time one file has spent waiting for rate limits, against ``RetryPolicy.max_rate_wait``:
    shared by its requests (the segments of a file), so that the file as a whole waits at most
    that long. Counted as time on the clock, not as a sum: segments told to wait at once wait
    together (8 segments each told ``t=60`` wait 60 s, not 480; summed, a file of 16 segments
    failed at the first 429 of a window with t >= 38 s). What is counted is the wait the server
    asks, not the jitter added to it (two waits of ``t=300`` fit in 600 s)."""

    __slots__ = ("budget", "until", "waited")

    def __init__(self, policy: RetryPolicy):
        self.budget = policy.max_rate_wait
        self.until = 0.0  # when the last wait counted ends (time.monotonic())
        self.waited = 0.0

    def take(self, wait: float) -> bool:
        """Count a wait of ``wait`` seconds from now; False (nothing counted) when the file's
        waits would then exceed its budget."""
        now = time.monotonic()
        more = max(0.0, now + wait - max(self.until, now))  # (the part no other wait covers)
        if self.waited + more > self.budget + 1e-6:
            return False
        self.waited += more
        self.until = max(self.until, now + wait)
        return True


#: The outage cause of a file given up because the server asks it to wait longer than a file
#: waits (``max_hint`` at once, ``max_rate_wait`` in all), or still answers 429 when its --retries
#: are spent after ``max_hint`` of waiting (one of the Hub's windows): a limit that does not lift within that
#: is, for the run, a server that does not serve; ``STREAK`` such files in a row stop the hand-out
#: (``outage.OutageWatch``) instead of each file in turn waiting its whole bound. A 429 with a
#: short wait, retried until ``--retries`` is spent, is not one (the limit lifts between files).
RATE_LIMITED = "rate limited for longer than a file waits"


def _rate_limited(err: BaseException, host: str) -> BaseException:
    if host and isinstance(err, BolmoError):
        err.outage = (host, RATE_LIMITED)
    return err


def attempt_count(n: int) -> str:
    """``n`` attempts, said as a count ("1 attempt", "3 attempts") in the give-up lines."""
    return f"{n} attempt{'' if n == 1 else 's'}"


def _default_fail(what: str) -> Callable[[str, int], BaseException]:
    return lambda reason, n: BolmoError(f"{what}: gave up after {attempt_count(n)}; last error: {reason}")


def _next_delay(
    policy: RetryPolicy,
    what: str,
    n: int,
    exc: BaseException,
    note: Callable[[], str] | None,
    fail: Any,
    where: Callable[[], str | None] | None = None,
    rate_wait: RateWait | None = None,
) -> float:
    """Log the retry and return its delay, or raise the caller's error when the budget is spent.
    An error raised for an ``outage_cause`` carries ``outage = (host, cause)`` (``where()``: the
    host asked): the run's ``OutageWatch`` tells a server that is down from one broken file."""
    reason = _reason(exc)
    cause = outage_cause(exc)
    host = (where() if where is not None else None) or getattr(exc, "host", None) or ""
    if n >= policy.max_attempts:
        refused = exhausted(exc, what) if isinstance(exc, OSError) else None
        if refused is not None:  # (a connection refused a socket: the line names the limit, as a file's does)
            raise refused from exc
        err = (fail or _default_fail(what))(reason, n)
        if cause is not None and host and isinstance(err, BolmoError):
            err.outage = (host, cause)
        elif (
            isinstance(exc, Retry)
            and exc.status == 429
            and rate_wait is not None
            and rate_wait.waited >= policy.max_hint
        ):
            # --retries spent on a rate limit that did not lift in one of the Hub's windows of
            # waiting: as one past the bound (t=60 forever held each file 7 x 60 s, file after file).
            raise _rate_limited(err, host) from exc
        raise err from exc
    hinted = retry_hint(exc.headers) if isinstance(exc, Retry) and exc.headers is not None else None
    if hinted is not None and hinted > policy.max_hint:
        # (a rate limit's wait cut short only spends the attempts: each retry meets the same limit)
        told = f"{hinted:.0f} s" if hinted < 1e7 else "forever"
        raise _rate_limited(
            (fail or _default_fail(what))(
                f"{reason}, and the server asks to wait {told} before trying again (more than {policy.max_hint:.0f} s); "
                "try again later",
                n,
            ),
            host,
        ) from exc
    delay = policy.delay(n, exc.headers if isinstance(exc, Retry) else None)
    if hinted is not None and rate_wait is not None and not rate_wait.take(min(hinted, policy.max_hint)):
        raise _rate_limited(
            (fail or _default_fail(what))(
                f"{reason}, and the server asks to wait {hinted:g} s more after {rate_wait.waited:.0f} s of waiting: "
                f"past the {policy.max_rate_wait:.0f} s one file waits in all for a rate limit; try again later",
                n,
            ),
            host,
        ) from exc
    more = ""
    if cause is not None:
        say, unsaid = _throttled(host, cause)
        if not say:
            log.debug("%s: %s [retry %d/%d in %.1fs]", what, reason, n, policy.max_attempts, delay)
            return delay
        if unsaid:
            more = f" (and {unsaid} more for {cause}{f' from {host}' if host else ''} since the last such line)"
    log.warning(
        "%s: %s [retry %d/%d in %.1fs%s]%s", what, reason, n, policy.max_attempts, delay, note() if note else "", more
    )
    return delay


async def retrying(
    policy: RetryPolicy,
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    fail: Callable[[str, int], BaseException] | None = None,
    retry_on: tuple[type[BaseException], ...] = RETRY_EXCEPTIONS,
    note: Callable[[], str] | None = None,
    where: Callable[[], str | None] | None = None,
    rate_wait: RateWait | None = None,
) -> T:
    """Await ``attempt()`` until it returns, at most ``policy.max_attempts`` times.

    ``Retry`` and ``retry_on`` exceptions are retried after ``policy.delay``; ``fail(reason,
    attempts)`` builds the error raised when the budget is spent; ``note()`` adds context to the
    retry line (e.g. ", resuming at byte N"); ``where()``: the host asked (``host_of``), for the
    error's ``outage`` and the retry lines said once per host and cause (``LOG_INTERVAL``).
    ``rate_wait``: the rate-limit waits left to the file (shared by its requests; else this
    call's own ``max_rate_wait``)."""
    n = 0
    if rate_wait is None:
        rate_wait = RateWait(policy)
    while True:
        n += 1
        try:
            return await attempt()
        except Retry as exc:
            delay = _next_delay(policy, what, n, exc, note, fail, where, rate_wait)
        except aiohttp.ClientConnectorCertificateError as exc:  # not transient: no retry
            raise certificate_error(exc) from exc
        except retry_on as exc:
            if isinstance(exc, aiohttp.ClientResponseError) and not_http(exc) is None:
                raise  # (a subclass: too many redirects, a content type: the caller's to say)
            delay = _next_delay(policy, what, n, exc, note, fail, where)
        await asyncio.sleep(delay)


def certificate_error(exc: aiohttp.ClientConnectorCertificateError) -> HubError:
    """A server whose certificate does not verify against the default CAs: the host, why, the fix
    (not "cannot reach": the server answered; retrying would get the same certificate)."""
    host = getattr(exc, "host", "") or "the server"
    why = getattr(exc, "certificate_error", None) or exc
    return HubError(
        f"the TLS certificate of {host} could not be verified ({why}). If it is signed by a private CA, "
        "point SSL_CERT_FILE at a CA bundle that holds it; otherwise check --endpoint / HF_ENDPOINT."
    )


def retrying_sync(
    policy: RetryPolicy,
    what: str,
    attempt: Callable[[], T],
    *,
    fail: Callable[[str, int], BaseException] | None = None,
    retry_on: tuple[type[BaseException], ...] = SYNC_RETRY_EXCEPTIONS,
    note: Callable[[], str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``retrying`` for blocking callers (threads): the same policy, budget, hints and log line."""
    n = 0
    rate_wait = RateWait(policy)
    while True:
        n += 1
        try:
            return attempt()
        except Retry as exc:
            delay = _next_delay(policy, what, n, exc, note, fail, None, rate_wait)
        except retry_on as exc:
            delay = _next_delay(policy, what, n, exc, note, fail)
        sleep(delay)


class Progress:
    """The progress deadline of one body (an async context manager around its read loop):
    the next ``min_rate * progress_window`` bytes must arrive within ``progress_window``
    seconds, or the attempt fails with ``Retry`` (so it is retried within the attempt budget).
    A timer enforces it, so a body that sends nothing at all fails on time too; ``got(n)`` per
    chunk costs an addition and, once per window's worth of bytes, a clock read. ``pause()``
    / ``resume()`` bracket waits that are not the server's fault (the consumer is busy)."""

    __slots__ = ("_cm", "_got", "_loop", "_need", "_next", "_window", "what")

    def __init__(self, policy: RetryPolicy, what: str):
        self._window = policy.progress_window
        self._need = max(1.0, policy.min_rate * policy.progress_window)
        self._got = 0
        self._loop = asyncio.get_running_loop()
        self._next = 0.0  # when the timer was last moved
        self._cm: asyncio.Timeout | None = None
        self.what = what

    async def __aenter__(self) -> Progress:
        self._next = self._loop.time()
        self._cm = asyncio.timeout_at(self._next + self._window)
        await self._cm.__aenter__()
        return self

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> None:
        assert self._cm is not None
        try:
            await self._cm.__aexit__(et, exc, tb)
        except TimeoutError:
            if not self._cm.expired():
                raise
            raise self.failure() from None

    def got(self, n: int) -> None:
        self._got += n
        if self._got >= self._need:
            self._got = 0
            now = self._loop.time()
            if now - self._next > self._window / 8:  # move the timer at most 8 times a window
                self._next = now
                assert self._cm is not None
                self._cm.reschedule(now + self._window)

    def pause(self) -> None:
        assert self._cm is not None
        self._cm.reschedule(None)

    def resume(self) -> None:
        assert self._cm is not None
        self._got = 0
        self._next = self._loop.time()
        self._cm.reschedule(self._next + self._window)

    def failure(self) -> Retry:
        return Retry(
            f"{self.what}: less than {self._need:.0f} bytes in {self._window:g}s (a stalled or trickling connection)"
        )


__all__ = [
    "RETRY_EXCEPTIONS",
    "RETRY_STATUSES",
    "SYNC_RETRY_EXCEPTIONS",
    "Progress",
    "RateWait",
    "Retry",
    "RetryPolicy",
    "attempt_count",
    "host_of",
    "not_http",
    "outage_cause",
    "retry_hint",
    "retrying",
    "retrying_sync",
]
