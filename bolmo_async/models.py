"""Shared records: what the Hub lists, what the plan takes, what a staged file holds.

Configs and plans are frozen dataclasses validated in ``__post_init__``; records that are
created in bulk are slotted.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UnsafePathError, UsageError

#: Files decoding at once, shared out over the workers (at least one each): one per worker on 2
#: cores (the next files transfer ahead meanwhile, ``--connections``). More only interleaves files
#: on the same core, so they finish together and the shards they complete wait: with two per
#: worker, byte mode's first shard started once most of the text was decoded, and its shards were
#: then written while the disk alone was busy, at the end (the run took CPU time + disk time).
DEFAULT_CONCURRENCY = 2
#: Connections for file bodies at once, the run's total: files in flight, or the Range segments
#: of a large file when few are in flight (``--connections``). 16 fills a link of 16 x a CDN's
#: per-connection cap; lower it to stay under a limit.
DEFAULT_CONNECTIONS = 16
#: Documents (JSON lines, parquet texts) larger than this are skipped and counted.
DEFAULT_MAX_DOCUMENT_BYTES = 64 * 1024 * 1024

DEFAULT_REPO_ID = "allenai/bolmo_mix"
DEFAULT_TOKENIZER_ID = "allenai/dolma2-tokenizer"
DEFAULT_MAX_TOKENS_PER_FILE = 100_000_000
DEFAULT_DATA_FRACTION = 0.01
DEFAULT_SEED = 42
#: The fields of a tokenizer record (run.json's, a manifest's) that make its ids what they are
#: (``api._check_state`` compares these too).
TOKENIZER_IDENTITY = ("kind", "fingerprint", "eos_token_id", "special_tokens_as_text")
#: One document in this many is encoded again by the reference engine (0: never).
DEFAULT_CHECK_EVERY = 1000
#: Subword engines, in the order ``auto`` tries them (tiktoken only on request: see
#: ``tokenize.tiktoken_exact``).
ENGINES = ("auto", "fastokens", "tokenizers", "tiktoken")

#: Suffixes of data files we read, longest first so ".jsonl.zst" wins over ".zst".
DATA_SUFFIXES: tuple[str, ...] = (
    ".jsonl.zst",
    ".json.zst",
    ".jsonl.gz",
    ".json.gz",
    ".jsonl",
    ".json",
    ".parquet",
)


def data_suffix(path: str) -> str | None:
    """The data-file suffix of ``path`` (``".jsonl.zst"`` ...) or None when it is not data."""
    lower = path.lower()
    for suffix in DATA_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


#: NUL and the other control characters: one search (a generator over the characters took
#: 10 us a path, and the coordinator checks each planned path four times).
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def check_repo_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a repo, else raise.

    The Hub's listing is untrusted: refuse ``..``, absolute paths, backslashes, NUL and
    other control characters, empty segments. The result is what we use to build URLs and
    to name local files, so it never escapes the output folder.
    """
    problem = None
    if not path or not isinstance(path, str):
        problem = "it is empty"
    elif _CONTROL.search(path):
        problem = "it holds a control character (NUL, newline, ...)"
    elif "\\" in path:
        problem = "it holds a backslash"
    elif path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        problem = "it is absolute"
    else:
        parts = path.split("/")
        if any(p in ("", ".", "..") for p in parts):
            problem = "it has an empty, '.' or '..' segment"
        elif posixpath.normpath(path) != path:
            problem = "it is not normalised"
    if problem:
        raise UnsafePathError(
            f"The repository listing holds an unsafe path {path!r}: {problem}. "
            "Refusing to use it; check --endpoint / HF_ENDPOINT points at the real Hub or a trusted mirror."
        )
    return path


@dataclass(frozen=True, slots=True)
class RepoFile:
    """One file of the repo listing."""

    path: str
    size: int
    oid: str  # git blob sha1
    sha256: str | None = None  # LFS sha256, when the file is in LFS


def verifies_prefixes(option: bool | None, endpoint: str | None) -> bool:
    """Whether a JSON-lines prefix is read whole, to check the file against the listing's hash,
    or only its own bytes (a prefix cannot be hashed alone). ``option`` None (the default): whole
    over plain http, where nothing but TCP's checksum guards the bytes; only the prefix over
    https (``endpoint`` None: the Hub), where TLS authenticates every byte the Hub's
    content-addressed storage sends."""
    if option is not None:
        return option
    return endpoint is not None and not endpoint.lower().startswith("https://")


def reads_prefixes_whole(option: bool | None, endpoint: str | None, streaming: bool) -> bool:
    """Whether a JSON-lines prefix's whole file is downloaded: to check it (``verifies_prefixes``)
    or to keep it (``--no-streaming``)."""
    return not streaming or verifies_prefixes(option, endpoint)


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """A file the plan takes: whole (``limit is None``) or a prefix of ``limit`` compressed bytes."""

    path: str
    source: str
    size: int
    oid: str
    sha256: str | None
    limit: int | None = None

    @property
    def whole(self) -> bool:
        return self.limit is None

    @property
    def planned_bytes(self) -> int:
        return self.size if self.limit is None else min(self.limit, self.size)

    def read_bytes(self, whole_prefixes: bool) -> int:
        """Bytes a task downloads for this file: a prefix only up to its limit (a JSON-lines one
        past it when no document ends within it, a parquet one whole row groups and the footer),
        or, ``whole_prefixes`` (``verifies_prefixes``, or ``--no-streaming``, which keeps whole
        files), a JSON-lines prefix's whole file. A parquet prefix kept whole: progress follows
        what is really read."""
        if whole_prefixes and self.limit is not None and not self.path.lower().endswith(".parquet"):
            return self.size
        return self.planned_bytes

    @property
    def key(self) -> str:
        """Stable name of this unit of work in ``staging/`` (path digest + limit)."""
        import hashlib

        digest = hashlib.sha256(self.path.encode("utf-8")).hexdigest()[:20]
        return digest if self.limit is None else f"{digest}-p{self.limit}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlannedFile:
        return cls(
            path=check_repo_path(d["path"]),
            source=d["source"],
            size=int(d["size"]),
            oid=d["oid"],
            sha256=d.get("sha256"),
            limit=None if d.get("limit") is None else int(d["limit"]),
        )


@dataclass(frozen=True, slots=True)
class SourceSummary:
    source: str
    files_total: int
    bytes_total: int
    target_bytes: int
    files_planned: int
    bytes_planned: int


@dataclass(frozen=True)
class Selection:
    """What a plan takes from a listing, besides the fraction: which files (``include`` /
    ``exclude`` globs on repo paths), how files group into sources (``source_depth`` folders;
    None: the top-level folders holding data), per-source fractions, and the record fields."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    source_depth: int | None = None
    source_fractions: tuple[tuple[str, float], ...] = ()
    text_field: str = "text"
    id_field: str = "id"

    def __post_init__(self) -> None:
        for globs, flag in ((self.include, "--include"), (self.exclude, "--exclude")):
            if not isinstance(globs, tuple | list) or not all(isinstance(g, str) for g in globs):
                raise UsageError(f"{flag} takes a tuple of globs like ('data/stack_edu/*',), got {globs!r}")
        if self.source_depth is not None and (
            isinstance(self.source_depth, bool) or not isinstance(self.source_depth, int)
        ):
            raise UsageError(f"--source-depth must be an integer, got {self.source_depth!r}")
        if self.source_depth is not None and self.source_depth < 1:
            raise UsageError(f"--source-depth must be 1 or more, got {self.source_depth}")
        seen: dict[str, Any] = {}
        for name, fraction in self.source_fractions:
            if not name or name.startswith("/"):
                raise UsageError(f"--source-fraction takes SOURCE=F with a source folder, got {name!r}")
            validate_fraction(fraction, flag=f"--source-fraction {name}")
            key = name.strip("/")
            if key in seen and seen[key] != fraction:
                raise UsageError(
                    f"--source-fraction {key} is given twice ({seen[key]:g} and {fraction:g}): give each source once."
                )
            seen[key] = fraction
        for field_name, flag in ((self.text_field, "--text-field"), (self.id_field, "--id-field")):
            if not field_name or not isinstance(field_name, str):
                raise UsageError(f"{flag} must be a field name, got {field_name!r}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["source_fractions"] = dict(self.source_fractions)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Selection:
        d = d or {}
        return cls(
            include=tuple(d.get("include", ())),
            exclude=tuple(d.get("exclude", ())),
            source_depth=d.get("source_depth"),
            source_fractions=tuple(sorted((str(k), float(v)) for k, v in (d.get("source_fractions") or {}).items())),
            text_field=d.get("text_field", "text"),
            id_field=d.get("id_field", "id"),
        )

    def without_fractions(self) -> Selection:
        """What must match for two plans to share staged files (fractions may grow)."""
        return Selection(self.include, self.exclude, self.source_depth, (), self.text_field, self.id_field)


@dataclass(frozen=True)
class Plan:
    repo_id: str
    revision: str
    commit: str
    data_fraction: float
    seed: int
    files: tuple[PlannedFile, ...]
    sources: tuple[SourceSummary, ...]
    listing_digest: str
    repo_type: str = "dataset"
    endpoint: str | None = None
    version: int = 1
    selection: Selection = field(default_factory=Selection)
    matched: tuple[tuple[str, int], ...] = ()  # (include/exclude pattern, files it matched)

    def __post_init__(self) -> None:
        validate_fraction(self.data_fraction)

    @property
    def planned_bytes(self) -> int:
        return sum(f.planned_bytes for f in self.files)

    def source_rows(self) -> list[dict[str, Any]]:
        """The manifest's ``sources``: per source, the files and bytes planned (``inspect`` reads
        a manifest whose rows differ from its folder's plan as one of an earlier plan)."""
        return [{"source": s.source, "files": s.files_planned, "bytes": s.bytes_planned} for s in self.sources]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": self.endpoint,
            "data_fraction": self.data_fraction,
            "seed": self.seed,
            "listing_digest": self.listing_digest,
            "sources": [asdict(s) for s in self.sources],
            "files": [f.to_json() for f in self.files],
            "selection": self.selection.to_json(),
            "matched": [list(m) for m in self.matched],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        return cls(
            version=int(d.get("version", 1)),
            repo_id=d["repo_id"],
            repo_type=d.get("repo_type", "dataset"),
            revision=d["revision"],
            commit=d["commit"],
            endpoint=d.get("endpoint"),
            data_fraction=float(d["data_fraction"]),
            seed=int(d["seed"]),
            listing_digest=d["listing_digest"],
            sources=tuple(SourceSummary(**s) for s in d["sources"]),
            files=tuple(PlannedFile.from_json(f) for f in d["files"]),
            selection=Selection.from_json(d.get("selection")),
            matched=tuple((str(p), int(n)) for p, n in d.get("matched", [])),
        )


def validate_fraction(fraction: float, flag: str = "--data-fraction") -> float:
    if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) <= 1.0):
        raise UsageError(f"{flag} must be in (0, 1], got {fraction!r}: use e.g. 0.001 for 0.1% or 1.0 for all.")
    return float(fraction)


def tokenizer_fingerprint(json_text: str) -> str:
    """``TokenizerInfo.fingerprint`` of a subword tokenizer's JSON (run.json and the manifest
    record it; the folder's and the cache's copies are matched by it offline)."""
    return hashlib.sha256(json_text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about the tokenizer used."""

    kind: str  # "byte" | "subword"
    identifier: str
    eos_token_id: int
    vocab_size: int
    fingerprint: str
    engine: str = ""
    special_tokens_as_text: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class SkipCounter:
    """Documents skipped, by reason, with the first few examples (file:line)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    def merge(self, other: SkipCounter | dict[str, Any]) -> None:
        counts = other.counts if isinstance(other, SkipCounter) else other.get("counts", {})
        examples = other.examples if isinstance(other, SkipCounter) else other.get("examples", {})
        for reason, n in counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
        for reason, ex in examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: max(0, self.max_examples - len(mine))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}
