"""The ``bolmo-async`` command line: a thin layer over ``bolmo_async.api``.

Errors print one line naming the fix; ``BOLMO_ASYNC_DEBUG=1`` shows the traceback.

Only typer and the small modules load at start: ``--help``, ``--version`` and a usage error
answer at once. The API (the HTTP stack, numpy, pyarrow: half a second of CPU) is imported by
the command that runs, after its arguments are parsed.
"""
# ruff: noqa: E402  (a quiet Ctrl+C handler is installed before the slow imports)

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from .entry import STOP_SIGNALS
from .entry import interrupted_at_start as _interrupted_at_start  # light: before the imports below
from .entry import stoppable as _stoppable

# A stop while the imports below run (a second or so) ends quietly, not with a traceback from
# inside a library; the usual handlers are back once they are done.
_AT_START = _stoppable()
for _sig in _AT_START:
    signal.signal(_sig, _interrupted_at_start)

import typer
import typer.core

from .errors import BolmoError, Interrupted, OutputClosed, Stopped, interrupted_by, signal_of
from .models import (
    DEFAULT_CHECK_EVERY,
    DEFAULT_CONCURRENCY,
    DEFAULT_CONNECTIONS,
    DEFAULT_DATA_FRACTION,
    DEFAULT_MAX_DOCUMENT_BYTES,
    DEFAULT_MAX_TOKENS_PER_FILE,
    DEFAULT_REPO_ID,
    DEFAULT_SEED,
    DEFAULT_TOKENIZER_ID,
    Selection,
    validate_fraction,
)
from .util import human_bytes, human_count

#: The value each option takes, named as the README's tables name it (`--data-fraction F`): typer
#: said `<str>`, `<float>`, `<int range>` (newuser17). tests/test_docs.py compares the two.
VALUE_NAMES = {
    "--output-dir": "D",
    "--endpoint": "URL",
    "--repo-id": "ID",
    "--revision": "REV",
    "--data-fraction": "F",
    "--seed": "N",
    "--include": "GLOB",
    "--exclude": "GLOB",
    "--source-depth": "N",
    "--source-fraction": "SOURCE=F",
    "--text-field": "NAME",
    "--id-field": "NAME",
    "--tokenizer": "KIND",
    "--tokenizer-identifier": "ID",
    "--eos-token-id": "N",
    "--engine": "NAME",
    "--check-every": "N",
    "--processes": "N",
    "--concurrency": "N",
    "--connections": "N",
    "--retries": "N",
    "--read-timeout": "S",
    "--max-document-bytes": "N",
    "--worker": "I/N",
    "--ray-address": "ADDR",
    "--ray-tasks": "N",
    "--max-tokens-per-file": "N",
    "--decode": "N",
    "--sequence-length": "N",
    "--scratch-dir": "DIR",
    "--size-mb": "MB",
    "--vocab-size": "N",
    "--host": "ADDR",
    "--port": "N",
    "--cdn-port": "N",
    "--model-repo": "ID=DIR",
    "--page-size": "N",
    "--faults": "RATE[:kinds]",
    "--fault-seed": "N",
    "--require-token": "TOKEN",
    "--require-token-file": "PATH",
    "--url-ttl": "S",
    "--ready-file": "PATH",
    "--wan-rtt-ms": "MS",
    "--wan-response-mbs": "MB",
    "--wan-link-mbs": "MB",
}


class _Argument(typer.core.TyperArgument):
    """A positional argument named in the usage line as in the README and its own help
    (`mirror serve [OPTIONS] DIR`): typer wrote a required one as `{DIR}`."""

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        if self.metavar is None:
            return list(super().get_usage_pieces(ctx))
        return [self.metavar if self.required else f"[{self.metavar}]"]


def _name_values(group: Any) -> None:
    """Every option of every command below ``group`` gets its value's name from ``VALUE_NAMES``;
    every argument is named in the usage line as in its help (``_Argument``)."""
    for p in getattr(group, "params", []):
        named = [VALUE_NAMES[o] for o in p.opts if o in VALUE_NAMES]
        if p.param_type_name == "option" and named and not p.is_flag:
            p.metavar = named[0]
        elif type(p) is typer.core.TyperArgument:
            p.__class__ = _Argument
    for cmd in getattr(group, "commands", {}).values():
        _name_values(cmd)


class _Commands(typer.core.TyperGroup):
    """The command group: an option given to a command that does not take it, but another does
    (a job array's steps given the same flags), is named with the commands that take it. Click's
    guess was a flag of this command that merely looks alike (`fetch --max-tokens-per-file`:
    "Possible options: --tokenizer-identifier")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _name_values(self)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """The original script's flags with no command before them (``--output-dir D
        --data-fraction F``, as ``prepare_bolmo_data.py`` took them): named with the command
        that takes them all, ``prepare`` (click said "No such option: --output-dir")."""
        given = list(args)  # (click's parser consumes the list)
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            if type(exc).__name__ != "NoSuchOption" or ctx.parent is not None:
                raise
            option = exc.option_name  # type: ignore[attr-defined]
            takes = [
                n for n, cmd in _all_commands(self) if any(option in p.opts + p.secondary_opts for p in cmd.params)
            ]
            if not takes:
                raise
            from .guidance import command

            name = "prepare" if "prepare" in takes else takes[0]
            usage_error = sys.modules[type(exc).__module__].UsageError
            line = command(*name.split(), *given)
            raise usage_error(f"{option} needs a command before it: `{line}`", ctx=ctx) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:  # (typer may carry its own copy of click's classes: told by name)
            if type(exc).__name__ != "NoSuchOption" or getattr(exc, "ctx", None) is None:
                raise
            here = exc.ctx.command  # type: ignore[attr-defined]
            option = exc.option_name  # type: ignore[attr-defined]
            commands = _all_commands(self)
            owners = [
                n
                for n, cmd in commands
                if cmd is not here and any(option in p.opts + p.secondary_opts for p in cmd.params)
            ]
            if not owners:
                raise
            usage_error = sys.modules[type(exc).__module__].UsageError
            where = next((n for n, cmd in commands if cmd is here), here.name)
            raise usage_error(f"{option} is an option of {', '.join(owners)}, not of {where}.", ctx=exc.ctx) from None  # type: ignore[attr-defined]


def _all_commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every command below ``group`` by its full name ("fetch", "mirror serve")."""
    found: list[tuple[str, Any]] = []
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            found += _all_commands(cmd, f"{prefix}{name} ")
        else:
            found.append((prefix + name, cmd))
    return found


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags read as flags, [ray] stays as written
    no_args_is_help=True,
    help="Prepare allenai/bolmo_mix token shards for Bolmo / OLMo-core training.",
    # Which command first: the list alone did not say (newuser17). "\b": kept as written.
    epilog="\b\nStart here: bolmo-async prepare -o D --data-fraction 0.001 (a smoke test;\n"
    "add --tokenizer subword for the dolma2 ids bolmo-core's stage 1/2 read),\n"
    "then bolmo-async inspect D. Step by step, or as a job array: plan,\n"
    "fetch (--worker I/N in each task), finalize. Offline: bolmo-async mirror\n"
    'sample DIR, then mirror serve DIR (README.md: "Try the commands yourself").',
)
mirror_app = typer.Typer(
    rich_markup_mode=None,
    no_args_is_help=True,
    help="A local Hub-compatible mirror and a generated sample mix (tests, demo, benchmarks).",
)
app.add_typer(mirror_app, name="mirror", short_help="A local Hub mirror and a sample mix: try the tool offline.")

OUT = typer.Option(
    ..., "--output-dir", "-o", help="Folder (or s3://BUCKET/PREFIX, r2://, gs://, az://) for plan, staging, shards."
)
ENDPOINT = typer.Option(None, "--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co).")
REPO = typer.Option(DEFAULT_REPO_ID, "--repo-id", help="Dataset repo to read.")
REVISION = typer.Option("main", "--revision", help="Branch, tag or commit; pinned to its commit sha in plan.json.")


def _fraction(value: float | None) -> float | None:
    if value is not None:
        try:
            validate_fraction(value)
        except BolmoError as exc:
            raise typer.BadParameter(str(exc)) from exc
    return value


def _parse_fraction(value: str | float) -> float:
    """A float, as typer's own parse; a percentage (``1%``: "not a valid float", which named no
    fix) is refused with the fraction it means. (The default comes as a float.)"""
    if isinstance(value, float | int):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        percent = float(text.removesuffix("%")) if text.endswith("%") else None
    except ValueError:
        percent = None
    if percent is not None:
        raise typer.BadParameter(f"{text} is a percentage: give the fraction, {percent / 100:g} for {text}.")
    raise typer.BadParameter(
        f"{text!r} is not a number: give a fraction in (0, 1], e.g. 0.001 for 0.1% or 1.0 for all."
    )


def _parse_tokens(value: str | int) -> int:
    """A token count, at least 2 (a token and an EOS); one written with a suffix, as the original
    README gave the default ("100M"), is refused with the number it means."""
    if isinstance(value, int):
        return value
    text = value.strip()
    try:
        n = int(text)
    except ValueError:
        scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:].upper())
        try:
            tokens = float(text[:-1]) * scale if scale else 0.0
        except ValueError:
            tokens = 0.0
        # (only a count the flag takes: "nanM", "infK" or "0.000001M" name none)
        meant = f"{tokens:.0f} for {text}" if math.isfinite(tokens) and round(tokens) >= 2 else ""
        raise typer.BadParameter(
            f"{text!r} is not a whole number: give the tokens, " + (meant or "e.g. 100000000 for 100M") + "."
        ) from None
    if n < 2:
        raise typer.BadParameter(f"{n} is not in the range x>=2 (a token and an EOS).")
    return n


FRACTION = typer.Option(
    DEFAULT_DATA_FRACTION,
    "--data-fraction",
    parser=_parse_fraction,
    callback=_fraction,
    help="Fraction of each source's bytes, in (0, 1].",
)
SEED = typer.Option(DEFAULT_SEED, "--seed", help="Seed of the file order (same seed + fraction -> same plan).")


INCLUDE = typer.Option(
    [], "--include", help="Take only repo paths matching this glob (repeatable), before the fraction."
)
EXCLUDE = typer.Option([], "--exclude", help="Leave out repo paths matching this glob (repeatable).")
SOURCE_DEPTH = typer.Option(
    None,
    "--source-depth",
    min=1,
    help="A source is a file's first N folders (default: the top-level folders holding data).",
)
SOURCE_FRACTION = typer.Option(
    [], "--source-fraction", help="SOURCE=F: this fraction for one source or folder prefix (repeatable)."
)
TEXT_FIELD = typer.Option("text", "--text-field", help="The documents' text field (JSON key or parquet column).")
ID_FIELD = typer.Option("id", "--id-field", help="The documents' id field (absent: path:line).")


def _selection(
    include: list[str],
    exclude: list[str],
    source_depth: int | None,
    source_fraction: list[str],
    text_field: str,
    id_field: str,
) -> Selection:
    pairs = []
    for spec in source_fraction:
        name, sep, value = spec.rpartition("=")
        try:
            pairs.append((name, float(value)))
        except ValueError:
            sep = ""
        if not sep or not name:
            raise typer.BadParameter(
                f"takes SOURCE=F, e.g. data/finemath=0.5; got {spec!r}", param_hint="--source-fraction"
            )
    try:
        return Selection(
            include=tuple(include),
            exclude=tuple(exclude),
            source_depth=source_depth,
            source_fractions=tuple(sorted(pairs)),
            text_field=text_field,
            id_field=id_field,
        )
    except BolmoError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _verbose(value: bool) -> bool:
    if value:  # -v after the command: the group's callback has set up logging already
        logging.getLogger().setLevel(logging.DEBUG)
    return value


#: ``-v`` is taken before the command (``bolmo-async -v prepare``) and after it alike.
VERBOSE = typer.Option(False, "--verbose", "-v", callback=_verbose, help="Debug logging.")


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose or os.environ.get("BOLMO_ASYNC_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="bolmo-async: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("aiohttp", "asyncio", "huggingface_hub", "filelock", "urllib3", "httpx", "httpx2", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: The exit code of a Unix tool whose output's reader has gone: 128 + SIGPIPE (which ends ``cat``,
#: ``seq``, ``yes`` ... | head without a word). This process ignores SIGPIPE (Python does: a
#: connection closed under a write is an error, not an end), so it exits so by itself.
_PIPE_CLOSED_EXIT = 141


#: The command's output is all it does (``inspect``): its reader gone, it ends at once.
_output_is_the_work = False
#: Standard output's reader has gone (``... | head``): the rest of the report is dropped.
_output_closed = False


def _say(msg: str = "") -> None:
    """One line of the command's report on stdout. Its reader gone (``| head``): a command whose
    output is its work (``inspect``) ends at once, quietly, status 141; every other one finishes
    its work (a fetch is not stopped by its report's reader), drops the rest of its report and
    exits 141 where it would have exited 0 (its own failure's status wins)."""
    global _output_closed
    if _output_closed:
        return
    try:
        _write_out(msg + "\n")
    except BrokenPipeError:
        _output_closed = True
        with contextlib.suppress(OSError):  # what is still buffered for it goes nowhere, quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if _output_is_the_work:
            raise OutputClosed from None


def _write_out(text: str) -> None:
    """``text`` on stdout, all of it or BrokenPipeError: one large write (``inspect --json``) that
    the pipe took only in part came back as written in full, the rest lost without an error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation: a captured stdout)
        typer.echo(text, nl=False)
        return
    sys.stdout.flush()
    data = memoryview(text.encode(sys.stdout.encoding or "utf-8", errors=sys.stdout.errors or "strict"))
    while data:
        data = data[os.write(fd, data) :]


def _print_plan(
    plan: Any,
    tokenizer: str | None = None,
    identifier: str = DEFAULT_TOKENIZER_ID,
    verify: bool | None = None,
    streaming: bool = True,
) -> None:
    """The plan table: per source, files, download (``verify``: ``--verify-prefixes``; whole files
    without ``streaming``), and estimated tokens and shard disk for the run's tokenizer (``plan``
    does not know it yet: byte and dolma2 side by side)."""
    from .guidance import absolute_tokenizer_path
    from .models import reads_prefixes_whole
    from .planner import estimate, source_fractions

    est = estimate(plan, reads_prefixes_whole(verify, plan.endpoint, streaming))
    _say(
        f"plan: {plan.repo_id}@{plan.commit[:12]} (revision {plan.revision}), fraction {plan.data_fraction:g}, seed {plan.seed}"
    )
    width = max(34, *(len(name) + 2 for name in est))
    other = tokenizer == "subword" and identifier != DEFAULT_TOKENIZER_ID
    identifier = absolute_tokenizer_path(identifier)
    subword = "subword*" if other else "dolma2"  # another tokenizer: estimated at dolma2's ratio, and said so
    columns: list[tuple[str, str]] = []  # (header, estimate key)
    if tokenizer in (None, "byte"):
        columns.append(("est. byte tokens", "byte_tokens"))
    if tokenizer in (None, "subword"):
        columns.append((f"est. {subword} tokens", "subword_tokens"))
    disk_header = "est. shard disk" + (" (byte / dolma2)" if tokenizer is None else "")
    _say(
        f"{'source':<{width}} {'files':>7}  {'download':>10}  "
        + "".join(f"{h:>{max(16, len(h))}}  " for h, _ in columns)
        + f"{disk_header:>{max(16, len(disk_header))}}"
    )
    for name, row in est.items():
        disk = " / ".join(human_bytes(4 * row[key]) for _, key in columns)
        _say(
            f"{name:<{width}} {int(row['files']):>7}  {human_bytes(row['download_bytes']):>10}  "
            + "".join(f"{human_count(row[key]):>{max(16, len(h))}}  " for h, key in columns)
            + f"{disk:>{max(16, len(disk_header))}}"
        )
    total = est.get("TOTAL")
    if total is not None:
        # The staging beside the shards until --drop-staging: byte mode stages the text (a byte a
        # token), subword mode the uint32 ids (as much as the shards). The disk check counts it.
        from .outdir import STAGING

        kept = " / ".join(human_bytes(total[key] * (1 if key == "byte_tokens" else 4)) for _, key in columns)
        label = f"{STAGING}/ (until --drop-staging)"
        _say(
            f"{label:<{width}} {'':>7}  {'':>10}  "
            + "".join(f"{'':>{max(16, len(h))}}  " for h, _ in columns)
            + f"{kept:>{max(16, len(disk_header))}}"
        )
    for pattern, n in plan.matched:
        _say(f"{pattern}: {n} file(s)")
    # The fractions asked for, per source (not target/total bytes: rounded to whole bytes, those
    # differ in the tenth digit even when every source has the same fraction).
    fractions = source_fractions([s.source for s in plan.sources], plan.selection, plan.data_fraction)
    if len(set(fractions.values())) > 1:
        _say("fractions: " + ", ".join(f"{k} {v:.3g}" for k, v in fractions.items()))
    _say(
        "(estimates from typical compression ratios"
        + (f"; * {identifier}, estimated at dolma2's tokens per byte)" if other else ")")
    )


def _planned_endpoint(out: Any) -> str | None:
    """The endpoint ``out``'s plan was made against (None when it cannot be read: the hint then
    leaves ``--endpoint`` out)."""
    from .planner import load_plan

    try:
        the_plan = load_plan(out)
    except BolmoError:
        return None
    return the_plan.endpoint if the_plan is not None else None


def _shares_said(out: Any, missing: list[str], fetch: str) -> str | None:
    """The --worker shares that own ``missing`` files, when the shares' count is recorded."""
    from .planner import load_plan, missing_shares_said

    try:
        the_plan = load_plan(out)
    except BolmoError:
        return None
    return missing_shares_said(out, the_plan, missing, fetch) if the_plan is not None else None


def _summary(manifest: dict[str, Any], location: str) -> None:
    from .guidance import command, fetch_command, local_copy_command
    from .outdir import DATA_SOURCES, MANIFEST, RAW, open_output

    out = open_output(location)
    t = manifest["totals"]
    _say(
        f"wrote {t['shards']} shard(s): {human_count(t['tokens'])} tokens, {t['documents']} documents -> {out.ref(DATA_SOURCES)}"
    )
    if t["skipped_documents"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in t["skipped_documents"].items())
        _say(f"skipped documents: {reasons} (examples in {MANIFEST})")
    if t.get("unreadable_files"):
        bad = t["unreadable_files"]
        _say(f"UNREADABLE: {len(bad)} file(s) gave no data at all (listed in {MANIFEST}):")
        for path, why in list(bad.items())[:10]:
            _say(f"  {why}" if why.startswith(path) else f"  {path}: {why}")
    if not manifest["complete"]:  # (finalize --allow-incomplete: finalizing again fetches nothing)
        fetch = fetch_command(out, _planned_endpoint(out), manifest.get("tokenizer"))
        _say(
            f"INCOMPLETE: {len(manifest['missing_files'])} planned file(s) are not staged (listed in {MANIFEST}): "
            + (
                _shares_said(out, manifest["missing_files"], fetch)
                or f"`{fetch}` (or the missing --worker shares) fetches them"
            )
            + ", then finalize again."
        )
    tok = manifest["tokenizer"]
    if tok["kind"] == "subword" and tok.get("vocab_size") == 100278 and tok["eos_token_id"] == 100257:
        _say(
            f"These shards hold {tok['identifier']} subword ids (EOS {tok['eos_token_id']}): bolmo-core's stage 1/2 "
            "launchers (NumpyByteFSLDataset expands them to bytes) and OLMo-core read them."
        )
    elif tok["kind"] == "subword":
        _say(
            f"These shards hold {tok['identifier']} subword ids (EOS {tok['eos_token_id']}), not dolma2's: bolmo-core's "
            "stage 1/2 launchers expect allenai/dolma2-tokenizer ids (vocabulary 100278, EOS 100257)."
        )
    else:
        _say(
            "These shards hold Bolmo BYTE ids (utf8 + 4, EOS 1) for byte-level trainers only. bolmo-core's stage 1/2 "
            "launchers read dolma2 SUBWORD ids and would silently misread these: use --tokenizer subword for them."
        )
    size = out.staging_bytes()
    if size:
        _say(
            f"the staging holds {human_bytes(size)}: what finalize (another --max-tokens-per-file, a repair) reuses, and "
            f"another --data-fraction for the files it takes whole; `{command('finalize', '--output-dir', out, '--drop-staging')}` removes it."
        )
    raw = out.raw_bytes()
    if raw:  # (--drop-staging leaves them: a user freeing disk was told of the staging only)
        _say(
            f"{out.ref(RAW)} holds {human_bytes(raw)}: the whole files --no-streaming kept, which a --no-streaming "
            f"rerun reads instead of downloading; nothing else removes them: `rm -r {shlex.quote(out.ref(RAW))}` frees them."
        )
    if manifest["complete"] and out.local:
        _say(f"export DATA_SOURCE={shlex.quote(out.ref(DATA_SOURCES))}")
    elif manifest["complete"]:  # bolmo-core's launchers open() DATA_SOURCE: a URL is no file to them
        _say(
            f"{DATA_SOURCES} lists the shards' URLs, which OLMo-core reads from the store (each with its .csv.gz). "
            "For bolmo-core's launchers, which open DATA_SOURCE as a local file, copy it first:"
        )
        _say(f"  {local_copy_command(out.ref(DATA_SOURCES))}")


def _run(fn: Any, resumes: bool = True) -> Any:
    """``fn()`` with its errors as one line; ``resumes``: a rerun picks up where this one stopped
    (not so for ``inspect``, which only reads)."""
    from .guidance import cli_voice

    try:
        with cli_voice():  # (its errors keep the flags' words: --force, not force=True)
            return fn()
    except BolmoError as exc:
        if os.environ.get("BOLMO_ASYNC_DEBUG"):
            raise
        _error(f"error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:  # (a stopped fetch's ``Stopped`` says what it kept)
        raise typer.Exit(_say_stopped(signal_of(exc), resumes, str(exc) if isinstance(exc, Stopped) else "")) from None
    except OutputClosed:  # (from a callback that prints: the plan table) the run ends, quietly
        raise
    except OSError as exc:
        if os.environ.get("BOLMO_ASYNC_DEBUG") or exc.errno != errno.ENAMETOOLONG:
            return _unexpected(exc, resumes)
        # A path the system refuses by its length, wherever it came from (a flag, an environment
        # variable): a rerun cannot fix it.
        _error(f"error: {exc.filename or 'a path'}: {exc.strerror}; choose a shorter path.")
        raise typer.Exit(2) from None
    except Exception as exc:
        return _unexpected(exc, resumes)


def _before_api() -> None:
    """What a command sets up before it imports the API (once its arguments are parsed):
    Arrow's allocator, chosen before Arrow allocates anything."""
    from .util import prefer_system_allocator, record_absent_imports

    prefer_system_allocator()
    record_absent_imports()


def _start_workers_early(processes: int, output_dir: str, tokenizer: str, identifier: str) -> None:
    """``--processes N`` (N > 1): the workers' fork server starts now, before the API's imports
    (``entry.start_workers_early``; the entry point has started it already when it could read
    the arguments)."""
    from .entry import start_workers_early

    start_workers_early(processes, output_dir, tokenizer, identifier)


def _before_network() -> None:
    """A command that talks to the Hub: aiohttp imported with its CA certificates loaded only if a
    connection needs them (``lazycerts``; this process is the tool's own, no library user's)."""
    from .lazycerts import import_aiohttp

    import_aiohttp()


def _error(line: str, color: str | None = typer.colors.RED) -> None:
    """The command's last word on stderr (an error, a stop), once no thread holds file descriptor
    2 (``util.stderr_free``: a tokenizer's probe, on a thread while the repo is listed): written
    into the hold, it was lost with the exit."""
    from .util import stderr_free

    with stderr_free():
        typer.secho(line, err=True, fg=color)


def _unexpected(exc: Exception, resumes: bool) -> Any:
    if os.environ.get("BOLMO_ASYNC_DEBUG"):
        raise exc
    from .errors import exhausted

    refused = exhausted(exc)  # a ulimit (threads, files, memory): the limit and the fix, not "report it"
    if refused is not None:
        _error(f"error: {refused}")
        raise typer.Exit(refused.exit_code) from None
    _error(
        f"error: unexpected {type(exc).__name__}: {exc}. "
        + ("Finished files are kept; rerun the same command to resume. " if resumes else "")
        + "If it persists, rerun with BOLMO_ASYNC_DEBUG=1 and report the traceback."
    )
    raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"bolmo-async {version('bolmo-async')}")
        except PackageNotFoundError:  # a checkout run without installing it
            typer.echo("bolmo-async (not installed: a checkout)")
        raise typer.Exit(0)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    scratch_dir: str | None = typer.Option(
        None,
        "--scratch-dir",
        envvar="BOLMO_ASYNC_SCRATCH",
        help="Local scratch for an object-store --output-dir (files in flight only; default: a temporary folder).",
    ),
) -> None:
    _setup_logging(verbose)
    if scratch_dir:
        os.environ["BOLMO_ASYNC_SCRATCH"] = scratch_dir  # worker processes inherit it


@app.command("plan", short_help="Step 1: list the repo, choose the files, write plan.json.")
def plan_cmd(
    output_dir: str = OUT,
    repo_id: str = REPO,
    revision: str = REVISION,
    endpoint: str | None = ENDPOINT,
    data_fraction: float = FRACTION,
    seed: int = SEED,
    include: list[str] = INCLUDE,
    exclude: list[str] = EXCLUDE,
    source_depth: int | None = SOURCE_DEPTH,
    source_fraction: list[str] = SOURCE_FRACTION,
    text_field: str = TEXT_FIELD,
    id_field: str = ID_FIELD,
    force: bool = typer.Option(False, "--force", help="Reset an output folder holding another plan."),
    verbose: bool = VERBOSE,
) -> None:
    """List the repo, pin the revision and write plan.json with a summary table."""
    sel = _selection(include, exclude, source_depth, source_fraction, text_field, id_field)
    _before_api()
    _before_network()
    from . import api

    p = _run(
        lambda: api.plan(
            output_dir,
            repo_id=repo_id,
            revision=revision,
            endpoint=endpoint,
            data_fraction=data_fraction,
            seed=seed,
            force=force,
            selection=sel,
        )
    )
    _print_plan(p)
    from .guidance import command, fetch_command, next_steps

    _say(
        next_steps(
            f"{fetch_command(output_dir, p.endpoint)} --tokenizer subword"
            "  # or --tokenizer byte; in a job array, add --worker I/N to each task",
            command("finalize", "--output-dir", output_dir),
        )
    )


TOKENIZER = typer.Option(
    "byte",
    "--tokenizer",
    help="byte | subword: byte (Bolmo byte ids) or subword (dolma2 ids: what bolmo-core stage 1/2 read).",
)
TOKENIZER_ID = typer.Option(
    DEFAULT_TOKENIZER_ID, "--tokenizer-identifier", help="Hub repo id, tokenizer.json file or folder (subword)."
)
EOS = typer.Option(None, "--eos-token-id", help="Override the EOS id appended after each document (subword).")
SPECIAL = typer.Option(
    False,
    "--special-tokens-as-ids",
    help="Encode special-token strings in text as their ids (dolma tokens' behaviour).",
)
ENGINE = typer.Option(
    "auto",
    "--engine",
    help="auto | fastokens | tokenizers | tiktoken: the subword engine (auto: fastokens when installed, else tokenizers).",
)
CHECK_EVERY = typer.Option(
    DEFAULT_CHECK_EVERY,
    "--check-every",
    min=0,
    help="Re-encode one document in N with the tokenizers reference; a mismatch stops the run (0: off).",
)
PROCESSES = typer.Option(
    0,
    "--processes",
    "--tokenizer-processes",
    min=0,
    help="Worker processes, each doing whole files (0: one per 16 MB of planned download, up to the usable cores; "
    "1: one worker in this process).",
)
MAX_DOC = typer.Option(
    0,
    "--max-document-bytes",
    min=0,
    help=f"Skip (and count) documents larger than this (0: {DEFAULT_MAX_DOCUMENT_BYTES >> 20} MiB).",
)
DROP_STAGING = typer.Option(
    False,
    "--drop-staging",
    help="After a complete finalize, delete staging/ (saves its disk; another --max-tokens-per-file then needs a "
    "full refetch; the same one has nothing to do).",
)
SKIP_DISK = typer.Option(
    False, "--skip-disk-check", help="Do not refuse a run whose estimated size exceeds the free disk."
)
CONCURRENCY = typer.Option(
    DEFAULT_CONCURRENCY,
    "--concurrency",
    help="Files in flight (downloading and decoding), shared out over the workers.",
)
CONNECTIONS = typer.Option(
    DEFAULT_CONNECTIONS,
    "--connections",
    help="Connections for file bodies at once (the run's total): files in flight, or Range segments of a large "
    "file when few are. Lower it to stay under a limit.",
)
STREAMING = typer.Option(
    True, "--streaming/--no-streaming", help="--no-streaming keeps verified raw files under raw/ and reuses them."
)
VERIFY_PREFIXES = typer.Option(
    None,
    "--verify-prefixes/--no-verify-prefixes",
    help="A partly taken JSON-lines file: download it whole to check its sha256, or only the prefix taken. "
    "Default: whole over plain http, only the prefix over https (TLS vouches for the bytes).",
    show_default=False,
)
RETRIES = typer.Option(
    8, "--retries", help="Attempts per file (and per Hub API call: revision, listing) before it is reported failed."
)
READ_TIMEOUT = typer.Option(
    60.0, "--read-timeout", help="Seconds a download (or a Hub API call) may stall before it is resumed (retried)."
)
_WHEN_PLANNING = (
    ": used only when this fetch plans (the folder has no plan yet) or plans again (a value other than the plan's);"
    " with --worker, only the plan's own value is taken."
)
FORCE = typer.Option(False, "--force", help="Reset an output folder holding another plan or tokenizer.")
NO_PROGRESS = typer.Option(
    False,
    "--no-progress",
    help="No live bar and no periodic progress lines (the plan table, warnings, errors and the summary still print).",
)


#: Tokenizer and download options that fetch, fetch --ray and prepare pass on alike.
_FETCH_OPTIONS = (
    "tokenizer",
    "tokenizer_identifier",
    "eos_token_id",
    "engine",
    "check_every",
    "concurrency",
    "connections",
    "streaming",
    "verify_prefixes",
    "retries",
    "read_timeout",
    "max_document_bytes",
)


def _fetch_options(args: dict[str, Any]) -> dict[str, Any]:
    """Those options, as the API's keywords, from a command's arguments (its ``locals()``)."""
    return {
        **{k: args[k] for k in _FETCH_OPTIONS},
        "special_tokens_as_ids": args["special_tokens_as_ids"],
        "check_disk": not args["skip_disk_check"],
    }


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) == "COMMANDLINE"  # typer may carry its own copy of click's enum


def _unused(ctx: typer.Context, unused: dict[str, str]) -> None:
    """A warning line for each option given on the command line that has no effect in this run
    (``unused``: parameter name -> why)."""
    for name, why in unused.items():
        if _given(ctx, name):
            flag = next(p.opts[0] for p in ctx.command.params if p.name == name)
            typer.secho(f"warning: {flag} has no effect {why}", err=True, fg=typer.colors.YELLOW)


@app.command("fetch", short_help="Step 2: download, tokenize and stage the planned files.")
def fetch_cmd(
    ctx: typer.Context,
    output_dir: str = OUT,
    tokenizer: str = TOKENIZER,
    tokenizer_identifier: str = TOKENIZER_ID,
    eos_token_id: int | None = EOS,
    special_tokens_as_ids: bool = SPECIAL,
    engine: str = ENGINE,
    check_every: int = CHECK_EVERY,
    processes: int = PROCESSES,
    concurrency: int = CONCURRENCY,
    connections: int = CONNECTIONS,
    streaming: bool = STREAMING,
    verify_prefixes: bool | None = VERIFY_PREFIXES,
    endpoint: str | None = ENDPOINT,
    retries: int = RETRIES,
    read_timeout: float = READ_TIMEOUT,
    max_document_bytes: int = MAX_DOC,
    skip_disk_check: bool = SKIP_DISK,
    force: bool = FORCE,
    no_progress: bool = NO_PROGRESS,
    # (they said "Plan option.": what it did in a fetch was left to guess; newuser17)
    repo_id: str | None = typer.Option(None, "--repo-id", help=f"As for plan{_WHEN_PLANNING}"),
    revision: str | None = typer.Option(None, "--revision", help=f"As for plan{_WHEN_PLANNING}"),
    data_fraction: float | None = typer.Option(
        None, "--data-fraction", parser=_parse_fraction, callback=_fraction, help=f"As for plan{_WHEN_PLANNING}"
    ),
    seed: int | None = typer.Option(None, "--seed", help=f"As for plan{_WHEN_PLANNING}"),
    worker: str | None = typer.Option(
        None, "--worker", help="Fetch only share I (0-based) of N of the plan (job arrays; plan first)."
    ),
    ray: bool = typer.Option(False, "--ray", help="Run the fetch as Ray tasks (pip install 'bolmo-async[ray]')."),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="Ray cluster address (default: RAY_ADDRESS, else the one `ray start` started here, else a new local one).",
    ),
    ray_tasks: int = typer.Option(0, "--ray-tasks", min=0, help="Ray tasks (0: two per cluster CPU)."),
    verbose: bool = VERBOSE,
) -> None:
    """Download, tokenize and stage the planned files (plans first if plan.json is absent)."""
    opts = _fetch_options(locals())
    if ray:
        _unused(ctx, {"processes": "with --ray (each Ray task is one worker)"})
    else:
        _unused(ctx, {"ray_address": "without --ray", "ray_tasks": "without --ray"})
    _before_api()
    if not ray:
        _start_workers_early(processes, output_dir, tokenizer, tokenizer_identifier)
    _before_network()
    from . import api

    res = _run(
        lambda: api.fetch(
            output_dir,
            **opts,
            processes=processes,
            endpoint=endpoint,
            force=force,
            progress=not no_progress,
            repo_id=repo_id,
            revision=revision,
            data_fraction=data_fraction,
            seed=seed,
            worker=worker,
            ray=ray,
            ray_address=ray_address,
            ray_tasks=ray_tasks,
            on_plan=lambda p: _print_plan(
                p, tokenizer, opts["tokenizer_identifier"], opts["verify_prefixes"], opts["streaming"]
            ),
        )
    )
    from .outdir import RAW

    how = " with Ray" if ray else ""
    done = (
        f"staged{how}: {res['files']} planned file(s); this run fetched {res['fetched_now']} of them"
        + (f" and read {res['from_raw_now']} from the downloads kept in {RAW}/" if res.get("from_raw_now") else "")
        + f" ({human_count(res['tokens_now'])} tokens)."
    )
    from .guidance import command, next_steps

    finalize = command("finalize", "--output-dir", output_dir)
    if worker is not None:
        _say(
            f"{done} Share {worker} is done{_plan_said(output_dir)}. Once all shares are staged, run the next step once."
        )
        _say(next_steps(finalize))
    else:
        _say(done)
        _say(next_steps(finalize))


def _plan_said(output_dir: str) -> str:
    """The folder's plan in a few words: a job-array task pointed at the wrong folder (another
    fraction's, another run's) fetched into its plan without a word of which plan it was."""
    from .outdir import open_output
    from .planner import load_plan

    try:
        p = load_plan(open_output(output_dir))
    except (BolmoError, OSError):
        p = None
    if p is None:
        return ""
    return f" (the plan of {output_dir}: {p.repo_id}, --data-fraction {p.data_fraction:g}, seed {p.seed})"


@app.command("finalize", short_help="Step 3: write the shards and data_sources.txt.")
def finalize_cmd(
    ctx: typer.Context,
    output_dir: str = OUT,
    max_tokens_per_file: int | None = typer.Option(
        None,
        "--max-tokens-per-file",
        parser=_parse_tokens,
        help="Tokens per shard at most (default: what this folder was finalized with, else 100000000).",
    ),
    allow_incomplete: bool = typer.Option(
        False, "--allow-incomplete", help="Write shards from what is staged even if planned files are missing."
    ),
    ray: bool = typer.Option(False, "--ray", help="Write the shards as Ray tasks (pip install 'bolmo-async[ray]')."),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="Ray cluster address (default: RAY_ADDRESS, else the one `ray start` started here, else a new local one).",
    ),
    drop_staging: bool = DROP_STAGING,
    verbose: bool = VERBOSE,
) -> None:
    """Write bolmo_data_XXXXX.npy shards, their .csv.gz, manifest.json and data_sources.txt."""
    if not ray:
        _unused(ctx, {"ray_address": "without --ray"})
    _before_api()
    from . import api

    m = _run(
        lambda: api.finalize(
            output_dir,
            max_tokens_per_file=max_tokens_per_file,
            allow_incomplete=allow_incomplete,
            ray=ray,
            ray_address=ray_address,
            drop_staging=drop_staging,
        )
    )
    _summary(m, output_dir)


@app.command("prepare", short_help="Steps 1-3 in one command (the original tool's).")
def prepare_cmd(
    ctx: typer.Context,
    output_dir: str = OUT,
    data_fraction: float = FRACTION,
    tokenizer: str = TOKENIZER,
    tokenizer_identifier: str = TOKENIZER_ID,
    max_tokens_per_file: int = typer.Option(
        DEFAULT_MAX_TOKENS_PER_FILE,
        "--max-tokens-per-file",
        parser=_parse_tokens,
        help="Tokens per shard at most (a folder finalized before keeps its bound unless this is given).",
    ),
    seed: int = SEED,
    streaming: bool = STREAMING,
    verify_prefixes: bool | None = VERIFY_PREFIXES,
    repo_id: str = REPO,
    revision: str = REVISION,
    endpoint: str | None = ENDPOINT,
    eos_token_id: int | None = EOS,
    special_tokens_as_ids: bool = SPECIAL,
    engine: str = ENGINE,
    check_every: int = CHECK_EVERY,
    processes: int = PROCESSES,
    concurrency: int = CONCURRENCY,
    connections: int = CONNECTIONS,
    retries: int = RETRIES,
    read_timeout: float = READ_TIMEOUT,
    max_document_bytes: int = MAX_DOC,
    skip_disk_check: bool = SKIP_DISK,
    allow_incomplete: bool = typer.Option(
        False,
        "--allow-incomplete",
        help="If files fail or the run is stopped, still write shards and data_sources.txt from what was staged.",
    ),
    drop_staging: bool = DROP_STAGING,
    include: list[str] = INCLUDE,
    exclude: list[str] = EXCLUDE,
    source_depth: int | None = SOURCE_DEPTH,
    source_fraction: list[str] = SOURCE_FRACTION,
    text_field: str = TEXT_FIELD,
    id_field: str = ID_FIELD,
    force: bool = FORCE,
    no_progress: bool = NO_PROGRESS,
    verbose: bool = VERBOSE,
) -> None:
    """plan + fetch + finalize in one command (the original tool's flags and defaults)."""
    opts = _fetch_options(locals())
    bound = max_tokens_per_file if _given(ctx, "max_tokens_per_file") else None  # None: the folder's own
    sel = _selection(include, exclude, source_depth, source_fraction, text_field, id_field)
    _before_api()
    _start_workers_early(processes, output_dir, tokenizer, tokenizer_identifier)
    _before_network()
    from . import api

    m = _run(
        lambda: api.prepare(
            output_dir,
            **opts,
            data_fraction=data_fraction,
            max_tokens_per_file=bound,
            seed=seed,
            repo_id=repo_id,
            revision=revision,
            endpoint=endpoint,
            processes=processes,
            force=force,
            allow_incomplete=allow_incomplete,
            drop_staging=drop_staging,
            progress=not no_progress,
            on_plan=lambda p: _print_plan(
                p, tokenizer, opts["tokenizer_identifier"], opts["verify_prefixes"], opts["streaming"]
            ),
            selection=sel,
        )
    )
    _summary(m, output_dir)


@app.command("inspect", short_help="Check a finished folder; decode documents.")
def inspect_cmd(
    folder: str | None = typer.Argument(None, metavar="D", help="An output folder written by finalize/prepare."),
    output_dir_option: str | None = typer.Option(
        None, "--output-dir", "-o", help="The same folder, as the other commands take it (D or this)."
    ),
    decode: int = typer.Option(0, "--decode", min=0, help="Print the first N documents decoded back to text."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    sequence_length: int | None = typer.Option(
        None,
        "--sequence-length",
        min=1,
        help="Also count what a fixed-length reader (OLMo-core's) makes of the shards at N tokens per instance: "
        "instances, and tokens dropped (each shard's tail shorter than N).",
    ),
    verbose: bool = VERBOSE,
) -> None:
    """Shard table, size/XXH3-128 checks against the manifest and data_sources.txt, decoded documents."""
    if folder is not None and output_dir_option is not None and folder != output_dir_option:
        raise typer.BadParameter(
            f"two folders given ({folder} and -o {output_dir_option}): name one", param_hint="D / --output-dir"
        )
    output_dir = folder if folder is not None else output_dir_option
    if output_dir is None:
        raise typer.BadParameter(
            "name the output folder: bolmo-async inspect D (or -o D)", param_hint="D / --output-dir"
        )
    _before_api()
    from . import api

    global _output_is_the_work
    _output_is_the_work = True
    rep = _run(lambda: api.inspect(output_dir, decode=decode, sequence_length=sequence_length), resumes=False)
    if as_json:
        # The manifest's own facts (complete, tokenizer, totals, ...: what the text report's first line
        # says, which the JSON lacked), without its shard list, which "shards" gives as checked.
        facts = {k: v for k, v in rep["manifest"].items() if k != "shards"}
        _say(json.dumps({**rep, "manifest": facts}, indent=1, ensure_ascii=False))
    else:
        from .outdir import DATA_SOURCES, MANIFEST

        m = rep["manifest"]
        tok = m["tokenizer"]
        # In the words the user typed (the flags), and each line saying itself: it said "fraction 0.05
        # seed 42 ..., complete: True" and an "ok" column, without what was checked (newuser17).
        _say(
            f"{output_dir}: {m['repo_id']}@{m['revision'][:12]}, --data-fraction {m['data_fraction']:g}, --seed "
            f"{m['seed']}, --tokenizer {tok['kind']} ({tok['identifier']}, EOS {tok['eos_token_id']})"
        )
        planned, missing = m.get("planned_files"), m.get("missing_files") or []
        of_planned = f"all {planned} planned file(s)" if isinstance(planned, int) else "every planned file"
        _say(
            f"complete: {of_planned} are in the shards"
            if m["complete"]
            else f"INCOMPLETE: {len(missing)} of the planned file(s) are not in the shards "
            f"(finalized with --allow-incomplete; {MANIFEST} lists them)"
        )
        _say(f"{'shard':<24}{'tokens':>14}{'documents':>12}  ok")
        for r in rep["shards"]:
            _say(f"{r['path']:<24}{r['tokens']:>14}{r['documents']:>12}  {'yes' if r['ok'] else 'NO'}")
        _say(
            f"{'total':<24}{sum(r['tokens'] for r in rep['shards']):>14}{sum(r['documents'] for r in rep['shards']):>12}"
        )
        skipped = (m.get("totals") or {}).get("skipped_documents") or {}
        if skipped:
            _say(f"skipped documents: {', '.join(f'{k}: {v}' for k, v in skipped.items())} (examples in {MANIFEST})")
        if not rep["problems"]:
            _say(
                f"checked: each of the {len(rep['shards'])} shard(s) has the size, whole uint32 tokens and XXH3-128 "
                f"checksum {MANIFEST} records, and its .csv.gz index; {DATA_SOURCES} lists exactly them"
            )
        for d in rep["documents"]:
            text = d["text"] if len(d["text"]) <= 300 else d["text"][:300] + "…"
            _say(f"--- {d['id']} ({d['src']}:{d['loc']}, {d['tokens']} tokens)\n{text}")
        fl = rep.get("fixed_length")
        if fl:
            _say(
                f"at sequence length {fl['sequence_length']}: {fl['instances']} instance(s); a fixed-length reader drops "
                f"{fl['dropped_tokens']} of {fl['tokens']} tokens ({100 * fl['dropped_fraction']:.2f}%), "
                f"and {fl['shards_dropped_whole']} of the {len(rep['shards'])} shard(s) whole (shorter than one sequence)"
            )
        if rep["running"] and not rep["problems"]:
            typer.secho(
                f"note: {rep['running']} is writing this folder now: what this reports may change once that ends",
                err=True,
                fg=typer.colors.YELLOW,
            )
        for p in rep["problems"]:
            typer.secho(f"problem: {p}", err=True, fg=typer.colors.RED)
    if rep["problems"]:
        raise typer.Exit(1)


@mirror_app.command("serve", short_help="Serve DIR as a Hub dataset repo on loopback.")
def mirror_serve(
    folder: Path = typer.Argument(
        ..., exists=True, file_okay=False, metavar="DIR", help="Folder to serve as the dataset repo."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Port (0: a free one)."),
    cdn_port: int = typer.Option(
        0, "--cdn-port", min=0, max=65535, help="Port of the CDN stand-in that LFS files redirect to."
    ),
    repo_id: str = typer.Option(DEFAULT_REPO_ID, "--repo-id", help="Dataset repo id to serve the folder as."),
    model_repo: list[str] = typer.Option(
        [], "--model-repo", help="Also serve folder DIR as the model repo ID (a tokenizer, say; repeatable)."
    ),
    page_size: int = typer.Option(1000, "--page-size", help="Tree listing page size (Link: rel=next)."),
    faults: str | None = typer.Option(
        None, "--faults", help="Inject faults: RATE[:kind,kind...], e.g. 0.3 or 0.5:reset,http429."
    ),
    fault_seed: int = typer.Option(0, "--fault-seed", help="Seed of the fault injection."),
    token: str | None = typer.Option(
        None,
        "--require-token",
        envvar="BOLMO_ASYNC_MIRROR_TOKEN",
        show_envvar=False,
        help="Answer 401 unless this bearer token is sent (a command line is visible to every user in `ps`: "
        "prefer --require-token-file or BOLMO_ASYNC_MIRROR_TOKEN).",
    ),
    token_file: Path | None = typer.Option(
        None, "--require-token-file", help="As --require-token, the token read from this file (its first line)."
    ),
    url_ttl: float = typer.Option(3600.0, "--url-ttl", help="Seconds a signed CDN URL stays valid."),
    ready_file: Path | None = typer.Option(None, "--ready-file", help="Write the endpoint URL here once listening."),
    wan_rtt_ms: float = typer.Option(
        0.0, "--wan-rtt-ms", min=0, help="Emulate a wide-area link: milliseconds before every answer (a round trip)."
    ),
    wan_response_mbs: float = typer.Option(
        0.0, "--wan-response-mbs", min=0, help="Emulate a CDN's per-connection cap: MB/s per response (0: none)."
    ),
    wan_link_mbs: float = typer.Option(
        0.0, "--wan-link-mbs", min=0, help="Emulate the link's total rate: MB/s over all responses (0: none)."
    ),
    verbose: bool = VERBOSE,
) -> None:
    """Serve DIR as a Hub dataset repo on loopback (prints the endpoint to use)."""
    from .mirror import FaultConfig, WanConfig, run_mirror

    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    wan = WanConfig(rtt=wan_rtt_ms / 1000, response_rate=wan_response_mbs * 1e6, link_rate=wan_link_mbs * 1e6)
    if wan.active and not loopback:
        raise typer.BadParameter(
            f"the WAN emulation (--wan-*) is for loopback only; drop it or bind to 127.0.0.1 (not {host})",
            param_hint="--host",
        )
    if not loopback:
        typer.secho(f"warning: binding to {host}, not loopback", err=True, fg=typer.colors.YELLOW)
    if token_file is not None:
        if token:
            raise typer.BadParameter(
                "pass the token once: --require-token-file, or --require-token / BOLMO_ASYNC_MIRROR_TOKEN",
                param_hint="--require-token-file",
            )
        try:
            lines = token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise typer.BadParameter(f"cannot read {token_file}: {exc}", param_hint="--require-token-file") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise typer.BadParameter(
                f"{token_file} holds no token on its first line", param_hint="--require-token-file"
            )
    try:
        fc = FaultConfig.parse(faults, seed=fault_seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--faults") from exc
    try:
        run_mirror(
            str(folder),
            repo_id=repo_id,
            host=host,
            port=port,
            cdn_port=cdn_port,
            model_repos=model_repo,
            page_size=page_size,
            faults=fc,
            token=token,
            url_ttl=url_ttl,
            ready_file=str(ready_file) if ready_file else None,
            wan=wan if wan.active else None,
        )
    except (OSError, ValueError) as exc:  # a port in use, a bad --model-repo, a missing folder
        if os.environ.get("BOLMO_ASYNC_DEBUG"):
            raise
        fix = ""
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:  # (it named no way out)
            fix = ": another program (a mirror left running?) holds that port; stop it, or pass another --port / --cdn-port (0: a free one)"
        typer.secho(f"error: mirror serve: {exc}{fix}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


@mirror_app.command("sample", short_help="Write a generated sample mix into DIR.")
def mirror_sample(
    folder: Path = typer.Argument(..., metavar="DIR", help="Folder to write the sample mix into."),
    size_mb: float = typer.Option(8.0, "--size-mb", min=0.01, help="Megabytes of text."),
    seed: int = typer.Option(0, "--seed", help="Seed (same seed -> same files)."),
    verbose: bool = VERBOSE,
) -> None:
    """Write a deterministic sample in bolmo_mix's shape (zst/gz/plain JSON lines, parquet)."""
    from .mirror import build_sample

    s = _mirror_run("mirror sample", lambda: build_sample(folder, size_mb=size_mb, seed=seed))
    _say(
        f"wrote {len(s['files'])} files, {s['documents']} documents, {human_bytes(s['text_bytes'])} of text to {folder}"
    )


@mirror_app.command("demo-tokenizer", short_help="Train a small BPE on a sample, into DIR.")
def mirror_demo_tokenizer(
    sample: Path = typer.Argument(
        ..., exists=True, file_okay=False, metavar="SAMPLE", help="A folder written by `mirror sample`."
    ),
    folder: Path = typer.Argument(
        ..., metavar="DIR", help="Where to write tokenizer.json (serve it with --model-repo ID=DIR)."
    ),
    vocab_size: int = typer.Option(4000, "--vocab-size", min=300, help="Vocabulary size."),
    verbose: bool = VERBOSE,
) -> None:
    """Train a small byte-level BPE on the sample (dolma2's shape), for demos without dolma2."""
    from .mirror.sample import train_demo_tokenizer

    path = _mirror_run("mirror demo-tokenizer", lambda: train_demo_tokenizer(sample, folder, vocab_size))
    _say(f"wrote {path} ({vocab_size} ids, EOS <|endoftext|>)")


def _mirror_run(what: str, fn: Any) -> Any:
    """A mirror helper's errors as one line: a folder that cannot be used (exit 2, checked before
    any work), a write that failed midway (exit 1)."""
    try:
        return fn()
    except (ValueError, OSError) as exc:
        if os.environ.get("BOLMO_ASYNC_DEBUG"):
            raise
        typer.secho(f"error: {what}: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2 if isinstance(exc, ValueError) else 1) from None


for _sig in _AT_START:
    signal.signal(_sig, signal.default_int_handler if _sig == signal.SIGINT else signal.SIG_DFL)

#: The stop signal this command received first (None: none), and when.
_stopped_by: int | None = None
_stopped_at = 0.0
#: The stop was said (one line on stderr) already.
_stop_said = False
#: Seconds after a stop signal during which another one is only noted: the clean-up the first one
#: started (workers given ``STOP_GRACE``, temporaries removed) is not cut short by a second
#: Ctrl+C, or by the SIGHUP of a terminal closed meanwhile.
_REPEAT_IGNORED = 10.0


def _on_stop_signal(signum: int, frame: Any) -> None:
    """Every stop signal as Ctrl+C: a ``KeyboardInterrupt`` (``Interrupted``, naming it), which
    every phase of a run handles; inside a fetch the event loop's own handlers take over
    (``api.run_interruptible``)."""
    global _stopped_by, _stopped_at
    import time

    now = time.monotonic()
    if _stopped_by is not None and now - _stopped_at < _REPEAT_IGNORED:
        return
    _stopped_by, _stopped_at = signum, now
    raise Interrupted(signum)


def _note_stop_signal(signum: int, frame: Any) -> None:
    """A stop signal while the command exits: noted, never raised (``_exit_now``)."""
    global _stopped_by, _stopped_at
    if _stopped_by is None:
        import time

        _stopped_by, _stopped_at = signum, time.monotonic()


def _say_stopped(signum: int, resumes: bool = True, line: str = "") -> int:
    """The stop's one line (once; ``line``: the run's own, saying what it kept); its exit code,
    128 + the signal (the shell's convention)."""
    global _stop_said
    if not _stop_said:
        _stop_said = True
        said = interrupted_by(signum)
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) takes no more output
            if line:
                _error(f"error: {line}")
            else:
                _error(f"{said}; rerun the same command to resume" if resumes else said, color=None)
    return 128 + signum


def _stop_raised_where_it_is_lost(unraisable: Any) -> None:
    """``sys.unraisablehook``: a stop signal's ``Interrupted`` raised where Python cannot raise
    (the handler ran inside a weakref callback or a ``__del__`` the garbage collector called):
    Python only printed "Exception ignored in ..." and the run went on to exit 0, the stop lost
    (1 of 20 SIGHUPs just after plan.json). The signal is sent again, from a thread, to land
    outside it; any other such exception goes to the default hook."""
    exc = unraisable.exc_value
    if isinstance(exc, Interrupted) and signal.getsignal(exc.signum) is _on_stop_signal:
        global _stopped_by
        _stopped_by = None  # (not a repeat: the first one was lost)
        import threading

        threading.Timer(0.01, os.kill, (os.getpid(), exc.signum)).start()
        return
    sys.__unraisablehook__(unraisable)


def _stop_handling() -> None:
    """SIGTERM (job schedulers, `kill`) and SIGHUP (the terminal closed) stop as cleanly as Ctrl+C,
    whatever phase the run is in; one inherited as ignored (nohup) stays ignored."""
    for sig in _stoppable():
        signal.signal(sig, _on_stop_signal)
    sys.unraisablehook = _stop_raised_where_it_is_lost


def global_options_first(argv: list[str]) -> list[str]:
    """``argv`` with ``--scratch-dir DIR`` (and ``--version``) given after the command moved before
    it, where the callback reads it: ``-v`` works on either side, and a job array's line that put
    the scratch beside the command's other options was refused with "No such option:
    --scratch-dir" (``fetch --version``: "No such option: --version")."""
    head: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # options before the command stay there
        taken = 2 if argv[i] == "--scratch-dir" else 1
        head += argv[i : i + taken]
        i += taken
    if i >= len(argv):
        return argv
    head.append(argv[i])  # the command (``mirror`` and its own subcommand: no --scratch-dir there)
    moved: list[str] = []
    args = argv[i + 1 :]
    j = 0
    while j < len(args):
        arg = args[j]
        if arg == "--":
            rest += args[j:]
            break
        if arg == "--scratch-dir" and j + 1 < len(args):
            moved += args[j : j + 2]
            j += 2
            continue
        if arg.startswith("--scratch-dir=") or arg == "--version":
            moved.append(arg)
        else:
            rest.append(arg)
        j += 1
    if not moved:
        return argv
    return head[:-1] + moved + head[-1:] + rest


def main() -> None:
    _stop_handling()
    sys.argv[1:] = global_options_first(sys.argv[1:])
    try:
        app()
    except KeyboardInterrupt as exc:  # between commands' own handling (argument parsing, summaries)
        _exit_now(_say_stopped(signal_of(exc)))
    except OutputClosed:
        _exit_now(_PIPE_CLOSED_EXIT)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or (_PIPE_CLOSED_EXIT if _output_closed else 0)
            if _stopped_by is not None and code:
                # Typer turns a KeyboardInterrupt raised outside a command's own handling (its
                # imports, a summary) into a silent exit 130, whatever the signal.
                code = _say_stopped(_stopped_by)
            _exit_now(code)
        raise


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: after a stop, without joining threads still inside
    a CPU step (a BPE encode, a tokenizer build: seconds, and uninterruptible); after a command,
    without freeing every object and module one by one (0.1-0.2 s of a small run here). Everything
    kept is on disk already (atomic renames), a lock goes with the process. The exit handlers
    still run (an object-store run's own scratch folder is removed; worker processes are reaped):
    only the thread joins and the teardown are skipped."""
    import atexit

    # From here a stop signal is only noted: raised inside an exit handler (multiprocessing's
    # finalizers), it would print a traceback and skip the handlers after it (worker processes
    # not reaped, semaphores reported leaked). The exit code is the run's, decided already.
    with contextlib.suppress(ValueError):  # ValueError: not the main thread (no handler to set)
        for sig in _stoppable() + [s for s in STOP_SIGNALS if signal.getsignal(s) is _on_stop_signal]:
            signal.signal(sig, _note_stop_signal)
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
