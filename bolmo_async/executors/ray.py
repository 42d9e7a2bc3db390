"""The Ray executor: planned files and shard writes as Ray tasks.

Each fetch task runs the same worker as a local run, in-process on its one CPU, over a balanced
share of the files (the same staging, claims, resume and determinism as ``--worker I/N``); each
shard task writes one shard of a finalize's layout (boundaries are fixed first, so any order
gives the same bytes). Ray only schedules and retries. The output folder must be one every node
reaches: a shared filesystem, or a bucket (``--output-dir s3://...``). An error a task raises on
purpose comes back as the same class with the same message.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .. import __version__
from ..entry import STOP_SIGNALS
from ..errors import BolmoError, Interrupted, OutputError, UsageError, rebuild
from ..finalizer import Piece, Written, write_shard
from ..models import Plan
from ..outdir import PLAN, OutputDir, open_output
from ..outdir.store import named_scratch
from ..progress import Progress
from ..worker import WorkerSpec
from .base import LayoutCallback, OpenShardCallback, RunResult, ShardCallback, StagedCallback
from .local import Pool

log = logging.getLogger("bolmo_async")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UsageError("--ray needs Ray: pip install 'bolmo-async[ray]' (or pip install 'ray[default]').") from exc
    return ray


#: What a task of one CPU (``num_cpus=1``) sets before its first encode, unless the user set it:
#: fastokens splits a batch over FASTOKENS_BPE_THREADS threads (default: every core of the node),
#: each keeping its own caches of encoded words (100-200 MB on unrepeated text), so 64 tasks on a
#: 64-core node would hold 64 x 64 cache sets.
TASK_ENV = {"FASTOKENS_BPE_THREADS": "1"}


def one_core_each() -> None:
    """This process's encoders on one thread, as the local pool's workers get their core share."""
    for name, value in TASK_ENV.items():
        os.environ.setdefault(name, value)


def use_scratch(scratch: str | None) -> None:
    """The command's ``--scratch-dir`` in this task: its worker process has the environment the
    cluster was started with (``ray start``), not the command's."""
    if scratch:
        os.environ["BOLMO_ASYNC_SCRATCH"] = scratch


def _plan_digest(location: str) -> str | None:
    """sha256 of the output's plan.json as this process sees it (None: it sees none)."""
    raw = open_output(location).read_bytes(PLAN)
    return None if raw is None else hashlib.sha256(raw).hexdigest()


def same_output(location: str, plan_digest: str | None) -> None:
    """An OutputError unless this task sees the plan.json the command wrote: a task has the
    environment its node's Ray was started in (``ray start``), so a bucket's AWS_ENDPOINT_URL
    there may name another store, or a folder not be mounted there at the same path; its files
    were then staged where the command never looks, and the run said every one was staged."""
    if plan_digest is None or _plan_digest(location) == plan_digest:
        return
    raise OutputError(
        f"a Ray task on {socket.gethostname()} does not see {location}/{PLAN} as this command wrote it: every node "
        "must reach the same output (a bucket: the same AWS_ENDPOINT_URL, AWS_REGION and credentials in the "
        "environment `ray start` ran in, on every node; a folder: the same shared path)."
    )


def run_units(
    spec: WorkerSpec, units: list[int], scratch: str | None = None, plan_digest: str | None = None
) -> tuple[str, Any, str]:
    """A Ray task: stage ``units`` with one in-process worker. ``("ok", RunResult, "")``, or
    ``("error", class name, message)`` for an error raised on purpose (rebuilt by the caller)."""
    logging.basicConfig(level=logging.INFO, format="bolmo-async[ray]: %(levelname)s: %(message)s")
    one_core_each()
    use_scratch(scratch)
    try:
        same_output(spec.output_dir, plan_digest)
        with Pool(1) as pool:
            pool.start(spec)
            return "ok", pool.run(units), ""
    except BolmoError as exc:
        return "error", type(exc).__name__, str(exc)


def write_one_shard(
    location: str,
    index: int,
    pieces: list[Piece],
    arrows: dict[int, str],
    srcs: dict[int, str],
    eos: int,
    scratch: str | None = None,
    plan_digest: str | None = None,
) -> tuple[str, Any, str]:
    use_scratch(scratch)
    try:
        same_output(location, plan_digest)
        return "ok", write_shard(open_output(location), index, pieces, arrows, srcs, eos, threading.Event()), ""
    except BolmoError as exc:
        return "error", type(exc).__name__, str(exc)


#: The driver-to-task protocol: raised whenever what a task is sent changes (its functions, their
#: arguments, the classes pickled in them). ``task`` and its first two arguments never change.
PROTOCOL = 2  # (1: ``run_units``/``write_one_shard`` were Ray's functions, called directly)
_TASKS: dict[str, Callable[..., tuple[str, Any, str]]] = {"run_units": run_units, "write_one_shard": write_one_shard}


def task_args(name: str, *args: Any) -> bytes:
    """The rest of a ``task`` call: which task and its arguments, pickled by the command (read
    only once the protocol matched: another install's classes could not be unpickled)."""
    return pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL)


def task(*args: Any, **kwargs: Any) -> tuple[str, Any, str]:
    """Every Ray task's entry: ``task(PROTOCOL, __version__, task_args(...))``. A cluster started
    from another install or checkout than the command (``ray start`` imports its own) failed each
    file with a TypeError of a changed signature; whatever its arguments, this compares the
    command's protocol and version with its own first, and says the fix in one line."""
    said = args[:2]
    if said != (PROTOCOL, __version__):
        there = f"version {said[1]}, task protocol {said[0]}" if len(said) == 2 else "an unknown task protocol"
        return (
            "error",
            "UsageError",
            f"a Ray task on {socket.gethostname()} runs another bolmo-async than this command (the command: "
            f"{there}; the cluster: version {__version__}, task protocol {PROTOCOL}): the cluster was started from "
            "another install or checkout. Restart it from this command's install (`ray stop`, then `ray start` "
            "on every node, with the same bolmo-async importable there), then rerun the same command.",
        )
    name, rest = pickle.loads(args[2])
    return _TASKS[name](*rest)


def _balanced(units: list[int], plan_files: tuple[Any, ...], n: int) -> list[list[int]]:
    """``units`` split into ``n`` lists balanced by planned bytes (largest first, then path)."""
    loads = [0] * n
    out: list[list[int]] = [[] for _ in range(n)]
    for u in sorted(units, key=lambda u: (-plan_files[u].planned_bytes, plan_files[u].path)):
        k = min(range(n), key=lambda i: (loads[i], i))
        out[k].append(u)
        loads[k] += plan_files[u].planned_bytes
    return [sorted(x) for x in out if x]


#: Seconds the cluster's address may take to answer before ``--ray-address`` is refused (Ray's own
#: connect keeps retrying for minutes, printing its own lines, when nothing answers).
PROBE_TIMEOUT = 5.0
#: The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, a Ray Client
#: server) answers with its own SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _fix(label: str) -> str:
    local = "unset RAY_ADDRESS" if label.startswith("RAY_ADDRESS") else "leave --ray-address out"
    return (
        "start the cluster first (`ray start --head` on its head node), or pass its head node's address "
        "(HOST:6379 by default, ray://HOST:10001 for Ray Client, `auto` for one started on this machine), "
        f"or {local} for a local Ray."
    )


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """The ``host:port`` (or ``ray://host:port``) ``ray.init(address)`` would connect to, as Ray
    resolves it (``RAY_ADDRESS`` first; for ``auto`` the cluster ``ray start`` recorded on this
    machine), or None when it starts a local Ray instead; and how the user named it."""
    label = f"--ray-address {address}"
    env = os.environ.get("RAY_ADDRESS") or None
    if env is not None and address in (None, "auto"):
        address, label = env, f"RAY_ADDRESS={env}"
    if address == "auto":
        try:
            from ray._private.utils import read_ray_address  # how Ray itself resolves "auto"

            address = read_ray_address() or None
        except Exception:  # Ray moved it: its own resolution and errors apply
            return None, label
        if address is None:
            raise UsageError(
                f"{label}: no Ray cluster was started on this machine (`ray start --head` records one) and "
                f"RAY_ADDRESS is unset; {_fix(label)}"
            )
    if address in (None, "local"):
        return None, label
    return address, label


def probe_cluster(address: str, label: str, timeout: float = PROBE_TIMEOUT) -> None:
    """A UsageError naming the fix unless a gRPC server (a Ray cluster's GCS or Ray Client port)
    answers at ``address`` within ``timeout`` seconds."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port_s = hostport.rpartition(":")
    if not sep:
        host, port_s = hostport, "10001" if address.startswith("ray://") else ""
    host = host.strip("[]")
    try:
        port = int(port_s)
        if not (host and 0 < port < 65536):
            raise ValueError
    except ValueError:
        raise UsageError(f"{label}: not a Ray address (HOST:PORT, ray://HOST:PORT or auto); {_fix(label)}") from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError as exc:
        why = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise UsageError(f"{label}: nothing answers at {host}:{port} ({why}); {_fix(label)}") from None
    if len(head) < 9 or head[3] != 0x04:  # an HTTP/1 server (the dashboard on 8265, say), or something else
        raise UsageError(
            f"{label}: {host}:{port} answers, but not as a Ray cluster (its GCS port, 6379 by default, or "
            f"ray://HOST:10001); {_fix(label)}"
        )


class _Session:
    """Ray initialised for the duration (and shut down if this process started it)."""

    def __init__(self, address: str | None):
        self.ray = _import_ray()
        self.address = address
        self.started = False

    def __enter__(self) -> Any:
        if not self.ray.is_initialized():
            target, label = cluster_address(self.address)
            if target is not None:
                probe_cluster(target, label)  # bounded: ray.init would retry for minutes
            try:
                with _our_stop_handlers():
                    self.ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:  # Ray's own refusals of a cluster
                if target is None and self.address is None:
                    raise
                if isinstance(exc, RuntimeError):  # e.g. the cluster runs another Ray or Python version
                    raise UsageError(
                        f"{label}: Ray would not join the cluster ({_short(exc)}); run the same Ray "
                        f"({self.ray.__version__}) and Python versions here as on the cluster."
                    ) from None
                raise UsageError(f"{label}: {_short(exc)}; {_fix(label)}") from None
            self.started = True
        return self.ray

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()


@contextlib.contextmanager
def _our_stop_handlers() -> Iterator[None]:
    """The stop signals' handlers as they were before ``ray.init``, which sets its own for SIGTERM
    (``sys.exit(15)``, over a core handler printing a stack dump): a scheduler's SIGTERM to
    ``fetch --ray`` then exited 1 with a dump instead of the run's stop (143, the line naming the
    resume)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (Ray sets none off the main thread either)
        return
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


@contextlib.contextmanager
def _stop_named() -> Iterator[None]:
    """A stop signal raised while Ray waits keeps its name: Ray's wait turns the ``Interrupted``
    (SIGTERM, SIGHUP) a handler raised inside it into a bare ``KeyboardInterrupt``, and the stop's
    line then said Ctrl+C's "interrupted". Each handler is wrapped to note its signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []
    saved: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        previous = signal.getsignal(sig)
        if callable(previous):

            def noting(signum: int, frame: Any, previous: Any = previous) -> None:
                seen.append(signum)
                previous(signum, frame)

            saved[sig] = previous
            signal.signal(sig, noting)
    try:
        yield
    except KeyboardInterrupt as exc:
        if seen and not isinstance(exc, Interrupted):
            raise Interrupted(seen[0]) from None
        raise
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def _result(value: tuple[str, Any, str]) -> Any:
    kind, payload, message = value
    if kind == "error":
        raise rebuild(payload, message)
    return payload


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, tasks: int = 0, retries: int = 3):
        self.address = address
        self.tasks = tasks
        self.retries = retries
        self._spec: WorkerSpec | None = None
        _import_ray()  # a missing Ray is a usage error before anything starts

    def units(self, plan: Plan) -> list[int]:
        return list(range(len(plan.files)))

    def start(self, spec: WorkerSpec) -> None:
        self._spec = spec

    def run(
        self,
        units: list[int],
        *,
        resolve_ahead: list[int] | None = None,
        progress: Progress | None = None,
        on_staged: StagedCallback | None = None,
        on_files_done: ShardCallback | None = None,
        layout_at: LayoutCallback | None = None,
        open_shard: OpenShardCallback | None = None,
    ) -> RunResult:
        """Stage ``units`` as Ray tasks (progress per finished task; shards are left to finalize).
        Each task resolves its own files (``resolve_ahead`` is not used)."""
        assert self._spec is not None, "start() first"
        spec = self._spec
        result = RunResult()
        with _Session(self.address) as ray, _stop_named():
            cpus = int(ray.cluster_resources().get("CPU", 1))
            n = self.tasks or max(1, min(len(units), 2 * cpus))
            shares = _balanced(units, spec.files, n)
            remote = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=True)(task)
            scratch, digest = named_scratch(), _plan_digest(spec.output_dir)
            refs = {
                remote.remote(PROTOCOL, __version__, task_args("run_units", spec, share, scratch, digest)): share
                for share in shares
            }
            log.info("ray: %d task(s) over %d CPU(s) for %d planned file(s)", len(refs), cpus, len(units))
            t0 = time.monotonic()
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                share = refs[ready[0]]
                try:
                    part: RunResult = _result(ray.get(ready[0]))
                except BolmoError:  # raised on purpose in the task: the run's error, as itself
                    raise
                except Exception as exc:  # a task that failed after Ray's retries: its files fail
                    why = (str(exc).splitlines() or [type(exc).__name__])[-1][:500]
                    for u in share:
                        result.failed[spec.files[u].path] = f"its Ray task failed: {why}"
                        if progress is not None:
                            progress.file_done()
                    continue
                result.merge(part)
                if progress is not None:
                    for u in share:
                        if u in part.resumed:  # staged before: not this run's (its task skipped it)
                            progress.add_total(-spec.files[u].read_bytes(spec.whole_prefixes))
                            progress.file_done()
                        elif u in part.staged:
                            progress.add_bytes(
                                spec.files[u].read_bytes(spec.whole_prefixes)
                            )  # (a task reports at its end)
                            skipped = part.staged[u].get("skipped", {}).get("counts", {})
                            progress.add_documents(
                                int(part.staged[u].get("documents", 0)), int(part.staged[u].get("tokens", 0))
                            )
                            progress.file_done(sum(skipped.values()))
                        else:
                            progress.file_done()
                log.info("ray: a task finished %d file(s) (%.0fs)", len(share), time.monotonic() - t0)
        return result

    def write_shards(
        self,
        out: OutputDir,
        shards: list[list[Piece]],
        arrows: Mapping[int, str],
        srcs: Mapping[int, str],
        eos: int,
        written: Written | None = None,
    ) -> list[dict[str, Any]]:
        """One Ray task per shard."""
        with _Session(self.address) as ray, _stop_named():
            remote = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=True)(task)
            scratch, digest = named_scratch(), _plan_digest(out.location)
            refs = [
                remote.remote(
                    PROTOCOL,
                    __version__,
                    task_args(
                        "write_one_shard",
                        out.location,
                        k,
                        pieces,
                        {p.unit: arrows[p.unit] for p in pieces},
                        {p.unit: srcs[p.unit] for p in pieces},
                        eos,
                        scratch,
                        digest,
                    ),
                )
                for k, pieces in enumerate(shards)
            ]
            return [_result(v) for v in ray.get(refs)]

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
