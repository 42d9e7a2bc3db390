"""The Python API: ``plan``, ``fetch``, ``finalize``, ``prepare``, ``inspect``; the CLI is a thin layer over it."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import os
import shlex
import signal
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from inspect import signature as inspect_signature
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from .errors import (
    BolmoError,
    DiskSpaceError,
    DownloadError,
    FetchIncomplete,
    HubError,
    NotFoundError,
    StateError,
    Stopped,
    TokenizerError,
    UsageError,
    interrupted_by,
    signal_of,
)
from .executors import Executor, Pool, check_not_bootstrapping, choose, usable_cores
from .guidance import (
    check_output_dir,
    check_types,
    command,
    fetch_command,
    fetched_with,
    fixed_length_loss,
    normalize,
    plan_missing,
    say_to_caller,
    selection_from,
    tokenizer_flags,
    warn_short_shards,
)
from .models import (
    DEFAULT_CHECK_EVERY,
    DEFAULT_CONCURRENCY,
    DEFAULT_CONNECTIONS,
    DEFAULT_DATA_FRACTION,
    DEFAULT_REPO_ID,
    DEFAULT_SEED,
    DEFAULT_TOKENIZER_ID,
    ENGINES,
    TOKENIZER_IDENTITY,
    Plan,
    PlannedFile,
    Selection,
    TokenizerInfo,
    check_repo_path,
    reads_prefixes_whole,
    validate_fraction,
)
from .offline import hub_offline
from .outdir import DATA_SOURCES, MANIFEST, RUN_STATE, TOKENIZER, OutputDir, csv_name, marker_name, open_output
from .planner import disk_needed, load_plan, make_plan, parse_worker, record_shares, save_plan
from .progress import Progress
from .util import human_bytes, release_free_memory
from .worker import WorkerSpec

# The network (aiohttp), the data path (numpy, pyarrow) and the tokenizers load where they are
# first used, not with this module: ``prepare`` spawns the worker processes it is asked for before
# it needs any of them, so that the workers import while the coordinator does (half a second of
# CPU each, on other cores).
if TYPE_CHECKING:
    from .finalizer import Layout, Written
    from .staging import Staging
    from .tokenize import TokenizerSpec

log = logging.getLogger("bolmo_async")
T = TypeVar("T")


#: The signals that stop a run (SIGHUP: its terminal was closed), where the platform has them.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def run_interruptible(coro: Coroutine[Any, Any, T], doing: str) -> T:
    """Run ``coro`` (``doing``: what it does, as the stop's line says it); a stop signal
    (``STOP_SIGNALS``, except one this process ignores: ``nohup``) cancels it ->
    ``Stopped``. It runs before a run stages anything."""

    async def main() -> T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        installed = []
        stopped_by: list[int] = []

        def on_signal(sig: int) -> None:
            if stopped_by:  # a second signal: the stop under way is not cut short
                return
            stopped_by.append(sig)
            # The stop's one line is Stopped's, below (nothing is staged yet to be kept).
            log.debug("%s received: stopping", signal.Signals(sig).name)
            if task is not None:
                task.cancel()

        for sig in STOP_SIGNALS:
            try:
                previous = signal.getsignal(sig)
                if previous == signal.SIG_IGN:
                    continue
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append((sig, previous))
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        try:
            return await coro
        except asyncio.CancelledError as exc:
            signum = stopped_by[0] if stopped_by else signal.SIGINT
            raise Stopped(
                f"{interrupted_by(signum)} while {doing}, before this run wrote anything; rerun the same command",
                signum,
            ) from exc
        finally:
            for sig, previous in installed:
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous)  # asyncio would leave the default handler behind

    return asyncio.run(main())


def _endpoint(explicit: str | None) -> str:
    """The endpoint of this run: ``--endpoint``, else ``HF_ENDPOINT``, else the Hub. Never the one a
    plan.json names: a shared folder must not decide where a user's token is sent."""
    from .hub import default_endpoint

    return default_endpoint(explicit or os.environ.get("HF_ENDPOINT") or None)


#: The files of a tokenizer repo, fetched together (``load_tokenizer_source`` asks for them in turn).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


async def _fetch_model_files(endpoint: str, repo_id: str, names: tuple[str, ...]) -> list[Any]:
    """Files of a model repo (a tokenizer's), through the run's own Hub client (the same token
    rules as the data: sent to the endpoint only; huggingface_hub's downloader would also contact
    huggingface.co for its own purposes). At the same time, in one session: each is a resolve
    and a download, whose round trips do not wait for the other file's. Per file its bytes, None
    (the repo has no such file) or its TokenizerError, raised by whoever asks for that file."""
    from .download import fetch_small
    from .hub import HubClient, make_session, read_token
    from .tokenize import MAX_TOKENIZER_BYTES

    async def one(client: HubClient, name: str) -> bytes | None:
        try:
            return await fetch_small(client, "main", name, MAX_TOKENIZER_BYTES)
        except UsageError as exc:
            raise TokenizerError(f"--tokenizer-identifier {repo_id!r}: {exc}") from exc
        except NotFoundError as exc:  # (fetch_small gives None for a missing file: here the repo is)
            raise TokenizerError(
                f"tokenizer repo {repo_id} not found at {endpoint} (a private or gated repo also answers so without "
                f"a valid HF_TOKEN). Check --tokenizer-identifier (the default: {DEFAULT_TOKENIZER_ID}), pass a local "
                "tokenizer.json (or its folder) as --tokenizer-identifier, set HF_TOKEN if the repo is gated, or serve "
                "it from a mirror with `mirror serve --model-repo ID=FOLDER`."
            ) from exc
        except (HubError, DownloadError) as exc:
            raise TokenizerError(
                f"could not fetch tokenizer {repo_id} from {endpoint}: {exc} Pass a local tokenizer.json (or its "
                "folder) as --tokenizer-identifier, set HF_TOKEN if the repo is gated, or serve it from a mirror "
                "with `mirror serve --model-repo ID=FOLDER`."
            ) from exc

    retry = _hub_retry(cap=4)
    try:
        async with make_session(2 * len(names), retry) as session:
            client = HubClient(
                session, endpoint=endpoint, repo_id=repo_id, repo_type="model", token=read_token(), retry=retry
            )
            return list(await asyncio.gather(*(one(client, name) for name in names), return_exceptions=True))
    except UsageError as exc:  # (the client's own checks: a repo id it refuses)
        raise TokenizerError(f"--tokenizer-identifier {repo_id!r}: {exc}") from exc


def _model_file_fetcher(endpoint: str) -> Callable[[str, str], bytes | None]:
    """``load_tokenizer_source``'s ``fetch``: the first file asked for fetches the tokenizer's
    files together; each answer (or error) is given when its file is asked for."""
    fetched: dict[tuple[str, str], Any] = {}

    def fetch(repo_id: str, name: str) -> bytes | None:
        if (repo_id, name) not in fetched:
            names = _TOKENIZER_FILES if name in _TOKENIZER_FILES else (name,)
            got = run_interruptible(_fetch_model_files(endpoint, repo_id, names), "downloading the tokenizer")
            fetched.update(((repo_id, n), r) for n, r in zip(names, got, strict=True))
        answer = fetched[(repo_id, name)]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return fetch


def _accept_endpoint(plan: Plan, endpoint: str, out: OutputDir) -> bool:
    """This run may use the folder planned against ``plan.endpoint`` from ``endpoint`` (else
    StateError); True when that took a listing of the repo just now. Another endpoint (the mirror restarted
    on another port, the Hub instead of a mirror of it) is accepted when it lists the pinned
    commit with the very files the plan was made from: the same bytes, each checked by its sha256.
    The listing goes to this run's endpoint only (the token never to the one plan.json names).
    Under HF_HUB_OFFLINE, True without a request: the pinned commit is taken as the plan says (every
    file read is checked against its listed sha256 all the same)."""
    if hub_offline():
        return True
    if not plan.endpoint or plan.endpoint.rstrip("/") == endpoint.rstrip("/"):
        return False
    try:
        run_interruptible(_check_listing(plan, endpoint), "checking the repository's listing")
    except (HubError, StateError) as exc:
        why = "it lists other files" if isinstance(exc, StateError) else str(exc).rstrip(".")
        raise StateError(
            f"{out} was planned against {plan.endpoint}, but this run talks to {endpoint} "
            f"(--endpoint / HF_ENDPOINT, else the Hub), which does not list the planned files of "
            f"{plan.repo_id}@{plan.commit[:12]} ({why}). Pass --endpoint {plan.endpoint} to "
            "continue, or --force to plan again against this one."
        ) from exc
    log.warning(
        "%s was planned against %s; %s lists the same files at the pinned commit %s: reading them from there",
        out,
        plan.endpoint,
        endpoint,
        plan.commit[:12],
    )
    return True


async def _check_listing(plan: Plan, endpoint: str) -> None:
    """The pinned commit must still list the files the plan was made from."""
    from .hub import listing_digest

    _, files = await _list(endpoint, plan.repo_id, plan.revision, plan.commit)
    digest = listing_digest(files)
    if digest != plan.listing_digest:
        raise StateError(
            f"The listing of {plan.repo_id}@{plan.commit[:12]} changed since the plan was made "
            f"(digest {digest[:12]} != {plan.listing_digest[:12]}). Rerun with --force to plan again."
        )


#: This run's ``--retries`` and ``--read-timeout``, for its Hub API calls (the revision, the
#: listing, the tokenizer's files) as for its downloads: a server that accepted connections and
#: never answered held a run 8 attempts x 60 s (with backoff, 8.5 minutes) before its first word,
#: whatever the flags said. Set by ``fetch`` and ``prepare`` (``_hub_calls``).
_HUB_RETRY: contextvars.ContextVar[tuple[int, float]] = contextvars.ContextVar("hub_retry", default=(8, 60.0))


def _hub_retry(cap: int = 0) -> Any:
    """The ``RetryPolicy`` of this run's Hub API calls (``cap``: at most that many attempts)."""
    from .retry import RetryPolicy

    attempts, read_timeout = _HUB_RETRY.get()
    return RetryPolicy(max_attempts=min(attempts, cap) if cap else attempts, read_timeout=read_timeout)


@contextlib.contextmanager
def _hub_calls(options: Mapping[str, Any]) -> Iterator[None]:
    """``options``' --retries and --read-timeout for the Hub API calls made within (``_HUB_RETRY``)."""
    token = _HUB_RETRY.set((int(options.get("retries", 8)), float(options.get("read_timeout", 60.0))))
    try:
        yield
    finally:
        _HUB_RETRY.reset(token)


#: The tokenizer this run is loading (on a thread), raced against the repo listing: a bad
#: tokenizer (missing file, not JSON, unknown repo) stops the run before the listing ends.
_TOKENIZER_LOAD: contextvars.ContextVar[Future[Any] | None] = contextvars.ContextVar("tokenizer_load", default=None)


async def _list(endpoint: str, repo_id: str, revision: str, commit: str | None = None) -> tuple[str, list[Any]]:
    listing = asyncio.ensure_future(_list_now(endpoint, repo_id, revision, commit))
    tok = _TOKENIZER_LOAD.get()
    try:
        while tok is not None and not listing.done():
            if tok.done() and not tok.cancelled() and tok.exception() is not None:
                raise tok.exception()  # type: ignore[misc]
            await asyncio.wait({listing}, timeout=0.05)
        return await listing
    finally:
        if not listing.done():
            listing.cancel()
            with contextlib.suppress(BaseException):
                await listing


async def _list_now(endpoint: str, repo_id: str, revision: str, commit: str | None) -> tuple[str, list[Any]]:
    from .hub import HubClient, data_files, make_session, read_token

    retry = _hub_retry()
    async with make_session(4, retry) as session:
        client = HubClient(session, endpoint=endpoint, repo_id=repo_id, token=read_token(), retry=retry, fail_fast=True)
        sha = commit or await client.resolve_commit(revision)
        return sha, data_files(await client.list_files(sha))


def _known_keywords(fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """A wrong keyword is a TypeError naming the public function, before anything is touched."""
    params = inspect_signature(fn).parameters
    named = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
    allowed = named | (_FETCH_KEYWORDS if any(p.kind is p.VAR_KEYWORD for p in params.values()) else set())
    if fn.__name__ == "prepare":
        allowed -= set(_NOT_PREPARE)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        raise TypeError(
            f"{fn.__name__}() got an unexpected keyword argument {unknown[0]!r}"
            + (f": {_NOT_PREPARE[unknown[0]]}" if fn.__name__ == "prepare" and unknown[0] in _NOT_PREPARE else "")
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        )


#: ``fetch``'s keywords that ``prepare`` does not take (nor the CLI's prepare), and where they go.
_NOT_PREPARE = {
    "worker": "a job array's share is fetch(output_dir, worker=...); finalize(output_dir) once every share is staged",
}


def _none_ok(fn: Callable[..., Any]) -> set[str]:
    """The keywords of ``fn`` (and of ``_fetch``, for its ``**options``) whose default is None."""
    params = dict(inspect_signature(fn).parameters)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        params = {**inspect_signature(_fetch).parameters, **params}
    return {n for n, p in params.items() if p.default is None}


P = ParamSpec("P")
R = TypeVar("R")


#: Set while a public call runs: the calls it makes itself leave its errors' words to it.
_OUTER_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("outer_call", default=False)


def _one_run_per_folder(create: bool) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Hold the output folder's lock for the call (see ``util.folder_lock``): shared for
    ``--worker`` shares, exclusive otherwise. ``create``: make the folder first if needed, once
    the call's options are valid (nothing touches the disk for a usage error)."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            if _OUTER_CALL.get():  # (prepare's own plan, fetch, finalize: the caller's call words it)
                return run_locked(*args, **kwargs)
            token = _OUTER_CALL.set(True)
            try:
                return run_locked(*args, **kwargs)
            except (BolmoError, Stopped) as exc:
                say_to_caller(exc, fn.__name__)  # force=True, not --force (the CLI keeps its words)
                raise
            finally:
                _OUTER_CALL.reset(token)

        def run_locked(*args: P.args, **kwargs: P.kwargs) -> R:
            check_not_bootstrapping()  # before the folder: a re-imported script must not take its lock
            _known_keywords(fn, kwargs)  # a wrong keyword names this public function, before any disk
            if len(args) + ("output_dir" in kwargs) != 1:
                raise TypeError(
                    f"{fn.__name__}() takes the output folder as its one positional argument and the options as "
                    "keywords, e.g. data_fraction=0.01"
                )
            check_output_dir(fn.__name__, args[0] if args else kwargs["output_dir"])
            kwargs = check_types(fn.__name__, kwargs, _none_ok(fn))  # type: ignore[assignment]
            kwargs = normalize(fn.__name__, kwargs)  # type: ignore[assignment]
            given: dict[str, Any] = dict(kwargs)
            validate_fetch_options(**{k: v for k, v in given.items() if k in _VALIDATED})
            if (given.get("max_tokens_per_file") or 2) < 2:
                raise UsageError("--max-tokens-per-file must be at least 2 (a token and an EOS)")
            out = open_output(args[0] if args else kwargs["output_dir"])  # type: ignore[arg-type]
            if args:
                args = (out, *args[1:])  # type: ignore[assignment]
            else:
                kwargs["output_dir"] = out
            if create:
                out.create()
            elif not out.exists():
                if out.local and os.path.lexists(out.location):
                    raise UsageError(f"--output-dir {out}: a file, not an output folder; name the folder of a run.")
                return fn(*args, **kwargs)  # nothing there to protect; fn says what is missing
            try:
                with out.lock(shared=kwargs.get("worker") is not None):
                    return fn(*args, **kwargs)
            except BaseException:
                out.discard_if_unused()  # a failed first command leaves no folder behind
                raise

        return run

    return wrap


@_one_run_per_folder(create=True)
def plan(
    output_dir: str | os.PathLike[str] | OutputDir,
    *,
    repo_id: str = DEFAULT_REPO_ID,
    revision: str = "main",
    endpoint: str | None = None,
    data_fraction: float = DEFAULT_DATA_FRACTION,
    seed: int = DEFAULT_SEED,
    force: bool = False,
    selection: Selection | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    source_depth: int | None = None,
    source_fractions: Mapping[str, float] | None = None,
    text_field: str | None = None,
    id_field: str | None = None,
) -> Plan:
    """List the repo, pin the revision, write ``plan.json``; reuse a matching plan already there.

    A plan for the same repo, revision, seed and selection but other fractions is re-made at
    the same pinned commit (staged whole files are reused). Anything else different needs
    ``force``. The selection, as keywords or as one ``selection=bolmo_async.Selection(...)``:
    ``include`` / ``exclude`` (lists of globs on repo paths), ``source_depth``,
    ``source_fractions`` ({source: fraction}), ``text_field`` / ``id_field`` (record fields)."""
    sel = selection_from(
        "plan",
        selection,
        include=include,
        exclude=exclude,
        source_depth=source_depth,
        source_fractions=source_fractions,
        text_field=text_field,
        id_field=id_field,
    )
    return _plan(
        output_dir,
        repo_id=repo_id,
        revision=revision,
        endpoint=endpoint,
        data_fraction=data_fraction,
        seed=seed,
        force=force,
        selection=sel,
    )[0]


def _plan(
    output_dir: str | os.PathLike[str] | OutputDir,
    *,
    repo_id: str,
    revision: str,
    endpoint: str | None,
    data_fraction: float,
    seed: int,
    force: bool,
    selection: Selection,
) -> tuple[Plan, bool]:
    """``plan``, and whether the repo was listed just now."""
    from .hub import listing_digest

    validate_fraction(data_fraction)
    out = open_output(output_dir)

    def online() -> str:  # what to run where the Hub is reachable, for a plan refused offline
        from .offline import online_fetch

        ep = _endpoint(endpoint)
        return online_fetch(
            out, ep, data_fraction, selection, repo_id=repo_id, revision=revision, seed=seed, force=force
        )

    if force and hub_offline():
        from .offline import planning_refused

        raise planning_refused(out, "--force plans again", online())
    if force and out.is_output():  # (a folder that holds no run of ours keeps what it holds: raw/ of the user's...)
        out.reset()
    existing = load_plan(out)
    if existing is not None:
        same = (existing.repo_id, existing.revision, existing.seed) == (repo_id, revision, seed)
        if not same:
            raise StateError(
                f"{out} holds a plan for {existing.repo_id}@{existing.revision} seed {existing.seed}, not "
                f"{repo_id}@{revision} seed {seed}. Use another --output-dir, or --force to reset this one."
            )
        if existing.selection.without_fractions() != selection.without_fractions():
            raise StateError(
                f"{out} holds a plan with another selection ({_describe(existing.selection)}) than this run's "
                f"({_describe(selection)}). Use another --output-dir, or --force to reset this one."
            )
        if (existing.data_fraction, existing.selection) == (data_fraction, selection):
            return existing, _accept_endpoint(existing, _endpoint(endpoint), out)
    if hub_offline():  # (no listing: refused before a word of re-planning)
        from .offline import refuse_unplanned

        refuse_unplanned(out, existing, data_fraction, selection, online())
    if existing is not None:
        log.info("fractions changed: re-planning at the pinned commit %s", existing.commit[:12])
    ep = _endpoint(endpoint)
    if existing is None and not force and not out.is_output():
        _refuse_outputs_not_ours(out)
    if existing is not None:
        _accept_endpoint(existing, ep, out)
    elif others := out.others():
        log.warning("%s", out.others_warning(others))
    log.info("listing %s@%s at %s ...", repo_id, existing.commit[:12] if existing else revision, ep)
    commit, files = run_interruptible(
        _list(ep, repo_id, revision, existing.commit if existing else None), "listing the repository"
    )
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
        endpoint=ep,
        selection=selection,
    )
    save_plan(p, out)
    if existing is not None:
        _say_unreused(out, existing, p)
    return p, True


def _refuse_outputs_not_ours(out: OutputDir) -> None:
    """A folder no run of ours planned that holds files of our output's names (the original
    prepare_bolmo_data.py writes the same ``bolmo_data_00000.npy`` ... and ``data_sources.txt``):
    refused, before anything is written, rather than rewritten and removed as stale shards of ours."""
    shards = sorted(out.shards())
    theirs = (
        [f"{shards[0]}" + (f" and {len(shards) - 1} more shard file(s)" if len(shards) > 1 else "")] if shards else []
    )
    theirs += [DATA_SOURCES] if out.exists_file(DATA_SOURCES) else []
    if theirs:
        shown = " and ".join(theirs) if len(theirs) < 3 else ", ".join(theirs)
        raise StateError(
            f"{out} holds {shown}, which no bolmo-async plan made (prepare_bolmo_data.py's output?): this run "
            "would replace them. Use another --output-dir, or --force to replace them."
        )


def _say_unreused(out: OutputDir, old: Plan, new: Plan) -> None:
    """One line when files staged for the old fractions are not what the new plan stages (a
    partly-taken file is staged under its prefix length): they stay in ``staging/`` unused."""
    from .outdir import STAGING
    from .staging import Staging

    keys = {f.key for f in new.files}
    staging = Staging(out)
    left = [f for f in old.files if f.key not in keys and staging.done(f) is not None]
    if left:
        log.info(
            "%d file(s) staged for --data-fraction %g are not reused by this plan (a partly-taken file is staged "
            "per prefix length; %d of them partly taken): they stay in %s unused until `%s` (after a "
            "complete finalize) removes the whole staging",
            len(left),
            old.data_fraction,
            sum(1 for f in left if not f.whole),
            out.ref(STAGING),
            command("finalize", "--output-dir", out, "--drop-staging"),
        )


def _describe(sel: Selection) -> str:
    parts = [f"{k} {v}" for k, v in sel.to_json().items() if v not in ((), [], {}, None, "text", "id")]
    return ", ".join(parts) or "everything, default fields"


def ensure_plan(
    output_dir: str | os.PathLike[str] | OutputDir,
    *,
    endpoint: str | None = None,
    force: bool = False,
    repo_id: str | None = None,
    revision: str | None = None,
    data_fraction: float | None = None,
    seed: int | None = None,
) -> Plan:
    """The plan in ``output_dir``; planned (or re-planned) when absent, forced or when plan options are given.
    Options left None keep the existing plan's values, or the defaults: ``force`` too (it resets the
    folder, not the choice of data: `fetch --force --tokenizer subword`, the way out a refusal of
    the other tokenizer offers, planned the defaults' 1% of everything instead of the folder's)."""
    out = open_output(output_dir)
    existing = _readable_plan(out) if force else load_plan(out)
    asked = any(v is not None for v in (repo_id, revision, data_fraction, seed))
    if not force and existing is not None and not asked:
        return existing
    if not force and existing is None and not asked and out.exists_file(RUN_STATE):
        # plan.json removed after a fetch: the defaults (1% of every source) would be planned and
        # the folder's output rewritten for them, its own fraction and selection lost without a word.
        raise StateError(plan_missing(out, out.read_bytes(MANIFEST)) + ".")
    new = plan(
        output_dir,
        endpoint=endpoint,
        force=force,
        repo_id=repo_id or (existing.repo_id if existing else DEFAULT_REPO_ID),
        revision=revision or (existing.revision if existing else "main"),
        data_fraction=data_fraction
        if data_fraction is not None
        else (existing.data_fraction if existing else DEFAULT_DATA_FRACTION),
        seed=seed if seed is not None else (existing.seed if existing else DEFAULT_SEED),
        selection=existing.selection if existing else None,
    )
    if force and existing is not None and revision is None and new.commit != existing.commit:
        # (the options kept, the data is not: the plan table shows no commit)
        log.warning(
            "%s has moved on since this folder's plan: planned again at its commit %s, not the plan's %s (other "
            "files or contents); `--revision %s` plans at the folder's commit",
            new.revision,
            new.commit[:12],
            existing.commit[:12],
            existing.commit,
        )
    return new


def _readable_plan(output_dir: str | os.PathLike[str] | OutputDir) -> Plan | None:
    """The folder's plan, or None where --force is about to reset one it cannot read."""
    try:
        return load_plan(open_output(output_dir))
    except BolmoError:
        return None


def _tokenizer_desc(d: dict[str, Any]) -> str:
    return f"{d.get('kind')} {d.get('identifier')} (eos {d.get('eos_token_id')}, fingerprint {d.get('fingerprint')})"


def _other_tokenizer_fix(prev: dict[str, Any], share: bool) -> str:
    """What to do about a folder fetched with another tokenizer: go on with the one it was fetched
    with (a job array's share that left out a flag the others have, most often), or start apart.
    A ``--worker`` share is not told to ``--force``: that is refused there (it would reset the
    folder the other shares write into)."""
    reset = "" if share else ", or --force to reset this one"
    flags = shlex.join(tokenizer_flags(prev))
    if not flags:
        return f"Use another --output-dir{reset}."
    return f"Pass {flags} to go on with it (as it was fetched), or use another --output-dir{reset}."


def _folder_said(out: OutputDir) -> str:
    """The folder with its plan in a few words: a share pointed at another run's folder (another
    fraction's, a smoke test's) is refused for its tokenizer, and told whose folder it is."""
    try:
        p = load_plan(out)
    except (BolmoError, OSError):
        p = None
    if p is None:
        return str(out)
    return f"{out} (its plan: {p.repo_id}, --data-fraction {p.data_fraction:g}, seed {p.seed})"


def _tokenizer_differences(prev: dict[str, Any], now: dict[str, Any], share: bool) -> str:
    """What differs between the tokenizer a folder was fetched with and this run's, and the flags
    that go on with the folder: two descriptions side by side looked the same when a flag that
    they do not show differed (--special-tokens-as-ids), and "Use another --output-dir" left the
    flag to guess."""
    said = []
    same_json = prev.get("fingerprint") == now.get("fingerprint")
    if not same_json:  # (its EOS may differ too: not a flag to name)
        said.append(f"another tokenizer JSON ({now.get('identifier')}, fingerprint {now.get('fingerprint')})")
    eos_differs = same_json and prev.get("eos_token_id") != now.get("eos_token_id")
    if eos_differs:
        said.append(f"EOS {prev.get('eos_token_id')} there, {now.get('eos_token_id')} here (--eos-token-id)")
    as_ids_here = prev.get("special_tokens_as_text") is not False and now.get("special_tokens_as_text") is False
    if prev.get("special_tokens_as_text") != now.get("special_tokens_as_text"):
        said.append(
            "it was fetched without --special-tokens-as-ids, this run has it"
            if as_ids_here
            else "it was fetched with --special-tokens-as-ids, this run without it"
        )
    flags = tokenizer_flags(prev)  # (its --eos-token-id too)
    reset = "" if share else ", or --force to reset this one"
    go_on = f"Fetch with {shlex.join(flags)}" + (" and without --special-tokens-as-ids" if as_ids_here else "")
    return "; ".join(said) + f". {go_on} to go on with it (as it was fetched), or use another --output-dir{reset}."


def _refuse_other_kind(out: OutputDir, kind: str, force: bool, share: bool = False) -> None:
    """A folder fetched with the other kind of tokenizer (byte / subword) is refused before the repo
    is listed: it printed the plan table (and rewrote plan.json for another fraction) before the
    refusal. The whole check, by fingerprint, follows once the tokenizer is loaded (``_check_state``)."""
    raw = None if force or kind not in ("byte", "subword") else out.read_bytes(RUN_STATE)
    if raw is None:
        return
    try:
        prev = json.loads(raw).get("tokenizer", {})
    except (ValueError, AttributeError):  # (said by ``_check_state``, with the fix)
        return
    if isinstance(prev, dict) and prev.get("kind") not in (None, kind):
        raise StateError(
            f"{_folder_said(out)} was fetched with tokenizer {_tokenizer_desc(prev)}; this run asks for --tokenizer {kind}"
            # (a rerun that left the flag out was told of a flag it never gave)
            + (" (the default when --tokenizer is not given). " if kind == "byte" else ". ")
            + _other_tokenizer_fix(prev, share)
        )


def _check_state(out: OutputDir, info: TokenizerInfo, force: bool, share: bool = False) -> None:
    raw = out.read_bytes(RUN_STATE)
    path = out.ref(RUN_STATE)
    if raw is not None:
        try:
            prev = json.loads(raw).get("tokenizer", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise StateError(f"{path} is unreadable ({exc}); rerun with --force to reset {out}.") from exc
        now = info.to_json()
        keys = ("kind", "fingerprint", "eos_token_id", "special_tokens_as_text")
        if any(prev.get(k) != now.get(k) for k in keys):
            raise StateError(
                f"{_folder_said(out)} was fetched with tokenizer {_tokenizer_desc(prev)}; this run differs: "
                + _tokenizer_differences(prev, now, share)
            )
    text = json.dumps({"tokenizer": info.to_json()}, indent=1) + "\n"
    if raw is None:
        # A conditional create: two --worker shares of a fresh plan both found none, both wrote
        # their own and went on staging with another tokenizer each. The one that lost the race
        # checks against what the winner wrote, as a share started after it would.
        if not out.create_bytes(RUN_STATE, text.encode("utf-8")):
            _check_state(out, info, force, share)
    elif raw.decode("utf-8", "replace") != text:
        out.write_text(RUN_STATE, text)


def _tokenizer_spec(
    kind: str,
    identifier: str,
    *,
    endpoint: str,
    eos_token_id: int | None,
    special_tokens_as_text: bool,
    engine: str,
    check_every: int,
    folder: OutputDir | None = None,
) -> tuple[TokenizerSpec, TokenizerInfo]:
    """The recipe workers build the tokenizer from, and what run.json records. Only the JSON is
    read here (and checked once); the engines are built in the workers. Under HF_HUB_OFFLINE a Hub
    repo id is read as ``folder`` or the cache has it (``offline.tokenizer_fetch``)."""
    from .tokcache import remember_json
    from .tokenize import ByteTokenizer, TokenizerSpec, checked_info, load_tokenizer_source

    if kind == "byte":
        return TokenizerSpec("byte"), ByteTokenizer().info
    log.info("loading tokenizer %s ...", identifier)
    from .offline import tokenizer_fetch

    fetch = tokenizer_fetch(folder) if hub_offline() else _model_file_fetcher(endpoint)
    src = load_tokenizer_source(identifier, fetch=fetch)
    info = checked_info(
        src,
        eos_token_id=eos_token_id,
        special_tokens_as_text=special_tokens_as_text,
        engine=engine,
        check_every=check_every,
    )
    remember_json(identifier, src.json_text)  # the next run's fork server builds its engine from it
    spec = TokenizerSpec("subword", src, info.eos_token_id, special_tokens_as_text, info.engine, check_every, info)
    release_free_memory(0)  # the parsed JSON's objects (when probed): tens of MB this process no longer needs
    return spec, info


def validate_fetch_options(
    *,
    tokenizer: str = "byte",
    engine: str = "auto",
    concurrency: int = DEFAULT_CONCURRENCY,
    connections: int = DEFAULT_CONNECTIONS,
    retries: int = 8,
    read_timeout: float = 60.0,
    processes: int = 0,
    check_every: int = DEFAULT_CHECK_EVERY,
    max_document_bytes: int = 0,
    eos_token_id: int | None = None,
) -> None:
    """Every fetch option checked before anything touches the network or the disk."""
    if tokenizer not in ("byte", "subword"):
        # (the original script's own --help showed `--tokenizer dolma2`)
        hint = (
            ""
            if str(tokenizer).lower().startswith("byte")
            else ": `--tokenizer subword` gives dolma2 ids (any other tokenizer's: name it with --tokenizer-identifier)"
        )
        raise UsageError(f"--tokenizer must be 'byte' or 'subword', got {tokenizer!r}{hint}")
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not 1 <= concurrency <= 256:
        raise UsageError(f"--concurrency must be between 1 and 256, got {concurrency}")
    if not 1 <= connections <= 1024:
        raise UsageError(f"--connections must be between 1 and 1024, got {connections}")
    if retries < 1:
        raise UsageError(f"--retries must be at least 1, got {retries}")
    if not 0 < read_timeout < float("inf"):  # inf: a stalled download would hang the run for good
        raise UsageError(f"--read-timeout must be a positive, finite number of seconds, got {read_timeout}")
    if processes < 0:
        raise UsageError(f"--processes must be 0 (one per usable core) or more, got {processes}")
    if check_every < 0:
        raise UsageError(f"--check-every must be 0 (off) or more, got {check_every}")
    if max_document_bytes < 0:
        raise UsageError(f"--max-document-bytes must be 0 (the default) or more, got {max_document_bytes}")
    if eos_token_id is not None and not 0 <= eos_token_id < 1 << 32:
        raise UsageError(f"--eos-token-id must be a token id (0 or more, below 2**32), got {eos_token_id}")


#: ``--engine auto`` runs the ``tokenizers`` reference itself on plans of fewer compressed bytes
#: than this (the same ids; fastokens' longer build only pays off on more text).
SMALL_PLAN_BYTES = 1 << 20


def _record_split(out: OutputDir, plan: Plan, worker: tuple[int, int]) -> None:
    """A share the folder took records its N (``planner.record_shares``), warned when the shares
    before it were of another split."""
    if (other := record_shares(out, plan, worker[1])) is not None:
        log.warning(
            "%s: its shares were started as --worker I/%d; this one is %d/%d, of another split of the plan: "
            "it overlaps theirs and leaves files to none of them (finalize names what is missing). Give every "
            "share the same N",
            out,
            other,
            worker[0],
            worker[1],
        )


def _small(plan: Plan) -> bool:
    return sum(pf.planned_bytes for pf in plan.files) < SMALL_PLAN_BYTES


#: With ``processes=0``, a worker process per this many planned compressed bytes, up to the cores:
#: starting a process costs about a second of CPU (imports, the BPE engine), which a small
#: plan does not win back.
BYTES_PER_PROCESS = 16 * 1024 * 1024


def auto_processes(plan: Plan | None) -> int:
    if plan is None:
        return usable_cores()
    # The bytes to decode (a prefix's, not its file's).
    planned = sum(pf.planned_bytes for pf in plan.files)
    return max(1, min(usable_cores(), len(plan.files), -(-planned // BYTES_PER_PROCESS)))


@dataclass
class FetchReport:
    files: int
    fetched_now: int  # staged from a transfer
    documents_now: int
    tokens_now: int
    written: Written
    verified: frozenset[str]
    engines: tuple[str, ...]
    finished: dict[str, Any] | None = None  # the manifest of an output already complete and current
    layout: Layout | None = None  # every planned file's shard layout, from the workers' reports
    from_raw_now: int = 0  # staged from their downloads kept in raw/, without a transfer

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "fetched_now": self.fetched_now,
            "from_raw_now": self.from_raw_now,
            "documents_now": self.documents_now,
            "tokens_now": self.tokens_now,
            "engines": list(self.engines),
        }


def _say_kept_downloads(out: OutputDir, fresh: list[PlannedFile], streaming: bool) -> set[str]:
    """One line when files to fetch are kept whole in ``raw/`` (an earlier ``--no-streaming``
    run's): a --no-streaming rerun read them without a word, so the README's "reuses them on a
    rerun" could not be seen kept, and a streaming one downloaded them again, also without a word.
    (Only their sizes are looked at here; the worker checks each against the listing.) Returns
    the keys of those files."""
    kept: list[PlannedFile] = []
    where = ""
    for pf in fresh:
        try:
            path = out.download_path(pf.key, check_repo_path(pf.path), keep=True)
            if path.stat().st_size == pf.size:
                kept.append(pf)
                where = str(path.parent.parent)  # raw/ (of the folder, or of the scratch for a bucket)
        except (OSError, BolmoError):
            continue
    if not kept:
        return set()
    said = (
        f"{len(kept)} of the {len(fresh)} file(s) to fetch are in {where} already "
        f"({human_bytes(sum(pf.size for pf in kept))}, kept by an earlier --no-streaming run): "
    )
    if streaming:
        log.info("%sa streaming run downloads them again (--no-streaming reads them)", said)
    else:
        log.info("%sread from there once checked against the listing, not downloaded again", said)
    return {pf.key for pf in kept}


def _check_disk(
    out: OutputDir, plan: Plan, recs: dict[int, dict[str, Any] | None], kind: str, streaming: bool, shards: bool
) -> None:
    """Refuse a run that cannot fit: only the work left counts (files not staged yet, shards not
    written yet), estimated from what is staged already when anything is (``recs``: each unit's
    completion record, None when not staged)."""
    left = [plan.files[u] for u, rec in recs.items() if rec is None]
    need = disk_needed(left, kind, streaming, shards_for=list(plan.files) if shards else [])
    done = [(plan.files[u], rec) for u, rec in recs.items() if rec is not None]
    planned = sum(pf.planned_bytes for pf, _ in done)
    if planned > 0:  # this data's own ratio instead of typical compression ratios
        per_byte = sum(int(rec.get("tokens", 0)) for _, rec in done) / planned
        left_tokens = per_byte * sum(pf.planned_bytes for pf in left)
        need = int(left_tokens * (1 if kind == "byte" else 4) * 1.1)
        if shards:
            need += int(4 * per_byte * sum(pf.planned_bytes for pf in plan.files) * 1.1)
        if not streaming:
            need += sum(pf.size for pf in left)
    if shards:
        need -= sum(size for name, size in out.shards().items() if name.endswith(".npy"))
    free = out.free_bytes()
    if free is not None and free < need:
        raise DiskSpaceError(
            f"{out} has {human_bytes(free)} free; the {len(left)} file(s) left to fetch need about {human_bytes(need)} "
            "(staging" + (" + shards" if shards else "") + "). Free space, choose another --output-dir or a smaller "
            "--data-fraction, or pass --skip-disk-check if you know better."
        )


def _fetch(
    out: OutputDir,
    *,
    tokenizer: str = "byte",
    tokenizer_identifier: str = DEFAULT_TOKENIZER_ID,
    eos_token_id: int | None = None,
    special_tokens_as_text: bool = True,
    engine: str = "auto",
    check_every: int = DEFAULT_CHECK_EVERY,
    concurrency: int = DEFAULT_CONCURRENCY,
    connections: int = DEFAULT_CONNECTIONS,
    streaming: bool = True,
    verify_prefixes: bool | None = None,
    endpoint: str | None = None,
    retries: int = 8,
    read_timeout: float = 60.0,
    progress: bool = True,
    force: bool = False,
    check_disk: bool = True,
    plan_options: dict[str, Any] | None = None,
    processes: int = 0,
    worker: tuple[int, int] | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    ray_tasks: int = 0,
    max_document_bytes: int = 0,
    shard_bound: int | None = None,
    listing_checked: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    tok_future: Future[tuple[TokenizerSpec, TokenizerInfo]] | None = None,
    pool: Executor | None = None,
) -> FetchReport:
    validate_fetch_options(
        tokenizer=tokenizer,
        engine=engine,
        concurrency=concurrency,
        connections=connections,
        retries=retries,
        read_timeout=read_timeout,
        processes=processes,
        check_every=check_every,
        max_document_bytes=max_document_bytes,
        eos_token_id=eos_token_id,
    )
    ep = _endpoint(endpoint)
    _refuse_other_kind(out, tokenizer, force, share=worker is not None)
    existing = None if force else load_plan(out)
    # With a plan on disk (or --processes) the workers are spawned now and import while the repo is
    # listed; a new plan's size is known only after the listing, and a small one (a smoke test)
    # runs in this process rather than pay for spawning.
    n = processes or (auto_processes(existing) if existing is not None else 0)
    # The tokenizer JSON loads (a download on the real Hub) while the repo is listed.
    loader = ThreadPoolExecutor(1, thread_name_prefix="bolmo-tokenizer")
    if tok_future is None:
        tok_future = loader.submit(
            contextvars.copy_context().run,  # (this run's Hub call settings: ``_HUB_RETRY``)
            _tokenizer_spec,
            tokenizer,
            tokenizer_identifier,
            endpoint=ep,
            eos_token_id=eos_token_id,
            special_tokens_as_text=special_tokens_as_text,
            engine=engine,
            check_every=check_every,
            folder=out,
        )

    def executor_for(n: int) -> Executor:  # the one place that picks who runs the files
        return stack.enter_context(
            choose(processes=n, worker=worker, ray=ray, ray_address=ray_address, ray_tasks=ray_tasks)
        )

    with contextlib.ExitStack() as stack:
        stack.callback(loader.shutdown, wait=False, cancel_futures=True)  # an error does not wait for it
        stack.callback(_TOKENIZER_LOAD.reset, _TOKENIZER_LOAD.set(tok_future))
        # ``pool``: spawned by ``prepare`` before it listed the repo; this call owns it from here.
        pool = stack.enter_context(pool) if pool is not None else executor_for(n) if n or ray else None
        # (after the workers are spawned: they import while this process does)
        from .finalizer import ShardPlanner, retire_stale_sources, source_prefix
        from .staging import Staging, unverified_prefix
        from .tokenize import forget_probed

        if existing is not None and not any(v is not None for v in (plan_options or {}).values()):
            the_plan = existing
            if not _accept_endpoint(the_plan, ep, out) and not listing_checked:
                run_interruptible(_check_listing(the_plan, ep), "checking the repository's listing")
        else:
            the_plan = ensure_plan(out, endpoint=endpoint, force=force, **(plan_options or {}))
            if on_plan is not None:
                tok_future.result()  # a bad tokenizer is reported instead of the plan table
                on_plan(the_plan)
        if pool is None:
            n = auto_processes(the_plan)
            pool = executor_for(n)
        units = pool.units(the_plan)
        spec_tok, info = tok_future.result()
        stack.callback(forget_probed)
        if not (isinstance(pool, Pool) and pool.processes == 1):
            # The probe's reference engine serves only a worker on a thread of this process.
            forget_probed()
            release_free_memory(0)
        if eos_token_id is not None and info.kind == "subword" and eos_token_id >= info.vocab_size:
            log.warning(
                "--eos-token-id %d is not one of %s's %d ids: every document will end with an id its vocabulary "
                "(and a model's embedding sized to it) does not have; pass the tokenizer's own EOS id, or leave "
                "the flag out",
                eos_token_id,
                tokenizer_identifier,
                info.vocab_size,
            )
        if engine == "auto" and info.kind == "subword" and _small(the_plan):
            # A smoke test: building fastokens (0.5 s a process) would cost more than it saves;
            # the reference gives the same ids.
            info = dataclasses.replace(info, engine="tokenizers")
            spec_tok = dataclasses.replace(spec_tok, engine="tokenizers", checked=info)
        whole = reads_prefixes_whole(verify_prefixes, ep, streaming)
        offline = hub_offline()
        if offline and not (  # (a finished output whose staging was dropped: nothing to do, as online)
            shard_bound is not None
            and out.staging_dropped()
            and _finished_output(out, the_plan, shard_bound, info.to_json(), checks_prefixes=whole)
        ):
            from .offline import check_files  # (before any work: what is missing is said in one line)

            check_files(out, the_plan, units, whole, the_plan.endpoint)
        _check_state(out, info, force, share=worker is not None)
        if worker is not None:  # (a share the folder refused, pointed at another run's, records nothing)
            _record_split(out, the_plan, worker)
        if spec_tok.source is not None and out.read_text(TOKENIZER) != spec_tok.source.json_text:
            out.write_text(TOKENIZER, spec_tok.source.json_text)
        staging = Staging(out)
        recs = {u: staging.done(the_plan.files[u]) for u in units}  # each marker read once
        if whole:
            # A prefix staged with its hash unchecked (--no-verify-prefixes) is staged again by a
            # run that checks them (its worker does the same: ``run_file_task``).
            recs = {u: None if rec is not None and unverified_prefix(rec) else rec for u, rec in recs.items()}
        fresh = [u for u, rec in recs.items() if rec is None]
        already = len(units) - len(fresh)
        # None staged is a finished output's staging dropped (--drop-staging): a rerun of that
        # prepare fetched every file again to rewrite the same shards (newuser17).
        if shard_bound is not None and (already == len(units) or (already == 0 and out.staging_dropped())):
            finished = _finished_output(out, the_plan, shard_bound, info.to_json(), checks_prefixes=whole)
            if finished is not None:  # a rerun of a finished prepare: nothing to do, nothing touched
                return FetchReport(len(units), 0, 0, 0, {}, frozenset(), (info.engine,), finished=finished)
        if ray and already == len(units) and all(staging.checked(the_plan.files[u]) is not None for u in units):
            # Nothing for Ray to do (every staged file checked against its marker here, as a worker
            # would): no cluster is contacted.
            log.info("all %d planned file(s) are staged and intact: nothing to fetch, Ray not started", len(units))
            return FetchReport(len(units), 0, 0, 0, {}, frozenset(the_plan.files[u].key for u in units), (info.engine,))
        if already:
            log.info(
                "%d of %d planned file(s) already staged: fetching the other %d",
                already,
                len(units),
                len(units) - already,
            )
        in_raw = _say_kept_downloads(out, [the_plan.files[u] for u in fresh], streaming and not offline)
        if check_disk:
            _check_disk(out, the_plan, recs, info.kind, streaming, shards=shard_bound is not None)
        if shard_bound is not None:  # (prepare: its workers put shards in place as files are staged)
            retire_stale_sources(out, the_plan, shard_bound)
        slots = max(1, -(-concurrency // max(1, n)))  # files decoding at once per worker
        per_worker = max(1, -(-connections // max(1, n)))  # its connections: files in flight, or segments
        pool.start(
            WorkerSpec(
                output_dir=out.location,
                files=the_plan.files,
                repo_id=the_plan.repo_id,
                repo_type=the_plan.repo_type,
                commit=the_plan.commit,
                endpoint=ep,
                tokenizer=spec_tok,
                eos=info.eos_token_id,
                streaming=streaming,
                verify_prefixes=verify_prefixes,
                retries=retries,
                read_timeout=read_timeout,
                slots=max(slots, per_worker),
                decoders=slots,
                connections=per_worker,
                max_document_bytes=max_document_bytes,
                src_prefix=source_prefix(the_plan),
                text_field=the_plan.selection.text_field,
                id_field=the_plan.selection.id_field,
                # A --worker share holds the folder's lock shared, and Ray's tasks may run a file
                # twice (a task retried while the first still runs): per-file claims. Otherwise
                # this run holds the lock exclusively (``_one_run_per_folder``): none needed.
                claims=worker is not None or ray,
                offline=offline,
            )
        )
        shards = ShardPlanner(the_plan, shard_bound) if shard_bound is not None else None
        total = sum(the_plan.files[u].read_bytes(whole) for u in units)
        to_stage = set(fresh)
        staged_here: set[int] = set()  # of those, the files this run heard staged (said if it is stopped)

        def on_staged(unit: int, lengths: Any) -> Any:
            if unit in to_stage:
                staged_here.add(unit)
            return shards.staged(unit, lengths) if shards is not None else []

        with Progress(len(units), total, enabled=progress, kind=f"{info.kind} tokens") as prog:
            try:
                result = pool.run(
                    units,
                    # Not the staged ones, nor those a --no-streaming run reads from raw/: the
                    # Hub's resolver budget (a rerun resolved every kept file for nothing).
                    resolve_ahead=[]
                    if offline
                    else fresh
                    if streaming
                    else [u for u in fresh if the_plan.files[u].key not in in_raw],
                    progress=prog,
                    on_staged=on_staged,
                    on_files_done=shards.finish if shards is not None else None,
                    layout_at=shards.layout_at if shards is not None else None,
                    open_shard=shards.open_shard if shards is not None else None,
                )
            except KeyboardInterrupt as exc:
                signum = signal_of(exc)
                kept = already + len(staged_here)
                if isinstance(pool, Pool):  # its workers have ended: the count is final
                    kept += _staged_unheard(staging, the_plan, (pool.handed_out & to_stage) - staged_here, whole)
                said = (
                    f"{interrupted_by(signum)}: the files staged so far are kept"  # (Ray's are not counted here)
                    if not isinstance(pool, Pool)
                    else f"{interrupted_by(signum)}: {kept} of the {len(units)} planned file(s) are staged and kept"
                    if kept
                    else f"{interrupted_by(signum)} before any of the {len(units)} planned file(s) was staged"
                )
                # What the original tool's Ctrl+C left, shards of what was done, is one command away
                # (not for a share: the others' files are still to come).
                partial = (
                    f" (`{command('finalize', '--output-dir', out, '--allow-incomplete')}` writes shards of what is staged)"
                    if worker is None and (kept or not isinstance(pool, Pool))
                    else ""
                )
                raise Stopped(f"{said}; rerun the same command to resume", signum, partial) from None
    if result.outage:  # a server down: one line, not one per file (``outage.OutageWatch``)
        raise FetchIncomplete(result.outage, failed=result.failed)
    if result.failed:
        names = "\n  ".join(f"{p}: {_without_path(p, why)}" for p, why in sorted(result.failed.items()))
        again = set(result.failed) - result.permanent
        advice = []
        if again:
            which = "the others are" if result.permanent else "these are"
            advice.append(f"Rerun the same command to resume: finished files are kept and only {which} fetched again.")
        if result.permanent:
            which = ", ".join(sorted(result.permanent)) if again else "These files"
            advice.append(
                f"{which} cannot be read as documents{' or disagree with the listing' if _disagree(result) else ''}, "
                "so a rerun fails them again: "
                f"`{command('finalize', '--output-dir', out, '--allow-incomplete')}` writes the shards without them (or plan again with "
                "--exclude PATH --force, which starts over)."
            )
        raise FetchIncomplete(
            f"{len(result.failed)} file(s) failed:\n  {names}\n" + " ".join(advice),
            failed=result.failed,
        )
    written: Written = {}
    if shards is not None:
        for k, pieces in shards.handed_out.items():
            if k in result.shards:
                written[k] = (pieces, result.shards[k])
    return FetchReport(
        files=len(units),
        fetched_now=result.fetched_now,
        documents_now=prog.documents,
        tokens_now=prog.tokens,
        written=written,
        verified=frozenset(the_plan.files[u].key for u in result.staged),
        engines=tuple(sorted(result.engines)),
        layout=shards.layout() if shards is not None else None,
        from_raw_now=result.from_raw,
    )


def _disagree(result: Any) -> bool:
    """Whether a file a rerun fails again failed for its size against the listing's
    (``download.ListingMismatch``), not for its documents."""
    return any("the listing and the file disagree" in result.failed[p] for p in result.permanent)


def _staged_unheard(staging: Staging, the_plan: Plan, units: set[int], whole: bool) -> int:
    """How many of ``units`` (handed to a worker, never heard of) are staged: a file whose marker
    was written as the stop landed, its message dropped or cut short (the stop's count was one short).
    Only the files in flight at the stop: a few marker reads, not one per planned file."""
    from .staging import unverified_prefix

    recs = (staging.done(the_plan.files[u]) for u in units)
    return sum(rec is not None and not (whole and unverified_prefix(rec)) for rec in recs)


#: The options ``fetch`` and ``prepare`` take as keywords (``**options``).
_FETCH_KEYWORDS = (
    set(inspect_signature(_fetch).parameters)
    - {"out", "plan_options", "shard_bound", "listing_checked", "tok_future", "pool"}
) | {"special_tokens_as_ids"}  # the CLI's spelling (``guidance.normalize`` turns it into special_tokens_as_text)


@_one_run_per_folder(create=True)
def fetch(
    output_dir: str | os.PathLike[str] | OutputDir,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    data_fraction: float | None = None,
    seed: int | None = None,
    worker: tuple[int, int] | str | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    ray_tasks: int = 0,
    force: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Fetch and stage every planned file not staged yet (planning first if needed).

    Options (all keywords, the CLI's flags): ``tokenizer`` ("byte" | "subword"),
    ``tokenizer_identifier``, ``eos_token_id``, ``special_tokens_as_ids``, ``engine``,
    ``check_every``, ``concurrency``, ``connections``, ``streaming``, ``verify_prefixes`` (None:
    a partly taken JSON-lines file is read whole and hash-checked over plain http, only its prefix
    over https), ``endpoint``, ``retries``,
    ``read_timeout``, ``progress``, ``check_disk``, ``processes`` (worker processes; 0: one per 16 MB
    planned, up to the usable cores; 1: one worker in this process), ``max_document_bytes``,
    ``on_plan`` (called with the plan when this call plans; ``special_tokens_as_text``, the reverse
    of ``special_tokens_as_ids``, still works but is deprecated). Who runs the files: a local pool of
    worker processes (default), ``worker=(I, N)`` or ``"I/N"``: only share I of N of the plan (a job array), or
    ``ray=True``: Ray tasks on the cluster at ``ray_address`` (local when None; ``ray_tasks``: 0
    for two per cluster CPU)."""
    if ray and worker is not None:
        raise UsageError("--ray and --worker do not go together: Ray spreads the shares itself.")
    if ray_tasks < 0:
        raise UsageError(f"--ray-tasks must be 0 (two per cluster CPU) or more, got {ray_tasks}")
    if isinstance(worker, str):  # the CLI's form, I/N (the wrapper parsed it; for type checkers)
        worker = parse_worker(worker)
    out = open_output(output_dir)
    plan_options = {"repo_id": repo_id, "revision": revision, "data_fraction": data_fraction, "seed": seed}
    if worker is not None:
        existing = load_plan(out)
        if existing is None:
            raise StateError(
                f"--worker needs the plan first: run `bolmo-async plan --output-dir {out} ...` once, then launch the "
                "workers (workers never plan on their own, so that all of them share one plan)."
            )
        conflicts = [
            f"--{k.replace('_', '-')} {v!r} (the plan has {getattr(existing, k)!r})"
            for k, v in plan_options.items()
            if v is not None and v != getattr(existing, k) and not (k == "revision" and v == existing.commit)
        ]
        if conflicts:
            raise UsageError(
                "--worker uses the plan already in --output-dir, which differs: "
                + "; ".join(conflicts)
                + ". Drop these options, or plan again first (without --worker)."
            )
        if force:  # (it said "which differs" of a plan no option differed from)
            raise UsageError(
                "--force does not go with --worker: a share never resets the folder the other shares write "
                f"into. Drop --force; to start the folder over, run `{command('plan', '--output-dir', out, '--force')}` "
                "(with the plan options) once, then the shares."
            )
        plan_options = {}
    try:
        with _hub_calls(options):
            report = _fetch(
                out,
                force=force,
                plan_options=plan_options,
                worker=worker,
                ray=ray,
                ray_address=ray_address,
                ray_tasks=ray_tasks,
                **options,
            )
    except TokenizerError as exc:
        hinted = None if force else _with_fetched_identifier(out, exc, options)
        if hinted is None:
            raise
        raise hinted from exc
    return report.to_json()


def _with_fetched_identifier(out: OutputDir, exc: TokenizerError, options: dict[str, Any]) -> TokenizerError | None:
    """A subword tokenizer that could not be had, asked for by another identifier than the folder
    was fetched with (a share that left out --tokenizer-identifier, so the default Hub repo): the
    error says which one the folder holds. None: nothing to add."""
    from .errors import EngineMismatch

    if isinstance(exc, EngineMismatch) or options.get("tokenizer") != "subword":
        return None
    prev = fetched_with(out)
    asked = options.get("tokenizer_identifier", DEFAULT_TOKENIZER_ID)
    if not isinstance(prev, dict) or prev.get("kind") != "subword" or prev.get("identifier") in (None, asked):
        return None
    flags = shlex.join(tokenizer_flags(prev))
    return TokenizerError(
        f"{exc} {out} was fetched with another tokenizer identifier: pass {flags} to go on with it (as it was fetched)."
    )


@_one_run_per_folder(create=False)
def finalize(
    output_dir: str | os.PathLike[str] | OutputDir,
    *,
    max_tokens_per_file: int | None = None,
    allow_incomplete: bool = False,
    ray: bool = False,
    ray_address: str | None = None,
    drop_staging: bool = False,
) -> dict[str, Any]:
    """Write the shards, their csv.gz, ``manifest.json`` and ``data_sources.txt`` from the staging
    (shards written by local threads, or by Ray tasks with ``ray=True``). ``max_tokens_per_file``
    None: the bound this folder was finalized with before (else 100M). ``drop_staging``: then
    delete ``staging/`` (only after a complete finalize)."""
    from .finalizer import finalize_dir

    out = open_output(output_dir)
    write_shards = choose(processes=1, ray=True, ray_address=ray_address).write_shards if ray else None
    kept = _something_staged(out, max_tokens_per_file)
    if kept is not None:
        return kept
    manifest = finalize_dir(out, max_tokens_per_file, allow_incomplete=allow_incomplete, write_shards=write_shards)
    return _drop_staging(out, manifest) if drop_staging else manifest


def _staged_any(out: OutputDir) -> bool:
    try:
        _something_staged(out, None)
    except StateError:
        return False
    return True


def _something_staged(out: OutputDir, max_tokens_per_file: int | None) -> dict[str, Any] | None:
    """A finalize needs at least one staged file: with none, ``--allow-incomplete`` would replace
    the output (a finished one, whose staging ``--drop-staging`` removed) with an empty one.
    Such a finished output asked for again as it is (no other --max-tokens-per-file) is its
    manifest, returned: there is nothing to remake (a finalize run twice, a job's retry, was
    refused, exit 1, naming a refetch)."""
    from .staging import STAGING_FORMAT, Staging

    the_plan = load_plan(out)
    if the_plan is None:
        return None  # finalize_dir says what is missing
    staging = Staging(out)
    if any(staging.done(pf) is not None for pf in the_plan.files):
        return None
    try:
        manifest = json.loads(out.read_bytes(MANIFEST) or b"{}")
        finished = bool(manifest.get("complete"))
    except (ValueError, AttributeError):
        manifest, finished = {}, False
    n = len(the_plan.files)
    older, damaged = _older_staging_format(out, the_plan)
    bound = manifest.get("max_tokens_per_file") if max_tokens_per_file is None else max_tokens_per_file
    gone = finished and older is None and not damaged and out.staging_dropped()
    kept = _finished_output(out, the_plan, bound, fetched_with(out)) if gone and isinstance(bound, int) else None
    if kept is not None:
        log.info(
            "the output in %s is complete and current (%d shard(s), --max-tokens-per-file %d; its staging was "
            "dropped): nothing to do, nothing rewritten; `%s` checks its shards",
            out,
            len(kept["shards"]),
            bound,
            command("inspect", out),
        )
        return kept
    why = (
        f"{n} of {n} planned file(s) are not staged in this version's format: {out}'s staging was written by "
        f"an earlier bolmo-async (staging format {older}, now {STAGING_FORMAT}), so shards cannot be made from it"
        if older is not None
        else f"{n} of {n} planned file(s) are not staged: {out}'s staging markers are damaged (above)"
        if damaged
        else f"{n} of {n} planned file(s) are not staged: the staging of {out}'s finished output is gone "
        "(--drop-staging removes it), so its shards cannot be remade from it"
        + (
            f" at --max-tokens-per-file {max_tokens_per_file} (they stay as they are, at {manifest.get('max_tokens_per_file')})"
            if max_tokens_per_file is not None and max_tokens_per_file != manifest.get("max_tokens_per_file")
            else ""
        )
        if finished
        else f"{n} of {n} planned file(s) of {out} are not staged yet"
    )
    finished = finished or older is not None or damaged  # either way, the fetch fetches them again
    again = fetch_command(out, the_plan.endpoint, fetched_with(out))
    raise StateError(
        f"{why}. Run `{again}` first{' (it fetches them again)' if finished else ''}, "
        "then finalize; --allow-incomplete would write an empty output."
    )


def _without_path(path: str, why: str) -> str:
    """A failed file's reason without the path its error begins with (``repo/path: gave up ...``):
    the list names each file once ("data/a.zst: allenai/bolmo_mix/data/a.zst: gave up" named it twice)."""
    head, sep, rest = why.partition(": ")
    return rest if sep and rest and (head == path or head.endswith("/" + path)) else why


def _older_staging_format(out: OutputDir, the_plan: Plan) -> tuple[Any, bool]:
    """The format of a staged file's marker written in another staging format (an upgrade of
    bolmo-async between the fetch and this finalize), or None: that staging is there, not gone;
    and whether a marker of this format is there, damaged (``staging.marker_problem``)."""
    from .staging import STAGING_FORMAT, marker_problem

    damaged = False
    for pf in the_plan.files[:100]:
        with contextlib.suppress(OSError, ValueError, RecursionError):
            rec = json.loads(out.read_bytes(marker_name(pf.key)) or b"null")
            if isinstance(rec, dict) and rec.get("path") == pf.path and rec.get("format") != STAGING_FORMAT:
                return rec.get("format"), False
            damaged = damaged or (isinstance(rec, dict) and rec.get("path") == pf.path and bool(marker_problem(rec)))
    return None, damaged


def _drop_staging(out: OutputDir, manifest: dict[str, Any]) -> dict[str, Any]:
    if not manifest["complete"]:
        log.warning("staging kept: the output is incomplete, and the missing files are fetched into it")
        return manifest
    out.remove_staging()
    return manifest


@_one_run_per_folder(create=True)
def prepare(
    output_dir: str | os.PathLike[str] | OutputDir,
    *,
    data_fraction: float = DEFAULT_DATA_FRACTION,
    max_tokens_per_file: int | None = None,
    seed: int = DEFAULT_SEED,
    repo_id: str = DEFAULT_REPO_ID,
    revision: str = "main",
    endpoint: str | None = None,
    force: bool = False,
    allow_incomplete: bool = False,
    drop_staging: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    selection: Selection | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    source_depth: int | None = None,
    source_fractions: Mapping[str, float] | None = None,
    text_field: str | None = None,
    id_field: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """plan + fetch + finalize; shards are written by the workers while files are still being
    fetched. On interruption or failed files it stops (exit non-zero) without writing
    ``data_sources.txt``; ``allow_incomplete`` then finalizes what was staged (``complete: false``).
    ``max_tokens_per_file`` None: the bound this folder was finalized with before (else 100M).
    The selection keywords are ``plan``'s; the fetch options ``fetch``'s."""
    sel = selection_from(
        "prepare",
        selection,
        include=include,
        exclude=exclude,
        source_depth=source_depth,
        source_fractions=source_fractions,
        text_field=text_field,
        id_field=id_field,
    )
    out = open_output(output_dir)
    _refuse_other_kind(out, options.get("tokenizer", "byte"), force)
    # Worker processes asked for are spawned first, before this process imports the network and
    # the data path: they import (half a second of CPU each) while it does and while it lists the
    # repo and loads the tokenizer, instead of after. (With processes=0 their number depends on
    # the plan's size, known only after the listing.)
    processes = options.get("processes", 0)
    local = not options.get("ray") and options.get("worker") is None
    pool = choose(processes=processes) if processes > 1 and local else None
    try:
        from .finalizer import finalize_dir, remembered_bound

        if max_tokens_per_file is None:
            max_tokens_per_file = remembered_bound(out)
            if out.exists_file(MANIFEST):
                log.info(
                    "--max-tokens-per-file %d: the bound this folder was finalized with (pass the flag to change it)",
                    max_tokens_per_file,
                )
                warn_short_shards(max_tokens_per_file)
        with _hub_calls(options):
            tok_future, the_plan, listed = _plan_while_loading(
                output_dir, out, repo_id, revision, endpoint, data_fraction, seed, force, sel, options
            )
        if on_plan is not None:
            on_plan(the_plan)
    except BaseException as exc:
        if pool is not None:
            pool.__exit__(type(exc), exc, exc.__traceback__)  # stops the workers
        raise
    try:
        with _hub_calls(options):
            report = _fetch(
                out,
                endpoint=endpoint,
                shard_bound=max_tokens_per_file,
                listing_checked=listed,
                tok_future=tok_future,
                pool=pool,
                **options,
            )
    except BaseException as exc:
        # ``_fetch`` ends the pool once it holds it; an error or a stop before (its first lines:
        # a stop within milliseconds of plan.json) left it to the interpreter's exit, which ended
        # the workers last (when they had queues, after unlinking their semaphores: one still being
        # forked printed "FileNotFoundError ... SemLock._rebuild"). Ending it twice does nothing.
        if pool is not None:
            pool.__exit__(type(exc), exc, exc.__traceback__)
        if not isinstance(exc, FetchIncomplete | Stopped):
            raise
        if allow_incomplete and out.exists_file(RUN_STATE) and _staged_any(out):
            manifest = finalize_dir(out, max_tokens_per_file, allow_incomplete=True)
            log.warning(
                "wrote %d shard(s) from what was staged (manifest marked incomplete: %d planned file(s) missing)",
                len(manifest["shards"]),
                len(manifest["missing_files"]),
            )
            if isinstance(exc, Stopped) and exc.partial:  # (written just now: not a step left to the user)
                raise exc.without_partial() from None
        raise
    if report.finished is not None:
        log.info(
            "the output in %s is complete and current (%d shard(s)): nothing to do, nothing rewritten "
            "(--force starts over)",
            out,
            len(report.finished["shards"]),
        )
        return _drop_staging(out, report.finished) if drop_staging else report.finished
    manifest = finalize_dir(
        out, max_tokens_per_file, written=report.written, verified=report.verified, layout=report.layout
    )
    return _drop_staging(out, manifest) if drop_staging else manifest


def _plan_while_loading(
    output_dir: str | os.PathLike[str] | OutputDir,
    out: OutputDir,
    repo_id: str,
    revision: str,
    endpoint: str | None,
    data_fraction: float,
    seed: int,
    force: bool,
    sel: Selection,
    options: dict[str, Any],
) -> tuple[Future[tuple[TokenizerSpec, TokenizerInfo]], Plan, bool]:
    """``prepare``'s plan, made while the tokenizer loads: the tokenizer's future, the plan, and
    whether the repo was listed just now."""
    # The tokenizer loads while the repo is listed; a bad one stops the listing and is reported
    # before the plan table.
    loader = ThreadPoolExecutor(1, thread_name_prefix="bolmo-tokenizer")
    tok_future = loader.submit(
        contextvars.copy_context().run,  # (this run's Hub call settings: ``_HUB_RETRY``)
        _tokenizer_spec,
        options.get("tokenizer", "byte"),
        options.get("tokenizer_identifier", DEFAULT_TOKENIZER_ID),
        endpoint=_endpoint(endpoint),
        eos_token_id=options.get("eos_token_id"),
        special_tokens_as_text=options.get("special_tokens_as_text", True),
        engine=options.get("engine", "auto"),
        check_every=options.get("check_every", DEFAULT_CHECK_EVERY),
        folder=out,
    )
    loader.shutdown(wait=False)  # its one task runs on; an error below does not wait for it
    token = _TOKENIZER_LOAD.set(tok_future)
    try:
        the_plan, listed = _plan(
            output_dir,
            repo_id=repo_id,
            revision=revision,
            endpoint=endpoint,
            data_fraction=data_fraction,
            seed=seed,
            force=force,
            selection=sel,
        )
    finally:
        _TOKENIZER_LOAD.reset(token)
    tok_future.result()
    return tok_future, the_plan, listed


def _finished_output(
    out: OutputDir, plan: Plan, bound: int, tokenizer: dict[str, Any] | None, checks_prefixes: bool = False
) -> dict[str, Any] | None:
    """The manifest of ``out`` when it is a complete finalize of this very plan at ``bound`` with
    ``tokenizer`` (its ``to_json()``; None: any) and its shards, indexes and ``data_sources.txt``
    are all there at their recorded sizes; else None. (The tokenizer was left to run.json's check:
    with run.json gone, a prepare with another tokenizer called the old shards current.)
    ``checks_prefixes``: a run that checks JSON-lines prefixes against their file's sha256, for
    which shards made from prefixes read unchecked are not current (with the staging kept, it
    stages them again; after --drop-staging it called them current)."""
    try:
        manifest = json.loads(out.read_bytes(MANIFEST) or b"null")
        if not isinstance(manifest, dict) or not manifest.get("complete"):
            return None
        if checks_prefixes and manifest.get("unverified_prefixes"):
            return None
        made_with = manifest.get("tokenizer")
        if tokenizer is not None and (
            not isinstance(made_with, dict) or any(made_with.get(k) != tokenizer.get(k) for k in TOKENIZER_IDENTITY)
        ):
            return None
        same = (
            manifest.get("max_tokens_per_file") == bound
            and manifest.get("revision") == plan.commit
            and manifest.get("data_fraction") == plan.data_fraction
            and manifest.get("seed") == plan.seed
            and manifest.get("selection") == plan.selection.to_json()
            and manifest.get("planned_files") == len(plan.files)
        )
        shards = manifest["shards"]
        sizes = out.shards()
        names = [str(s["path"]).replace(os.sep, "/").rsplit("/", 1)[-1] for s in shards]
        intact = all(
            sizes.get(n) == 4 * int(s["tokens"]) and csv_name(n) in sizes for n, s in zip(names, shards, strict=True)
        )
        listed = out.read_text(DATA_SOURCES)
        current = listed is not None and listed.split() == [out.ref(n) for n in names]
    except (ValueError, KeyError, TypeError):
        return None
    return manifest if same and intact and current else None


_VALIDATED = (
    "tokenizer",
    "engine",
    "concurrency",
    "connections",
    "retries",
    "read_timeout",
    "processes",
    "check_every",
    "max_document_bytes",
    "eos_token_id",
)


def inspect(
    output_dir: str | os.PathLike[str], *, decode: int = 0, verify: bool = True, sequence_length: int | None = None
) -> dict[str, Any]:
    """Check an output folder written by ``finalize`` / ``prepare`` (read only).

    Returns ``{"manifest", "shards", "documents", "problems", ...}``: every shard checked against
    the manifest (size, whole uint32 tokens, XXH3-128 checksum unless ``verify=False``),
    ``data_sources.txt`` checked to point into the folder, the first ``decode`` documents decoded
    back to text; ``problems`` is empty when all is well; ``running`` names the run writing the
    folder meanwhile (its problems are then that run's work in progress), else None. ``sequence_length=N`` adds
    ``fixed_length``: the instances a fixed-length reader (OLMo-core's) makes at N tokens and the
    tokens it drops (each shard's tail shorter than N)."""
    from .inspector import inspect_dir

    check_output_dir("inspect", output_dir)
    check_types(
        "inspect",
        {"decode": decode, "verify": verify, "sequence_length": sequence_length},
        none_ok=("sequence_length",),
    )
    if decode < 0:
        raise UsageError(f"--decode must be 0 or more, got {decode}")
    if sequence_length is not None and sequence_length < 1:
        raise UsageError(f"--sequence-length must be 1 or more, got {sequence_length}")
    out = open_output(output_dir)
    out.read_only = True  # its errors' advice: nothing to resume
    out.check_reachable()
    rep = inspect_dir(out, decode=decode, verify=verify)
    if sequence_length is not None:
        rep["fixed_length"] = fixed_length_loss((int(s["tokens"]) for s in rep["shards"]), sequence_length)
    return rep


__all__ = ["fetch", "finalize", "inspect", "plan", "prepare"]
