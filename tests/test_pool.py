"""The local pool's worker processes: forked from one fork server that imported their modules once
(or spawned, the way back), reaped with the pool, stopped as a group."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import bolmo_async
from bolmo_async.errors import UsageError
from bolmo_async.executors.local import START_METHOD_ENV, Pool, start_method
from bolmo_async.mirror import MirrorThread

from .helpers import cli, finish, is_fork_server, shard_hashes, worker_processes


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def test_workers_are_forked_from_one_preloaded_server_reaped_with_the_pool(monkeypatch):
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Pool(2) as pool:
        pool._started()
        workers = [psutil.Process(mem.process.pid) for mem in pool.members]
        (server_pid,) = {w.ppid() for w in workers}  # one server for both
        server = psutil.Process(server_pid)
        assert server.ppid() == os.getpid() and "multiprocessing.forkserver" in " ".join(server.cmdline())
        time.sleep(1.0)  # the workers are waiting for their spec by now
        # The server paid the imports (numpy, pyarrow, aiohttp: ~0.8 CPU s); a worker forked from
        # it has them already (a spawned one pays them all itself).
        assert all(_cpu(w) < _cpu(server) / 3 for w in workers), (
            [_cpu(w) for w in workers],
            _cpu(server),
        )
        server_cpu = _cpu(server)
    # Closed: the server is stopped and reaped, so its CPU time (and its workers') counts in this
    # process's RUSAGE_CHILDREN (bench/cpu_of.py), and nothing is left behind.
    assert server_pid not in {c.pid for c in psutil.Process().children()}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    grew = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert grew >= 0.9 * server_cpu


def test_the_closing_pool_does_not_wait_for_the_fork_server_to_tear_its_interpreter_down(monkeypatch):
    """Its workers ended and reaped, the server is killed and reaped at once: its own exit would
    free numpy, pyarrow and aiohttp module by module (0.1 s a run waited for), and it holds
    nothing. Its CPU time (and its workers') still reaches RUSAGE_CHILDREN through the reap."""
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    reaped: dict[int, int] = {}
    waitpid = os.waitpid

    def recording(pid: int, options: int) -> tuple[int, int]:
        got = waitpid(pid, options)
        if got[0]:
            reaped[got[0]] = got[1]
        return got

    with Pool(2) as pool:
        pool._started()
        (server_pid,) = {psutil.Process(mem.process.pid).ppid() for mem in pool.members}
        monkeypatch.setattr(os, "waitpid", recording)
    assert server_pid not in {c.pid for c in psutil.Process().children()}
    status = reaped[server_pid]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def test_spawn_is_the_way_back_and_a_bad_value_says_what_to_use(monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert start_method() == "spawn"
    with Pool(2) as pool:
        # A spawned child shows its own command line once it has exec'd (under load, a moment
        # after the Pool returns: before that, it is a copy of this process).
        deadline = time.monotonic() + 60
        while True:
            cmds = [" ".join(psutil.Process(mem.process.pid).cmdline()) for mem in pool.members]
            if all("spawn_main" in c for c in cmds) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert all("spawn_main" in c for c in cmds), cmds
    monkeypatch.setenv(START_METHOD_ENV, "fork")
    with pytest.raises(UsageError, match="forkserver or spawn"):
        start_method()


@pytest.mark.parametrize("user", ["", "3"])
def test_the_command_line_gives_numeric_libraries_one_thread_in_its_own_process_too(user):
    """The ``bolmo-async`` command's own process (the coordinator) sets the thread count before
    numpy loads: OpenBLAS started a spinning thread per other core there. A user's setting wins."""
    code = (
        "import atexit, os, sys\n"
        "atexit.register(lambda: print('threads', os.environ.get('OPENBLAS_NUM_THREADS')))\n"
        "sys.argv = ['bolmo-async', '--version']\n"
        "from bolmo_async.entry import main\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if user:
        env["OPENBLAS_NUM_THREADS"] = user
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"threads {user or 1}", r.stdout


def test_numeric_libraries_get_one_thread_in_workers_unless_the_user_said(tmp_path):
    """The fork server's preload sets the thread count before numpy loads (OpenBLAS starts its
    threads then); the user's own setting wins; the coordinator is never touched."""
    code = (
        "import os, sys\n"
        "import bolmo_async.worker, bolmo_async.executors\n"  # the coordinator's side: nothing set
        "assert 'OPENBLAS_NUM_THREADS' not in os.environ, 'set in the coordinator'\n"
        "import bolmo_async.worker as w\n"
        "w.limit_library_threads()\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
    r = subprocess.run(
        [sys.executable, "-c", code.replace("assert 'OPENBLAS", "#")],
        capture_output=True,
        text=True,
        env={**env, "OPENBLAS_NUM_THREADS": "3"},
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr
    # The preload, as the fork server runs it: numpy loads after the setting, so OpenBLAS starts
    # no thread of its own (it would start one per other core).
    code = (
        "import os, sys\n"
        "import bolmo_async.worker\n"
        "assert 'numpy' not in sys.modules, 'numpy loads before the thread count is set'\n"
        "import bolmo_async.preload\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], names.count('python'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["1", "1"], (r.stdout, r.stderr)


def test_the_fork_server_outlasts_a_sigterm_so_its_pool_still_sees_its_workers(monkeypatch):
    """A SIGTERM to the whole process group reaches the fork server too: it lives on until the
    pool is done (it reports the workers' exits: without it the pool would count them all lost
    and not wait for them); the workers still stop on SIGTERM."""
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    with Pool(2) as pool:
        pool._started()
        (server_pid,) = {psutil.Process(mem.process.pid).ppid() for mem in pool.members}
        os.kill(server_pid, signal.SIGTERM)
        time.sleep(0.5)
        assert psutil.Process(server_pid).status() != psutil.STATUS_ZOMBIE
        assert all(mem.alive() for mem in pool.members)
        victim = pool.members[0].process
        os.kill(victim.pid, signal.SIGTERM)  # a worker waiting for its spec just ends
        victim.join(10)
        assert victim.exitcode == -signal.SIGTERM and pool.members[1].alive()
    assert server_pid not in {c.pid for c in psutil.Process().children()}


@pytest.mark.slow
def test_forkserver_and_spawn_give_the_same_shards(repos, tmp_path):
    hashes = {}
    with MirrorThread(repos) as m:
        for method in ("forkserver", "spawn"):
            out = tmp_path / method
            args = ["prepare", "-o", str(out), "--endpoint", m.endpoint, "--data-fraction", "0.5", "--processes", "2"]
            r = subprocess.run(
                cli(*args, "--no-progress", "--max-tokens-per-file", "100000"),
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, START_METHOD_ENV: method},
            )
            assert r.returncode == 0, r.stderr[-2000:]
            hashes[method] = shard_hashes(json.loads((out / "manifest.json").read_text()))
    assert hashes["forkserver"] == hashes["spawn"] and len(hashes["spawn"]) > 1


def _in_own_group(*args: str, ignore: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    """The CLI as a job scheduler or a terminal runs it: a process group of its own (a signal to
    the group reaches the fork server and the workers too), stderr kept; ``ignore``: signals it
    inherits as ignored (``nohup`` ignores SIGHUP)."""

    def ignored() -> None:
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)

    return subprocess.Popen(
        cli(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=ignored if ignore else None,
    )


@contextlib.contextmanager
def _fetch_in_flight(
    repos: object,
    out: Path,
    *,
    fraction: str = "1",
    trickle: float = 0.05,
    ignore: tuple[int, ...] = (),
    settle: float = 1.0,
) -> Iterator[tuple[subprocess.Popen[str], psutil.Process]]:
    """``fetch --processes 2`` from a mirror that trickles every body, in a process group of its
    own (``_in_own_group``): (the process, the coordinator) once both workers run and the folder's
    run.json exists, ``settle`` s later (files in flight). Killed, with its group, if it still runs."""
    from bolmo_async.mirror import FaultConfig

    faults = FaultConfig(rate=1.0, seed=0, kinds=("trickle",), trickle_delay=trickle, max_per_path=10**6)
    with MirrorThread(repos, faults=faults) as m:
        proc = _in_own_group(
            "fetch",
            "-o",
            str(out),
            "--endpoint",
            m.endpoint,
            "--data-fraction",
            fraction,
            "--processes",
            "2",
            ignore=ignore,
        )
        try:
            coordinator = psutil.Process(proc.pid)
            deadline = time.monotonic() + 60
            while len(worker_processes(coordinator)) < 2 or not (out / "run.json").exists():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            time.sleep(settle)
            yield proc, coordinator
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)  # (its pipes closed: no ResourceWarning in a later test)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_the_whole_process_group_exits_128_plus_it_and_leaves_nothing(repos, tmp_path, sig):
    """A scheduler's SIGTERM, or the SIGHUP of a closed terminal, reaches every process of the job
    (the fork server too): the run still stops as one, exits 128 + the signal (143, 129: the
    shell's convention) with the one line saying how to resume, and has ended its workers and the
    fork server and removed every temporary by then. (SIGTERM exited 130; SIGHUP killed every
    process where it stood, leaving staging temporaries.)"""
    out = tmp_path / "o"
    with _fetch_in_flight(repos, out) as (proc, coordinator):
        tree = [
            c
            for c in coordinator.children(recursive=True)
            if "resource_tracker import main" not in " ".join(c.cmdline())
        ]
        os.killpg(proc.pid, sig)
        _, err = finish(proc, 60)
        assert proc.returncode == 128 + sig, err
        assert "rerun the same command to resume" in err and "Traceback" not in err, err
        # The stop's line names the signal, and what it kept (counted: a stop at once kept none).
        assert re.search(
            rf"interrupted \({signal.Signals(sig).name}\)(: \d+ of the \d+ planned file\(s\) are staged and kept| before any of)",
            err,
        ), err
        left = [c for c in tree if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert left == [], "still running after the coordinator exited"
        temporaries = [p.name for p in [*out.iterdir(), *(out / "staging").iterdir()] if p.name.endswith(".tmp")]
        assert temporaries == []


def test_ctrl_c_while_the_fork_server_imports_still_stops_every_worker(monkeypatch):
    """Ctrl+C lands while the pool waits for its workers to start (the fork server importing): the
    stop that follows still waits for them, then ends them and the server. (A ``Thread.join``
    interrupted by Ctrl+C counts the thread ended on Python 3.11: the stop went on while workers
    were still being started, and waited forever for a server kept alive by one of them.)"""
    import threading

    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    pool = Pool(2)
    threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        pool._started()
        time.sleep(5)  # (the fork server was quicker than the timer)
    stopper = threading.Thread(target=pool.stop, daemon=True)
    stopper.start()
    stopper.join(60)
    assert not stopper.is_alive(), "the stop hung"
    assert all(mem.process.pid is not None and not mem.process.is_alive() for mem in pool.members)
    time.sleep(0.5)
    left = [
        c
        for c in me.children(recursive=True)
        if c.pid not in before and "resource_tracker import main" not in " ".join(c.cmdline())
    ]
    assert [c for c in left if c.status() != psutil.STATUS_ZOMBIE] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_ctrl_c_to_the_process_group_while_workers_import_prints_no_traceback(repos, tmp_path, monkeypatch, method):
    """A terminal's Ctrl+C reaches the fork server (or a spawned worker) too, and it is still
    importing the workers' modules (~0.8 CPU s) when prepare has just started: the run stops with
    its one line, not a KeyboardInterrupt traceback from that import."""
    monkeypatch.setenv(START_METHOD_ENV, method)
    marker = "spawn_main"
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        proc = _in_own_group(
            "prepare", "-o", str(out), "--endpoint", m.endpoint, "--data-fraction", "1", "--processes", "2"
        )
        try:
            coordinator = psutil.Process(proc.pid)
            deadline = time.monotonic() + 60
            server = None
            while server is None:
                assert time.monotonic() < deadline and proc.poll() is None
                for c in coordinator.children():
                    with contextlib.suppress(psutil.Error):
                        if (
                            is_fork_server(coordinator, c)
                            if method == "forkserver"
                            else marker in " ".join(c.cmdline())
                        ):
                            server = c
                time.sleep(0.005)
            time.sleep(0.05)  # in the middle of its imports
            os.killpg(proc.pid, signal.SIGINT)
            _, err = finish(proc, 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)  # (its pipes closed: no ResourceWarning in a later test)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


# A probe of how the fork server starts: spawned (``ensure_running`` with no server yet) or forked
# (the first ``os.fork`` of this process), and the modules this process had imported by then.
_WHEN_SERVER_STARTS = """
import json, os, sys
import multiprocessing.forkserver as fs
seen = {"spawned": [], "forked": []}
MODULES = ("aiohttp", "numpy", "pyarrow", "bolmo_async.filetask", "typer", "bolmo_async.cli", "bolmo_async.api")
real = fs.ForkServer.ensure_running
def probe(self):
    if self._forkserver_pid is None and not seen["spawned"]:
        seen["spawned"].append(sorted(m for m in MODULES if m in sys.modules))
    return real(self)
fs.ForkServer.ensure_running = probe
fs.ensure_running = fs._forkserver.ensure_running
real_fork = os.fork
def fork():
    if not seen["forked"]:
        seen["forked"].append(sorted(m for m in MODULES if m in sys.modules))
    return real_fork()
os.fork = fork
import atexit
atexit.register(lambda: print(json.dumps(seen)))
sys.argv = ["bolmo-async", *sys.argv[1:]]
from bolmo_async.entry import main  # the command's entry point (bolmo-async, python -m bolmo_async)
main()
"""


@pytest.mark.parametrize("processes", [["--processes", "2"], []])
def test_the_fork_server_is_forked_from_the_command_once_it_has_the_workers_modules(
    repos, tmp_path, monkeypatch, processes
):
    """``--processes 2``, or none given (one per core): the fork server is forked from the command's
    process once that has imported the workers' modules (which it needs too), before typer, the CLI
    module and the API: a server spawned as a new interpreter imported them all again (0.5 s of
    CPU), which a run with ``--processes 0`` waited for after its listing, and a subword run's
    build of the reference engine waited behind."""
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    if len(os.sched_getaffinity(0)) < 2 and not processes:
        pytest.skip("one core: --processes 0 starts no worker process")
    with MirrorThread(repos) as m:
        args = ["prepare", "-o", str(tmp_path / "o"), "--endpoint", m.endpoint, "--data-fraction", "0.2"]
        r = subprocess.run(
            [sys.executable, "-c", _WHEN_SERVER_STARTS, *args, *processes, "--no-progress"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen == {"spawned": [], "forked": [["aiohttp", "bolmo_async.filetask", "numpy", "pyarrow"]]}, seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_CHILD_SUBREAPER)")
def test_a_fork_server_started_early_that_no_pool_took_is_stopped_and_reaped_at_exit(tmp_path):
    """The command failed before it made its pool (here: an output folder it cannot create): the
    server it started early is stopped and reaped by the exit, not left to end on its own. The
    run is made from a subreaper, which an orphan would be handed to."""
    code = (
        "import ctypes, json, os, subprocess, sys, time\n"
        "assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0\n"  # PR_SET_CHILD_SUBREAPER
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "time.sleep(1.0)\n"  # an orphaned server ends once its pipe reads EOF: handed to this process
        "orphans = []\n"
        "while True:\n"
        "    try:\n"
        "        pid, _ = os.waitpid(-1, os.WNOHANG)\n"
        "    except ChildProcessError:\n"
        "        break\n"
        "    if not pid:\n"
        "        break\n"
        "    orphans.append(pid)\n"
        "print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr, 'orphans': orphans}))\n"
    )
    child = (
        "import multiprocessing.forkserver as fs, sys\n"
        "from bolmo_async.executors.local import start_fork_server\n"
        "start_fork_server()\n"
        "print(fs._forkserver._forkserver_pid, flush=True)\n"
        "sys.exit(2)\n"  # as the CLI ends after an error: exit handlers run
    )
    r = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-c", child], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["rc"] == 2, got["err"]
    server = int(got["out"].split()[0])
    assert server not in got["orphans"], got


def test_a_pool_stopped_before_its_workers_have_their_spec_ends_them_without_the_kill(monkeypatch):
    """A run that fails or is stopped right after its workers are forked (a 404 at the listing,
    Ctrl+C): a worker forked a moment ago still ignores SIGTERM (inherited from the fork server
    until it sets its own), so the stop's SIGTERM was lost and each worker waited on its inbox for
    the whole grace, then was killed (3-4 s of every such run). The stop tells it by its inbox too."""
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    pool = Pool(2)
    pool._started()
    pool.stop()
    codes = [mem.process.exitcode for mem in pool.members]
    assert all(code is not None and code != -signal.SIGKILL for code in codes), codes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_sighup_ignored_as_nohup_does_is_left_ignored(repos, tmp_path):
    """``nohup bolmo-async ...``: the run inherits SIGHUP ignored and must keep it so (its
    workers and fork server too): the terminal closing does not stop it."""
    out = tmp_path / "o"
    with _fetch_in_flight(repos, out, fraction="0.3", trickle=0.02, ignore=(signal.SIGHUP,), settle=0) as (proc, _):
        for _ in range(3):
            time.sleep(0.3)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGHUP)
        _, err = finish(proc, 120)
    assert proc.returncode == 0, err
    assert "Share" not in err and "interrupted" not in err.lower()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_sigterm_while_the_command_starts_its_workers_says_so_and_exits_143(repos, tmp_path):
    """SIGTERM while ``--processes 2`` starts its fork server and imports the API (before the run's
    own handling: 0.35-0.5 s after start here) exited 130 without a word (Typer's own handling of
    a KeyboardInterrupt). The entry point starts the server before the CLI loads, so the signal
    may also land while it loads: then the start-up line ("interrupted (SIGTERM)"), same code."""
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        proc = _in_own_group(
            "prepare", "-o", str(out), "--endpoint", m.endpoint, "--data-fraction", "1", "--processes", "2"
        )
        try:
            coordinator = psutil.Process(proc.pid)
            deadline = time.monotonic() + 60
            while not coordinator.children():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.002)
            proc.send_signal(signal.SIGTERM)
            _, err = finish(proc, 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)  # (its pipes closed: no ResourceWarning in a later test)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err, err


def test_a_fatal_error_is_seen_while_a_hand_out_waits_for_its_resolve(repos, tmp_path):
    """The coordinator waits up to ``ResolveAhead.WAIT`` (10 s) for a file's resolve before it
    hands the file out. It waited blocked: a worker's fatal error (here a --text-field the data
    does not have), a worker's death or progress went unread meanwhile, and the run failed 10 s
    late. Every resolve but the first file's is held up by a 429 (Retry-After 30 s)."""
    from bolmo_async.errors import UsageError
    from bolmo_async.mirror import FaultConfig

    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=1, text_field="body")
        first = plan.files[0].path
        assert plan.files[0].sha256 and len(plan.files) > 4, "LFS files: resolved ahead"
        others = tuple(pf.path for pf in plan.files[1:])
        m.faults = FaultConfig(rate=1.0, seed=0, kinds=("http429",), retry_after=30.0, max_per_path=1, only=others)
        started = time.monotonic()
        with pytest.raises(UsageError, match="--text-field 'body'") as info:
            bolmo_async.fetch(out, endpoint=m.endpoint, processes=2, concurrency=2, connections=2, progress=False)
        took = time.monotonic() - started
    assert first in str(info.value) or "has no such field" in str(info.value)
    assert took < 6.0, f"the fatal error was seen {took:.1f} s after the run started"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_a_second_signal_does_not_cut_the_stop_short(repos, tmp_path):
    """SIGTERM, then the SIGHUP of the terminal closing (or a second Ctrl+C) while the first stop
    still waits for its workers: the second is only noted. It was a KeyboardInterrupt inside the
    stop's own clean-up (the workers' join, the temporaries' removal)."""
    out = tmp_path / "o"
    with _fetch_in_flight(repos, out) as (proc, coordinator):
        workers = worker_processes(coordinator)
        for w in workers:
            w.suspend()  # slow to stop: the stop waits for them (its grace)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        for w in workers:
            w.resume()
        _, err = finish(proc, 60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE] == []
    assert [p.name for p in [*out.iterdir(), *(out / "staging").iterdir()] if p.name.endswith(".tmp")] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_a_killed_fork_server_is_named_and_its_live_workers_are_stopped_before_their_temporaries_go(repos, tmp_path):
    """kill -9 of the fork server closes every worker's status pipe, which multiprocessing reads
    as exit code 255: the run blamed the workers ("exited with code 255") and removed their
    temporaries while they still ran. It names the server's death and stops the workers first."""
    out = tmp_path / "o"
    with _fetch_in_flight(repos, out) as (proc, coordinator):
        workers = worker_processes(coordinator)
        server = next(p for p in coordinator.children() if is_fork_server(coordinator, p) and p not in workers)
        server.kill()
        _, err = finish(proc, 60)
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    assert f"the fork server (pid {server.pid}) was killed by SIGKILL" in err, err
    assert "exited with code 255" not in err, err
    assert [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE] == []
    assert [p.name for p in [*out.iterdir(), *(out / "staging").iterdir()] if p.name.endswith(".tmp")] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_fetch_stopped_while_it_lists_names_the_signal_and_claims_nothing_staged(repos, tmp_path, sig):
    """A stop during the repository's listing said "Interrupted. Finished files are staged" (none
    existed) and never named SIGTERM or SIGHUP: the line says what was stopped, by what, and that
    this run staged nothing; and it is the only line (a warning before it said "finished files are
    kept")."""
    from bolmo_async.mirror import WanConfig

    out = tmp_path / "o"
    with MirrorThread(repos, wan=WanConfig(rtt=1.0)) as m:
        proc = subprocess.Popen(
            cli("fetch", "-o", str(out), "--endpoint", m.endpoint, "--data-fraction", "0.1", "--no-progress"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            port = int(m.endpoint.rsplit(":", 1)[1])
            listing = psutil.Process(proc.pid)
            deadline = time.monotonic() + 60
            # Connected to the mirror: the listing's first request waits its round trip (1 s).
            while not any(c.raddr and c.raddr.port == port for c in listing.net_connections("tcp")):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.005)
            proc.send_signal(sig)
            _, err = finish(proc, 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)  # (its pipes closed: no ResourceWarning in a later test)
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"interrupted ({name}) while listing the repository, before this run wrote anything" in err, err
    assert "Finished files are staged" not in err and "Traceback" not in err, err
    # One line: no warning before it that claims kept files ("finished files are kept": none are).
    assert [line for line in err.splitlines() if "INFO" not in line] == [
        f"error: interrupted ({name}) while listing the repository, before this run wrote anything; rerun the"
        " same command"
    ], err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_sigterm_to_one_worker_is_named_as_what_stopped_it(repos, tmp_path):
    """``kill PID`` of one worker process: it stops cleanly (its files fail, a rerun fetches them),
    and its files' reason said only "stopped", not by what."""
    out = tmp_path / "o"
    with _fetch_in_flight(repos, out, settle=0.3) as (proc, coordinator):
        worker = worker_processes(coordinator)[0]
        worker.send_signal(signal.SIGTERM)
        _, err = finish(proc, 60)
    assert proc.returncode == 1, err
    assert f"(pid {worker.pid}) was stopped by SIGTERM; rerun to fetch it again" in err, err


def test_a_stop_before_the_fetch_holds_prepares_early_workers_still_ends_them(repos, tmp_path, monkeypatch):
    """``prepare`` starts its worker processes before it plans; ``_fetch`` ends them once it holds
    them. A stop in between (within milliseconds of plan.json) left them to the interpreter's
    exit, which unlinks their queues' semaphores first: a worker still being forked printed
    "FileNotFoundError ... SemLock._rebuild". A real SIGINT, sent as ``_fetch`` is entered."""
    from bolmo_async import api

    monkeypatch.delenv(START_METHOD_ENV, raising=False)

    def at_fetch(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is api._fetch.__code__:
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with MirrorThread(repos) as m, pytest.raises(KeyboardInterrupt):
            sys.setprofile(at_fetch)
            try:
                bolmo_async.prepare(tmp_path / "o", endpoint=m.endpoint, data_fraction=0.3, processes=2, progress=False)
            finally:
                sys.setprofile(None)
    finally:
        signal.signal(signal.SIGINT, old)
    assert (tmp_path / "o" / "plan.json").exists()
    me = psutil.Process()
    until = time.monotonic() + 3.0  # (left alone, they would be up within the fork server's imports)
    while time.monotonic() < until:
        left = [w for w in worker_processes(me) if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        assert left == [], "workers left running, to be ended by the interpreter's exit"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_a_stop_just_after_plan_json_with_workers_being_forked_prints_no_traceback(repos, tmp_path):
    """SIGHUP to the job a few ms after plan.json appears (the workers still being forked): 5 of
    20 such runs printed a worker's "FileNotFoundError ... SemLock._rebuild" traceback."""
    with MirrorThread(repos) as m:
        for i in range(12):
            out = tmp_path / f"o{i}"
            proc = _in_own_group(
                "prepare", "-o", str(out), "--endpoint", m.endpoint, "--data-fraction", "1", "--processes", "2"
            )
            try:
                while not (out / "plan.json").exists() and proc.poll() is None:
                    time.sleep(0.0005)
                time.sleep(0.002)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGHUP)
                _, err = finish(proc, 60)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            assert "Traceback" not in err and "Error" not in err, (i, err)
            assert [p.name for p in out.rglob("*.tmp")] == [], i


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_a_killed_resource_tracker_costs_the_run_nothing(repos, tmp_path):
    """kill -9 of multiprocessing's resource tracker: nothing of the run is in its care (no
    semaphore: the workers talk over pipes), so the run completes, exit 0, no traceback, no
    "relaunching" warning, and no semaphore was ever made (it once held the queues', and stopped
    the run when it died)."""
    out = tmp_path / "o"

    def maps(p: psutil.Process) -> list[str]:
        with contextlib.suppress(psutil.Error):  # (one that ended meanwhile)
            return [m.path for m in p.memory_maps()]
        return []

    def tracker(coordinator: psutil.Process) -> list[psutil.Process]:
        found = []
        for p in coordinator.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "resource_tracker import main" in " ".join(p.cmdline()):
                    found.append(p)
        return found

    with _fetch_in_flight(repos, out, settle=0.3) as (proc, coordinator):
        run = [coordinator, *coordinator.children(recursive=True)]
        semaphores = [path for p in run for path in maps(p) if "/sem." in path]  # (sem_open maps it)
        deadline = time.monotonic() + 10
        while not (found := tracker(coordinator)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(found) == 1, found
        found[0].kill()
        _, err = finish(proc, 120)
    assert semaphores == []
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "relaunching" not in err and "resource" not in err, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_a_coordinator_killed_with_kill_9_leaves_no_stdlib_warning(repos, tmp_path):
    """kill -9 of the coordinator: its workers end with it, and the resource tracker removes the
    semaphores it leaves, as it should, but said so in a stdlib warning on the terminal ("There
    appear to be 9 leaked semaphore objects to clean up at shutdown")."""
    out = tmp_path / "o"
    with _fetch_in_flight(repos, out, settle=0.3) as (proc, coordinator):
        coordinator.kill()
        _, err = finish(proc, 60)  # (until every process of the run has let go of stderr)
    assert proc.returncode == -signal.SIGKILL
    assert "leaked" not in err and "Traceback" not in err and "Warning" not in err, err


_INTERRUPTED_IN_POOL = """
import multiprocessing, sys, threading, time
from bolmo_async.executors.forkserver import start_fork_server
from bolmo_async.executors.local import Pool

def on_call(frame, event, arg):  # a stop signal as it lands: raised at one exact point
    if frame.f_code is threading.Thread.start.__code__ and frame.f_back.f_code is Pool.__init__.__code__:
        return on_return
    return None

def on_return(frame, event, arg):
    if event == "return":
        sys.settrace(None)
        raise KeyboardInterrupt
    return on_return

start_fork_server(None, 2, fork=True)  # as the command line does: the server is ready at once
sys.settrace(on_call)
try:
    Pool(2)
except KeyboardInterrupt:
    time.sleep(2.0)  # what the starting thread would have started by now
    print("alive:", [p.name for p in multiprocessing.active_children()], flush=True)
"""


def test_a_stop_while_the_pool_starts_its_thread_stops_the_workers_it_starts(monkeypatch):
    """A stop signal that lands while ``Pool()`` starts the thread that starts its workers
    (``Thread.start`` waits for it to run: --processes 2, SIGTERM 0.7 s in, 1 run in 10-20): the
    pool never reached its caller, so nothing stopped it, and the thread started its workers
    anyway; the command exited under them, its queues' semaphores removed while a worker still
    unpickled them, and the fork server's child printed a FileNotFoundError traceback. The pool
    stops them itself before the stop goes on."""
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_IN_POOL], capture_output=True, text=True, timeout=120)
    assert "alive: []" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 0, r.stderr[-2000:]


def _say(conn: Any, text: str) -> None:
    """A worker process's outbox, as ``worker.process_main`` makes it: one message, then wait."""
    from bolmo_async import messages as m

    out = m.Outbox(conn)
    out.put(m.Log(0, 20, text))
    time.sleep(60)  # (killed by the test)


def test_a_worker_killed_in_the_middle_of_a_message_holds_up_no_other_worker():
    """kill -9 (or the OOM killer) of a worker process while it sends a message larger than its pipe
    holds: another worker's messages still come and the cut message reads as that worker's end.
    (One queue shared by every worker hung them all: the killed worker held its write lock
    forever; seen as a run that never ended after a worker was killed.)"""
    import multiprocessing
    import queue
    import threading

    from bolmo_async import messages as m

    ctx = multiprocessing.get_context("spawn")
    ends = [ctx.Pipe(duplex=False) for _ in range(2)]
    replies = m.Replies([r for r, _ in ends])
    big = ctx.Process(target=_say, args=(ends[0][1], "x" * 4_000_000), daemon=True)
    big.start()
    ends[0][1].close()
    deadline = time.monotonic() + 30
    while not ends[0][0].poll(0.05):  # its first bytes are out: it waits in the middle of the message
        assert time.monotonic() < deadline
    os.kill(big.pid, signal.SIGKILL)
    big.join(10)
    small = ctx.Process(target=_say, args=(ends[1][1], "still heard"), daemon=True)
    small.start()
    ends[1][1].close()
    got: list[Any] = []

    def read() -> None:  # on a thread: a reader stuck on the cut message fails the test, not hangs it
        while time.monotonic() < deadline and not got:
            with contextlib.suppress(queue.Empty):
                got.append(replies.get(0.5))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(40)
    small.kill()
    small.join(10)
    assert not reader.is_alive(), "the coordinator's read hung on the killed worker's cut message"
    assert [g.message for g in got] == ["still heard"]
    with pytest.raises(queue.Empty):
        replies.get(0.1)  # and the killed worker's pipe is no longer read
    replies.close()


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_killed_workers_pipe_reads_as_ended_at_once(monkeypatch, method):
    """Only the worker holds the write end of its pipe (not the coordinator, the fork server or
    another worker): once killed, its pipe reads as ended, so that a message it was cut in the
    middle of can never keep the coordinator waiting for the rest."""
    monkeypatch.setenv(START_METHOD_ENV, method)
    with Pool(2) as pool:
        pool._started()
        first, second = pool.members
        os.kill(first.process.pid, signal.SIGKILL)
        assert first.replies.poll(10), "the killed worker's pipe is still held open by another process"
        with pytest.raises(EOFError):
            first.replies.recv()
        assert not second.replies.poll(0.2) and second.process.is_alive()


def test_runs_of_worker_processes_one_after_another_leave_no_pipe_or_thread_behind(repos, tmp_path):
    """The API called again and again in one process (a notebook, a driver script): each pool's
    pipes (two per worker) and their threads end with it."""
    import threading

    def threads() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith(("bolmo", "QueueFeeder"))}

    with MirrorThread(repos) as m:
        seen = []
        for i in range(3):
            bolmo_async.prepare(tmp_path / f"o{i}", endpoint=m.endpoint, data_fraction=0.3, processes=2, progress=False)
            deadline = time.monotonic() + 5
            while threads() and time.monotonic() < deadline:  # (daemon threads let go of their pipes)
                time.sleep(0.02)
            seen.append((psutil.Process().num_fds(), threads()))
    assert seen[1] == seen[2] == (seen[0][0], set()), seen


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_killed_workers_whole_download_of_a_file_it_held_goes_when_its_loss_is_seen(
    repos, tmp_path, monkeypatch, method
):
    """A worker killed -9 after a streaming run's parquet was downloaded whole and before it was
    decoded left ``raw/KEY/.KEY.whole`` (named after the file, not the worker: its pid finds it
    not) until a rerun cleaned that file's scratch (attack runs: 1 of 50). The loss of the
    worker, as the run sees it, removes it with the rest, the file's claim taken first; a file
    whose claim another process holds (a ``--worker`` share took it meanwhile) keeps its own."""
    from bolmo_async.executors.base import RunResult
    from bolmo_async.outdir import open_output
    from bolmo_async.planner import load_plan
    from bolmo_async.tokenize import TokenizerSpec

    from .helpers import worker_spec

    monkeypatch.setenv(START_METHOD_ENV, method)
    out = tmp_path / "o"
    with MirrorThread(repos) as mirror:
        bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=1)
        folder = open_output(out)
        plan = load_plan(folder)
        assert plan is not None
        mine, theirs = [u for u, f in enumerate(plan.files) if f.path.endswith(".parquet")][:2]
        wholes = []
        for u in (mine, theirs):
            key = plan.files[u].key
            whole = folder.download_path(key, plan.files[u].path, keep=False)
            whole.parent.mkdir(parents=True, exist_ok=True)
            whole.write_bytes(b"a parquet downloaded whole, not decoded yet")
            wholes.append(whole)
        with Pool(2) as pool, folder.claim(plan.files[theirs].key) as held_elsewhere:
            assert held_elsewhere
            pool.start(worker_spec(out, plan, mirror.endpoint, TokenizerSpec("byte"), 1))
            pool._started()
            dead = pool.members[0]
            os.kill(dead.process.pid, signal.SIGKILL)
            dead.process.join(10)
            dead.tasks |= {("file", mine), ("file", theirs)}
            result = RunResult()
            assert pool._lost(dead, result, None) == 2
    assert not wholes[0].exists()
    assert wholes[1].exists()
    assert "was killed by SIGKILL" in result.failed[plan.files[mine].path]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="waitid")
def test_a_killed_fork_server_does_not_say_the_other_workers_go_on(repos, tmp_path, monkeypatch, caplog):
    """kill -9 of the fork server while a ready worker held no file: the run warned "...worker
    process 1, which it had started, is stopped holding no file: the other workers go on", then
    failed the other worker's files with the same server's death: every worker it forked ends with
    it, none goes on. And asked at once, as here, the server's death was not visible yet (its
    status pipe closes a moment before it can be waited for): "worker process 1 exited with code
    255", the worker not stopped before its temporaries went (6 of 8 runs of this test)."""
    import logging
    import queue
    from multiprocessing import forkserver

    from bolmo_async import messages as m
    from bolmo_async.executors.base import RunResult
    from bolmo_async.outdir import open_output
    from bolmo_async.planner import load_plan
    from bolmo_async.tokenize import TokenizerSpec

    from .helpers import worker_spec

    monkeypatch.setenv(START_METHOD_ENV, "forkserver")
    out = tmp_path / "o"
    with MirrorThread(repos) as mirror:
        bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=1)
        plan = load_plan(open_output(out))
        assert plan is not None
        with Pool(2) as pool:
            pool.start(worker_spec(out, plan, mirror.endpoint, TokenizerSpec("byte"), 1))
            pool._started()
            ready: set[int] = set()
            deadline = time.monotonic() + 60
            while len(ready) < 2 and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    msg = pool.outbox.get(0.5)
                    if isinstance(msg, m.Ready):
                        ready.add(msg.wid)
                        pool.members[msg.wid].ready = True
            assert len(ready) == 2
            os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
            for mem in pool.members:
                mem.process.join(10)  # (its status pipe closed: read as code 255)
            with caplog.at_level(logging.WARNING, logger="bolmo_async"):
                assert pool._lost(pool.members[1], RunResult(), None) == 0
    said = [r.getMessage() for r in caplog.records if "holding no file" in r.getMessage()]
    assert len(said) == 1 and "fork server (pid" in said[0], caplog.text
    assert "go on" not in said[0], said[0]
