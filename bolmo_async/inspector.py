"""Inspect an output folder: shard table, checks against the manifest, documents decoded back."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import StateError
from .guidance import command, plan_missing
from .outdir import DATA_SOURCES, MANIFEST, PLAN, RUN_STATE, TOKENIZER, LocalDir, OutputDir, csv_name, open_output
from .tokenize import decode_bytes
from .util import CHECKSUM

if TYPE_CHECKING:
    from .models import Plan


def _digest(out: OutputDir, name: str, algo: str) -> str | None:
    """The file's checksum of the manifest's kind: XXH3-128, or sha256 (manifests written by
    earlier versions)."""
    if algo == CHECKSUM:
        return out.checksum(name)
    h = hashlib.sha256()
    with out.open_input(name) as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def parse_index(data: bytes) -> list[tuple[int, int, str, str, int]]:
    """Rows ``(start, end, id, src, loc)`` of a shard's ``.csv.gz`` (its bytes)."""
    text = io.TextIOWrapper(io.BytesIO(gzip.decompress(data)), encoding="utf-8", newline="")
    return [(int(r[0]), int(r[1]), r[2], r[3], int(r[4])) for r in csv.reader(text)]


def read_index(csv_path: str | os.PathLike[str]) -> list[tuple[int, int, str, str, int]]:
    """Rows ``(start, end, id, src, loc)`` of a shard's ``.csv.gz`` file on local disk."""
    with open(csv_path, "rb") as f:
        return parse_index(f.read())


def _base(ref: str) -> str:
    """The file name a manifest entry (an absolute path or a URL) names, in whatever folder."""
    return ref.replace(os.sep, "/").rsplit("/", 1)[-1]


def inspect_dir(
    output_dir: str | os.PathLike[str] | OutputDir, *, decode: int = 0, verify: bool = True
) -> dict[str, Any]:
    """Check the output folder ``output_dir`` itself (also a copy or a moved folder): each shard
    the manifest names, looked up in this folder, against its recorded size and checksum;
    ``data_sources.txt`` against the folder. ``problems`` is empty when all is well."""
    out = open_output(output_dir)
    if not out.exists():
        if isinstance(out, LocalDir) and out.root.is_file():  # a shard or data_sources.txt, say
            raise StateError(
                f"{out} is a file, not an output folder: inspect checks the folder that holds it, "
                f"`{command('inspect', out.root.parent)}`."
            )
        raise StateError(f"{out} does not exist or is not a folder: pass the --output-dir of a finished run.")
    # A run writing the folder meanwhile rewrites shards, the manifest and data_sources.txt under
    # this check: what it finds is that run's work in progress, not damage to repair.
    running = out.holder()
    raw = out.read_bytes(MANIFEST)
    if raw is None:
        if running:
            raise StateError(f"{out} has no {MANIFEST} yet: {running} is writing it now; inspect it once that ends.")
        if not out.is_output():
            raise StateError(
                f"{out} is not an output folder of bolmo-async (it has no {PLAN} and no {MANIFEST}): pass the "
                "--output-dir of a run (`bolmo-async prepare --output-dir DIR` makes one)."
            )
        if not out.exists_file(PLAN):
            raise StateError(plan_missing(out) + ".")
        raise StateError(f"{out} has no {MANIFEST}: no finalize has finished here yet; {_what_finishes(out)}.")
    try:
        manifest = json.loads(raw)
        _check_manifest(manifest)
        shards = manifest["shards"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"{out.ref(MANIFEST)} is unreadable ({exc}); run `{command('finalize', '--output-dir', out)}` again."
        ) from exc
    problems: list[str] = []
    rows = []
    refinalize = f"run `{command('finalize', '--output-dir', out)}` (it rewrites what is wrong from the staging)"
    plan = _plan_of(out)
    if running:
        refinalize = f"{running} is writing this folder now: inspect it again once that ends"
    elif plan is not None and out.staging_dropped():
        refinalize = _refetch(out, plan)
    for s in shards:
        name = _base(s["path"])  # this folder's shard, wherever the manifest was written
        index = csv_name(name)
        where = out.ref(name)
        mine: list[str] = []
        size = out.size(name)
        algo = CHECKSUM if CHECKSUM in s else "sha256"
        if size is None:
            mine.append(f"{where} is missing: {refinalize}")
        elif size % 4:
            mine.append(f"{where} is {size} bytes, not a whole number of uint32 tokens (truncated?): {refinalize}")
        elif size != 4 * s["tokens"]:
            mine.append(f"{where} holds {size // 4} tokens, the manifest says {s['tokens']}: {refinalize}")
        elif verify and (algo not in s or _digest(out, name, algo) != s[algo]):
            mine.append(f"{where}: its {algo} checksum differs from the manifest: {refinalize}")
        if not out.exists_file(index):
            mine.append(f"{out.ref(index)} is missing: {refinalize}")
        problems += mine
        rows.append({"path": name, "tokens": s["tokens"], "documents": s["documents"], "ok": not mine})
    expected = [out.ref(_base(s["path"])) for s in shards]
    ds = out.read_text(DATA_SOURCES)
    if ds is None:
        why = "the output is incomplete" if not manifest.get("complete", True) else "it was removed"
        problems.append(f"{out.ref(DATA_SOURCES)} is missing ({why}): {refinalize}")
    else:
        listed = [line for line in ds.splitlines() if line.strip()]
        inside = out.ref("x")[:-1]  # the folder's own prefix, as the trainer is given it
        outside = [line for line in listed if not line.startswith(inside)]
        if outside:
            problems.append(
                f"{DATA_SOURCES} points outside {out} (e.g. {outside[0]}): the folder was moved or copied; "
                f"{refinalize}{'' if running else ' to write it for this place'}"
            )
        elif sorted(listed) != sorted(expected):
            problems.append(f"{DATA_SOURCES} and the manifest list different shards: {refinalize}")
    stale = _earlier_plan(out, manifest, plan, refinalize if running else None)
    if stale:
        problems.append(stale)
    problems += _header_problems(out, manifest, None if stale else plan, refinalize)
    docs: list[dict[str, Any]] = []
    if decode > 0:
        failed = {r["path"] for r in rows if not r["ok"]}  # (said above: their bytes are not the manifest's)
        docs = _decode(out, manifest, decode, failed, problems, refinalize)
    return {"manifest": manifest, "shards": rows, "problems": problems, "documents": docs, "running": running}


def _refetch(out: OutputDir, plan: Plan) -> str:
    """How to remake what is wrong once the staging was dropped (``--drop-staging``): finalize alone
    cannot (it refuses: nothing staged), so the fetch that stages the files again, then finalize."""
    from .guidance import fetch_command, fetched_with

    return (
        f"run `{fetch_command(out, plan.endpoint, fetched_with(out))}` "
        f"then `{command('finalize', '--output-dir', out)}` (its staging was dropped: the fetch stages the files "
        "again, finalize rewrites what is wrong from them)"
    )


def _what_finishes(out: OutputDir) -> str:
    """The next step of an output that was never finalized: the fetch while planned files are not
    staged (a finalize then only refuses), else the finalize."""
    from .guidance import fetch_command, fetched_with
    from .planner import load_plan, missing_shares_said
    from .staging import Staging

    finalize = f"run `{command('finalize', '--output-dir', out)}`"
    try:
        plan = load_plan(out)
        if plan is None:
            return finalize
        staging = Staging(out)
        missing = [pf.path for pf in plan.files if staging.done(pf) is None]
        if not missing:
            return finalize
    except (StateError, OSError, ValueError, AttributeError, RecursionError):
        return finalize
    fetch = fetch_command(out, plan.endpoint, fetched_with(out))
    staged = len(plan.files) - len(missing)
    shares = missing_shares_said(out, plan, missing, fetch)
    if shares is not None:
        return f"{staged} of {len(plan.files)} planned file(s) are staged. {shares}, then finalize"
    return f"{staged} of {len(plan.files)} planned file(s) are staged: run `{fetch}` (or the missing --worker shares), then finalize"


def _check_manifest(m: Any) -> None:
    """ValueError naming what is wrong with a manifest whose JSON parsed (damaged, hand-edited, of
    another program) before any of it is used: a shard entry without a path, or a manifest without
    the facts the report's first line gives, ended inspect in a KeyError (a traceback)."""
    if not isinstance(m, dict):
        raise ValueError("not a JSON object")
    for key, kind in (("repo_id", str), ("revision", str), ("seed", int), ("complete", bool), ("shards", list)):
        if not isinstance(m.get(key), kind):
            raise ValueError(f"no valid {key!r}")
    if not isinstance(m.get("data_fraction"), int | float):
        raise ValueError("no valid 'data_fraction'")
    tok = m.get("tokenizer")
    if not (
        isinstance(tok, dict)
        and isinstance(tok.get("kind"), str)
        and isinstance(tok.get("identifier"), str)
        and type(tok.get("eos_token_id")) is int
    ):
        raise ValueError("no valid 'tokenizer'")
    for i, s in enumerate(m["shards"]):
        if not (
            isinstance(s, dict)
            and isinstance(s.get("path"), str)
            and type(s.get("tokens")) is int
            and type(s.get("documents")) is int
        ):
            raise ValueError(f"shard entry {i} has no valid 'path', 'tokens' and 'documents'")


def _plan_of(out: OutputDir) -> Plan | None:
    """The folder's plan; None when there is none (a copy without ``plan.json``) or it is
    unreadable (the next command's to say)."""
    from .planner import load_plan

    try:
        return load_plan(out)
    except StateError:
        return None


def _earlier_plan(out: OutputDir, manifest: dict[str, Any], plan: Plan | None, advice: str | None = None) -> str | None:
    """A problem when the folder was planned again (another fraction, ``plan`` or ``fetch
    --data-fraction``) after the shards were written: until finalize, they and ``data_sources.txt``
    are the earlier plan's. None when they are this plan's, or when there is no plan to compare
    (a copy without ``plan.json``, a manifest of an earlier version). ``advice`` replaces the
    way to repair it (while a run writes the folder: to wait for it)."""
    if "sources" not in manifest or plan is None:
        return None
    if manifest["sources"] == plan.source_rows() and manifest.get("revision") == plan.commit:
        return None
    then, now = _plan_change(manifest, plan)
    return f"the shards and {DATA_SOURCES} are of an earlier plan ({then}) than {out.ref(PLAN)} (now {now}): " + (
        advice or f"fetch what it lacks, then run `{command('finalize', '--output-dir', out)}` to write this plan's"
    )


def _plan_change(manifest: dict[str, Any], plan: Plan) -> tuple[str, str]:
    """What differs between the plan the shards are of (``manifest``) and ``plan``, as it was and
    as it is: '(--data-fraction 0.5) than plan.json (now 0.5)' named the one that had not changed
    when the --source-fraction had."""
    recorded = manifest.get("selection")
    then_sel: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    now_sel = plan.selection.to_json()

    def fractions(d: Any) -> str:
        return " ".join(f"{k}={v:g}" for k, v in sorted(d.items())) if isinstance(d, dict) and d else "none"

    was: list[str] = []
    isnow: list[str] = []
    if manifest.get("data_fraction") != plan.data_fraction:
        was.append(f"--data-fraction {manifest.get('data_fraction')}")
        isnow.append(f"{plan.data_fraction}")
    if (then_sel.get("source_fractions") or {}) != now_sel["source_fractions"]:
        was.append(f"--source-fraction {fractions(then_sel.get('source_fractions'))}")
        isnow.append(fractions(now_sel["source_fractions"]))
    if manifest.get("revision") != plan.commit:
        was.append(f"revision {manifest.get('revision')}")
        isnow.append(f"{plan.commit}")
    if manifest.get("seed") != plan.seed:
        was.append(f"--seed {manifest.get('seed')}")
        isnow.append(f"{plan.seed}")
    if not was:  # the files it selects (--include, --exclude, --source-depth) or the repo's listing
        return "another selection of files", "its own"
    return "; ".join(was), "; ".join(isnow)


def _header_problems(out: OutputDir, manifest: dict[str, Any], plan: Plan | None, refinalize: str) -> list[str]:
    """The manifest's header fields that disagree with what the folder holds: its totals and
    ``complete`` with its own shard entries and missing files, its plan (``plan``: None when there
    is none, or the shards are of an earlier one) with ``plan.json``, its tokenizer with
    ``run.json``'s. Hand-edited ones, most likely: the shards still match their entries, and the
    report's first line gave the edited fraction, seed or tokenizer as the output's. No shard read."""
    from .models import TOKENIZER_IDENTITY

    said: list[str] = []
    shards = manifest["shards"]
    totals = manifest.get("totals")
    if isinstance(totals, dict):
        if "shards" in totals and totals["shards"] != len(shards):
            said.append(f"totals.shards {json.dumps(totals['shards'])}, where it lists {len(shards)} shard(s)")
        # A document cut across shards has an EOS and an index row per piece: the entries hold
        # as many tokens more than the totals as rows more (none when no document is cut).
        tokens, docs = sum(s["tokens"] for s in shards), sum(s["documents"] for s in shards)
        t, d = totals.get("tokens"), totals.get("documents")
        if type(t) is int and type(d) is int and not (tokens - t == docs - d >= 0):
            said.append(
                f"totals.tokens {t} and totals.documents {d}, where its shard entries hold {tokens} tokens in {docs} "
                "rows (a document cut across shards adds one of each per piece)"
            )
    missing = manifest.get("missing_files")
    if isinstance(missing, list) and manifest["complete"] == bool(missing):
        said.append(f"complete {str(manifest['complete']).lower()}, with {len(missing)} missing file(s) listed")
    if plan is not None:
        for key, want in (
            ("repo_id", plan.repo_id),
            ("data_fraction", plan.data_fraction),
            ("seed", plan.seed),
            ("selection", plan.selection.to_json()),
            ("planned_files", len(plan.files)),
        ):
            if key in manifest and manifest[key] != want:
                said.append(f"{key} {json.dumps(manifest[key])}, where {PLAN} has {json.dumps(want)}")
    from .guidance import fetched_with

    tok = fetched_with(out)
    if tok is not None:
        for key in TOKENIZER_IDENTITY:
            if key in tok and key in manifest["tokenizer"] and manifest["tokenizer"][key] != tok[key]:
                got, want = json.dumps(manifest["tokenizer"].get(key)), json.dumps(tok[key])
                said.append(f"tokenizer {key} {got}, where {RUN_STATE} has {want}")
    return [f"{out.ref(MANIFEST)} says {s} (hand-edited?): {refinalize}" for s in said]


def _decode(
    out: OutputDir, manifest: dict[str, Any], n: int, failed: set[str], problems: list[str], refinalize: str
) -> list[dict[str, Any]]:
    """The first ``n`` documents decoded back to text, from the shards that passed their checks
    (``failed`` are skipped: a truncated one read short and ended inspect with "unexpected
    ValueError" in place of its report); an index that cannot be read is one more problem."""
    tok = manifest["tokenizer"]
    decode_ids: Any
    if tok["kind"] == "byte":
        decode_ids = decode_bytes
    else:
        from tokenizers import Tokenizer

        text = out.read_text(TOKENIZER)
        if text is None:
            return [{"id": "?", "text": f"(cannot decode: {out.ref(TOKENIZER)} is missing)"}]
        hf = Tokenizer.from_str(text)
        decode_ids = lambda ids: hf.decode([int(i) for i in ids], skip_special_tokens=False)  # noqa: E731
    eos = tok["eos_token_id"]
    docs: list[dict[str, Any]] = []
    for s in manifest["shards"]:
        name = _base(s["path"])
        index = out.read_bytes(csv_name(name))
        if index is None or name in failed:
            continue
        try:
            rows = parse_index(index)
            if any(not 0 <= start <= end <= s["tokens"] for start, end, *_ in rows):
                raise ValueError(f"a row lies outside the shard's {s['tokens']} tokens")
        except (OSError, EOFError, ValueError, IndexError, csv.Error, zlib.error) as exc:
            problems.append(f"{out.ref(csv_name(name))} cannot be read ({exc}): {refinalize}")
            continue
        with out.open_input(name) as src:
            for start, end, doc_id, src_path, loc in rows:
                ids = np.frombuffer(src.read_at(4 * (end - start), 4 * start), dtype="<u4")
                if len(ids) and ids[-1] == eos:
                    ids = ids[:-1]
                docs.append({"id": doc_id, "src": src_path, "loc": loc, "tokens": end - start, "text": decode_ids(ids)})
                if len(docs) >= n:
                    return docs
    return docs
