"""The run-wide outage rule: a Hub (or CDN) that is down ends the run, not each file in turn.

Each file has its own retry budget (``--retries``, about 25 s of backoff with the defaults), so a
server that answers every request with a 503 (or refuses every connection, or never answers)
failed the files one after the other, ``concurrency`` at a time: measured, an 18-file plan took
67 s, 277 resolves and 244 retry lines; a 5,000-file plan would retry for hours and then list
every file as failed.

The rule: when ``STREAK`` files in a row spent their whole retry budget on the same host and the
same cause (``retry.outage_cause``: a 5xx or 408, a refused or reset connection, no answer) and
no file was staged meanwhile, the coordinator hands out no new file. The files in flight end as
they do (one that is staged lifts the stop: the server is back); then the run ends with one line
naming the host, the cause and how long it tried, the files never handed out are "not started",
and what was staged is kept for the rerun. One broken file among good ones, a rate limit (429,
waited out as the server asks) and a server that recovers within a file's retry budget never
stop a run; a rate limit that asks a file to wait longer than a file waits in all is a cause
(``retry.RATE_LIMITED``): each of a large plan's files would meet it in turn.

Between a file's failure and the rule's verdict, the hold (``holds``): no new file is handed out
while the files in flight say nothing yet, so a down server costs one wave of files, not two. Any
byte those files receive (``answered``) or one of them staged ends the hold at once: a lone broken
file among files that are transferring keeps the run at full width (before, its slot idled until
another file was staged: measured, 2 files wide at 100 kB/s per response, the next file came
2.1 s into the run, when the 206 kB file beside it was staged; now at 0.8 s). Bytes are counted
as a file's worker reports them (``worker.PROGRESS_EVERY``); a download kept in raw/ read again
counts too (it says nothing of the server: at worst one file more is handed out meanwhile).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .retry import RATE_LIMITED

#: Files in a row that must fail for the same host and cause, none staged meanwhile.
STREAK = 3


class OutageWatch:
    """What the coordinator tells it: each file staged (``staged``) or failed (``failed``, with
    the error's ``outage``). ``down`` once the rule holds, until a file is staged."""

    def __init__(self, streak: int = STREAK, clock: Callable[[], float] = time.monotonic):
        self._streak = max(1, streak)
        self._clock = clock
        self._since = clock()  # the run's start, or when a file was last staged
        self._key: tuple[str, str] | None = None
        self._run = 0  # files in a row failed for ``_key``
        self._tried = 0  # files failed for ``_key`` since the last one staged
        self._held = False  # a file gave up on an outage cause; nothing received since
        self.down: tuple[str, str] | None = None

    def staged(self) -> None:
        self._since = self._clock()
        self._key, self._run, self._tried, self.down = None, 0, 0, None
        self._held = False

    def answered(self) -> None:
        """The files in flight received bytes: the servers answer, so the hold ends (the count of
        files in a row does not: only a file staged resets it)."""
        self._held = False

    def failed(self, outage: tuple[str, str] | None) -> bool:
        """Count one failed file; True when the run is to hand out no more files."""
        if outage is None or (outage[0], outage[1]) != self._key:
            self._key = (outage[0], outage[1]) if outage is not None else None
            self._run = self._tried = 0
            self._held = False
        if self._key is not None:
            self._run += 1
            self._tried += 1
            self._held = True
            if self._run >= self._streak:
                self.down = self._key
        return self.down is not None

    def holds(self, in_flight: int) -> bool:
        """Whether the next file is to wait: the run is down, or a file just gave up on a
        server's outage cause and the others in flight have received nothing since (they tell
        whether the server is down or that file alone: a byte received or a file staged lifts the
        hold, STREAK failed make it a stop). Without the hold, each failure handed out a new file
        that then spent a whole retry budget too; lifted only by a file staged, a lone broken
        file idled its slot until another file was done."""
        return self.down is not None or (self._held and in_flight > 0)

    def says(self, not_started: int) -> str:
        """The run's one line, once ``down``."""
        assert self.down is not None
        host, cause = self.down
        took = self._clock() - self._since
        limited = cause == RATE_LIMITED  # (it answers: 429, and asks to wait longer than a file waits)
        return (
            f"every request to {host} failed ({cause}) for {took:.0f} s: {self._tried} file(s) in a row gave up "
            f"{'waiting' if limited else 'after their retries'} and none was fetched meanwhile, so the run stopped "
            f"there with {not_started} file(s) not started. What was staged is kept: rerun the same command to "
            f"resume once {f'the rate limit of {host} lifts' if limited else f'{host} answers'}."
        )


__all__ = ["STREAK", "OutageWatch"]
