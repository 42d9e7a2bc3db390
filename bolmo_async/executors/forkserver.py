"""The fork server the local pool's worker processes are forked from (``local.Pool``).

multiprocessing's one fork server per process, with ``bolmo_async.preload`` as its preload: started
by the first pool (or earlier, by a command that will start worker processes:
``start_fork_server``), shared by the pools alive at once, killed and reaped by the last. A module
of its own, light to import (no asyncio, no worker): the CLI starts the server before it imports
anything else of the run.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

from ..errors import UsageError

log = logging.getLogger("bolmo_async")

#: How worker processes start: ``forkserver`` (the default where the platform has it) or ``spawn``.
START_METHOD_ENV = "BOLMO_ASYNC_START_METHOD"


def start_method() -> str:
    """``forkserver`` unless ``BOLMO_ASYNC_START_METHOD=spawn`` or the platform has no fork server."""
    wanted = os.environ.get(START_METHOD_ENV, "").strip().lower() or "forkserver"
    if wanted not in ("forkserver", "spawn"):
        raise UsageError(f"{START_METHOD_ENV}={wanted!r}: use forkserver or spawn (or leave it unset)")
    if wanted == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return wanted


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _ForkServer:
    """multiprocessing's fork server (one per process), shared by the pools alive at once: started
    by the first with ``bolmo_async.preload`` as its preload, stopped and reaped when the last ends.
    One that something else in this process started is used as it is and left alone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._ours = False
        self._early = 0  # holds of ``start_early`` that no pool has taken over yet

    def start_early(self, prebuild: str | None = None, workers: int = 0, fork: bool = False) -> None:
        """Start the server now, before any pool asks for it: its imports (0.5 CPU s) run on
        another core while this process imports and lists the repo, instead of after. Held as a
        user until the first pool takes it over; one no pool took is stopped at exit.
        ``prebuild``: a tokenizer JSON the server builds the reference engine from, for its
        ``workers`` (``tokenize.prebuild_reference``). ``fork``: the command line's own process,
        which imports what the workers need anyway: the server is forked from it once it has
        (``_fork_here``) instead of a new interpreter importing it all again."""
        from multiprocessing import forkserver

        from ..tokcache import PREBUILD_ENV, PREBUILD_WORKERS_ENV

        try:
            if start_method() != "forkserver":
                return
        except UsageError:  # said by the pool, as one line
            return
        with self._lock:
            if self._early:  # started early already (the entry point, then the command)
                return
        self.acquire()
        with self._lock:
            self._early += 1
            ours = self._ours
        limited = self._imported_for_fork() if ours and fork else None
        if ours:
            # With SIGINT blocked, as ``Pool._start_forked`` starts it (the server inherits the mask):
            # a Ctrl+C is only deferred to the restored mask. The resource tracker first: starting
            # it unblocks SIGINT on its way out (multiprocessing's own), which the server would
            # then start with.
            # (Not for a forked server: the pool starts the tracker with its first worker, and a
            # run of one worker on a thread needs none.)
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                forked = False
                if limited is not None:
                    signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
                    forked = self._fork_here(prebuild, workers, limited)
                if not forked:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old | {signal.SIGINT})
                    start_resource_tracker()
                    signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
                    if prebuild:  # read by the server's preload: its environment is this one, as it starts
                        os.environ[PREBUILD_ENV] = prebuild
                        os.environ[PREBUILD_WORKERS_ENV] = str(workers)
                    forkserver.ensure_running()
            except Exception as exc:  # the pool tries again, or spawns its workers
                log.debug("fork server: not started early (%s: %s)", type(exc).__name__, exc)
            finally:
                os.environ.pop(PREBUILD_ENV, None)
                os.environ.pop(PREBUILD_WORKERS_ENV, None)
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        atexit.register(self._drop_early)  # (twice registered, it runs twice: the second finds nothing)

    def _imported_for_fork(self) -> list[str] | None:
        """Before ``_fork_here``: every module a worker needs imported in this process (which the
        command imports anyway), with the settings a worker has (``LIBRARY_THREAD_VARS`` set to
        one thread before numpy loads, set again in the server, not in this process's
        environment: the variables it set), or None (nothing done) where the server is not to be
        forked: a Python whose fork server this does not know (3.14 adds an authentication
        key), numpy loaded before those settings, or a thread running."""
        from multiprocessing import forkserver

        from ..worker import LIBRARY_THREAD_VARS, import_task_modules

        server = forkserver._forkserver
        if (
            not (3, 10) <= sys.version_info[:2] < (3, 14)
            or getattr(server, "_forkserver_pid", 0) is not None
            or not hasattr(server, "_forkserver_alive_fd")
            or "numpy" in sys.modules
            or threading.active_count() != 1
        ):
            return None
        limited = [var for var in LIBRARY_THREAD_VARS if var not in os.environ]
        for var in limited:
            os.environ[var] = "1"
        try:
            import_task_modules()
        finally:
            for var in limited:
                os.environ.pop(var, None)
        return limited

    def _fork_here(self, prebuild: str | None, workers: int, limited: list[str]) -> bool:
        """The fork server as a fork of this process, which has imported every module a worker
        needs (``_imported_for_fork``): a server spawned as a new interpreter imported them all
        again (0.5 s of CPU, on the path of every run with worker processes: the coordinator
        waited for it after the listing with ``--processes 0``, and a subword run waited for its
        build of the reference engine behind them). Forked while this process runs no other
        thread; the server is then what a spawned one is: multiprocessing's server loop
        (``forkserver.main``) with ``bolmo_async.preload``'s settings (``_serve_forked``), a
        child of this process that ``release`` kills and reaps. False (nothing done): a thread
        runs; the caller spawns it then."""
        import socket
        from multiprocessing import connection, forkserver, util

        server: Any = forkserver._forkserver  # private: its three fields are what a started one sets
        if threading.active_count() != 1:
            return False
        with socket.socket(socket.AF_UNIX) as listener:
            address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
            listener.bind(address)
            if not util.is_abstract_socket_namespace(address):
                os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()
            try:
                pid = os.fork()
                if pid == 0:  # the server: never returns, never runs this process's exit handlers
                    code = 1
                    try:
                        os.close(alive_w)
                        _serve_forked(listener.fileno(), alive_r, prebuild, workers, limited)
                    except SystemExit:  # its coordinator let go of it
                        code = 0
                    except BlockingIOError:  # a fork refused (a pids limit): its coordinator says so, in one line
                        pass
                    except BaseException:
                        import traceback

                        traceback.print_exc()
                    finally:
                        os._exit(code)
            except BaseException:
                os.close(alive_w)
                raise
            finally:
                os.close(alive_r)
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid
        return True

    def _drop_early(self) -> None:
        with self._lock:
            held, self._early = self._early, 0
        for _ in range(held):
            self.release(reap=True)

    def acquire(self) -> Any:
        from multiprocessing import forkserver

        with self._lock:
            if self._early:  # a pool takes over a hold of ``start_early``
                self._early -= 1
                return multiprocessing.get_context("forkserver")
            if self._users == 0:
                # Private, but the only way to know: a server already running is someone else's.
                self._ours = getattr(forkserver._forkserver, "_forkserver_pid", None) is None
                if self._ours:
                    forkserver.set_forkserver_preload(["bolmo_async.preload"])
            self._users += 1
        return multiprocessing.get_context("forkserver")

    def release(self, reap: bool) -> None:
        """A pool is done with it; the last one stops it and reaps it (``reap``: every worker of
        that pool has ended: with one left, waiting for the server could wait for that worker)."""
        from multiprocessing import forkserver

        with self._lock:
            self._users -= 1
            if self._users or not self._ours or not reap:
                return
            server = forkserver._forkserver
            stop = getattr(server, "_stop", None)  # closes its pipe, then waitpid
            if stop is None:
                return
            pid = getattr(server, "_forkserver_pid", None)
            if isinstance(pid, int):
                # Killed first: on its pipe's EOF it would tear its interpreter down, numpy, pyarrow
                # and aiohttp loaded (0.1 s the run waited for at its very end), for nothing: it
                # holds no data, and every worker it forked has ended and been reaped by it (this
                # pool read their exit codes, which it sends once it has reaped them), so their CPU
                # time is in its own and reaches RUSAGE_CHILDREN with the reap below.
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                stop()


FORK_SERVER = _ForkServer()


def _serve_forked(listener_fd: int, alive_r: int, prebuild: str | None, workers: int, limited: list[str]) -> None:
    """The fork server forked from the command's process (``_ForkServer._fork_here``): what
    ``bolmo_async.preload`` does in a spawned one but its imports (done), then multiprocessing's
    server loop, which returns (SystemExit) when the coordinator lets go of it."""
    from multiprocessing import forkserver

    from ..tokcache import PREBUILD_ENV, PREBUILD_WORKERS_ENV

    for var in limited:  # the workers' environment, as a spawned server's
        os.environ[var] = "1"
    # A new interpreter's Ctrl+C handler, which the server hands its workers (not the command's).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as the preload's: a worker takes it back first thing
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if prebuild:
        from ..tokenize import prebuild_reference

        os.environ[PREBUILD_ENV] = prebuild
        os.environ[PREBUILD_WORKERS_ENV] = str(workers)
        prebuild_reference()
    forkserver.main(listener_fd, alive_r, [], None, None)


def server_death() -> str | None:
    """How the fork server ended, if it has (``None``: running, or none of ours). Its end closes
    every worker's status pipe, which ``multiprocessing`` reads as exit code 255 of each worker
    although they run on. Looked at without reaping it (``release`` reaps it)."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    info = _ended(pid)
    return None if info is None else _how(f"the fork server (pid {pid})", info)


def _ended(pid: object) -> Any:
    """The exit status of our child ``pid`` if it has ended, left unreaped (``None``: running,
    not a pid, or not our child)."""
    if not isinstance(pid, int):
        return None
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (OSError, AttributeError):
        return None


def _how(what: str, info: Any) -> str:
    """``what`` exited with code N / was killed by SIGNAME, from ``os.waitid``'s result."""
    if info.si_code == os.CLD_EXITED:
        return f"{what} exited with code {info.si_status}"
    try:
        name = signal.Signals(info.si_status).name
    except ValueError:
        name = f"signal {info.si_status}"
    return f"{what} was killed by {name}"


def tracker_death() -> str | None:
    """How multiprocessing's resource tracker ended, if it has (``None``: running, or none of
    ours), said once. A pool creates no semaphore (its workers talk over plain pipes), so nothing
    of a run is in its care; multiprocessing starts it for every worker process it starts anyway.
    Seen here, it is reaped and not relaunched (with a warning, at the next semaphore let go of)."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    pid = getattr(tracker, "_pid", None)
    info = _ended(pid)
    if info is None or not isinstance(pid, int):
        return None
    with contextlib.suppress(OSError):
        os.waitpid(pid, 0)  # (reaped: it is not reported twice)
    tracker._pid = None  # type: ignore[attr-defined]
    resource_tracker.register = resource_tracker.unregister = lambda name, rtype: None
    return _how(f"multiprocessing's resource tracker (pid {pid})", info)


#: Blocked in a thread that starts a helper process, which inherits the mask: Ctrl+C and a closed
#: terminal's SIGHUP, which reach the whole process group, do not end it where it stands (a
#: traceback from its imports, a resource tracker "relaunching" with a KeyError per semaphore);
#: the coordinator stops the run and then ends them. Only deferred in the starting thread.
TERMINAL_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGHUP") if hasattr(signal, name)}


#: The resource tracker's own warnings (all start "resource_tracker"), as a -W option.
_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def start_resource_tracker() -> None:
    """multiprocessing's resource tracker (started by the first queue of a pool, or the fork
    server), with SIGHUP blocked: it ignores SIGINT and SIGTERM itself, not SIGHUP."""
    from multiprocessing import resource_tracker

    # Its own warnings quiet (its command line takes this process's -W options): a coordinator
    # killed with kill -9 left its queues' semaphores to it, which it removed with a stdlib warning
    # ("There appear to be 9 leaked semaphore objects"); a pool now makes none, but a Python
    # program calling the API may.
    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_fork_server(prebuild: str | None = None, workers: int = 0, fork: bool = False) -> None:
    """For a command that will start worker processes (``--processes N``, N > 1): the fork server
    they are forked from starts now, before the coordinator's own imports (``_ForkServer.start_early``);
    ``prebuild``: the tokenizer JSON it builds the reference engine from for them (``workers``);
    ``fork``: forked from this process, the command line's, once it imported the workers' modules."""
    FORK_SERVER.start_early(prebuild, workers, fork)


__all__ = [
    "FORK_SERVER",
    "START_METHOD_ENV",
    "start_fork_server",
    "start_method",
    "start_resource_tracker",
    "tracker_death",
    "usable_cores",
]
