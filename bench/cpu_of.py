"""Run the bolmo-async CLI in this process and write its CPU split to a file.

    python bench/cpu_of.py OUT.json prepare --output-dir ...

``coordinator`` is this process's own CPU time (user + system), ``workers`` the CPU time of
its finished children, both from getrusage. Its children are the worker processes (spawned) or the
fork server the workers are forked from, with the workers it reaped: the pool stops and reaps
that server when it closes, so its imports and every worker's CPU time count here.
"""

from __future__ import annotations

import atexit
import json
import resource
import sys


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    sys.argv = ["bolmo-async", *args]
    from bolmo_async.entry import main as cli_main

    def write() -> None:  # at exit: the CLI ends with os._exit after running the exit handlers
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(out, "w") as f:
            json.dump(
                {
                    "coordinator": me.ru_utime + me.ru_stime,
                    "workers": kids.ru_utime + kids.ru_stime,
                    "coordinator_sys": me.ru_stime,
                    "workers_sys": kids.ru_stime,
                },
                f,
            )

    atexit.register(write)
    cli_main()


if __name__ == "__main__":
    main()
