"""What a local worker process is made of, imported once by the fork server its workers are
forked from (``executors.local``), never by the coordinator.

Importing it: one thread for numeric libraries unless the user set their count (before numpy
loads, ``worker.limit_library_threads``), SIGTERM and SIGHUP ignored (the fork server then lives exactly as
long as its coordinator wants: a ``kill`` of the whole process group stops the coordinator and
its workers, which it waits for, while the server that reports their exits stays; it ends when
the coordinator closes its pipe or dies), then every module a worker's tasks need. A worker
forked from the server starts with all of it in place: the 0.8 CPU s of imports are paid once per
pool, not once per worker. So is the subword reference engine, when the command line named the
tokenizer JSON to build it from (``tokenize.prebuild_reference``).
"""

from __future__ import annotations

import signal

from .worker import import_task_modules, limit_library_threads

limit_library_threads()
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a forked worker takes SIGTERM back first thing
if hasattr(signal, "SIGHUP"):  # a closed terminal's: the coordinator stops the run (and then it)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
import_task_modules()

from .tokenize import prebuild_reference  # noqa: E402  (numpy loads after the setting above)

prebuild_reference()  # the tokenizer the command line named, if any
