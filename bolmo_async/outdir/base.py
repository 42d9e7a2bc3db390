"""The output folder as an object: every name in it, and every way it is read and written.

The folder is the protocol between the coordinator, its workers, ``--worker I/N`` shares on
other machines, Ray tasks, a later ``finalize`` and ``inspect``. No other module spells one of
its file names or opens a file in it: they ask an ``OutputDir``. Its layout::

    .bolmo-async.lock            held by the run using the folder (a flock; a lease on object storage)
    plan.json                    the plan (PLAN)
    run.json                     the tokenizer of the staged data (RUN_STATE)
    shares.json                  how many --worker shares split the plan (SHARES), for finalize's word
    tokenizer/tokenizer.json     a subword run's tokenizer, for inspect's decoding (TOKENIZER)
    staging/<key>.arrow          a planned file's staged batches   } a unit is done when its
    staging/<key>.json           its completion marker, last        } marker vouches for it
    raw/<digest>/<name>          --no-streaming downloads (local scratch on object storage)
    bolmo_data_00000.npy         the shards (raw uint32) and their dolma-style index
    bolmo_data_00000.csv.gz
    manifest.json                what finalize wrote (MANIFEST)
    data_sources.txt             one shard location per line, last, only for complete output

Backends: ``LocalDir`` (a POSIX folder: temp-then-rename writes, O_DIRECT shards, flock,
O_NOFOLLOW) and ``StoreDir`` (object storage). ``open_output`` picks one from the location.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

PLAN = "plan.json"
RUN_STATE = "run.json"
SHARES = "shares.json"
MANIFEST = "manifest.json"
DATA_SOURCES = "data_sources.txt"
TOKENIZER = "tokenizer/tokenizer.json"
LOCK = ".bolmo-async.lock"
STAGING = "staging"
RAW = "raw"
SHARD_PREFIX = "bolmo_data_"
SHARD_RE = re.compile(rf"^{SHARD_PREFIX}\d{{5,}}\.(npy|csv\.gz)$")
#: The folder's own documents (small, written whole, atomically).
DOCUMENTS = (PLAN, RUN_STATE, SHARES, MANIFEST, DATA_SOURCES, TOKENIZER)
#: The longest name (in UTF-8 bytes) this module makes for one path component: ext4, XFS, btrfs and
#: most others allow 255; room is left for the temporary prefix and suffix.
MAX_NAME_BYTES = 200


def busy_message(location: str, who: str | None, note: str = "") -> str:
    """Why this run cannot take the folder's lock: ``who`` holds it ("shares": `fetch --worker`
    shares of its plan, which run until each has ended; another name or None: another run)."""
    if who == "shares":
        return (
            f"`fetch --worker` shares are running in {location}: this command runs once they have all ended "
            f"(only shares of one plan run together; finalize then names any share to run again).{note}"
        )
    return (
        f"another bolmo-async run{f' ({who})' if who else ''} is using {location}. Wait for it to finish or stop "
        f"it, or use another --output-dir (only --worker shares of one plan may run together).{note}"
    )


def shard_name(i: int) -> str:
    return f"{SHARD_PREFIX}{i:05d}.npy"


def csv_name(shard: str) -> str:
    """The dolma-style index beside a shard: ``.npy`` -> ``.csv.gz``."""
    return shard[: -len(".npy")] + ".csv.gz"


def staged_name(key: str) -> str:
    return f"{STAGING}/{key}.arrow"


def marker_name(key: str) -> str:
    return f"{STAGING}/{key}.json"


def fit_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """``name`` cut to at most ``max_bytes`` of UTF-8, keeping its end (the suffix says what the
    file is) and whole characters."""
    data = name.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return name
    tail = data[-max_bytes:]
    while tail and (tail[0] & 0xC0) == 0x80:  # not in the middle of a character
        tail = tail[1:]
    return tail.decode("utf-8", "surrogatepass")


class NewFile(Protocol):
    """A file being written front to back; invisible under its name until ``commit``.

    ``write`` takes bytes-like objects (page-aligned memory when the file was opened ``direct``);
    ``commit`` puts it in place whole (a rename, or a completed multipart upload) and returns
    its size; ``abort`` removes every trace. Disk full / quota errors arrive as DiskSpaceError.
    """

    name: str

    def write(self, data: Any) -> int: ...

    def flush(self) -> None: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...

    def unlink_early(self) -> None:
        """From any thread, while a write may be in progress: make the file's trace in the folder
        go now (a write going on lands in an unlinked file); ``abort`` still follows."""
        ...


class OutputDir:
    """What every backend offers. Names are relative, POSIX, made by the functions above."""

    #: Where the folder is, as the user wrote it after resolution: an absolute path or a URL.
    location: str
    #: True for a POSIX folder on this machine.
    local: bool = False
    #: Opened by a command that only reads (``inspect``): errors say nothing of resuming.
    read_only: bool = False

    def __str__(self) -> str:
        return self.location

    def __reduce__(self) -> Any:  # workers, shares and Ray tasks rebuild it from its location
        from . import open_output

        return (open_output, (self.location,))

    # -- the folder ----------------------------------------------------------------------
    def create(self) -> None:
        """Make the folder usable for writing (UsageError naming the fix when it cannot be)."""
        raise NotImplementedError

    def exists(self) -> bool:
        raise NotImplementedError

    def check_reachable(self) -> None:
        """For a command that only reads: UsageError naming what to check when the folder's
        storage cannot be reached at all (a local folder always can)."""

    def discard_if_unused(self) -> None:
        """A folder this run made and left holding nothing of its own goes again (a failed first
        command leaves nothing behind)."""

    def lock(self, *, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """One run per folder (``--worker`` shares of one plan share it); StateError when taken."""
        raise NotImplementedError

    def holder(self) -> str | None:
        """Who is writing the folder now ("a bolmo-async run (process 123)", "a job-array share
        (`fetch --worker`, process 456)"), for ``inspect``, which reads it meanwhile; None when no run holds it, or when
        that cannot be told. Only looks: never takes the lock, so no run starting meanwhile is
        refused because of it."""
        return None

    def claim(self, key: str) -> contextlib.AbstractContextManager[bool]:
        """Hold one unit of staging while it is staged: False when another run holds it now."""
        raise NotImplementedError

    def claim_wait_note(self) -> str:
        """Said to a run waiting for a unit another run holds: how long a dead holder can keep it
        (a flock dies with its process: nothing to say)."""
        return ""

    def reset(self) -> None:
        """``--force``: remove everything a run left (plan, state, staging, raw, shards, metadata)."""
        raise NotImplementedError

    def free_bytes(self) -> int | None:
        """Free space for the output (None: unbounded / unknown, e.g. object storage)."""
        raise NotImplementedError

    def is_output(self) -> bool:
        """The folder holds something of this tool's (a plan or a manifest)."""
        return any(self.exists_file(n) for n in (PLAN, MANIFEST, RUN_STATE))

    def remove_temporaries_of(self, pid: int, held: Sequence[str] = ()) -> int:
        """Remove the temporaries a dead writer process ``pid`` of this run left (shards written
        while their file was staged, staged files), and those of the files it held (``held``, their
        keys: a whole download not named after it, ``.KEY.whole``), each only while this process
        can take the file's claim; how many. Object storage: nothing to do (an upload that was not
        completed leaves no object)."""
        return 0

    def others(self) -> list[str]:
        """Names in the folder that no run of this tool writes (the user's own files), sorted;
        [] where listing is not cheap (object storage)."""
        return []

    def others_warning(self, others: list[str]) -> str:
        """What planning into a folder of the user's own files (``others``) tells the user."""
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return (
            f"{self} already holds files of its own ({shown}): this run's files ({PLAN}, {STAGING}/, "
            f"{RAW}/, shards, {DATA_SOURCES}) go beside them; a new --output-dir keeps them apart"
        )

    # -- files -----------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes | None:
        """A whole file, None when absent."""
        raise NotImplementedError

    def read_text(self, name: str) -> str | None:
        data = self.read_bytes(name)
        return None if data is None else data.decode("utf-8")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically: readers see the old file or the whole new one."""
        f = self.new_file(name)
        try:
            f.write(data)
            f.commit()
        except BaseException:
            f.abort()
            raise

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def create_bytes(self, name: str, data: bytes) -> bool:
        """Write ``name`` whole only if nothing stands there (a conditional create: of two runs
        racing, exactly one wins). False when it exists."""
        raise NotImplementedError

    def new_file(self, name: str, *, direct: bool = False) -> NewFile:
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def exists_file(self, name: str) -> bool:
        return self.size(name) is not None

    def remove(self, name: str) -> None:
        """Remove a file; absent is fine."""
        raise NotImplementedError

    def checksum(self, name: str) -> str | None:
        """The file's XXH3-128 (``util.CHECKSUM``), None when absent."""
        raise NotImplementedError

    def open_input(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A pyarrow random-access file of ``name`` (a memory map on local disk)."""
        raise NotImplementedError

    def ref(self, name: str) -> str:
        """What a trainer is given for ``name``: an absolute path, or a URL."""
        raise NotImplementedError

    # -- staging ---------------------------------------------------------------------------
    def clean_temporaries(self, key: str) -> int:
        """Remove what killed runs left for unit ``key`` (only while holding its claim)."""
        raise NotImplementedError

    def staging_bytes(self) -> int:
        raise NotImplementedError

    def remove_staging(self) -> None:
        raise NotImplementedError

    def raw_bytes(self) -> int:
        """Bytes of the whole files ``--no-streaming`` keeps in the folder's ``raw/`` (none where
        they live in a scratch)."""
        return 0

    def staging_dropped(self) -> bool:
        """Nothing at all where the staging goes (``remove_staging`` took it, or none was made):
        not an empty folder, nor a link put in its place (which is never read through)."""
        return self.staging_bytes() == 0

    def scratch(self, key: str) -> Path:
        """A local folder for a unit's whole-file downloads (kept ``--no-streaming`` raw files on
        local disk live in the output folder's ``raw/``; on object storage, in local scratch)."""
        raise NotImplementedError

    def download_path(self, key: str, repo_path: str, *, keep: bool) -> Path:
        """Where a whole-file download of unit ``key`` goes, on local disk: kept (``--no-streaming``:
        named after ``repo_path``, every component fitting the filesystem however long or odd the
        listed path) or a temporary one (a streaming run's parquet), removed once decoded."""
        if not keep:
            return self.scratch(key) / f".{key}.whole"
        return self.scratch(key) / fit_name(repo_path.rsplit("/", 1)[-1])

    def new_local_file(self, path: Path) -> NewFile:
        """A file under ``scratch`` written through a temporary, like ``new_file``."""
        raise NotImplementedError

    # -- shards ----------------------------------------------------------------------------
    def shards(self) -> dict[str, int]:
        """Shard and index files present: name -> size."""
        raise NotImplementedError

    def remove_shards_except(self, keep: set[str]) -> None:
        for name in self.shards():
            if name not in keep:
                self.remove(name)
