"""One error hierarchy for bolmo-async.

Every message names the fix (a flag, an environment variable, a command to rerun).
Low-level exceptions (aiohttp, zstandard, pyarrow, OSError) are translated at the module
boundary with ``raise ... from exc``; the CLI prints one line per error and shows the
traceback only when ``BOLMO_ASYNC_DEBUG=1``.

    BolmoError                      base; exit code 1
    ├── UsageError                  bad flag values or combinations; exit code 2
    ├── HubError                    the Hub (or mirror) answered something we cannot use
    │   ├── AuthError               401/403: token missing, revoked or terms not accepted
    │   ├── NotFoundError           repo, revision or file does not exist
    │   └── UnsafePathError         the file listing holds a hostile path
    ├── DownloadError               a file failed after its retry budget
    │   ├── IntegrityError          sha256/size mismatch that retries did not fix
    │   ├── ListingMismatch         the server's copy is not the size the listing gives (a rerun fails it again)
    │   └── RangeIgnored            the server answered a Range request with the whole body
    ├── DecodeError                 a file that cannot be read as documents (fails that file only)
    ├── StateError                  the output folder holds another plan/tokenizer, or is incomplete
    ├── DiskSpaceError              not enough free disk for the plan, or the disk filled up
    ├── OutputError                 the output folder (or bucket) refuses a write or cannot be reached
    ├── TokenizerError              tokenizer cannot be loaded, has no EOS, or panics
    │   └── EngineMismatch          a run-time cross-check found an engine disagreeing with the reference
    ├── WorkerError                 a worker process died or could not start
    ├── OfflineError                HF_HUB_OFFLINE is set and the run needs what only the Hub has
    ├── ResourceError               the system refused memory, a thread or a file descriptor
    └── FetchIncomplete             some planned files failed; rerunning resumes

A stop signal (Ctrl+C's SIGINT, SIGTERM, SIGHUP) is a ``KeyboardInterrupt``: ``Interrupted``
where the tool raises it itself, carrying the signal, and ``Stopped`` (one) where a stopped run
says what it kept; the command line exits 128 + its number. Never a ``BolmoError``: a script's
``except BolmoError`` around an API call must not swallow Ctrl+C.

Internal signals, never shown to a user (not BolmoErrors):

    StreamError                     the compressed stream itself is corrupt or truncated
    └── TooManyFrames               its frames (gzip members) are too many for what they hold
    Retry                           one attempt failed for a transient reason; ``retry.retrying`` decides
    OutputClosed                    the reader of the command line's output has gone (``... | head``)

Errors cross process, thread and Ray task boundaries as (class name, message) and are rebuilt
as the same class with ``rebuild``.
"""

from __future__ import annotations


class BolmoError(Exception):
    """Base class of every error bolmo-async raises on purpose."""

    exit_code = 1
    #: ``(host, cause)`` when a retry budget was spent on what a server that is down answers
    #: (``retry.outage_cause``): what the run's ``outage.OutageWatch`` counts.
    outage: tuple[str, str] | None = None


class UsageError(BolmoError):
    exit_code = 2


class HubError(BolmoError):
    pass


class AuthError(HubError):
    pass


class NotFoundError(HubError):
    """``code``: the server's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
    ``EntryNotFound``), or "" for a bare 404: a missing repo and a missing file in it read apart."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class UnsafePathError(HubError):
    pass


class DownloadError(BolmoError):
    pass


class IntegrityError(DownloadError):
    pass


class ListingMismatch(DownloadError):
    """The server's copy of a file is not the size the listing gives (the repo changed at that
    revision, a mirror's stale listing): each attempt, and each rerun, meets it again."""


class RangeIgnored(DownloadError):
    """The server answered a Range request with the whole body."""


class DecodeError(BolmoError):
    pass


class StateError(BolmoError):
    pass


class DiskSpaceError(BolmoError):
    pass


class OutputError(BolmoError):
    pass


class TokenizerError(BolmoError):
    pass


class EngineMismatch(TokenizerError):
    """A run-time cross-check found an engine disagreeing with the reference."""


class WorkerError(BolmoError):
    pass


class OfflineError(BolmoError):
    """HF_HUB_OFFLINE is set (no request to any host) and the run needs the Hub: a listing to plan,
    files neither staged nor kept in raw/, a tokenizer this machine does not have."""


class ResourceError(BolmoError):
    """The system refused this run memory, a thread or process, or a file descriptor (a ``ulimit``,
    a container's limits): never the data's fault, so the file it hit fails (a rerun fetches it)
    instead of being counted as corrupt (``exhausted``). ``kind``: "processes", "files" or "memory"."""

    kind = ""


#: What the system's refusals say, in the words of Python, pyarrow, zstd and zlib: (words, what
#: was refused). Matched in lower case. Never a hostile stream's own complaint: zstd's
#: "Frame requires too much memory for decoding" (a window over its limit) is the data's.
_REFUSALS = (
    (("can't start new thread", "failed to launch worker thread"), "processes"),
    (("too many open files",), "files"),
    (
        ("allocation error", "not enough memory", "insufficient memory", "cannot allocate memory", "out of memory"),
        "memory",
    ),
)


def refused_kind(exc: BaseException) -> str | None:
    """What the system refused, if ``exc`` says so: "processes" (a thread or process), "files" (a
    file descriptor) or "memory"; None for anything else (see ``exhausted``)."""
    import errno

    if isinstance(exc, ResourceError):
        return exc.kind or None
    if isinstance(exc, MemoryError):  # (pyarrow's ArrowMemoryError too)
        return "memory"
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return "files"
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return "memory"
    said = str(exc).lower()
    return next((kind for words, kind in _REFUSALS if any(w in said for w in words)), None)


#: A worker process that could not even start (no thread for its pipes under a pids limit) exits
#: with the code of what was refused, before it has a pipe to say it: its coordinator names it.
REFUSED_EXIT = {"processes": 71, "memory": 72, "files": 73}


def exhausted(exc: BaseException, where: str = "") -> ResourceError | None:
    """``exc`` as a ``ResourceError`` naming the limit and the fix when it says the system refused
    a resource (memory, a thread, a file descriptor), else None. ``where``: what it hit (a path).

    Under a low ``ulimit -v`` / ``-u`` / ``-n`` or a container's pids or memory limit, pyarrow,
    zstd and zlib report the refusal as an error of the bytes they were reading ("row group 0
    (Unknown error: Failed to launch worker thread ...)"): counted as a corrupt row group, the file
    was staged without its documents, and the rerun with the limit raised kept it that way."""
    if isinstance(exc, ResourceError):
        return exc
    try:  # (called in error handlers: an error of its own would lose the error it was given)
        kind = refused_kind(exc)
        line = refusal_line(kind, exc) if kind is not None else ""
    except Exception:
        return None
    if kind is None:
        return None
    refused = ResourceError(f"{where + ': ' if where else ''}{line}")
    refused.kind = kind
    return refused


def refusal_line(kind: str, exc: BaseException | None = None) -> str:
    """The one line of a refusal of ``kind`` ("processes", "files", "memory"): the limit and the fix."""
    detail = "" if exc is None else f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__
    detail = f" ({detail})" if detail else ""
    if kind == "files":
        # (``resource`` imported with this module: out of descriptors, an import cannot open its .so,
        # and an ImportError raised here, in a file task's error handler, lost the task: the run hung)
        try:
            soft = _resource.getrlimit(_resource.RLIMIT_NOFILE)[0] if _resource is not None else None
        except (OSError, ValueError):
            soft = None
        known = soft is not None and soft != getattr(_resource, "RLIM_INFINITY", -1)
        limit = f"this run may open {soft} files at once" if known else "a limit of open files"
        return (
            f"the system refused a file descriptor{detail}: {limit} (`ulimit -n`). "
            "Raise it (`ulimit -n 4096`) or lower --connections, then rerun the same command: finished files are kept"
        )
    if kind == "processes":
        return (
            f"the system refused a new thread{detail}: a limit of processes and threads (`ulimit -u`, a "
            "container's pids limit) or of memory (`ulimit -v`). Raise it or lower --processes, then rerun the "
            "same command: finished files are kept"
        )
    return (
        f"the system refused memory{detail}: a limit of memory (`ulimit -v`, a container's memory limit) or "
        "the machine's. Raise it or lower --processes / --concurrency, then rerun the same command: finished "
        "files are kept"
    )


#: Ctrl+C's signal number (POSIX): what a ``KeyboardInterrupt`` that names none was.
SIGINT = 2


class FetchIncomplete(BolmoError):
    """Raised at the end of a fetch when some files failed (a stop is ``Stopped``)."""

    def __init__(self, message: str, failed: dict[str, str] | None = None):
        super().__init__(message)
        self.failed = dict(failed or {})


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised as Ctrl+C's ``KeyboardInterrupt`` is (so that every clean-up that
    handles Ctrl+C handles it alike), naming the signal."""

    def __init__(self, signum: int = SIGINT):
        super().__init__(signum)
        self.signum = signum


class Stopped(Interrupted):
    """A run stopped by a stop signal, saying what it kept and to rerun: still a
    ``KeyboardInterrupt``, so that a script's ``except BolmoError`` (or ``except Exception``)
    around an API call does not swallow Ctrl+C. The command line says it and exits 128 + ``signum``."""

    def __init__(self, message: str, signum: int = SIGINT, partial: str = ""):
        super().__init__(signum)
        self.message = message + partial
        self.args = (self.message,)  # (its repr in a notebook's traceback: the line, not the signal's number)
        #: The line's advice of the finalize that writes shards of what is staged: left out where
        #: the call wrote them itself (``prepare(allow_incomplete=True)``).
        self.partial = partial
        self._said = message

    def without_partial(self) -> Stopped:
        """The same stop, its line without ``partial``."""
        return Stopped(self._said, self.signum)

    def __str__(self) -> str:
        return self.message


def signal_of(exc: BaseException) -> int:
    """The stop signal a ``KeyboardInterrupt`` stands for (SIGINT unless it says another)."""
    return getattr(exc, "signum", SIGINT)


def interrupted_by(signum: int) -> str:
    """How every stop line starts: "interrupted" (Ctrl+C) or "interrupted (SIGTERM)", naming any
    other stop signal (a scheduler's SIGTERM, a closed terminal's SIGHUP)."""
    from signal import Signals

    if signum == SIGINT:
        return "interrupted"
    try:
        return f"interrupted ({Signals(signum).name})"
    except ValueError:
        return f"interrupted (signal {signum})"


try:
    import resource as _resource
except ImportError:  # (not on Windows)
    _resource = None  # type: ignore[assignment]


class StreamError(Exception):
    """The compressed stream itself is corrupt or truncated (raised by ``decode.Decompressor``).
    ``reason``: the skip reason it is counted under."""

    reason = "corrupt_stream"


class TooManyFrames(StreamError):
    """The stream is a bomb of frames (gzip members) that hold next to nothing each: each costs
    a new decompressor, so it would take a decoding slot for hours (raised by ``decode.Decompressor``)."""

    reason = "too_many_frames"


class Retry(Exception):
    """Raised by an attempt: it failed for a transient reason (the message); try again.
    ``headers``: the response's, for ``Retry-After`` / ``RateLimit``."""

    def __init__(self, reason: str, headers: object = None, status: int | None = None):
        super().__init__(reason)
        self.headers = headers
        self.status = status


class OutputClosed(Exception):
    """The reader of the command line's output has gone (``bolmo-async inspect ... | head``): the
    command ends quietly, as Unix tools do."""


def rebuild(name: str, message: str) -> BolmoError:
    """The error a worker process reported as ``(type(exc).__name__, str(exc))``."""
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, BolmoError) and cls is not FetchIncomplete:
        try:
            return cls(message)
        except TypeError:
            pass
    return BolmoError(message)


__all__ = [
    "AuthError",
    "BolmoError",
    "DecodeError",
    "DiskSpaceError",
    "DownloadError",
    "EngineMismatch",
    "FetchIncomplete",
    "HubError",
    "IntegrityError",
    "Interrupted",
    "ListingMismatch",
    "NotFoundError",
    "OfflineError",
    "OutputClosed",
    "OutputError",
    "RangeIgnored",
    "ResourceError",
    "Retry",
    "StateError",
    "Stopped",
    "StreamError",
    "TokenizerError",
    "TooManyFrames",
    "UnsafePathError",
    "UsageError",
    "WorkerError",
    "exhausted",
    "rebuild",
    "refused_kind",
    "signal_of",
]
