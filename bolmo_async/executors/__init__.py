"""Who runs the planned files and the shard writes: ``choose`` picks one executor, here only.

- ``local.Pool``: worker processes on this machine (one worker on a thread for ``processes=1``);
- ``share.Share``: ``fetch --worker I/N``, one balanced share of the plan on a local pool;
- ``ray.RayExecutor``: Ray tasks running the same worker (``--ray``).
"""

from __future__ import annotations

from .base import Executor, RunResult
from .local import Pool, check_not_bootstrapping, usable_cores


def choose(
    *,
    processes: int,
    worker: tuple[int, int] | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    ray_tasks: int = 0,
) -> Executor:
    """The executor for these options (``processes``: local worker processes, at least 1)."""
    if ray:
        from .ray import RayExecutor

        return RayExecutor(ray_address, ray_tasks)
    if worker is not None:
        from .share import Share

        return Share(processes, *worker)
    return Pool(processes)


__all__ = ["Executor", "Pool", "RunResult", "check_not_bootstrapping", "choose", "usable_cores"]
