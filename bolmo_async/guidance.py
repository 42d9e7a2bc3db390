"""What a user is told before a run starts, and what a trainer will make of the output.

- the Python API's keywords: the CLI's spelling ``special_tokens_as_ids`` is the API's too, a
  relative tokenizer path is made absolute (the manifest must name a file a later reader can
  find), a local tokenizer is checked before any listing;
- options that have no effect in this run (a subword option with ``tokenizer="byte"``);
- shard bounds that fixed-length trainers waste: OLMo-core's fixed-length numpy datasets cut
  each shard (each file of ``data_sources.txt``) into ``tokens // sequence_length`` instances
  and drop the rest of the file, so a shard barely longer than a sequence loses a large part
  of itself, and one shorter than a sequence all of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import numbers
import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import BolmoError, Stopped, UsageError
from .models import (
    DEFAULT_CHECK_EVERY,
    DEFAULT_MAX_TOKENS_PER_FILE,
    DEFAULT_REPO_ID,
    DEFAULT_TOKENIZER_ID,
    Selection,
    validate_fraction,
)

log = logging.getLogger("bolmo_async")

#: Options that only a subword tokenizer reads, with their defaults (besides special_tokens_as_ids).
SUBWORD_ONLY: dict[str, Any] = {
    "tokenizer_identifier": DEFAULT_TOKENIZER_ID,
    "eos_token_id": None,
    "engine": "auto",
    "check_every": DEFAULT_CHECK_EVERY,
}

#: The selection keywords ``plan`` and ``prepare`` take directly (or as one ``Selection``).
SELECTION_KEYWORDS = ("include", "exclude", "source_depth", "source_fractions", "text_field", "id_field")

#: Sequence lengths trainers commonly read Bolmo / OLMo data at (tokens).
TYPICAL_SEQUENCE_LENGTHS = (2048, 4096, 8192)
#: Below this bound a full shard loses more than 1.5% at sequence length 4096: warn.
SHORT_SHARD_BOUND = 64 * 4096


def flag(keyword: str) -> str:
    return "--" + keyword.replace("_", "-")


#: True while the command line runs an API call (``cli._run``): its errors keep the CLI's words.
_CLI_VOICE: contextvars.ContextVar[bool] = contextvars.ContextVar("cli_voice", default=False)


@contextlib.contextmanager
def cli_voice() -> Iterator[None]:
    """The command line's API calls: their errors name flags and commands, as said to a shell."""
    token = _CLI_VOICE.set(True)
    try:
        yield
    finally:
        _CLI_VOICE.reset(token)


#: The CLI's words in errors, as a Python caller says them (outside `quoted commands`, which stay
#: shell lines to paste). ``{fn}``: the public function that raised.
_PYTHON_WORDS = (
    (
        re.compile(r"\b([Rr])erun (fetch )?with --force\b"),
        lambda m, fn: f"{'Cc'[m[1] == 'r']}all {'bolmo_async.fetch()' if m[2] else 'it'} again with force=True",
    ),
    (
        re.compile(r"\b([Rr])erun the same command\b"),
        lambda m, fn: f"{'Cc'[m[1] == 'r']}all bolmo_async.{fn}() again with the same arguments",
    ),
    (re.compile(r"(?<![\w-])--force\b"), lambda m, fn: "force=True"),
    (re.compile(r"\banother --output-dir\b"), lambda m, fn: "another output folder"),
)


def _said(say: Callable[[re.Match[str], str], str], fn: str, m: re.Match[str]) -> str:
    return say(m, fn)


def in_python_words(message: str, fn: str) -> str:
    """``message`` with the CLI's words of ``_PYTHON_WORDS`` as keywords and calls: the same fix,
    said to whoever called ``bolmo_async.fn()`` from Python (its ``force=True``, not ``--force``)."""
    parts = message.split("`")
    for i in range(0, len(parts), 2):  # (the odd ones are `commands`)
        for pattern, say in _PYTHON_WORDS:
            parts[i] = pattern.sub(functools.partial(_said, say, fn), parts[i])
    return "`".join(parts)


def say_to_caller(exc: BaseException, fn: str) -> None:
    """An error an API call ``fn`` raises, reworded for a Python caller (in place: its class and
    attributes stay); the command line's calls (``cli_voice``) keep the CLI's words."""
    if _CLI_VOICE.get():
        return
    if isinstance(exc, Stopped):
        exc._said, exc.partial = in_python_words(exc._said, fn), in_python_words(exc.partial, fn)
        exc.message = exc._said + exc.partial
        exc.args = (exc.message,)
    elif isinstance(exc, BolmoError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (in_python_words(exc.args[0], fn),)


#: The Python API's keywords by the kind of value they take (the CLI's flags parse the same).
_BOOLS = frozenset(
    {
        "force",
        "ray",
        "streaming",
        "progress",
        "check_disk",
        "special_tokens_as_ids",
        "special_tokens_as_text",
        "allow_incomplete",
        "drop_staging",
        "verify",
    }
)
_INTS = frozenset(
    {
        "seed",
        "check_every",
        "concurrency",
        "connections",
        "retries",
        "processes",
        "max_document_bytes",
        "ray_tasks",
        "decode",
        "source_depth",
        "eos_token_id",
        "max_tokens_per_file",
        "sequence_length",
    }
)
_NUMBERS = frozenset({"data_fraction", "read_timeout"})
_STRINGS = frozenset(
    {"repo_id", "revision", "endpoint", "tokenizer", "engine", "ray_address", "text_field", "id_field"}
)
#: The CLI's spelling of the keywords whose flag is not ``--keyword``.
_FLAGS = {
    "streaming": "--streaming / --no-streaming",
    "progress": "--no-progress, reversed",
    "check_disk": "--skip-disk-check, reversed",
    "special_tokens_as_text": "--special-tokens-as-ids, reversed",
    "source_fractions": "--source-fraction",
    "tokenizer_identifier": "--tokenizer-identifier",
}


def _cli_flag(keyword: str) -> str:
    return _FLAGS.get(keyword, flag(keyword))


def check_types(fn_name: str, kwargs: dict[str, Any], none_ok: Iterable[str]) -> dict[str, Any]:
    """The Python API's keywords checked the way the CLI parses its flags: a value of the wrong
    type (``streaming="no"``, ``data_fraction=True``) is a UsageError naming the keyword and its
    flag, never taken for something else. ``none_ok``: the keywords whose default is None.
    Returns the keywords with numbers as plain ``int`` / ``float`` and ``worker="I/N"`` parsed."""
    from .planner import parse_worker

    kw = dict(kwargs)
    allowed_none = set(none_ok)

    def refuse(k: str, v: Any, what: str) -> UsageError:
        also = " or None" if k in allowed_none else ""
        return UsageError(
            f"bolmo_async.{fn_name}(): {k} must be {what}{also} (the CLI's {_cli_flag(k)}), got {v!r} "
            f"({type(v).__name__})"
        )

    for k, v in kwargs.items():
        if v is None and k in allowed_none:
            continue
        if k in _BOOLS:
            # numpy's too (a config read through pandas); not imported for it: without numpy
            # loaded, no value is one of its bools.
            np = sys.modules.get("numpy")
            if not (isinstance(v, bool) or (np is not None and isinstance(v, np.bool_))):
                raise refuse(k, v, "True or False")
            kw[k] = bool(v)
        elif k in _INTS:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise refuse(k, v, "an integer")
            kw[k] = int(v)
        elif k in _NUMBERS:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise refuse(k, v, "a number")
            kw[k] = float(v)
        elif k in _STRINGS:
            if not isinstance(v, str):
                raise refuse(k, v, "a string")
        elif k == "tokenizer_identifier":
            path = os.fspath(v) if isinstance(v, os.PathLike) else v  # any path object, as str
            if not isinstance(path, str):
                raise refuse(k, v, "a Hub repo id or a path")
            kw[k] = path
        elif k == "worker":
            if isinstance(v, str):
                kw[k] = parse_worker(v)
            elif not (
                isinstance(v, tuple | list)
                and len(v) == 2
                and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v)
                and 0 <= v[0] < v[1]
            ):
                raise UsageError(
                    f"bolmo_async.{fn_name}(): worker takes (I, N) or 'I/N' with 0 <= I < N (share I of N, 0-based, "
                    f"as the CLI's --worker I/N), got {v!r}"
                )
            else:
                kw[k] = (int(v[0]), int(v[1]))
        elif k == "on_plan":
            if not callable(v):
                raise UsageError(f"bolmo_async.{fn_name}(): on_plan must be a function taking the plan, got {v!r}")
        elif k == "selection" and not isinstance(v, Selection):
            raise UsageError(
                f"bolmo_async.{fn_name}(): selection must be a bolmo_async.Selection(...), got {type(v).__name__}; "
                "or pass include=, exclude=, source_depth=, source_fractions=, text_field=, id_field= directly"
            )
    return kw


def check_output_dir(fn_name: str, output_dir: Any) -> None:
    """``output_dir``: a path or a location string (or an OutputDir), as ``--output-dir`` takes."""
    from .outdir import OutputDir

    if not (
        isinstance(output_dir, OutputDir)
        or (isinstance(output_dir, str | os.PathLike) and isinstance(os.fspath(output_dir), str))
    ):
        raise UsageError(
            f"bolmo_async.{fn_name}(): output_dir must be a folder path or a location like s3://BUCKET/PREFIX "
            f"(the CLI's --output-dir), got {output_dir!r} ({type(output_dir).__name__})"
        )


def normalize(fn_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords as the implementation takes them; warnings for options without effect."""
    kw = dict(kwargs)
    if "special_tokens_as_ids" in kw:
        if "special_tokens_as_text" in kw:
            raise TypeError(
                f"bolmo_async.{fn_name}() got both special_tokens_as_ids and special_tokens_as_text: "
                "pass special_tokens_as_ids only"
            )
        kw["special_tokens_as_text"] = not kw.pop("special_tokens_as_ids")
    elif "special_tokens_as_text" in kw:
        warnings.warn(
            "special_tokens_as_text is deprecated: pass special_tokens_as_ids (the CLI's --special-tokens-as-ids), "
            "its reverse",
            DeprecationWarning,
            stacklevel=3,
        )
    ident = kw.get("tokenizer_identifier")
    if isinstance(ident, str | Path):
        kw["tokenizer_identifier"] = absolute_tokenizer_path(str(ident))
        if kw.get("tokenizer") == "subword":
            check_local_tokenizer(str(ident), kw["tokenizer_identifier"])
    if kw.get("tokenizer", "byte") == "byte":
        idle = [k for k, default in SUBWORD_ONLY.items() if k in kw and kw[k] != default]
        if not kw.get("special_tokens_as_text", True):
            idle.append("special_tokens_as_ids")
        if idle:
            log.warning(
                "%s %s no effect with --tokenizer byte (byte ids need no tokenizer); pass --tokenizer subword to use %s",
                ", ".join(flag(k) for k in idle),
                "has" if len(idle) == 1 else "have",
                "it" if len(idle) == 1 else "them",
            )
    bound = kw.get("max_tokens_per_file")
    if isinstance(bound, int) and not isinstance(bound, bool) and bound >= 2:
        warn_short_shards(bound)
    return kw


def check_local_tokenizer(given: str, resolved: str) -> None:
    """What can be told of a local tokenizer before any listing or download: that it exists and
    is a JSON object (the full load, on a thread, races the listing)."""
    if not _looks_local(given):
        return  # a Hub repo id: fetched (and checked) while the repo is listed
    p = Path(resolved)
    if os.path.isdir(p):  # (never raises, whatever the name)
        p = p / "tokenizer.json"
        if not os.path.isfile(p):
            raise UsageError(
                f"--tokenizer-identifier {given}: the folder has no tokenizer.json; point it at a tokenizer.json, "
                "a folder holding one, or a Hub repo id like allenai/dolma2-tokenizer "
                f"(transformers writes one: AutoTokenizer.from_pretrained({given!r}).save_pretrained(DIR))."
            )
    try:
        with open(p, "rb") as f:
            head = f.read(4096).lstrip()
    except FileNotFoundError:
        raise UsageError(
            f"--tokenizer-identifier {given}: no such file or folder ({p}); pass a tokenizer.json, a folder holding "
            "one, or a Hub repo id like allenai/dolma2-tokenizer."
        ) from None
    except OSError as exc:
        raise UsageError(f"--tokenizer-identifier {given}: cannot be read ({exc.strerror or exc}).") from None
    if not head.startswith(b"{"):
        raise UsageError(
            f"--tokenizer-identifier {given}: {p} is not a tokenizers JSON file (a tokenizer.json, as "
            "`tokenizer.save()` writes it, starts with '{')."
        )


def absolute_tokenizer_path(identifier: str) -> str:
    """A tokenizer file or folder as an absolute path (kept in run.json and the manifest);
    a Hub repo id unchanged."""
    return str(Path(identifier).expanduser().resolve()) if _looks_local(identifier) else identifier


def _looks_local(identifier: str) -> bool:
    """A path rather than a Hub repo id (``namespace/name``)."""
    return (
        os.path.exists(os.path.expanduser(identifier))  # (never raises, whatever the name)
        or identifier.startswith((".", "/", "~"))
        or identifier.endswith(".json")
        or identifier.count("/") != 1
    )


def selection_from(fn_name: str, selection: Selection | None, **fields: Any) -> Selection:
    """``selection=`` or the selection keywords given directly (not both)."""
    given = {k: v for k, v in fields.items() if v is not None}
    if selection is not None:
        if given:
            raise TypeError(
                f"bolmo_async.{fn_name}() got selection= and {', '.join(sorted(given))}: pass one or the other"
            )
        return selection
    fractions = given.get("source_fractions") or {}
    try:
        pairs = list(fractions.items() if isinstance(fractions, Mapping) else fractions)
        if not all(len(pair) == 2 for pair in pairs):
            raise TypeError
    except TypeError:
        raise UsageError(
            f"bolmo_async.{fn_name}(): source_fractions takes {{source: fraction}}, e.g. {{'data/finemath': 0.5}} "
            f"(the CLI's --source-fraction SOURCE=F), got {fractions!r}"
        ) from None
    for k, v in pairs:
        if not isinstance(k, str):
            raise UsageError(f"bolmo_async.{fn_name}(): source_fractions' sources must be strings, got {k!r}")
        validate_fraction(v, flag=f"--source-fraction {k}")
    for name in ("include", "exclude"):
        globs = given.get(name)
        if isinstance(globs, str):  # one glob, not its characters
            given[name] = (globs,)
        elif globs is not None:
            listed = tuple(globs) if isinstance(globs, Iterable) else None
            if listed is None or not all(isinstance(g, str) for g in listed):
                raise UsageError(
                    f"bolmo_async.{fn_name}(): {name} takes a list of globs like ['data/stack_edu/*'] (the CLI's "
                    f"--{name}, repeatable), got {globs!r}"
                )
            given[name] = listed
    if given.get("source_depth") is not None:
        check_types(fn_name, {"source_depth": given["source_depth"]}, ())
    for name in ("text_field", "id_field"):
        if name in given:
            check_types(fn_name, {name: given[name]}, ())
    return Selection(
        include=tuple(given.get("include", ())),
        exclude=tuple(given.get("exclude", ())),
        source_depth=given.get("source_depth"),
        source_fractions=tuple(sorted((str(k), float(v)) for k, v in pairs)),
        text_field=given.get("text_field", "text"),
        id_field=given.get("id_field", "id"),
    )


def short_shard_warning(bound: int) -> str | None:
    """The warning for a ``--max-tokens-per-file`` that fixed-length trainers would waste, or None."""
    if bound >= SHORT_SHARD_BOUND:
        return None
    parts = []
    for n in TYPICAL_SEQUENCE_LENGTHS:
        lost = bound % n if bound >= n else bound
        parts.append(f"{lost} ({100 * lost / bound:.0f}%) at {n}")
    return (
        f"--max-tokens-per-file {bound} is small for training: OLMo-core's fixed-length datasets drop the tail of "
        f"every shard shorter than one sequence, so a full shard of {bound} tokens loses, by sequence length, "
        f"{', '.join(parts)}. Use at least {SHORT_SHARD_BOUND} (default {DEFAULT_MAX_TOKENS_PER_FILE}); "
        "`bolmo-async inspect D --sequence-length N` counts what a finished output in D loses."
    )


def warn_short_shards(bound: int) -> None:
    msg = short_shard_warning(bound)
    if msg:
        log.warning("%s", msg)


def fixed_length_loss(shard_tokens: Iterable[int], sequence_length: int) -> dict[str, Any]:
    """What a fixed-length reader at ``sequence_length`` makes of shards of these token counts:
    ``size // sequence_length`` instances per shard, the rest of each shard dropped."""
    tokens = list(shard_tokens)
    instances = sum(t // sequence_length for t in tokens)
    total = sum(tokens)
    dropped = total - instances * sequence_length
    return {
        "sequence_length": sequence_length,
        "instances": instances,
        "tokens": total,
        "dropped_tokens": dropped,
        "dropped_fraction": dropped / total if total else 0.0,
        "shards_dropped_whole": sum(1 for t in tokens if t < sequence_length),
    }


__all__ = [
    "SELECTION_KEYWORDS",
    "TYPICAL_SEQUENCE_LENGTHS",
    "absolute_tokenizer_path",
    "fixed_length_loss",
    "local_copy_command",
    "normalize",
    "plan_flags",
    "selection_from",
    "short_shard_warning",
    "tokenizer_flags",
    "warn_short_shards",
]


def tokenizer_flags(tokenizer: Mapping[str, Any] | None) -> list[str]:
    """The flags that fetch again with the tokenizer a folder was fetched with (``run.json``'s
    ``tokenizer``): without them a fetch asks for the default, ``--tokenizer byte``, which such a
    folder refuses. Empty when nothing was fetched yet (the choice is still the user's)."""
    if not isinstance(tokenizer, Mapping) or tokenizer.get("kind") not in ("byte", "subword"):
        return []
    if tokenizer["kind"] == "byte":
        return ["--tokenizer", "byte"]
    flags = ["--tokenizer", "subword"]
    if tokenizer.get("identifier"):
        flags += ["--tokenizer-identifier", str(tokenizer["identifier"])]
    if isinstance(tokenizer.get("eos_token_id"), int):
        # Always said: whether it was the tokenizer's own EOS or one chosen by --eos-token-id is
        # not recorded, and a fetch without the chosen one is refused (another EOS).
        flags += ["--eos-token-id", str(tokenizer["eos_token_id"])]
    if tokenizer.get("special_tokens_as_text") is False:
        flags.append("--special-tokens-as-ids")
    return flags


def fetched_with(out: Any) -> dict[str, Any] | None:
    """The tokenizer the output folder ``out``'s ``run.json`` says it was fetched with (a share of
    its plan, if one got that far), or None: nothing fetched yet, or unreadable."""
    from .errors import BolmoError
    from .outdir import RUN_STATE

    try:
        said = json.loads(out.read_bytes(RUN_STATE) or b"{}").get("tokenizer")
    except (OSError, BolmoError, ValueError, AttributeError, RecursionError):
        return None
    return said if isinstance(said, dict) else None


def fetch_command(output_dir: Any, endpoint: str | None, tokenizer: Mapping[str, Any] | None = None) -> str:
    """The fetch a user is told to run next for a folder planned against ``endpoint``: with that
    ``--endpoint`` unless it is the Hub's own (without it the fetch would talk to the Hub, which
    does not list a mirror's own repos), and with the ``tokenizer`` flags the folder was fetched
    with (``tokenizer_flags``)."""
    return command("fetch", "--output-dir", output_dir, *endpoint_flags(endpoint), *tokenizer_flags(tokenizer))


def endpoint_flags(endpoint: str | None) -> list[str]:
    """``--endpoint`` for a command a user is told to run, unless it is the Hub's own."""
    from .hub import HUB_ENDPOINT  # (aiohttp: only when a hint is printed)

    return ["--endpoint", endpoint] if endpoint and endpoint.rstrip("/") != HUB_ENDPOINT else []


def plan_missing(output_dir: Any, manifest: bytes | None = None) -> str:
    """What to say of a folder that holds a run's files but no plan.json (removed by hand): a bare
    fetch would plan the defaults; the same options plan the same files and take what is staged.
    ``manifest``: the folder's manifest.json, if a finalize wrote one: the plan it records is
    quoted whole (``plan_flags``), else the user is asked for the options."""
    from .outdir import MANIFEST, PLAN

    said = f"{output_dir} has no {PLAN} (removed?) but holds a run's files: plan it again"
    flags = plan_flags(manifest)
    if flags is None:
        again = command("plan", "--output-dir", output_dir, "--data-fraction", "F")
        return (
            f"{said} with the options it was made with, `{again}` (and --seed, --revision, --repo-id if they were "
            "set; the same plan takes the files already staged), then fetch and finalize"
        )
    again = command("plan", "--output-dir", output_dir, *flags)
    return (
        f"{said} as its {MANIFEST} records it, `{again}` (with the --endpoint it was planned against, if not the "
        "Hub; the same plan takes the files already staged), then fetch and finalize"
    )


def plan_flags(manifest: bytes | None) -> list[str] | None:
    """The plan options a manifest.json records, as the flags that plan the same files (the commit
    as --revision); None when there is none, or it does not record them as a finalize writes them."""
    import json

    try:
        m = json.loads(manifest) if manifest is not None else None
        if not isinstance(m, dict):
            return None
        repo, commit, fraction, seed = m["repo_id"], m["revision"], m["data_fraction"], m["seed"]
        sel = Selection.from_json(m["selection"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UsageError):
        return None
    if not (
        isinstance(repo, str)
        and isinstance(commit, str)
        and isinstance(fraction, int | float)
        and not isinstance(fraction, bool)
        and isinstance(seed, int)
        and not isinstance(seed, bool)
    ):
        return None
    flags = ["--repo-id", repo] if repo != DEFAULT_REPO_ID else []
    flags += ["--revision", commit, "--data-fraction", str(fraction), "--seed", str(seed)]
    return flags + selection_flags(sel)


def selection_flags(sel: Selection) -> list[str]:
    """The flags that select as ``sel`` does (none for the defaults)."""
    flags: list[str] = []
    for g in sel.include:
        flags += ["--include", g]
    for g in sel.exclude:
        flags += ["--exclude", g]
    if sel.source_depth is not None:
        flags += ["--source-depth", str(sel.source_depth)]
    for name, f in sel.source_fractions:
        flags += ["--source-fraction", f"{name}={f}"]
    if sel.text_field != "text":
        flags += ["--text-field", sel.text_field]
    if sel.id_field != "id":
        flags += ["--id-field", sel.id_field]
    return flags


def local_copy_command(url: str) -> str:
    """A shell line that copies a ``data_sources.txt`` on object storage to this folder and points
    ``DATA_SOURCE`` at the copy: bolmo-core's launchers ``open()`` ``DATA_SOURCE`` as a local file
    (the shard URLs listed in it are read from the store)."""
    scheme, _, rest = url.partition("://")
    name = rest.rsplit("/", 1)[-1]  # the copy keeps the object's name (outdir spells it)
    if scheme in ("s3", "r2"):  # R2 through the S3 API, at AWS_ENDPOINT_URL (the AWS CLI reads it too)
        copy = shlex.join(["aws", "s3", "cp", f"s3://{rest}", name])
    elif scheme in ("gs", "gcs"):
        copy = shlex.join(["gcloud", "storage", "cp", f"gs://{rest}", name])
    else:
        copy = f"copy {shlex.quote(url)} to ./{name}"
    return f'{copy} && export DATA_SOURCE="$PWD/{name}"'


def command(*args: Any) -> str:
    """``bolmo-async ARGS`` as a shell line a user can paste: every argument quoted as the shell
    needs (a folder with a space or a ``$`` stays one argument)."""
    return shlex.join(["bolmo-async", *(str(a) for a in args)])


def next_steps(*steps: str) -> str:
    """``Next:`` and the commands to run, one a line (a comment after ``#``), each pasteable as is."""
    return "\n".join(["Next:", *(f"  {s}" for s in steps)])
