"""Fetch on a Ray cluster: one Ray task per balanced share of the plan.

Each task is exactly ``fetch --worker I/N`` (same staging, resume and determinism guarantees),
so Ray only schedules, retries and reports; it is never a second implementation. The output
folder must be on a filesystem every node sees.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .errors import FetchIncomplete, StateError, UsageError
from .planner import load_plan

log = logging.getLogger("bolmo_async")


def _task(output_dir: str, index: int, total: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    from . import api

    logging.basicConfig(level=logging.INFO, format=f"bolmo-async[ray {index}/{total}]: %(levelname)s: %(message)s")
    return api.fetch(output_dir, worker=(index, total), progress=False, processes=1, **kwargs)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UsageError("--ray needs Ray: pip install 'bolmo-async[ray]' (or pip install 'ray[default]').") from exc
    return ray


def _shard_task(
    out: str, index: int, pieces: list[Any], arrows: dict[int, str], srcs: dict[int, str], eos: int
) -> dict[str, Any]:
    import threading

    from .finalizer import write_shard

    return write_shard(Path(out), index, pieces, {u: Path(a) for u, a in arrows.items()}, srcs, eos, threading.Event())


def write_shards_with_ray(
    out: Path,
    shards: list[list[Any]],
    arrows: dict[int, Path],
    srcs: dict[int, str],
    eos: int,
    address: str | None,
    retries: int = 3,
) -> list[dict[str, Any]]:
    """``finalize --ray``: one Ray task per shard (boundaries are already fixed, so any order gives the same bytes)."""
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        remote = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=True)(_shard_task)
        paths = {u: str(a) for u, a in arrows.items()}
        refs = [remote.remote(str(out), k, pieces, paths, srcs, eos) for k, pieces in enumerate(shards)]
        return list(ray.get(refs))
    finally:
        if started_here:
            ray.shutdown()


def fetch_with_ray(
    output_dir: str | os.PathLike[str],
    *,
    address: str | None = None,
    tasks: int = 0,
    retries: int = 3,
    **fetch_kwargs: Any,
) -> dict[str, Any]:
    """Run the plan in ``output_dir`` as Ray tasks on the cluster at ``address`` (local when None).
    Each task is the same worker as a local run, in-process (``processes=1``) on its one CPU."""
    ray = _import_ray()
    out = Path(output_dir).resolve()
    plan = load_plan(out)
    if plan is None:
        raise StateError(f"--ray needs the plan first: run `bolmo-async plan --output-dir {out} ...` once.")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = tasks or max(1, min(len(plan.files), 2 * cpus))
        remote = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=True)(_task)
        refs = {remote.remote(str(out), i, n, fetch_kwargs): i for i in range(n)}
        log.info("ray: %d task(s) over %d CPU(s) for %d planned file(s)", n, cpus, len(plan.files))
        t0 = time.monotonic()
        done_files = tokens = 0
        failed: dict[str, str] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = refs[ready[0]]
            try:
                res = ray.get(ready[0])
            except Exception as exc:  # a task that failed after Ray's retries
                failed[f"share {i}/{n}"] = str(exc).splitlines()[-1][:500]
                log.error("ray: share %d/%d failed: %s", i, n, failed[f"share {i}/{n}"])
                continue
            done_files += res["files"]
            tokens += res["tokens_now"]
            log.info(
                "ray: share %d/%d done (%d/%d files, %d tokens, %.0fs)",
                i,
                n,
                done_files,
                len(plan.files),
                tokens,
                time.monotonic() - t0,
            )
        if failed:
            raise FetchIncomplete(
                f"{len(failed)} Ray task(s) failed after retries: {failed}. Rerun the same command to resume.",
                failed=failed,
            )
        return {"files": len(plan.files), "fetched_now": done_files, "documents_now": 0, "tokens_now": tokens}
    finally:
        if started_here:
            ray.shutdown()
