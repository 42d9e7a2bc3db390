"""The output folder on object storage (``s3://``, ``r2://``, ``gs://``, ``az://``), through obstore.

Why obstore (``bench/store_libs.py``, the README's cloud section has the numbers): against one
S3 server it streamed a multipart upload for 2.4-3.5x less client CPU than pyarrow's and s3fs's
clients, read ranges for 1.8-4x less and listed for 2-24x less; it has the conditional create
(``If-None-Match: *``) and conditional overwrite (``If-Match``) this module locks with; one
library covers S3 and the stores that speak it (R2, MinIO, Weka), GCS and Azure by configuration.

Everything the folder holds lives in the bucket. Local scratch (``BOLMO_ASYNC_SCRATCH``, default a
temporary folder) holds only what is in flight: ``--no-streaming`` downloads and a bounded cache of
staged objects being read (``BOLMO_ASYNC_SCRATCH_CACHE`` bytes, default 2 GiB).

The guarantees of the local folder, kept on a store that has no rename and no ``flock``:

- **Atomic objects.** ``new_file`` streams a multipart upload (parts of ``PART`` bytes, a few in
  flight, none kept after it is sent); the object appears whole when the upload completes, never
  before. A failed or killed writer leaves no object (an aborted or orphaned upload is invisible;
  a bucket lifecycle rule "abort incomplete multipart uploads after 1 day" reclaims orphans).
- **Locks are leases.** The folder lock, ``--worker`` shares and unit claims are small objects
  made with a conditional create, kept fresh by a heartbeat thread, and taken over (conditional
  overwrite of the stale version) once older than ``LEASE`` seconds: a killed run blocks the
  folder for at most that long. Every write of ours is also idempotent (same plan, same bytes),
  so a lease lost to a stalled clock costs work, not data.
- **Retries.** Every request that can be replayed (small objects, reads, listings, deletes,
  downloads) is retried through ``retry.retrying_sync``; the parts of a streamed upload, whose
  bytes are not kept, by obstore's per-request retry set from the same ``RetryPolicy``. An error
  left over names the object and the fix (``OutputError``).
- **Credentials** come from the environment the usual way (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION``,
  ``AWS_ENDPOINT_URL``; GCS and Azure their own) and are never logged or written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..errors import OutputError, Retry, StateError, UsageError
from ..retry import SYNC_RETRY_EXCEPTIONS, RetryPolicy, attempt_count, retrying_sync
from .base import DOCUMENTS, LOCK, RAW, SHARD_RE, STAGING, NewFile, OutputDir, busy_message, fit_name
from .local import _FULL, _REFUSED, SCRATCH_OWNER, LocalNewFile, scratch_folder_name, translate

log = logging.getLogger("bolmo_async")
T = TypeVar("T")

#: Multipart part size: the shard writer's 8 MiB blocks go out as they come.
PART = 8 << 20
#: Parts of one upload in flight at once (memory per open object: about (1 + this) * PART).
UPLOAD_CONCURRENCY = 4
#: Seconds one request may take, start to end. A store that accepts connections and never
#: answers held every request for 300 s: the probe's three attempts said nothing for 15 minutes.
#: The probe writes an empty object; the other small requests (leases, documents of a few MB,
#: heads, listing pages, deletes) take seconds on any store; a part of a streamed upload (8 MiB)
#: and a document over 1 MiB written in one PUT have UPLOAD_TIMEOUT.
PROBE_TIMEOUT = 15.0
REQUEST_TIMEOUT = 60.0
UPLOAD_TIMEOUT = 300.0
#: A whole-object download (a staged object read on another machine) is bounded by the seconds
#: without a byte, not from start to end: an overall 300 s cut one still flowing, and each retry
#: began from the top, so an object needing longer at the link's rate never arrived.
TRANSFER_TIMEOUT = 60.0
#: Environment settings that are not usable numbers (refused when a store is opened).
_BAD_SETTINGS: list[str] = []


def _setting(name: str, default: float, what: str, zero_ok: bool = False) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
        if not (value >= 0 if zero_ok else value > 0) or value == float("inf"):
            raise ValueError
    except ValueError:
        _BAD_SETTINGS.append(f"{name}={raw!r}: {what} (unset it for the default, {int(default)})")
        return default
    return value


#: Seconds a lock or claim lives without its heartbeat (BOLMO_ASYNC_LEASE).
LEASE = _setting("BOLMO_ASYNC_LEASE", 60.0, "takes the seconds a lease lives, a positive number")
#: The scratch cache of staged objects being read, in bytes (BOLMO_ASYNC_SCRATCH_CACHE).
CACHE_BYTES = int(
    _setting("BOLMO_ASYNC_SCRATCH_CACHE", float(2 << 30), "takes bytes, 0 or more (0: no cache)", zero_ok=True)
)
SHARES = LOCK + ".shares"
#: Statuses in an error message that are worth another attempt.
_TRANSIENT_STATUS = re.compile(
    r"status code: (5\d\d|408|429)|SlowDown|error sending request|connection|timed? ?out", re.I
)
_STATUS = re.compile(r"status code: (\d{3})")
#: The S3 client asked the instance metadata service for a role's credentials (IMDSv2's token or
#: v1's path, whatever its endpoint): none were in the environment.
_FROM_INSTANCE_ROLE = re.compile(r"/latest/(api/token|meta-data)")
_HALF_KEY_PAIR = re.compile(r"Missing (SecretAccessKey|AccessKeyId)")


#: The errors of a local write (the scratch): never the store's, never retried.
_LOCAL_WRITE = _FULL | _REFUSED


def scratch_root() -> Path:
    """Local scratch: ``BOLMO_ASYNC_SCRATCH`` (``--scratch-dir``), or a temporary folder made by the
    first process that needs one (the coordinator: ``StoreDir`` makes it when opened), handed to
    its worker processes through the environment and removed when that process exits."""
    configured = os.environ.get("BOLMO_ASYNC_SCRATCH")
    if configured:
        from .local import check_path_names

        check_path_names(os.path.expanduser(configured), "--scratch-dir")
        root = Path(configured).expanduser().resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"--scratch-dir {configured} (BOLMO_ASYNC_SCRATCH) cannot be used ({exc.strerror or exc}); "
                "name a folder this user can write on a local disk."
            ) from None
        return root
    return _own_scratch()


_own: dict[int, Path] = {}


def _is_lease(body: bytes | None) -> bool:
    """``body`` is a lease's (``_lease_body``): not the empty or pid-holding flock file of a local
    output folder copied into the bucket (`aws s3 sync`), which has the lock's name."""
    try:
        return isinstance(json.loads(body or b""), dict)
    except ValueError:
        return False


def named_scratch() -> str | None:
    """The scratch the user named (``--scratch-dir`` / ``BOLMO_ASYNC_SCRATCH``), not the temporary
    one this process made: what a Ray task must use too (its worker has the cluster's environment)."""
    configured = os.environ.get("BOLMO_ASYNC_SCRATCH") or None
    own = _own.get(os.getpid())
    return None if configured is None or (own is not None and configured == str(own)) else configured


def _own_scratch() -> Path:
    pid = os.getpid()
    if pid not in _own:
        import atexit

        path = Path(tempfile.mkdtemp(prefix="bolmo-async-scratch-"))
        _own[pid] = path
        os.environ["BOLMO_ASYNC_SCRATCH"] = str(path)  # workers (which exit without clean-up) share it
        atexit.register(shutil.rmtree, path, True)
    return _own[pid]


def interruptible(fn: Callable[[], T]) -> T:
    """``fn()`` (a blocking call of the store's client), on a helper thread when called on the main
    thread, which waits for it. The client holds the thread that calls it until its request ends,
    and Python runs signal handlers on the main thread only between bytecodes: a Ctrl+C or SIGTERM
    during a request the store never answered was handled only at the request's timeout. A wait
    for a thread is interrupted by a signal: the stop is handled at once, the request is left to
    its (daemon) thread."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed to the caller, as if raised here
            box.append((False, exc))

    helper = threading.Thread(target=run, name="bolmo-async-store-call", daemon=True)
    helper.start()
    helper.join()
    done, value = box[0]
    if not done:
        try:
            raise value
        finally:
            del value, box
    return value


# -- the retry helper ------------------------------------------------------------------------------
def transient(reason: str) -> Exception:
    return Retry(reason)


def retrying(what: str, attempt: Callable[[], T], fail: Callable[[str, int], BaseException], attempts: int = 0) -> T:
    """``attempt()`` through the project's one retry helper (``attempts``: a smaller budget)."""
    policy = RetryPolicy(max_attempts=attempts) if attempts else RetryPolicy()
    return retrying_sync(policy, what, attempt, fail=fail, retry_on=SYNC_RETRY_EXCEPTIONS)


def _policy_config() -> dict[str, Any]:
    """obstore's per-request retry, for the parts of streamed uploads, from the same policy."""
    p = RetryPolicy()
    return {
        "max_retries": p.max_attempts - 1,
        "backoff": {
            "init_backoff": dt.timedelta(seconds=p.base_delay),
            "max_backoff": dt.timedelta(seconds=p.max_delay),
            "base": 2,
        },
        "retry_timeout": dt.timedelta(seconds=300),
    }


def _check_endpoint(var: str, endpoint: str) -> None:
    """An endpoint the S3 client can use: ``http(s)://HOST[:PORT]``. Without a scheme, or with
    an empty or spaced host, the client panicked (a Rust panic, a traceback) at the first request."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(endpoint)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number, or out of range
        ok = False
    if not ok or any(c.isspace() or ord(c) < 0x20 for c in endpoint):
        raise UsageError(
            f"{var}={endpoint!r} is not an http(s) URL of the store: write it as http://HOST:PORT or https://HOST "
            "(e.g. http://127.0.0.1:9000 for a MinIO on this machine)."
        )


def _credentials_problem(text: str) -> str | None:
    """What is wrong with the credentials when an error says they were never found (half a key
    pair, or none at all and no instance role): not a store to retry or to reach, nor a refusal."""
    half = _HALF_KEY_PAIR.search(text)
    if half:
        have, lack = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        if half.group(1) == "AccessKeyId":
            have, lack = lack, have
        return f"{have} is set but {lack} is not: set both (or neither, for AWS_PROFILE or an instance role)"
    if _FROM_INSTANCE_ROLE.search(text):
        return (
            "found no credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and AWS_PROFILE are not set, and no "
            "instance role gave any (the instance metadata service did not answer with one). Set them on every "
            "machine that runs a command (each task of a job array), or run where an instance role gives them"
        )
    return None


def _short(exc: BaseException) -> str:
    """An obstore error in one line, without its debug dump (never holds a credential: obstore
    prints the method and URL, and S3 URLs carry no secret unless presigned, which we never use)."""
    text = str(exc).split("\n\nDebug source:")[0].strip()
    code = re.search(r"<Code>([^<]+)</Code>", text)
    first = text.splitlines()[0] if text else type(exc).__name__
    took = re.search(r"\s+in ([\d.]+)(ms|s) - ", first)
    first = re.sub(r"\s+in [\d.]+\S*s - ", " - ", first)
    first = first.split(": <?xml")[0]
    if re.search(r"kind: Timeout|TimedOut", str(exc)):  # said only in the debug dump
        first += (
            f": no answer within {float(took[1]) / (1000 if took[2] == 'ms' else 1):.0f} s" if took else ": timed out"
        )
    return (f"{first} ({code.group(1)})" if code else first)[:300]


# -- leases ----------------------------------------------------------------------------------------
class _Heartbeat:
    """One thread per process keeps every held lease fresh: each is rewritten once it is LEASE/4
    seconds old (checked every 0.2 s)."""

    def __init__(self) -> None:
        #: (id of the StoreDir, key) -> (the StoreDir, the lease's body, when it was last written)
        self.held: dict[tuple[int, str], tuple[StoreDir, bytes, float]] = {}
        self.guard = threading.Lock()
        self.renewing = threading.Lock()  # held while leases are rewritten
        self.thread: threading.Thread | None = None
        #: Leases whose last renewal failed: said once, then tried every LEASE/8 s, not each beat.
        self.failing: dict[tuple[int, str], float] = {}

    def add(self, d: StoreDir, key: str, body: bytes) -> None:
        with self.guard:
            self.held[(id(d), key)] = (d, body, time.monotonic())
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="bolmo-async-leases", daemon=True)
                self.thread.start()

    def drop(self, d: StoreDir, key: str) -> None:
        with self.guard:
            self.held.pop((id(d), key), None)
            self.failing.pop((id(d), key), None)
        with self.renewing:  # a rewrite under way ends first: a released lease is not made again
            pass

    def _run(self) -> None:
        while True:
            time.sleep(0.2)
            with self.guard:
                # No lease left: the thread ends (it beat for the rest of the process; ``add`` starts
                # another, under the same guard, so a lease taken meanwhile is never left unrenewed).
                if not self.held:
                    self.thread = None
                    return
            now = time.monotonic()
            with self.renewing:
                with self.guard:
                    due = [
                        (k, v)
                        for k, v in self.held.items()
                        if now - v[2] >= LEASE / 4 and now >= self.failing.get(k, 0.0) + LEASE / 8
                    ]
                for slot, (d, body, _) in due:
                    with self.guard:
                        if slot not in self.held:
                            continue  # released meanwhile
                    try:  # one short attempt: a release waits for it (``drop``), a later beat retries
                        d._put(slot[1], body, attempts=1, kind="probe")
                    except Exception as exc:  # a lost lease costs work only
                        if slot not in self.failing:
                            log.warning(
                                "%s: could not renew a lease (%s); trying again every %g s",
                                d.location,
                                _short(exc.__cause__ or exc),
                                LEASE / 8,
                            )
                        with self.guard:
                            if slot in self.held:
                                self.failing[slot] = time.monotonic()
                        continue
                    with self.guard:
                        if self.failing.pop(slot, None) is not None:
                            log.info("%s: a lease renewed again", d.location)
                        if slot in self.held:
                            self.held[slot] = (d, body, now)


_beats: dict[int, _Heartbeat] = {}


def _heartbeat() -> _Heartbeat:
    pid = os.getpid()
    if pid not in _beats:  # a forked child starts its own thread
        _beats[pid] = _Heartbeat()
    return _beats[pid]


_held_locks: set[tuple[str, str]] = set()
_held_guard = threading.Lock()
_holders: dict[int, str] = {}


def _process_holder() -> str:
    pid = os.getpid()
    if pid not in _holders:
        _holders[pid] = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
    return _holders[pid]


class StoreNewFile:
    """An object written front to back as a streamed multipart upload (see ``NewFile``)."""

    def __init__(self, d: StoreDir, name: str, *, keep_copy: bool = False):
        self.dir = d
        self.name = name
        self.key = d.key(name)
        self.size = 0
        self._writer: Any = None
        self._done = False
        self._started = time.monotonic()
        #: ``keep_copy``: a staged file is also written into the scratch cache as it streams out
        #: (while it fits the cache), so that the shards made from it on this machine need no
        #: download of it.
        self._copy: Any = None
        self._copy_path: Path | None = None
        if keep_copy:
            with contextlib.suppress(OSError):  # no local copy: the object is downloaded when read
                self._copy_path = d._cache_dir() / f".{secrets.token_hex(8)}.{os.getpid()}.tmp"
                self._copy = open(self._copy_path, "wb")  # noqa: SIM115 (closed by commit/abort)

    def _drop_copy(self) -> None:
        copy, self._copy = self._copy, None
        if copy is not None:
            with contextlib.suppress(OSError):
                copy.close()
        if self._copy_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._copy_path)

    def write(self, data: Any) -> int:
        import obstore

        view = memoryview(data).cast("B")
        try:
            if self._writer is None:
                self._writer = obstore.open_writer(
                    self.dir.upload_store(), self.key, buffer_size=PART, max_concurrency=UPLOAD_CONCURRENCY
                )
            # obstore keeps a reference to the memory it is given until the part is sent: a copy,
            # so that the caller may reuse its block (the shard writer does) at once
            interruptible(lambda: self._writer.write(bytes(view)))
        except Exception as exc:
            self.abort()
            raise self.dir.failed(self.name, exc, "upload") from exc
        self.size += len(view)
        if self._copy is not None:
            try:
                if self.size > CACHE_BYTES:
                    raise OSError("larger than the scratch cache")
                self._copy.write(view)
            except OSError:
                self._drop_copy()
        return len(view)

    def flush(self) -> None:
        pass  # parts go out as they fill; the object exists only after commit

    def commit(self) -> int:
        if self._done:
            return self.size
        try:
            if self._writer is None:  # nothing written: an empty object
                self.dir._put(self.key, b"")
            else:
                writer, self._writer = self._writer, None
                interruptible(writer.close)  # completes the multipart upload: the object appears whole
        except Exception as exc:
            self.abort()
            raise self.dir.failed(self.name, exc, "upload") from exc
        self._done = True
        if self._copy is not None:
            self._keep_copy()
        log.debug("%s: %d bytes uploaded in %.2fs", self.name, self.size, time.monotonic() - self._started)
        return self.size

    def unlink_early(self) -> None:
        """Nothing in the bucket to remove: an upload is invisible until it completes (the local
        copy's temporary goes; a write going on lands in the unlinked file)."""
        if self._copy_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._copy_path)

    def _keep_copy(self) -> None:
        """The local copy into the cache under the name of the object's version (its ETag)."""
        try:
            self._copy.close()
            self._copy = None
            meta = self.dir._head(self.name)
            if meta is None or int(meta["size"]) != self.size or self._copy_path is None:
                raise OSError("the object changed")
            self.dir._evict(self.size)
            os.replace(self._copy_path, self.dir._cache_name(self.name, meta))
            self._copy_path = None
        except (OSError, OutputError):
            self._drop_copy()  # only a cache: the object is downloaded when read

    def abort(self) -> None:
        writer, self._writer = self._writer, None
        self._done = True
        self._drop_copy()
        if writer is not None:
            with contextlib.suppress(Exception):  # an exception through __exit__ aborts the upload
                writer.__exit__(OutputError, OutputError("aborted"), None)


class StoreDir(OutputDir):
    local = False

    def __init__(self, location: str):
        if _BAD_SETTINGS:
            raise UsageError("; ".join(_BAD_SETTINGS) + ".")
        scheme, _, rest = location.partition("://")
        self.scheme = scheme.lower()
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UsageError(f"--output-dir {location}: name a bucket, e.g. {self.scheme}://BUCKET/PREFIX.")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c in "?#\\" for c in bucket):
            raise UsageError(
                f"--output-dir {location!r}: a bucket name holds no spaces or control characters "
                f"(S3: lower-case letters, digits, '.' and '-'), e.g. {self.scheme}://my-bucket/PREFIX."
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        for segment in self.prefix.split("/") if self.prefix else ():
            if segment in ("", ".", "..") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in segment):
                what = "an empty segment (//)" if not segment else f"the segment {segment!r}"
                raise UsageError(
                    f"--output-dir {location}: an object key cannot hold {what} (a bucket has no parent or current "
                    f"folders); name the prefix plainly, e.g. {self.scheme}://{bucket}/bolmo_out."
                )
        self.location = f"{self.scheme}://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._stores: dict[tuple[int, str], Any] = {}
        #: Who holds our leases: this process (its nested commands share them, as with flock).
        self._holder = _process_holder()
        self._scratch_named = False  # its scratch folder says whose it is (``_scratch_dir``)
        scratch_root()  # made now, before any worker process starts, so that they share it

    # -- the client ------------------------------------------------------------------------------
    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _store(self, kind: str = "small") -> Any:
        """The obstore client of this process for ``kind`` of request (rebuilt after a fork: its
        runtime does not survive one): "upload", whose per-request retry covers streamed parts;
        the others make single attempts, retried by ``retrying``: "small" requests, "probe",
        "large" (a document of MBs written in one PUT) and "transfer" (an object read whole),
        each within its timeout (above)."""
        slot = (os.getpid(), kind)
        if slot not in self._stores:
            retry = _policy_config() if kind == "upload" else {"max_retries": 0}
            if kind == "transfer":  # a day in all, TRANSFER_TIMEOUT without a byte
                self._stores[slot] = self._make_store(retry, 86400.0, TRANSFER_TIMEOUT)
            else:
                timeout = {"probe": PROBE_TIMEOUT, "small": REQUEST_TIMEOUT}.get(kind, UPLOAD_TIMEOUT)
                self._stores[slot] = self._make_store(retry, timeout)
        return self._stores[slot]

    def upload_store(self) -> Any:
        return self._store("upload")

    def _make_store(self, retry_config: Any, timeout: float, idle: float | None = None) -> Any:
        from obstore.store import AzureStore, GCSStore, S3Store

        connect = min(30.0, timeout, idle or timeout)
        client: Any = {"connect_timeout": f"{connect:g}s", "timeout": f"{timeout:g}s"}
        if idle is not None:
            client["read_timeout"] = f"{idle:g}s"
        if self.scheme in ("gs", "gcs"):
            return GCSStore(self.bucket, client_options=client, retry_config=retry_config)
        if self.scheme in ("az", "abfs"):
            return AzureStore(self.bucket, client_options=client, retry_config=retry_config)
        config: Any = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            _check_endpoint(
                "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL", endpoint
            )
        if self.scheme == "r2" and not endpoint:
            raise UsageError(
                f"--output-dir {self.location}: set AWS_ENDPOINT_URL to your R2 endpoint "
                "(https://ACCOUNT_ID.r2.cloudflarestorage.com) and the R2 token as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
            )
        if endpoint:
            config["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                client["allow_http"] = True
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in os.environ.get(var, "")):  # (its value never said)
                raise UsageError(
                    f"{var} holds a control character (a newline or carriage return, most often from a file it was "
                    "copied from), which no request header can carry: set it again without it."
                )
        provider, profile_region = None, None
        if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
            provider, profile_region = self._profile_credentials()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or profile_region
        if region:
            config["region"] = region
        elif self.scheme == "r2" or endpoint:
            config["region"] = "auto" if self.scheme == "r2" else "us-east-1"
        return S3Store(
            self.bucket, config=config, client_options=client, retry_config=retry_config, credential_provider=provider
        )

    def _profile_credentials(self) -> tuple[Any, str | None]:
        """``AWS_PROFILE`` (credentials, region) through boto3 when it is installed (SSO, assumed
        roles, everything the AWS config files can say); else the profile's static keys from
        ``~/.aws/credentials``."""
        try:
            import boto3
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError:
            pass
        else:
            from botocore.exceptions import ProfileNotFound

            try:
                session = boto3.Session(profile_name=os.environ["AWS_PROFILE"])
            except ProfileNotFound:
                raise UsageError(
                    f"AWS_PROFILE={os.environ['AWS_PROFILE']}: no such profile in "
                    f"{os.environ.get('AWS_CONFIG_FILE', '~/.aws/config')} or "
                    f"{os.environ.get('AWS_SHARED_CREDENTIALS_FILE', '~/.aws/credentials')} on this machine; "
                    "name one of its profiles (`aws configure list-profiles`), or set AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY instead."
                ) from None
            return Boto3CredentialProvider(session), session.region_name
        import configparser

        profile = os.environ["AWS_PROFILE"]
        path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser()
        cfg = configparser.ConfigParser()
        cfg.read(path)
        if profile not in cfg or "aws_access_key_id" not in cfg[profile]:
            raise UsageError(
                f"AWS_PROFILE={profile}: no static keys for it in {path}; install boto3 "
                "(pip install boto3) for SSO or role profiles, or set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
            )
        sec = cfg[profile]
        creds = {"access_key_id": sec["aws_access_key_id"], "secret_access_key": sec.get("aws_secret_access_key", "")}
        if sec.get("aws_session_token"):
            creds["token"] = sec["aws_session_token"]
        return (lambda: {**creds, "expires_at": None}), None

    # -- errors and retries ----------------------------------------------------------------------
    def failed(self, name: str, exc: BaseException, doing: str, resumes: bool = True) -> BaseException:
        """An error of the store as one line naming the object and the fix."""
        import obstore.exceptions as oe

        if isinstance(exc, OutputError | UsageError | StateError):
            return exc
        what = self.ref(name) if name else self.location
        reason = _short(exc)
        problem = _credentials_problem(str(exc))
        if problem:
            return UsageError(f"--output-dir {self.location}: {problem} ({reason}).")
        if isinstance(exc, oe.UnauthenticatedError | oe.PermissionDeniedError) or re.search(
            r"status code: (401|403)", str(exc)
        ):
            return UsageError(
                f"{what}: the store refused this {doing} ({reason}). Check the credentials (AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE) and that they may read and write "
                f"{self.location}."
            )
        if re.search(r"PermanentRedirect|AuthorizationHeaderMalformed|status code: 301", str(exc)):
            return UsageError(
                f"--output-dir {self.location}: the bucket {self.bucket} is in another region; set AWS_REGION to it."
            )
        if "NoSuchBucket" in str(exc):
            return UsageError(
                f"--output-dir {self.location}: the bucket {self.bucket} does not exist; create it first."
            )
        status = re.search(r"status code: (5\d\d)", str(exc))
        check = (
            f"The store answered {status[1]} (its own error) to every attempt: check its status or try later"
            if status
            else "Check that the store is reachable (AWS_ENDPOINT_URL, the network)"
        )
        return OutputError(
            f"{what}: {doing} failed ({reason}). {check}"
            + (
                " and rerun the same command: finished objects are kept and the run resumes."
                if resumes and not self.read_only
                else "."
            )
        )

    def _call(
        self,
        what: str,
        name: str,
        fn: Callable[[], T],
        attempts: int = 0,
        unreachable: Callable[[str], BaseException] | None = None,
    ) -> T:
        """``fn()`` with transient store errors retried by the retry helper; ``unreachable(reason)``:
        the error when they remain."""
        import obstore.exceptions as oe

        def attempt() -> T:
            try:
                return interruptible(fn)
            except (FileNotFoundError, oe.NotFoundError, oe.AlreadyExistsError, oe.PreconditionError):
                raise
            except (oe.UnauthenticatedError, oe.PermissionDeniedError) as exc:
                raise self.failed(name, exc, what) from exc
            except (oe.GenericError, oe.JoinError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno in _LOCAL_WRITE:
                    raise  # a local write of ``fn`` (a download into a full scratch): the caller names the fix
                if _credentials_problem(str(exc)):  # no attempt can find them
                    raise self.failed(name, exc, what) from exc
                status = _STATUS.search(str(exc))
                if _TRANSIENT_STATUS.search(str(exc)) and not (
                    status and status.group(1).startswith("4") and status.group(1) not in ("408", "429")
                ):
                    raise transient(f"{self.ref(name) if name else self.location}: {_short(exc)}") from exc
                raise self.failed(name, exc, what) from exc
            except BaseException as exc:
                if type(exc).__name__ != "PanicException":  # (the client's Rust panic: no Exception)
                    raise
                raise OutputError(
                    f"{self.ref(name) if name else self.location}: the S3 client refused the request it was to make "
                    f"for this {what} ({_short(exc)}): check --output-dir and the AWS_* variables (AWS_ENDPOINT_URL, "
                    "the credentials) for characters a URL or a header cannot hold."
                ) from None

        def fail(reason: str, n: int) -> BaseException:
            if unreachable is not None:
                return unreachable(reason)
            return OutputError(
                f"{self.ref(name) if name else self.location}: {what} still failing after {attempt_count(n)} ({reason}). "
                "Check the store's health and endpoint (AWS_ENDPOINT_URL)"
                + (".", ", then rerun the same command: finished objects are kept and the run resumes.")[
                    not self.read_only
                ]
            )

        return retrying(f"{self.ref(name) if name else self.location}: {what}", attempt, fail, attempts)

    def _put(self, key: str, data: bytes, mode: Any = None, attempts: int = 0, kind: str = "small") -> Any:
        import obstore

        name = key[len(self.prefix) + 1 :] if self.prefix else key
        if kind == "small" and len(data) > 1 << 20:  # a document of MBs: an upload part's bound
            kind = "large"
        return self._call(
            "write",
            name,
            lambda: obstore.put(self._store(kind), key, data, mode=mode, use_multipart=False),
            attempts=attempts,
        )

    def _head(self, name: str) -> dict[str, Any] | None:
        import obstore
        import obstore.exceptions as oe

        try:
            return dict(self._call("head", name, lambda: obstore.head(self._store(), self.key(name))))
        except (FileNotFoundError, oe.NotFoundError):
            return None

    def _list(self, sub: str) -> list[dict[str, Any]]:
        import obstore

        prefix = self.key(sub).rstrip("/") + "/" if sub else (self.prefix + "/" if self.prefix else "")

        def run() -> list[dict[str, Any]]:
            return [dict(m) for chunk in obstore.list(self._store(), prefix, chunk_size=1000) for m in chunk]

        return self._call("list", sub, run)

    def _names(self, sub: str = "") -> list[tuple[str, int]]:
        """Every object under ``sub``: (name relative to the folder, size)."""
        cut = len(self.prefix) + 1 if self.prefix else 0
        return [(m["path"][cut:], int(m["size"])) for m in self._list(sub)]

    def _delete(self, names: list[str]) -> None:
        import obstore

        def batch(keys: list[str]) -> Callable[[], None]:
            return lambda: obstore.delete(self._store(), keys)

        for i in range(0, len(names), 1000):  # S3 deletes at most 1000 keys a request
            keys = [self.key(n) for n in names[i : i + 1000]]
            self._call("delete", names[i] if len(keys) == 1 else "", batch(keys))

    # -- the folder ----------------------------------------------------------------------------
    def create(self) -> None:
        """Probe: write and remove a small object, so that wrong credentials, a missing bucket or
        an unreachable store stop the run here, in one line, before any download."""
        import obstore

        probe = f".bolmo-async.probe.{secrets.token_hex(4)}"
        try:
            self._store("probe")
            self._call(
                "probe write",
                probe,
                lambda: obstore.put(self._store("probe"), self.key(probe), b""),
                attempts=3,
                unreachable=self._unreachable,
            )
            self._delete([probe])
        except (UsageError, StateError):
            raise
        except Exception as exc:
            raise UsageError(str(self.failed("", exc, "probe write", resumes=False))) from None

    def check_reachable(self) -> None:
        """For a command that only reads: the store answers a listing (a few attempts), else one
        line naming what to check."""
        import obstore

        prefix = self.prefix + "/" if self.prefix else ""

        def first() -> None:
            for _ in obstore.list(self._store("probe"), prefix, chunk_size=1):
                return

        self._call("list", "", first, attempts=3, unreachable=self._unreachable)

    def _unreachable(self, reason: str) -> UsageError:
        return UsageError(
            f"--output-dir {self.location}: cannot reach the store ({reason}). Check the endpoint "
            "(AWS_ENDPOINT_URL / AWS_REGION), the credentials and the network."
        )

    def exists(self) -> bool:
        return bool(self._names_limited())

    def _names_limited(self) -> list[str]:
        import obstore

        prefix = self.prefix + "/" if self.prefix else ""

        def run() -> list[str]:
            for chunk in obstore.list(self._store(), prefix, chunk_size=1):
                return [m["path"] for m in chunk]
            return []

        return self._call("list", "", run)

    def _lease_body(self) -> bytes:
        return json.dumps({"holder": self._holder, "since": time.time()}).encode()

    def _fresh(self, name: str) -> dict[str, Any] | None:
        """The lease at ``name`` when it is held (renewed within LEASE seconds), else None."""
        meta = self._head(name)
        if meta is None:
            return None
        age = (dt.datetime.now(dt.timezone.utc) - meta["last_modified"]).total_seconds()
        return meta if age < LEASE and _is_lease(self.read_bytes(name)) else None

    def _acquire(self, name: str) -> bool:
        """Make the lease ``name`` ours: a conditional create, or a conditional overwrite of a stale
        one (of the version we saw: of two runs taking it over, one wins)."""
        import obstore.exceptions as oe

        body = self._lease_body()
        for _ in range(3):
            if not self.create_bytes(name, body) and (seen := self.read_bytes(name)) != body:
                # (the same body: our own create, retried after its answer was lost)
                meta = self._head(name)
                if meta is None:
                    continue
                age = (dt.datetime.now(dt.timezone.utc) - meta["last_modified"]).total_seconds()
                if age < LEASE and (_is_lease(seen) or meta["size"] != len(seen or b"")):
                    return False
                try:
                    version = {"e_tag": meta["e_tag"]} | ({"version": meta["version"]} if meta.get("version") else {})
                    self._put(self.key(name), body, mode=version)
                except (oe.AlreadyExistsError, oe.PreconditionError, FileNotFoundError, oe.NotFoundError):
                    continue
                except oe.NotSupportedError:
                    self._put(self.key(name), body)
            _heartbeat().add(self, self.key(name), body)
            return True
        return False

    def _release(self, name: str) -> None:
        """Best effort, one short attempt: a lease not removed expires within LEASE seconds, and a
        release runs in the clean-up of a stop, which a hung store held for its whole retry budget
        (8 attempts of a minute)."""
        import obstore

        _heartbeat().drop(self, self.key(name))
        with contextlib.suppress(Exception):
            self._call("delete", name, lambda: obstore.delete(self._store("probe"), [self.key(name)]), attempts=1)

    @contextlib.contextmanager
    def lock(self, *, shared: bool = False) -> Iterator[None]:
        """A lease instead of ``flock``: an exclusive run holds ``LOCK``; each ``--worker`` share
        holds its own lease under ``SHARES``. Each side makes its lease, then looks for the
        other's: of two racing runs at least one sees the other and stops."""
        with _held_guard:
            nested = (self.location, self._holder) in _held_locks
        if nested:
            yield
            return
        mine = f"{SHARES}/{self._holder.replace(':', '-')}" if shared else LOCK
        expires = f" A killed run's lock expires {LEASE:g} s after it died."
        if shared:
            self._put(self.key(mine), self._lease_body())
            _heartbeat().add(self, self.key(mine), self._lease_body())
            if self._fresh(LOCK) is not None:
                self._release(mine)
                raise StateError(busy_message(self.location, None, expires))
        else:
            if not self._acquire(LOCK):
                raise StateError(busy_message(self.location, None, expires))
            if any(self._fresh(n) is not None for n, _ in self._names(SHARES)):
                self._release(LOCK)
                raise StateError(busy_message(self.location, "shares", expires))
        with _held_guard:
            _held_locks.add((self.location, self._holder))
        try:
            yield
        finally:
            with _held_guard:
                _held_locks.discard((self.location, self._holder))
            self._release(mine)

    def holder(self) -> str | None:
        """A lease renewed within ``LEASE`` seconds: the folder lock's, or a ``--worker`` share's."""
        if self._fresh(LOCK) is not None:
            return "a bolmo-async run"
        if any(self._fresh(n) is not None for n, _ in self._names(SHARES)):
            return "a job-array share (`fetch --worker`)"
        return None

    def _claim_name(self, key: str) -> str:
        return f"{STAGING}/.{key}.claim"

    def claim_wait_note(self) -> str:
        return (
            f" (a run killed while staging it holds it until its claim expires, within {int(LEASE)} s: "
            "BOLMO_ASYNC_LEASE)"
        )

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        name = self._claim_name(key)
        if not self._acquire(name):
            yield False
            return
        try:
            yield True
        finally:
            self._release(name)

    def reset(self) -> None:
        mine = {LOCK}
        doomed = [
            n
            for n, _ in self._names()
            if n not in mine
            and not n.startswith(SHARES + "/")
            and (n in DOCUMENTS or n.startswith((STAGING + "/", "tokenizer/")) or SHARD_RE.match(n))
        ]
        self._delete(doomed)
        shutil.rmtree(self._scratch_dir() / RAW, ignore_errors=True)

    def free_bytes(self) -> int | None:
        return None

    # -- files -----------------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes | None:
        import obstore
        import obstore.exceptions as oe

        try:
            # (bounded by the seconds without a byte: a document may be MBs)
            return self._call("read", name, lambda: bytes(obstore.get(self._store("transfer"), self.key(name)).bytes()))
        except (FileNotFoundError, oe.NotFoundError):
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        if len(data) <= PART:  # one PUT: atomic, and replayable by the retry helper
            self._put(self.key(name), data)
        else:
            super().write_bytes(name, data)

    def create_bytes(self, name: str, data: bytes) -> bool:
        import obstore.exceptions as oe

        try:
            self._put(self.key(name), data, mode="create")
        except (oe.AlreadyExistsError, oe.PreconditionError):
            return False
        return True

    def new_file(self, name: str, *, direct: bool = False) -> NewFile:
        staged = name.startswith(STAGING + "/") and name.endswith(".arrow")
        return StoreNewFile(self, name, keep_copy=staged)

    def size(self, name: str) -> int | None:
        meta = self._head(name)
        return None if meta is None else int(meta["size"])

    def remove(self, name: str) -> None:
        self._delete([name])

    def _download(self, name: str, sink: Callable[[Any], None], restart: Callable[[], None]) -> bool:
        """Stream object ``name`` into ``sink`` (chunks of about PART bytes); False when absent.
        A broken download starts again from the top (``restart``) through the retry helper."""
        import obstore
        import obstore.exceptions as oe

        def run() -> bool:
            restart()
            for chunk in obstore.get(self._store("transfer"), self.key(name)).stream(min_chunk_size=PART):
                sink(chunk)
            return True

        try:
            return self._call("read", name, run)
        except (FileNotFoundError, oe.NotFoundError):
            return False

    def checksum(self, name: str) -> str | None:
        from ..util import new_checksum

        cached = self._cached_path(name, fetch=False)
        if cached is not None:
            h = new_checksum()
            with open(cached, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            return str(h.hexdigest())
        box = [new_checksum()]

        def restart() -> None:
            box[0] = new_checksum()

        if not self._download(name, lambda chunk: box[0].update(chunk), restart):
            return None
        return str(box[0].hexdigest())

    @contextlib.contextmanager
    def open_input(self, name: str) -> Iterator[Any]:
        """The object through the scratch cache, memory-mapped (one download however often it is
        read while it stays cached)."""
        import pyarrow as pa

        for _ in range(3):
            path = self._cached_path(name, fetch=True)
            if path is None:
                raise FileNotFoundError(2, "no such object", self.ref(name))
            try:
                source = pa.memory_map(str(path), "r")
            except FileNotFoundError:
                continue  # evicted by another process between its download and this open: again
            with source:
                yield source
            return
        raise OutputError(
            f"{self.ref(name)}: its local copy keeps being evicted from the scratch cache; raise "
            "BOLMO_ASYNC_SCRATCH_CACHE (bytes) above the largest staged object."
        )

    def ref(self, name: str) -> str:
        return f"{self.location}/{name}"

    # -- local scratch -------------------------------------------------------------------------
    def _scratch_dir(self) -> Path:
        d = scratch_root() / scratch_folder_name(self.location)
        if not self._scratch_named:  # whose it is, said by a full scratch (``scratch_usage``)
            with contextlib.suppress(OSError):
                d.mkdir(parents=True, exist_ok=True)
                owner = d / SCRATCH_OWNER
                if not owner.exists():
                    owner.write_text(self.location + "\n", encoding="utf-8")
                self._scratch_named = True
        return d

    def _cache_dir(self) -> Path:
        d = self._scratch_dir() / "cache"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _cache_name(self, name: str, meta: dict[str, Any]) -> Path:
        tag = hashlib.sha256(f"{name}\0{meta.get('e_tag')}\0{meta['size']}".encode()).hexdigest()[:24]
        return self._cache_dir() / f"{tag}-{fit_name(name.replace('/', '_'), 150)}"

    def _cached_path(self, name: str, *, fetch: bool) -> Path | None:
        """A local copy of object ``name`` in the scratch cache: the copy's name carries the
        object's ETag, so a rewritten object is fetched again. Evicts the least recently used
        copies beyond CACHE_BYTES."""
        meta = self._head(name)
        if meta is None:
            return None
        path = self._cache_name(name, meta)
        if path.exists():
            with contextlib.suppress(OSError):
                os.utime(path)
            return path
        if not fetch:
            return None
        self._evict(int(meta["size"]))
        tmp = path.with_name(f".{path.name[:100]}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        box: list[Any] = [None]

        def restart() -> None:
            if box[0] is not None:
                box[0].close()
            box[0] = open(tmp, "wb")  # noqa: SIM115 (closed below)

        try:
            try:
                found = self._download(name, lambda chunk: box[0].write(chunk), restart)
            finally:
                if box[0] is not None:
                    box[0].close()
            if not found:
                return None
            os.replace(tmp, path)
        except OSError as exc:
            raise translate(exc, tmp, str(scratch_root()), scratch=True) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return path

    def _evict(self, incoming: int) -> None:
        d = self._cache_dir()
        entries = []
        for p in d.iterdir():
            if p.name.startswith("."):
                continue  # another process's download in flight
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in entries) + incoming
        for _, s, p in sorted(entries):  # oldest first; a copy another reader maps stays valid
            if total <= CACHE_BYTES:
                break
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            total -= s

    def scratch(self, key: str) -> Path:
        return self._scratch_dir() / RAW / key.split("-")[0]

    def new_local_file(self, path: Path) -> NewFile:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise translate(exc, path, str(scratch_root()), scratch=True) from exc
        return LocalNewFile(path, str(scratch_root()), scratch=True)

    # -- staging ---------------------------------------------------------------------------------
    def clean_temporaries(self, key: str) -> int:
        """A killed run's uploads never became objects; only local scratch has leftovers."""
        n = 0
        scratch = self.scratch(key)
        if scratch.is_dir():
            for p in [*scratch.glob(".*.tmp"), *scratch.glob(f".{key}.whole")]:
                with contextlib.suppress(OSError):
                    p.unlink()
                    n += 1
        return n

    def staging_bytes(self) -> int:
        return sum(size for name, size in self._names(STAGING) if not name.endswith(".claim"))

    def remove_staging(self) -> None:
        self._delete([name for name, _ in self._names(STAGING) if not name.endswith(".claim")])

    # -- shards ----------------------------------------------------------------------------------
    def shards(self) -> dict[str, int]:
        import obstore

        prefix = self.prefix + "/" if self.prefix else None

        def run() -> dict[str, int]:
            listed = obstore.list_with_delimiter(self._store(), prefix)
            cut = len(prefix) if prefix else 0
            return {m["path"][cut:]: int(m["size"]) for m in listed["objects"] if SHARD_RE.match(m["path"][cut:])}

        return dict(sorted(self._call("list", "", run).items()))
