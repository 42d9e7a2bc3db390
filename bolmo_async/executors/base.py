"""What every executor offers: run these planned files, write these shards, report results.

Three siblings implement it: ``local.Pool`` (worker processes on this machine, or one worker on
a thread), ``share.Share`` (``--worker I/N``: one balanced share of the plan, on a local pool)
and ``ray.RayExecutor`` (Ray tasks, each running the same worker in-process). All of them run
``worker.Worker``, so staging, resume and determinism are the same whoever runs a file.
``executors.choose`` is the one place that picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..models import Plan
from ..progress import Progress
from ..worker import WorkerSpec

#: Shard writes ``(k, pieces)`` ready to hand out.
ShardCallback = Callable[[], list[tuple[int, Any]]]
#: A file staged: ``(unit, tokens per document of each staged batch)`` -> shard writes to hand out.
StagedCallback = Callable[[int, list[Any]], list[tuple[int, Any]]]
#: A file handed out: ``unit`` -> where its documents start in the shards (``messages.LayoutAt``),
#: or None when files before it are not laid out yet.
LayoutCallback = Callable[[int], Any]
#: The shard being filled and its pieces so far (``finalizer.ShardPlanner.open_shard``), or None.
OpenShardCallback = Callable[[], tuple[int, list[Any]] | None]


@dataclass
class RunResult:
    """What the workers reported back."""

    staged: dict[int, dict[str, Any]] = field(default_factory=dict)  # unit -> completion record
    fetched_now: int = 0  # staged from a transfer
    from_raw: int = 0  # staged from their downloads kept in raw/ (a --no-streaming rerun)
    resumed: set[int] = field(default_factory=set)  # of ``staged``, the units staged before this run
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)  # shard index -> record
    engines: set[str] = field(default_factory=set)
    permanent: set[str] = field(default_factory=set)  # failed paths a rerun fails again (unreadable files)
    outage: str | None = None  # the one line of a run stopped by ``outage.OutageWatch`` (a server down)

    def merge(self, other: RunResult) -> None:
        self.staged.update(other.staged)
        self.fetched_now += other.fetched_now
        self.from_raw += other.from_raw
        self.resumed |= other.resumed
        self.failed.update(other.failed)
        self.shards.update(other.shards)
        self.engines |= other.engines
        self.permanent |= other.permanent
        self.outage = self.outage or other.outage


class Executor(Protocol):
    name: str

    def units(self, plan: Plan) -> list[int]:
        """The planned files (indices) this executor is to stage."""
        ...

    def start(self, spec: WorkerSpec) -> None: ...

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
        """Stage ``units``; ``on_staged``/``on_files_done`` may return shard writes to hand out.
        ``resolve_ahead``: the units worth resolving ahead of their hand-out (not staged yet);
        ``layout_at(unit)``: where a file's documents start in the shards, when known at its
        hand-out (its worker then writes the shards it fills while staging it); ``open_shard()``:
        the shard being filled and its pieces so far (which a worker may write as they come).
        An executor may ignore all three."""
        ...

    def write_shards(self, *args: Any) -> list[dict[str, Any]]:
        """A finalize's shards (``finalizer.ShardWriting``'s arguments)."""
        ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...
