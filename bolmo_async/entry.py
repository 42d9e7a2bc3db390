"""The ``bolmo-async`` command's entry point: starts the worker processes' fork server, when the
command line asks for worker processes, before anything else loads, then runs the CLI (``cli``).

typer and the CLI module take 0.1-0.15 s to load; the fork server's imports (0.5 s of CPU), and
in subword mode its build of the tokenizer's reference engine (0.3 s), are the longest thing a
small ``--processes 2`` run waits for, so they start first, on the other core. Only a reading of
the arguments that cannot be wrong in a harmful way: ``prepare`` or ``fetch`` with ``--processes
N`` (N > 1) and an output folder that is no location (``s3://``...), as ``cli._start_workers_early``
decides; a server started for arguments typer then refuses is stopped at exit, and the command
itself starts it as before when this reading found nothing (an option's value that looks like a
flag, say).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

#: The signals that stop a command: Ctrl+C, SIGTERM (``kill``, job schedulers), SIGHUP (its
#: terminal was closed). One this process inherited as ignored (``nohup``) stays ignored.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def interrupted_at_start(signum: int, frame: Any) -> None:
    """A stop while the command loads: one line, exit 128 + the signal (no traceback from inside
    a library's import)."""
    os.write(
        2, b"interrupted\n" if signum == signal.SIGINT else f"interrupted ({signal.Signals(signum).name})\n".encode()
    )
    os._exit(128 + signum)


def stoppable() -> list[signal.Signals]:
    """The stop signals whose handling is the command's to set: not ignored (``nohup``), not a
    library user's own handler (the command line imported into another program)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    ours = (signal.default_int_handler, signal.SIG_DFL, interrupted_at_start)
    return [s for s in STOP_SIGNALS if signal.getsignal(s) in ours]


#: Options of ``prepare``/``fetch`` that take a value, as this reading needs them.
_VALUED = ("--processes", "--tokenizer-processes", "--output-dir", "-o", "--tokenizer", "--tokenizer-identifier")
#: Options before the command that take a value (``cli._main``).
_GLOBAL_VALUED = ("--scratch-dir",)


def early_workers(argv: list[str]) -> tuple[int, str, str, str | None] | None:
    """(processes, output folder, tokenizer, identifier or None: the default) when ``argv`` is a
    ``prepare`` or ``fetch`` command with ``--processes`` and ``--output-dir`` given, else None."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # global options (``-v``, ``--scratch-dir DIR``)
        i += 2 if argv[i] in _GLOBAL_VALUED else 1
    if i >= len(argv) or argv[i] not in ("prepare", "fetch"):
        return None
    found: dict[str, str] = {}
    args = iter(argv[i + 1 :])
    for arg in args:
        if arg == "--":
            break
        if arg in ("--ray", "--help", "-h"):  # no worker process to start
            return None
        name, eq, value = arg.partition("=")
        if name in _VALUED and name.startswith("--") and eq:
            found[name] = value
        elif arg in _VALUED:
            found[arg] = next(args, "")
    processes = found.get("--processes", found.get("--tokenizer-processes", "0"))  # 0: one per core
    output_dir = found.get("--output-dir", found.get("-o", ""))
    if not processes.isdigit() or not output_dir:
        return None
    return int(processes), output_dir, found.get("--tokenizer", "byte"), found.get("--tokenizer-identifier")


def start_workers_early(processes: int, output_dir: str, tokenizer: str, identifier: str | None) -> None:
    """``--processes N`` (N > 1), or 0 (one per core, their number known once the repo is
    listed) on a machine of more than one core: the fork server the workers are forked from
    starts now, forked from this process once it has imported what a worker needs (which it
    needs too: ``forkserver._ForkServer._fork_here``), before it starts any thread. A spawned
    server imported it all again (0.5 CPU s), which a run with ``--processes 0`` waited for
    after the listing. Unused (one worker on a thread: a small plan), it is only a fork that is
    stopped at exit. Not for a location (``s3://``...): opening one sets the scratch folder its
    workers share in the environment, which they inherit from the server (``outdir.store``), so
    the pool starts it after that. With ``--processes N``, in subword mode, the server also builds
    the reference engine for its workers, from the tokenizer's JSON as this machine knows it
    (``tokcache.json_to_prebuild``): each would build its own. Once per process (a second call
    finds it started)."""
    if processes == 1 or "://" in output_dir:
        return
    from .executors.forkserver import start_fork_server, usable_cores

    if processes == 0 and usable_cores() < 2:
        return
    from .util import prefer_system_allocator

    prefer_system_allocator()  # before pyarrow loads: the server and its workers inherit it
    known = None
    if tokenizer == "subword" and processes > 1:
        from .models import DEFAULT_TOKENIZER_ID
        from .tokcache import json_to_prebuild

        known = json_to_prebuild(identifier or DEFAULT_TOKENIZER_ID)
    start_fork_server(str(known) if known is not None else None, processes, fork=True)


def main() -> None:
    for sig in stoppable():  # until the CLI has loaded and set its own (``cli``)
        signal.signal(sig, interrupted_at_start)
    # The command's own process is no library user's: one thread for the numeric libraries here
    # too, before numpy loads (the coordinator's numpy only lays out shards; OpenBLAS started a
    # thread per other core that spun, 0.08-0.13 CPU s of a run). The user's setting wins.
    # (Before the workers' start: it imports numpy, for the fork server it forks.)
    from .worker import limit_library_threads

    limit_library_threads()
    early = early_workers(sys.argv[1:])
    if early is not None:
        start_workers_early(*early)
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
