"""Who runs the planned files and the shard writes: ``choose`` picks one executor, here only.

- ``local.Pool``: worker processes on this machine (one worker on a thread for ``processes=1``);
- ``share.Share``: ``fetch --worker I/N``, one balanced share of the plan on a local pool;
- ``ray.RayExecutor``: Ray tasks running the same worker (``--ray``).

The executors load on first use (asyncio, the worker's records): ``executors.forkserver``, which
the CLI imports first to start the fork server early, needs none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from .local import Pool

    return Pool(processes)


def __getattr__(name: str) -> Any:
    if name in ("Executor", "RunResult"):
        from . import base

        return getattr(base, name)
    if name in ("Pool", "check_not_bootstrapping", "usable_cores"):
        from . import local

        return getattr(local, name)
    raise AttributeError(f"module 'bolmo_async.executors' has no attribute {name!r}")


__all__ = ["Executor", "Pool", "RunResult", "check_not_bootstrapping", "choose", "usable_cores"]
