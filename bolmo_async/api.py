"""The Python API: ``plan``, ``fetch``, ``finalize``, ``prepare``, ``inspect``; the CLI is a thin layer over it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from .errors import DiskSpaceError, FetchIncomplete, StateError, UsageError
from .fetcher import FetchOptions, fetch_async
from .finalizer import _SHARD_RE, DATA_SOURCES, MANIFEST, RUN_STATE, ShardStream, finalize_dir
from .hub import HubClient, RetryPolicy, data_files, default_endpoint, listing_digest, make_session, read_token
from .inspector import inspect_dir
from .models import (
    DEFAULT_DATA_FRACTION,
    DEFAULT_MAX_TOKENS_PER_FILE,
    DEFAULT_REPO_ID,
    DEFAULT_SEED,
    DEFAULT_TOKENIZER_ID,
    Plan,
    validate_fraction,
)
from .planner import PLAN_FILE, assign_workers, disk_needed, load_plan, make_plan, save_plan
from .tokenize import AnyTokenizer, ByteTokenizer, make_tokenizer
from .util import atomic_write_text, folder_lock, human_bytes

log = logging.getLogger("bolmo_async")
T = TypeVar("T")


def run_interruptible(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; SIGINT/SIGTERM cancel it (finished work is kept) -> FetchIncomplete(interrupted)."""

    async def main() -> T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        installed = []

        def on_signal(sig: int) -> None:
            log.warning("%s received: stopping; finished files are kept", signal.Signals(sig).name)
            if task is not None:
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous = signal.getsignal(sig)
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append((sig, previous))
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        try:
            return await coro
        except asyncio.CancelledError as exc:
            raise FetchIncomplete(
                "Interrupted. Finished files are staged; rerun the same command to resume.", interrupted=True
            ) from exc
        finally:
            for sig, previous in installed:
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous)  # asyncio would leave the default handler behind

    return asyncio.run(main())


def _endpoint(explicit: str | None, plan: Plan | None = None) -> str:
    return default_endpoint(explicit or os.environ.get("HF_ENDPOINT") or (plan.endpoint if plan else None))


async def _list(endpoint: str, repo_id: str, revision: str, commit: str | None = None) -> tuple[str, list[Any]]:
    retry = RetryPolicy()
    async with make_session(4, retry) as session:
        client = HubClient(session, endpoint=endpoint, repo_id=repo_id, token=read_token(), retry=retry)
        sha = commit or await client.resolve_commit(revision)
        return sha, data_files(await client.list_files(sha))


P = ParamSpec("P")
R = TypeVar("R")


def _one_run_per_folder(create: bool) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Hold the output folder's lock for the call (see ``util.folder_lock``): shared for
    ``--worker`` shares, exclusive otherwise. ``create``: make the folder first if needed."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            out = Path(args[0] if args else kwargs["output_dir"]).resolve()  # type: ignore[arg-type]
            if create:
                out.mkdir(parents=True, exist_ok=True)
            elif not out.is_dir():
                return fn(*args, **kwargs)  # nothing there to protect; fn says what is missing
            with folder_lock(out, shared=kwargs.get("worker") is not None):
                return fn(*args, **kwargs)

        return run

    return wrap


def reset_output(out: Path) -> None:
    """``--force``: remove what an earlier run left (plan, staging, raw, shards, metadata)."""
    for name in (PLAN_FILE, RUN_STATE, MANIFEST, DATA_SOURCES):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for d in ("staging", "raw", "tokenizer"):
        shutil.rmtree(out / d, ignore_errors=True)
    if out.exists():
        for p in out.iterdir():
            if _SHARD_RE.match(p.name):
                p.unlink()


@_one_run_per_folder(create=True)
def plan(
    output_dir: str | os.PathLike[str],
    *,
    repo_id: str = DEFAULT_REPO_ID,
    revision: str = "main",
    endpoint: str | None = None,
    data_fraction: float = DEFAULT_DATA_FRACTION,
    seed: int = DEFAULT_SEED,
    force: bool = False,
) -> Plan:
    """List the repo, pin the revision, write ``plan.json``; reuse a matching plan already there.

    A plan for the same repo, revision and seed but another fraction is re-made at the same
    pinned commit (staged whole files are reused). Anything else different needs ``force``.
    """
    validate_fraction(data_fraction)
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if force:
        reset_output(out)
    existing = load_plan(out)
    if existing is not None:
        same = (existing.repo_id, existing.revision, existing.seed) == (repo_id, revision, seed)
        if not same:
            raise StateError(
                f"{out} holds a plan for {existing.repo_id}@{existing.revision} seed {existing.seed}, not "
                f"{repo_id}@{revision} seed {seed}. Use another --output-dir, or --force to reset this one."
            )
        if existing.data_fraction == data_fraction:
            return existing
        log.info(
            "data fraction %g -> %g: re-planning at the pinned commit %s",
            existing.data_fraction,
            data_fraction,
            existing.commit[:12],
        )
    ep = _endpoint(endpoint, existing)
    commit, files = run_interruptible(_list(ep, repo_id, revision, existing.commit if existing else None))
    if not files:
        raise StateError(f"{repo_id}@{revision} lists no data files ({', '.join(('.jsonl.zst', '.parquet', '...'))}).")
    p = make_plan(
        files,
        data_fraction=data_fraction,
        seed=seed,
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        listing_digest=listing_digest(files),
        endpoint=endpoint or os.environ.get("HF_ENDPOINT"),
    )
    save_plan(p, out)
    return p


def ensure_plan(
    output_dir: str | os.PathLike[str],
    *,
    endpoint: str | None = None,
    force: bool = False,
    repo_id: str | None = None,
    revision: str | None = None,
    data_fraction: float | None = None,
    seed: int | None = None,
) -> Plan:
    """The plan in ``output_dir``; planned (or re-planned) when absent, forced or when plan options are given.
    Options left None keep the existing plan's values, or the defaults."""
    existing = None if force else load_plan(output_dir)
    if existing is not None and all(v is None for v in (repo_id, revision, data_fraction, seed)):
        return existing
    return plan(
        output_dir,
        endpoint=endpoint,
        force=force,
        repo_id=repo_id or (existing.repo_id if existing else DEFAULT_REPO_ID),
        revision=revision or (existing.revision if existing else "main"),
        data_fraction=data_fraction
        if data_fraction is not None
        else (existing.data_fraction if existing else DEFAULT_DATA_FRACTION),
        seed=seed if seed is not None else (existing.seed if existing else DEFAULT_SEED),
    )


def _check_state(out: Path, tok: AnyTokenizer, force: bool) -> None:
    path = out / RUN_STATE
    if path.exists():
        prev = json.loads(path.read_text()).get("tokenizer", {})
        now = tok.info.to_json()
        keys = ("kind", "fingerprint", "eos_token_id", "special_tokens_as_text")
        if any(prev.get(k) != now.get(k) for k in keys):

            def desc(d: dict[str, Any]) -> str:
                return f"{d.get('kind')} {d.get('identifier')} (eos {d.get('eos_token_id')}, fingerprint {d.get('fingerprint')})"

            raise StateError(
                f"{out} was fetched with tokenizer {desc(prev)}, this run uses {desc(now)}. "
                "Use another --output-dir, or --force to reset this one."
            )
    atomic_write_text(path, json.dumps({"tokenizer": tok.info.to_json()}, indent=1) + "\n")


@_one_run_per_folder(create=True)
def fetch(
    output_dir: str | os.PathLike[str],
    *,
    tokenizer: str = "byte",
    tokenizer_identifier: str = DEFAULT_TOKENIZER_ID,
    eos_token_id: int | None = None,
    special_tokens_as_text: bool = True,
    engine: str = "auto",
    concurrency: int = 8,
    streaming: bool = True,
    endpoint: str | None = None,
    retries: int = 8,
    progress: bool = True,
    force: bool = False,
    check_disk: bool = True,
    repo_id: str | None = None,
    revision: str | None = None,
    data_fraction: float | None = None,
    seed: int | None = None,
    processes: int = 0,
    worker: tuple[int, int] | None = None,
    read_timeout: float = 60.0,
    shard_stream: ShardStream | None = None,
) -> dict[str, Any]:
    """Fetch and stage every planned file not staged yet (planning first if needed).

    ``processes``: subword BPE worker processes (0: one per core; 1: threads in this process).
    ``shard_stream``: writes shards meanwhile (``prepare``)."""
    out = Path(output_dir).resolve()
    existing = None if force else load_plan(out)
    plan_options = any(v is not None for v in (repo_id, revision, data_fraction, seed))
    if worker is not None:
        if existing is None:
            raise StateError(
                f"--worker needs the plan first: run `bolmo-async plan --output-dir {out} ...` once, then launch the "
                "workers (workers never plan on their own, so that all of them share one plan)."
            )
        if plan_options or force:
            raise UsageError(
                "--worker uses the plan already in --output-dir: drop --data-fraction/--seed/--revision/--repo-id/--force."
            )
    the_plan = ensure_plan(
        out, endpoint=endpoint, force=force, repo_id=repo_id, revision=revision, data_fraction=data_fraction, seed=seed
    )
    ep = _endpoint(endpoint, the_plan)
    tok = make_tokenizer(
        tokenizer,
        tokenizer_identifier,
        endpoint=ep,
        token=read_token(),
        eos_token_id=eos_token_id,
        special_tokens_as_text=special_tokens_as_text,
        engine=engine,
        processes=processes,
    )
    try:
        _check_state(out, tok, force)
        if not isinstance(tok, ByteTokenizer):
            (out / "tokenizer").mkdir(exist_ok=True)
            atomic_write_text(out / "tokenizer" / "tokenizer.json", tok.source_json)
        if check_disk:
            need = disk_needed(the_plan, tok.info.kind, streaming)
            free = shutil.disk_usage(out).free
            if free < need:
                raise DiskSpaceError(
                    f"{out} has {human_bytes(free)} free; this plan needs about {human_bytes(need)} "
                    "(staging + shards). Free space, choose another --output-dir or a smaller --data-fraction."
                )
        if shard_stream is not None:
            shard_stream.start(tok.info.fingerprint)
        opts = FetchOptions(
            on_staged=shard_stream.staged if shard_stream is not None else None,
            output_dir=out,
            concurrency=concurrency,
            streaming=streaming,
            endpoint=ep,
            retries=retries,
            read_timeout=read_timeout,
            progress=progress,
        )
        files = None if worker is None else assign_workers(the_plan, worker[1])[worker[0]]
        fetcher = run_interruptible(fetch_async(the_plan, opts, tok, files))
    finally:
        tok.close()
    p = fetcher.progress
    return {
        "files": len(the_plan.files) if files is None else len(files),
        "fetched_now": p.files if p else 0,
        "documents_now": p.documents if p else 0,
        "tokens_now": p.tokens if p else 0,
    }


@_one_run_per_folder(create=False)
def finalize(
    output_dir: str | os.PathLike[str],
    *,
    max_tokens_per_file: int = DEFAULT_MAX_TOKENS_PER_FILE,
    allow_incomplete: bool = False,
    ray: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Write the shards, their csv.gz, ``manifest.json`` and ``data_sources.txt`` from the staging
    (shards written by local threads, or by Ray tasks with ``ray=True``)."""
    return finalize_dir(
        output_dir, max_tokens_per_file, allow_incomplete=allow_incomplete, ray=ray, ray_address=ray_address
    )


@_one_run_per_folder(create=True)
def prepare(
    output_dir: str | os.PathLike[str],
    *,
    data_fraction: float = DEFAULT_DATA_FRACTION,
    tokenizer: str = "byte",
    tokenizer_identifier: str = DEFAULT_TOKENIZER_ID,
    max_tokens_per_file: int = DEFAULT_MAX_TOKENS_PER_FILE,
    seed: int = DEFAULT_SEED,
    streaming: bool = True,
    repo_id: str = DEFAULT_REPO_ID,
    revision: str = "main",
    endpoint: str | None = None,
    **fetch_kwargs: Any,
) -> dict[str, Any]:
    """plan + fetch + finalize. On interruption or failed files, finalizes what was staged
    (manifest ``complete: false``) and re-raises."""
    if max_tokens_per_file < 1:
        raise UsageError("--max-tokens-per-file must be at least 1")
    force = bool(fetch_kwargs.pop("force", False))
    the_plan = plan(
        output_dir,
        repo_id=repo_id,
        revision=revision,
        endpoint=endpoint,
        data_fraction=data_fraction,
        seed=seed,
        force=force,
    )
    # Shards are written while files are still being fetched (in plan order, as they complete):
    # at the end only the last one is left. finalize_dir keeps them only where they match.
    stream = ShardStream(Path(output_dir).resolve(), the_plan, max_tokens_per_file)
    try:
        fetch(
            output_dir,
            tokenizer=tokenizer,
            tokenizer_identifier=tokenizer_identifier,
            streaming=streaming,
            endpoint=endpoint,
            shard_stream=stream,
            **fetch_kwargs,
        )
    except BaseException as exc:
        stream.abort()
        if not isinstance(exc, FetchIncomplete):
            raise
        if (Path(output_dir) / RUN_STATE).exists():
            manifest = finalize_dir(output_dir, max_tokens_per_file, allow_incomplete=True, written=stream.written)
            log.warning(
                "wrote %d shard(s) from what was staged (manifest marked incomplete: %d planned file(s) missing)",
                len(manifest["shards"]),
                len(manifest["missing_files"]),
            )
        raise exc
    return finalize_dir(output_dir, max_tokens_per_file, written=stream.finish())


def inspect(output_dir: str | os.PathLike[str], *, decode: int = 0, verify: bool = True) -> dict[str, Any]:
    return inspect_dir(output_dir, decode=decode, verify=verify)


__all__ = ["fetch", "finalize", "inspect", "plan", "prepare"]
