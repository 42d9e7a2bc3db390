"""The deterministic file-level fraction plan.

Files are first selected (``--include`` / ``--exclude`` globs) and grouped into sources (their
first ``--source-depth`` folders; by default the top-level folders holding data). Per source
the plan takes its fraction (``--source-fraction``, else ``--data-fraction``) of the source's
compressed bytes:
files ordered by ``sha256(f"{seed}:{path}")``, whole files in that order while they fit, then
a prefix of the next file (``limit`` compressed bytes, at least one document) to reach the
target. Same listing, fraction and seed -> the same plan; a larger fraction with the same seed
keeps every whole file of the smaller plan (monotone), so staged work is reused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import json
from collections import defaultdict
from typing import Any

from .errors import StateError, UsageError
from .models import Plan, PlannedFile, RepoFile, Selection, SourceSummary, data_suffix, validate_fraction
from .outdir import PLAN, SHARES, OutputDir

#: Rough text bytes per compressed byte, by format, for estimates only.
EXPANSION = {".zst": 3.5, ".gz": 3.0, ".parquet": 2.5}
#: Text bytes per dolma2 token (English web text), for estimates only.
BYTES_PER_SUBWORD = 4.3


def order_key(seed: int, path: str) -> str:
    return hashlib.sha256(f"{seed}:{path}".encode()).hexdigest()


def default_source_depth(files: list[RepoFile]) -> int:
    """The shallowest folder depth at which the data files fall into more than one group (the
    top-level folders holding data: ``data/<source>/...`` gives 2), or the deepest folder."""
    dirs = [f.path.split("/")[:-1] for f in files]
    deepest = max((len(d) for d in dirs), default=0)
    for depth in range(1, deepest + 1):
        if len({tuple(d[:depth]) for d in dirs}) > 1:
            return depth
    return max(1, deepest)


def source_of(path: str, depth: int) -> str:
    """The source (group) of ``path``: its first ``depth`` folders (``"."`` at the repo root)."""
    return "/".join(path.split("/")[:-1][:depth]) or "."


def select(files: list[RepoFile], selection: Selection) -> tuple[list[RepoFile], list[tuple[str, int]]]:
    """The files ``--include`` / ``--exclude`` keep (globs on repo paths), and each pattern's match count."""
    matched: list[tuple[str, int]] = []
    kept = files
    if selection.include:
        hits = {p: {f.path for f in files if fnmatch.fnmatchcase(f.path, p)} for p in selection.include}
        matched += [(f"include {p}", len(h)) for p, h in hits.items()]
        keep = set().union(*hits.values())
        kept = [f for f in kept if f.path in keep]
    for p in selection.exclude:
        gone = {f.path for f in kept if fnmatch.fnmatchcase(f.path, p)}
        matched.append((f"exclude {p}", len(gone)))
        kept = [f for f in kept if f.path not in gone]
    return kept, matched


def source_fractions(sources: list[str], selection: Selection, default: float) -> dict[str, float]:
    """Each source's fraction: ``--source-fraction SOURCE=F`` for a source or any folder prefix of
    it (the longest prefix wins), else ``--data-fraction``. A name that is no source and no
    prefix of one is a usage error listing the sources."""
    out = dict.fromkeys(sources, default)
    best: dict[str, int] = {}
    for name, fraction in selection.source_fractions:
        key = name.strip("/")
        hits = [s for s in sources if s == key or s.startswith(key + "/") or key.startswith(s + "/")]
        if not hits:
            raise UsageError(
                f"--source-fraction {name}: no such source. Sources (at --source-depth): {', '.join(sources)}"
            )
        for s in hits:
            if len(key) >= best.get(s, -1):
                out[s], best[s] = fraction, len(key)
    return out


def make_plan(
    files: list[RepoFile],
    *,
    data_fraction: float,
    seed: int,
    repo_id: str,
    revision: str,
    commit: str,
    listing_digest: str,
    endpoint: str | None = None,
    selection: Selection | None = None,
) -> Plan:
    """Pure function: listing -> plan. ``files`` must be the data files (see ``hub.data_files``)."""
    fraction = validate_fraction(data_fraction)
    selection = selection or Selection()
    files, matched = select(files, selection)
    if not files:
        raise UsageError(
            "--include/--exclude leave no data files: "
            + ", ".join(f"{p} matched {n}" for p, n in matched)
            + ". Check the globs against the repo's paths (e.g. 'data/stack_edu/**')."
        )
    depth = selection.source_depth or default_source_depth(files)
    by_source: dict[str, list[RepoFile]] = defaultdict(list)
    for f in files:
        by_source[source_of(f.path, depth)].append(f)
    fractions = source_fractions(sorted(by_source), selection, fraction)
    planned: list[PlannedFile] = []
    summaries: list[SourceSummary] = []
    for source in sorted(by_source):
        ordered = sorted(by_source[source], key=lambda f: (order_key(seed, f.path), f.path))
        total = sum(f.size for f in ordered)
        share = fractions[source]
        target = total if share >= 1.0 else round(total * share)
        taken: list[PlannedFile] = []
        used = 0
        for f in ordered:
            if used + f.size <= target:
                taken.append(PlannedFile(f.path, source, f.size, f.oid, f.sha256))
                used += f.size
                continue
            remaining = target - used
            if remaining > 0 or not taken:
                limit = max(1, remaining)
                taken.append(PlannedFile(f.path, source, f.size, f.oid, f.sha256, limit=limit))
                used += limit
            break
        planned.extend(taken)
        summaries.append(
            SourceSummary(
                source=source,
                files_total=len(ordered),
                bytes_total=total,
                target_bytes=target,
                files_planned=len(taken),
                bytes_planned=used,
            )
        )
    return Plan(
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        data_fraction=fraction,
        seed=seed,
        files=tuple(planned),
        sources=tuple(summaries),
        listing_digest=listing_digest,
        endpoint=endpoint,
        selection=selection,
        matched=tuple(matched),
    )


def estimate(plan: Plan, whole_prefixes: bool = False) -> dict[str, dict[str, float]]:
    """Per source and in total: files, bytes to download (``PlannedFile.read_bytes``), text bytes,
    tokens (byte, subword), disk."""
    return estimate_files(list(plan.files), whole_prefixes)


def estimate_files(files: list[PlannedFile], whole_prefixes: bool = False) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for f in files:
        suffix = data_suffix(f.path) or ""
        factor = next((v for k, v in EXPANSION.items() if suffix.endswith(k)), 1.0)
        text = f.planned_bytes * factor
        row = rows.setdefault(f.source, {"files": 0, "download_bytes": 0, "text_bytes": 0.0})
        row["files"] += 1
        row["download_bytes"] += f.read_bytes(whole_prefixes)
        row["text_bytes"] += text
    total = {"files": 0.0, "download_bytes": 0.0, "text_bytes": 0.0}
    for row in rows.values():
        row["byte_tokens"] = row["text_bytes"]
        row["subword_tokens"] = row["text_bytes"] / BYTES_PER_SUBWORD
        for k in total:
            total[k] += row[k]
    total["byte_tokens"] = total["text_bytes"]
    total["subword_tokens"] = total["text_bytes"] / BYTES_PER_SUBWORD
    rows["TOTAL"] = total
    return rows


def disk_needed(
    left: list[PlannedFile], kind: str, streaming: bool, shards_for: list[PlannedFile] | None = None
) -> int:
    """Bytes of disk still needed: staging of the files ``left`` to fetch (byte mode stages the
    text, subword uint32 ids), raw downloads when not streaming, and the shards of ``shards_for``
    (uint32 ids; 0 when no shards are written by this run). Rough: compression ratios vary."""

    def tokens(files: list[PlannedFile]) -> float:
        est = estimate_files(files)["TOTAL"]
        return est["byte_tokens"] if kind == "byte" else est["subword_tokens"]

    need = (1 if kind == "byte" else 4) * tokens(left) * 1.1
    if shards_for:
        need += 4 * tokens(shards_for) * 1.1
    if not streaming:  # the downloads are kept whole
        need += sum(f.size for f in left)
    return int(need)


def _digest(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_plan(plan: Plan, out: OutputDir) -> None:
    """The folder's plan, with its own digest: an edited file list, limit or endpoint is noticed."""
    data = plan.to_json()
    data["digest"] = _digest(data)
    out.write_text(PLAN, json.dumps(data, indent=1, sort_keys=True) + "\n")
    if recorded_shares(out, plan) is None:
        # Another plan's share count goes with it (a plan of other files, without --force): left
        # there, each share of the next job array failed its conditional create and wrote its own
        # N over it, so shares of two splits started at once were never told they overlap.
        out.remove(SHARES)


def load_plan(out: OutputDir) -> Plan | None:
    raw = out.read_bytes(PLAN)
    if raw is None:
        return None
    path = out.ref(PLAN)
    try:
        data: Any = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if data.get("digest") != _digest(data):
            raise StateError(
                f"{path} does not match its own digest: it was edited by hand or written by an older version. "
                "Rerun with --force to plan again (staged files of the same plan are fetched again)."
            )
        return Plan.from_json(data)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise StateError(f"{path} is not a readable plan ({exc}); delete it or rerun with --force.") from exc


def _plan_key(plan: Plan) -> str:
    """The planned files, in a digest: a share count recorded for one plan is not another's."""
    return hashlib.sha256("\n".join(f.key for f in plan.files).encode()).hexdigest()[:32]


def recorded_shares(out: OutputDir, plan: Plan) -> int | None:
    """The N of the ``--worker I/N`` shares that fetch ``plan`` in ``out`` (the first share's), if any."""
    try:
        data = json.loads(out.read_bytes(SHARES) or b"null")
        if isinstance(data, dict) and data.get("plan") == _plan_key(plan) and int(data["count"]) >= 1:
            return int(data["count"])
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        pass
    return None


def record_shares(out: OutputDir, plan: Plan, n: int) -> int | None:
    """A share of ``plan`` split in ``n`` starts: the first one records ``n`` (finalize then names
    the shares whose files are missing, not only the files). Returns the count recorded before
    by another split of this plan, if any (its shares overlap this one's and leave files to none)."""
    before = recorded_shares(out, plan)
    if before is None:
        text = json.dumps({"count": n, "plan": _plan_key(plan)}) + "\n"
        if not out.create_bytes(SHARES, text.encode()):  # another share won, or another plan's record
            before = recorded_shares(out, plan)
            if before is None:
                out.write_text(SHARES, text)
    return before if before != n else None


def missing_shares(out: OutputDir, plan: Plan, missing: list[str]) -> tuple[int, dict[int, int]] | None:
    """``(N, {share: missing files})`` for the shares of the recorded split that own ``missing``
    planned paths; None when no share count is recorded for this plan."""
    n = recorded_shares(out, plan)
    if n is None or not missing:
        return None
    owner = _owners(plan, n)
    shares: dict[int, int] = defaultdict(int)
    for path in set(missing):
        if path in owner:
            shares[owner[path]] += 1
    return n, dict(shares)


def missing_shares_said(out: OutputDir, plan: Plan, missing: list[str], fetch: str) -> str | None:
    """The shares to run again, with the command line of the first (``fetch``: the fetch to run,
    without ``--worker``); None when no share count is recorded for this plan."""
    found = missing_shares(out, plan, missing)
    if found is None or not found[1]:
        return None
    n, shares = found
    named = ", ".join(f"{i}/{n} ({k} file(s))" for i, k in sorted(shares.items()))
    first = min(shares)
    return (
        f"They are share{'s' if len(shares) > 1 else ''} {named} of the job array: run `{fetch} --worker {first}/{n}`"
        + (" (and so on for each)" if len(shares) > 1 else "")
        + " again to finish them"
    )


def parse_worker(spec: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (0-based I) -> (I, N); None stays None."""
    if spec is None:
        return None
    i_s, sep, n_s = spec.partition("/")
    try:
        i, n = int(i_s), int(n_s)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        one_based = (
            f": I counts from 0, so an array numbered from 1 (sbatch --array=1-{n}) would never run share 0; "
            f"number it from 0 (--array=0-{n - 1}) or pass $((SLURM_ARRAY_TASK_ID - 1))/$SLURM_ARRAY_TASK_COUNT"
            if sep and i == n >= 1
            else ""
        )
        raise UsageError(
            f"--worker takes I/N with 0 <= I < N (e.g. 0/4 ... 3/4; in a Slurm array: "
            f"--worker $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), got {spec!r}{one_based}"
        )
    return i, n


def _owners(plan: Plan, n: int) -> dict[str, int]:
    """The share (of ``n``) that owns each planned path: greedy largest-first onto the least-loaded
    share (ties: lowest index; files ordered by size, then path). It depends only on the plan and
    ``n``, never on which workers run or when. A file always goes to a share whose index is at
    most the number of files placed before it (every share above has load 0 and a higher index),
    so only the first min(n, files) shares can own any: a heap of those, O(files log files)
    whatever ``n`` (a min() over every share for each file took files x N: minutes and N memory for
    ``--worker 0/1000000000``, in every share, finalize and inspect)."""
    if n < 1:
        raise UsageError("the number of workers must be at least 1")
    heap = [(0, k) for k in range(min(n, len(plan.files)))]  # (load, share): a heap already
    owner: dict[str, int] = {}
    for f in sorted(plan.files, key=lambda f: (-f.planned_bytes, f.path)):
        load, k = heapq.heappop(heap)
        owner[f.path] = k
        heapq.heappush(heap, (load + f.planned_bytes, k))
    return owner


def share_files(plan: Plan, n: int, index: int) -> list[PlannedFile]:
    """The planned files of share ``index`` of ``n`` (``_owners``), in plan order."""
    owner = _owners(plan, n)
    return [f for f in plan.files if owner[f.path] == index]


def assign_workers(plan: Plan, n: int) -> list[list[PlannedFile]]:
    """A stable split of the plan's files into ``n`` shares balanced by bytes (``_owners``); each
    share keeps plan order. (``n`` lists: one share's files alone, ``share_files``.)"""
    owner = _owners(plan, n)
    shares: list[list[PlannedFile]] = [[] for _ in range(n)]
    for f in plan.files:
        shares[owner[f.path]].append(f)
    return shares
